"""Bundles: models carried between caches as one tar file (air-gapped sites, backups).

A bundle is a plain tar holding, in this order::

    index.json                                 what follows: models, manifest and blob digests, sizes
    manifests/<host>/<namespace>/<model>/<tag> the manifest bytes, verbatim
    blobs/sha256-<hex>                         every blob the manifests reference, once

so it is also an Ollama models directory (``tar -xf bundle.tar -C ~/.ollama/models`` works).

Export streams each blob from the cache through the tar writer in bounded pieces, hashing it on the
way so that a blob rotted on disk is never shipped.  Import never trusts the bundle: every member
name is checked against the two layouts above (no ``..``, no absolute path, no link, no device)
before it becomes a path, every blob is hashed while it streams into a staging file under
``.mirror/partial/``, and every manifest is checked against the index.  Only when all of it is
verified are the blobs published (atomic renames into ``blobs/``) and then the manifests (atomic
writes), so a model appears in the cache complete or not at all, even to a daemon serving the
cache meanwhile.  An import that fails or is interrupted removes its staging files; if the process
is killed, the daemon's sweeper removes them (temporary files of ``.mirror/partial/``, which it leaves
alone while their import runs: :class:`StagingLock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from .. import __version__
from ..names import InvalidName, ModelName, parse_digest
from ..units import human_size
from .catalog import Catalog
from .lock import StagingLock
from .space import free_bytes
from .store import Store, _fsync_dir, manifest_blobs

FORMAT = "ollama-mirror-bundle"
VERSION = 1
INDEX_NAME = "index.json"
MAX_INDEX_BYTES = 16 * 2**20
MAX_MANIFEST_BYTES = 4 * 2**20
PIECE = 2**20  # bytes read and written at a time: memory never grows with blob size
_BLOB_MEMBER = re.compile(r"sha256-([0-9a-f]{64})")


class BundleError(Exception):
    """The bundle cannot be written or read; the message says why, in one line."""


@dataclass(frozen=True)
class BundleModel:
    name: ModelName
    manifest_hex: str
    blobs: tuple[str, ...]  # hex digests of the config and layers
    size: int


@dataclass
class BundleIndex:
    models: list[BundleModel]
    blobs: dict[str, int]  # hex digest -> size

    def document(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "created": datetime.now(tz=UTC).isoformat(timespec="seconds"),
            "creator": f"ollama-mirror {__version__}",
            "models": [
                {
                    "name": str(m.name),
                    "manifest": "sha256:" + m.manifest_hex,
                    "blobs": ["sha256:" + b for b in m.blobs],
                    "size": m.size,
                }
                for m in self.models
            ],
            "blobs": [{"digest": "sha256:" + h, "size": s} for h, s in self.blobs.items()],
        }

    @classmethod
    def parse(cls, data: bytes) -> BundleIndex:
        """Read and check an index; anything unexpected is a :class:`BundleError`."""
        try:
            document = json.loads(data)
            if not isinstance(document, dict) or document.get("format") != FORMAT:
                raise BundleError("not an ollama-mirror bundle (index.json has another format)")
            if document.get("version") != VERSION:
                raise BundleError(f"bundle format version {document.get('version')!r} is not supported")
            blobs: dict[str, int] = {}
            for entry in document["blobs"]:
                size = entry["size"]
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise BundleError(f"index.json: bad size for {entry['digest']!r}")
                blobs[parse_digest(entry["digest"])] = size
            models = []
            for entry in document["models"]:
                refs = tuple(parse_digest(d) for d in entry["blobs"])
                if not refs or any(r not in blobs for r in refs):
                    raise BundleError(f"index.json: model {entry['name']!r} refers to blobs it does not list")
                models.append(
                    BundleModel(
                        ModelName.parse(entry["name"]),
                        parse_digest(entry["manifest"]),
                        refs,
                        sum(blobs[r] for r in set(refs)),
                    )
                )
        except InvalidName as e:
            raise BundleError(f"index.json: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise BundleError(f"index.json is damaged ({type(e).__name__}: {e})") from None
        if len({m.name for m in models}) != len(models):
            raise BundleError("index.json lists a model twice")
        return cls(models, blobs)


# --- export ----------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    models: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0


class _Export:
    """What goes in: the manifests' bytes, and open descriptors of the blobs (a sweep that removes one
    meanwhile cannot take its data away)."""

    def __init__(self) -> None:
        self.index = BundleIndex([], {})
        self.manifests: dict[ModelName, bytes] = {}
        self.fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def _plan_export(store: Store, names: Iterable[ModelName]) -> _Export:
    catalog = Catalog(store)
    plan = _Export()
    try:
        for name in names:
            if name in plan.manifests:
                continue
            model = catalog.find(name)
            if model is None:
                raise BundleError(f"model {name.display()} is not in the cache {store.root} (or incomplete)")
            refs = tuple(hexdigest for hexdigest, _ in model.blobs)
            for hexdigest, size in model.blobs:
                if hexdigest in plan.fds:
                    continue
                try:
                    fd = os.open(store.blob_path(hexdigest), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise BundleError(f"blob sha256:{hexdigest} of {name.display()} left the cache") from None
                plan.fds[hexdigest] = fd
                if os.fstat(fd).st_size != size:
                    raise BundleError(f"blob sha256:{hexdigest} in the cache is not {size} bytes long")
                plan.index.blobs[hexdigest] = size
            plan.manifests[name] = model.manifest
            plan.index.models.append(BundleModel(name, model.digest, refs, model.size))
    except BaseException:
        plan.close()
        raise
    return plan


class TransferProgress(Protocol):
    """How a bundle's blobs are reported as they go (the command's progress bars)."""

    def start(self, label: str, total: int) -> None: ...

    def update(self, done: int) -> None: ...

    def finish(self, note: str = "done") -> None: ...


def cached_model_names(store: Store) -> list[ModelName]:
    """Every complete model of the cache (``export --all``)."""
    return sorted(m.name for m in Catalog(store).models())


def export_bundle(
    store: Store, names: Iterable[ModelName], out: IO[bytes], progress: TransferProgress
) -> ExportReport:
    """Write a bundle of *names* from *store* to *out* (a file or a pipe: written strictly in order)."""
    plan = _plan_export(store, names)
    report = ExportReport()
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = PIECE  # type: ignore[attr-defined]  # blobs go through in pieces this size
            _add_bytes(tar, INDEX_NAME, json.dumps(plan.index.document(), indent=1).encode() + b"\n")
            for name, data in plan.manifests.items():
                _add_bytes(tar, f"manifests/{name.host}/{name.namespace}/{name.model}/{name.tag}", data)
                report.models.append(name.display())
            for hexdigest, size in plan.index.blobs.items():
                progress.start(f"sha256:{hexdigest[:12]}", size)
                reader = _HashingReader(plan.fds[hexdigest], progress)
                tar.addfile(_member(f"blobs/sha256-{hexdigest}", size), reader)
                if reader.sha.hexdigest() != hexdigest or reader.count != size:
                    raise BundleError(
                        f"blob sha256:{hexdigest} in the cache does not match its digest (damaged on disk); "
                        "remove the model and pull it again"
                    )
                progress.finish()
                report.blobs += 1
                report.bytes += size
    except OSError as e:
        raise BundleError(f"cannot write the bundle: {e.strerror or e}") from None
    finally:
        plan.close()
    return report


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    info.type = tarfile.REGTYPE
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_member(name, len(data)), io.BytesIO(data))


class _HashingReader:
    """A file object over a blob descriptor that hashes and reports what tarfile reads through it."""

    def __init__(self, fd: int, progress: TransferProgress) -> None:
        self._fd = fd
        self._offset = 0
        self._progress = progress
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = os.pread(self._fd, PIECE if size < 0 else min(size, PIECE), self._offset)
        self._offset += len(data)
        self.sha.update(data)
        self.count += len(data)
        self._progress.update(self.count)
        return data


# --- import ----------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    models: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # tags whose cached manifest was different
    blobs_added: int = 0
    blobs_present: int = 0
    bytes_added: int = 0


class _Staged:
    """Verified data waiting to be published, and the staging files to remove if it never is."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.token = secrets.token_hex(4)
        self.files: dict[str, str] = {}  # hex digest -> staging path
        self.seen: set[str] = set()  # hex digests received (staged, or already cached)
        self.manifests: dict[ModelName, bytes] = {}
        self.lock = StagingLock(store.partial_dir, self.token)  # keeps a sweeper away from our files

    def path(self, hexdigest: str) -> str:
        # Not a Fill's ``sha256-<hex>.part``: a daemon's download of the same blob never meets it.
        return os.path.join(self.store.partial_dir, f"import-{self.token}-{hexdigest}.part")

    def discard(self) -> None:
        for path in self.files.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.files.clear()
        self.lock.release()


