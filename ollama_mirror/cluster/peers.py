"""Node to node: a node reads a blob another node is downloading, over that node's own registry route.

The node that holds a blob's lease (:mod:`.leases`) downloads it from the upstream; every other node
asked for it reads it from the holder, with ranged GETs on the holder's ``/v2/<repo>/blobs/<digest>``
route, which serves the bytes of a download in progress as they arrive (and the published blob after).
So the bytes cross the internet once for the whole cluster, and a follower's clients get them while the
holder's download runs.  The follower's own download machinery does the rest: ranges, retries, resume,
and the sha256 before anything is published.

Those requests carry a signature (``X-Mirror-Peer``: the node, the time, an HMAC of both and of the
request line with ``security.signing_secret``, the same on every node), which lets them past the
holder's API keys, registry access rules and rate limit; a signature older than a minute is refused.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest, IResponse

from ..upstream.client import NETWORK_ERRORS, discard
from ..upstream.errors import UpstreamError

PEER_HEADER = b"x-mirror-peer"
MAX_SKEW = 60.0  # seconds a signature stays good (clocks of the nodes may differ a little)


class PeerSigner:
    """Signs this node's requests to other nodes, and checks theirs (one secret for the cluster)."""

    def __init__(self, secret: bytes, node: str, clock: IReactorTime) -> None:
        self._secret = secret
        self.node = node
        self._clock = clock

    def _mac(self, node: str, when: str, method: str, path: str) -> str:
        text = f"peer\n{node}\n{when}\n{method}\n{path}".encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str) -> bytes:
        when = str(int(self._clock.seconds()))
        return f"{self.node} {when} {self._mac(self.node, when, method, path)}".encode()

    def verify(self, request: IRequest) -> str | None:
        """The URL of the node that sent *request*, if it carries a good signature; else ``None``."""
        values = request.requestHeaders.getRawHeaders(PEER_HEADER)  # type: ignore[attr-defined]
        if not values:
            return None
        try:
            node, when, mac = values[0].decode("ascii").split(" ")
            age = abs(self._clock.seconds() - int(when))
        except (UnicodeDecodeError, ValueError):
            return None
        method = request.method.decode("latin-1")
        path = request.uri.decode("latin-1")
        good = hmac.compare_digest(mac.encode(), self._mac(node, when, method, path).encode())
        return node if good and age <= MAX_SKEW else None


class PeerSource:
    """A :class:`~ollama_mirror.cache.blobs.BlobSource` that reads from another node's registry route."""

    def __init__(self, agent: IAgent, signer: PeerSigner, node: str) -> None:
        self._agent = agent
        self._signer = signer
        self.node = node.rstrip("/")

    async def open_range(self, repository: str, digest: str, start: int, end: int | None) -> IResponse:
        path = f"/v2/{repository}/blobs/{digest}"
        rng = f"bytes={start}-{'' if end is None else end}"
        headers = Headers({b"range": [rng.encode()], PEER_HEADER: [self._signer.sign("GET", path)]})
        try:
            response = await self._agent.request(b"GET", (self.node + path).encode(), headers, None)
        except NETWORK_ERRORS as e:
            raise UpstreamError(f"node {self.node} did not answer: {e}", kind="connection") from None
        if response.code in (200, 206):
            return response
        await discard(response)
        raise UpstreamError(f"node {self.node} answered {response.code} for {digest} {rng}", response.code)

    async def answers(self) -> bool:
        """Whether the node answers at all (``HEAD /``): a holder that does is alive."""
        try:
            response = await self._agent.request(b"HEAD", (self.node + "/").encode(), Headers(), None)
        except NETWORK_ERRORS:
            return False
        await discard(response)
        return True
