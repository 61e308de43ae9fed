"""Where a private model's blob may come from when this node lacks it: a cluster's shared storage, never
an upstream (the fallback of its download is this source, which has nothing)."""

from __future__ import annotations

from twisted.web.iweb import IResponse

from ..upstream.errors import UpstreamError


class NoUpstream:
    """A :class:`~ollama_mirror.cache.blobs.BlobSource` for private models: every read is "not found"."""

    async def open_range(self, repository: str, digest: str, start: int, end: int | None) -> IResponse:
        raise UpstreamError(
            f"blob {digest} of the private model {repository} is not on this mirror (private models are "
            "never asked of an upstream)",
            404,
            lasting=True,
        )