def import_bundle(
    store: Store, src: IO[bytes], progress: TransferProgress, min_free: int = 0
) -> ImportReport:
    """Verify the whole bundle from *src*, then add its models to *store* (see the module docstring).

    *min_free* bytes must stay free on the cache's disk after the import.
    """
    store.create()
    staged = _Staged(store)
    try:
        index = _receive(store, src, staged, progress, min_free)
        return _publish(store, index, staged)
    finally:
        staged.discard()


def _receive(
    store: Store, src: IO[bytes], staged: _Staged, progress: TransferProgress, min_free: int
) -> BundleIndex:
    """Read every member, staging and verifying it; nothing is published here."""
    index: BundleIndex | None = None
    try:
        with tarfile.open(fileobj=src, mode="r|*") as tar:
            for member in tar:
                kind, key = _classify(member)
                if kind == "dir":
                    continue
                if index is None:
                    if kind != "index":
                        raise BundleError(f"{INDEX_NAME} must come first in the bundle, not {member.name!r}")
                    index = BundleIndex.parse(_read_small(tar, member, MAX_INDEX_BYTES))
                    _check_room(store, index, min_free)
                elif kind == "index":
                    raise BundleError(f"the bundle holds {INDEX_NAME} twice")
                elif kind == "manifest":
                    _receive_manifest(tar, member, index, staged)
                else:
                    _receive_blob(tar, member, key, index, staged, progress)
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"the bundle is truncated or not a tar file ({e})") from None
    if index is None:
        raise BundleError("the bundle is empty (no index.json)")
    missing_blobs = [h for h in index.blobs if h not in staged.seen]
    missing_models = [m.name.display() for m in index.models if m.name not in staged.manifests]
    if missing_blobs or missing_models:
        raise BundleError(
            f"the bundle is incomplete (truncated?): {len(missing_blobs)} blobs and {len(missing_models)} "
            "manifests its index lists are missing"
        )
    return index


