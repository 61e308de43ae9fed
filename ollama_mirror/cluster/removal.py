"""Removing a model from the whole cluster, not from one node: ``ollama-mirror rm`` and ``/api/delete``.

A model removed on one node only would come back: another node still serves its copy, and any node
reads the tag again from the shared storage.  So the node asked removes the tag from its own cache, from
the shared storage (the manifest: the blobs no tag references then go with the next sweep of the shared
copy), and asks every other live node to forget it, with a signed node-to-node request
(``DELETE /mirror/cluster/models/<name>``, which only nodes may send).  A node that does not answer keeps
its copy until its own eviction (it is told in the log).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import quote

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest

from ..names import ModelName
from ..upstream.client import NETWORK_ERRORS, discard
from ..upstream.errors import UpstreamError
from .members import Membership
from .peers import PEER_HEADER, PeerSigner
from .shared import SharedStore

log = Logger(namespace="ollama_mirror.cluster")

FORGET_PATH = "/mirror/cluster/models/"


class ClusterRemoval:
    def __init__(
        self,
        shared: SharedStore,
        delete_here: Callable[[ModelName], Awaitable[list[str] | None]],
        membership: Membership | None = None,
        agent: IAgent | None = None,
        signer: PeerSigner | None = None,
    ) -> None:
        """*delete_here* removes a model from this node's cache (the sweeper's); with *membership*,
        *agent* and *signer* (a cluster with Redis) the other live nodes are told too."""
        self._shared = shared
        self._delete_here = delete_here
        self._membership = membership
        self._agent = agent
        self._signer = signer

    async def delete(self, name: ModelName) -> list[str] | None:
        """Remove *name* everywhere: this node's removed blobs (``[]`` when only the shared copy had
        it), or ``None`` when neither had it."""
        removed = await self._delete_here(name)
        try:
            shared = await self._shared.remove_manifest(name)
        except UpstreamError as e:  # (removed here all the same; said, since another node may bring it back)
            log.warn(
                "could not remove {name} from the shared storage: {reason}", name=str(name), reason=e.message
            )
            shared = False
        await self._tell_the_others(name)
        if removed is None and shared:
            return []
        return removed

    async def forget(self, name: ModelName) -> list[str] | None:
        """What another node asks: remove *name* from this node's cache alone."""
        return await self._delete_here(name)

    def from_a_node(self, request: IRequest) -> bool:
        """Whether *request* carries another node's good signature."""
        return self._signer is not None and self._signer.verify(request) is not None

    async def _tell_the_others(self, name: ModelName) -> None:
        if self._membership is None or self._agent is None or self._signer is None:
            return
        others = [node["url"] for node in self._membership.nodes if not node.get("self")]
        if others:
            await DeferredList([Deferred.fromCoroutine(self._tell(url, name)) for url in others])

    async def _tell(self, node: str, name: ModelName) -> None:
        assert self._agent is not None and self._signer is not None
        path = FORGET_PATH + quote(str(name), safe="/:")
        headers = Headers({PEER_HEADER: [self._signer.sign("DELETE", path)]})
        try:
            response = await self._agent.request(b"DELETE", (node.rstrip("/") + path).encode(), headers, None)
            await discard(response)
        except NETWORK_ERRORS as e:
            log.warn("node {node} was not told to forget {name}: {error}", node=node, name=str(name), error=e)
            return
        if response.code != 200:
            log.warn(
                "node {node} answered {code} when told to forget {name}",
                node=node,
                code=response.code,
                name=str(name),
            )
