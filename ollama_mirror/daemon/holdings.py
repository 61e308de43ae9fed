"""What the mirror holds, or is already fetching: requests it can answer without new upstream work.

The rate limit charges a request only when it sends the mirror upstream (see
:mod:`ollama_mirror.security.access`): a fleet behind one address that pulls what the mirror holds, or
what one of its members is already pulling, costs nothing, however many requests its pulls make.
"""

from __future__ import annotations

import os

from ..cache.manifests import ManifestCache
from ..cache.store import Store
from ..fill.manager import FillManager
from ..names import ModelName


class CacheHoldings:
    def __init__(self, store: Store, manifests: ManifestCache, fills: FillManager) -> None:
        self._store = store
        self._manifests = manifests
        self._fills = fills

    def has_tag(self, name: ModelName) -> bool:
        """The tag's manifest is fresh in the cache, or being fetched for another request."""
        return self._manifests.in_hand(name)

    def has_blob(self, hexdigest: str) -> bool:
        """The blob is cached or being downloaded, or a manifest the mirror served lists it (its
        download is part of a pull already counted by that manifest)."""
        return (
            hexdigest in self._manifests.blob_sizes
            or self._fills.active(hexdigest) is not None
            or self._store.blob_size(hexdigest) is not None
        )

    def has_manifest(self, hexdigest: str) -> bool:
        """A manifest asked for by digest is in the cache (digests never need revalidation)."""
        return os.path.exists(self._store.digest_manifest_path(hexdigest))