def _classify(member: tarfile.TarInfo) -> tuple[str, str]:
    """What a member is, from its name and type alone; anything unexpected stops the import."""
    name = member.name[2:] if member.name.startswith("./") else member.name
    parts = name.split("/")
    if member.isdir() and name == ".":
        return "dir", name
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in name:
        raise BundleError(f"bundle member {member.name!r} has an unsafe path; refused")
    if member.isdir() and parts[0] in ("manifests", "blobs") and len(parts) <= 4:
        return "dir", name
    if not member.isreg():
        raise BundleError(f"bundle member {member.name!r} is not a regular file (a link or device); refused")
    if parts == [INDEX_NAME]:
        return "index", name
    if len(parts) == 5 and parts[0] == "manifests":
        try:
            ModelName(*parts[1:])
        except InvalidName:
            raise BundleError(f"bundle member {member.name!r} is not a valid model name; refused") from None
        return "manifest", name
    if len(parts) == 2 and parts[0] == "blobs" and (match := _BLOB_MEMBER.fullmatch(parts[1])):
        return "blob", match.group(1)
    raise BundleError(f"bundle member {member.name!r} is not part of a bundle; refused")


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise BundleError(f"bundle member {member.name!r} is larger than {human_size(limit)}; refused")
    reader = tar.extractfile(member)
    assert reader is not None  # a regular file
    data = reader.read(limit + 1)
    if len(data) != member.size:
        raise BundleError(f"bundle member {member.name!r} is truncated")
    return data


