"""What the cache holds, model by model: listing, details, and deletion that keeps shared blobs.

The files are the truth: a model is a manifest under ``manifests/<host>/<ns>/<model>/<tag>`` whose
blobs are all present.  A tag fetched before its blobs waits in ``.mirror/staged/`` (same layout) and
moves into ``manifests/`` when its last blob arrives, so that the cache is always a models directory
Ollama can run every model of.  Everything here walks or reads the disk, so it runs in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..names import InvalidName, ModelName
from .store import Store, manifest_blobs, prune_empty_dirs


@dataclass(frozen=True)
class CachedModel:
    name: ModelName
    manifest: bytes
    modified: float  # the manifest file's mtime, as Ollama reports it
    blobs: tuple[tuple[str, int], ...]  # (hex digest, size) of the config and every layer
    missing: tuple[str, ...]  # hex digests of blobs not (yet) in the cache
    path: str = ""  # the manifest's file
    staged: bool = False  # waiting in the work area for its blobs (Ollama does not see it)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def size(self) -> int:
        return sum(size for _, size in self.blobs)

    @property
    def digest(self) -> str:
        """The hex sha256 of the manifest bytes: what ``ollama list`` shows as ID."""
        return hashlib.sha256(self.manifest).hexdigest()

    @property
    def modified_at(self) -> str:
        return datetime.fromtimestamp(self.modified, tz=UTC).isoformat()

    def layers(self) -> list[dict[str, Any]]:
        try:
            layers = json.loads(self.manifest).get("layers", [])
        except ValueError:
            return []
        return [layer for layer in layers if isinstance(layer, dict)]

    def config_digest(self) -> str | None:
        try:
            digest = json.loads(self.manifest)["config"]["digest"]
        except (ValueError, KeyError, TypeError):
            return None
        return digest[7:] if isinstance(digest, str) and digest.startswith("sha256:") else None


class Catalog:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _manifest_paths(self, root: str) -> Iterator[tuple[ModelName, str]]:
        """Every well-formed ``<root>/<host>/<ns>/<model>/<tag>`` file (others are ignored)."""
        for host in _entries(root):
            for namespace in _entries(os.path.join(root, host)):
                for model in _entries(os.path.join(root, host, namespace)):
                    directory = os.path.join(root, host, namespace, model)
                    for tag in _entries(directory):
                        path = os.path.join(directory, tag)
                        try:
                            name = ModelName(host, namespace, model, tag)
                        except InvalidName:
                            continue  # temporary files and strays
                        if os.path.isfile(path):
                            yield name, path

    def _load(self, name: ModelName, path: str, staged: bool = False) -> CachedModel | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
            modified = os.stat(path).st_mtime
        except OSError:
            return None
        blobs = tuple(
            (digest[7:], size) for digest, size in manifest_blobs(data) if digest.startswith("sha256:")
        )
        if not blobs:
            return None  # not a manifest we can read: not a model
        missing = tuple(hexdigest for hexdigest, _ in blobs if self.store.blob_size(hexdigest) is None)
        return CachedModel(name, data, modified, blobs, missing, path, staged)

    def models(self, complete_only: bool = True) -> list[CachedModel]:
        """Cached models, newest first (as ``/api/tags`` lists them); with *complete_only* false, also
        the tags waiting for their blobs (staged), where no published manifest has the same name."""
        found = {
            name: m
            for name, path in self._manifest_paths(self.store.manifests_dir)
            if (m := self._load(name, path)) is not None
        }
        if complete_only:
            return sorted((m for m in found.values() if m.complete), key=lambda m: m.modified, reverse=True)
        for name, path in self._manifest_paths(self.store.staged_dir):
            if name not in found and (m := self._load(name, path, staged=True)) is not None:
                found[name] = m
        return sorted(found.values(), key=lambda m: m.modified, reverse=True)

    def staged(self) -> list[ModelName]:
        """The tags waiting in the work area for their blobs."""
        return [name for name, _ in self._manifest_paths(self.store.staged_dir)]

    def promote(self, hexdigest: str | None = None) -> list[ModelName]:
        """(thread) Staged tags whose blobs are all cached now move into ``manifests/`` (only those that
        list *hexdigest*, when given: the blob that just arrived); the tags that moved."""
        moved = []
        for name, path in self._manifest_paths(self.store.staged_dir):
            if hexdigest is not None:
                try:
                    with open(path, "rb") as f:
                        if hexdigest.encode() not in f.read():
                            continue
                except OSError:
                    continue
            if self.store.promote_manifest(name):
                moved.append(name)
        return moved

    def find(self, name: ModelName) -> CachedModel | None:
        model = self._load(name, self.store.manifest_path(name))
        return model if model is not None and model.complete else None

    def read_blob_text(self, hexdigest: str, limit: int = 1 << 20) -> str:
        """A small text layer (template, license, system, params), decoded leniently."""
        with open(self.store.blob_path(hexdigest), "rb") as f:
            return f.read(limit).decode("utf-8", "replace")

    def config(self, model: CachedModel) -> dict[str, Any]:
        digest = model.config_digest()
        if digest is None:
            return {}
        try:
            document = json.loads(self.read_blob_text(digest))
        except (OSError, ValueError):
            return {}
        return document if isinstance(document, dict) else {}

    def delete(self, name: ModelName, keep: frozenset[str] = frozenset()) -> list[str] | None:
        """Remove a model's manifest and the blobs no other model uses; ``None`` if it is not cached.

        *keep* holds hex digests that must stay (blobs being downloaded).  Returns the removed ones.
        """
        published = self._load(name, self.store.manifest_path(name))
        staged = self._load(name, self.store.staged_manifest_path(name), staged=True)
        if published is None and staged is None:
            return None
        blobs: dict[str, int] = {}
        for model in (published, staged):
            if model is not None:
                os.unlink(model.path)
                root = self.store.staged_dir if model.staged else self.store.manifests_dir
                prune_empty_dirs(os.path.dirname(model.path), root)
                blobs.update(model.blobs)
        still_used = {hexdigest for m in self.models(complete_only=False) for hexdigest, _ in m.blobs}
        removed = []
        for hexdigest in blobs:
            if hexdigest in still_used or hexdigest in keep:
                continue
            try:
                os.unlink(self.store.blob_path(hexdigest))
                removed.append(hexdigest)
            except FileNotFoundError:
                pass
        return removed


def _entries(directory: str) -> list[str]:
    try:
        return sorted(entry for entry in os.listdir(directory) if not entry.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