def _check_room(store: Store, index: BundleIndex, min_free: int) -> None:
    needed = sum(size for hexdigest, size in index.blobs.items() if store.blob_size(hexdigest) is None)
    free = free_bytes(store.root)
    if needed + min_free > free:
        raise BundleError(
            f"not enough disk space for the bundle: {human_size(needed)} of new blobs, "
            f"{human_size(free)} free, and {human_size(min_free)} must stay free (cache.min_free_gb); "
            "nothing was imported"
        )


def _receive_manifest(
    tar: tarfile.TarFile, member: tarfile.TarInfo, index: BundleIndex, staged: _Staged
) -> None:
    host, namespace, model, tag = member.name.removeprefix("./").split("/")[1:]
    name = ModelName(host, namespace, model, tag)
    entry = next((m for m in index.models if m.name == name), None)
    if entry is None:
        raise BundleError(f"bundle member {member.name!r} is not in its index; refused")
    if name in staged.manifests:
        raise BundleError(f"the bundle holds the manifest of {name.display()} twice")
    data = _read_small(tar, member, MAX_MANIFEST_BYTES)
    if hashlib.sha256(data).hexdigest() != entry.manifest_hex:
        raise BundleError(f"the manifest of {name.display()} does not match its digest")
    refs = {digest.removeprefix("sha256:") for digest, _ in manifest_blobs(data)}
    if not refs or refs != set(entry.blobs):
        raise BundleError(f"the manifest of {name.display()} disagrees with the index")
    staged.manifests[name] = data


def _receive_blob(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    hexdigest: str,
    index: BundleIndex,
    staged: _Staged,
    progress: TransferProgress,
) -> None:
    size = index.blobs.get(hexdigest)
    if size is None:
        raise BundleError(f"bundle member {member.name!r} is not in its index; refused")
    if hexdigest in staged.seen:
        raise BundleError(f"the bundle holds blob sha256:{hexdigest} twice")
    if member.size != size:
        raise BundleError(
            f"blob sha256:{hexdigest} is {member.size} bytes in the bundle, {size} in its index"
        )
    reader = tar.extractfile(member)
    assert reader is not None
    cached = staged.store.blob_size(hexdigest) == size
    progress.start(f"sha256:{hexdigest[:12]}", size)
    sha = hashlib.sha256()
    received = 0
    fd = -1
    if not cached:  # already in the cache: verify the bundle's copy all the same, but keep ours
        path = staged.path(hexdigest)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        staged.files[hexdigest] = path
    try:
        while piece := reader.read(PIECE):
            sha.update(piece)
            received += len(piece)
            if fd >= 0:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            progress.update(received)
        if fd >= 0:
            os.fsync(fd)
    finally:
        if fd >= 0:
            os.close(fd)
    if received != size or sha.hexdigest() != hexdigest:
        progress.finish("DAMAGED")
        raise BundleError(
            f"blob sha256:{hexdigest} in the bundle does not match its digest (damaged in transit?); "
            "nothing was imported"
        )
    progress.finish("verified" + (", already cached" if cached else ""))
    staged.seen.add(hexdigest)


def _publish(store: Store, index: BundleIndex, staged: _Staged) -> ImportReport:
    """Everything is verified: blobs into ``blobs/`` first, then the manifests that make them models."""
    report = ImportReport()
    for hexdigest in index.blobs:
        path = staged.files.pop(hexdigest, None)
        if path is None or store.blob_size(hexdigest) is not None:  # (a daemon may have fetched it meanwhile)
            report.blobs_present += 1
            if path is not None:
                os.unlink(path)
            continue
        os.replace(path, store.blob_path(hexdigest))
        report.blobs_added += 1
        report.bytes_added += index.blobs[hexdigest]
    _fsync_dir(store.blobs_dir)
    for model in index.models:
        data = staged.manifests[model.name]
        previous = store.read_manifest(model.name)
        if previous != data:
            store.write_manifest(model.name, data)
            if previous is not None:
                report.replaced.append(model.name.display())
        report.models.append(model.name.display())
    return report
