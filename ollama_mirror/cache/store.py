"""The cache on disk: an Ollama models directory plus the mirror's own work area.

``manifests/<host>/<namespace>/<model>/<tag>`` hold upstream manifest bytes verbatim and
``blobs/sha256-<hex>`` only complete, verified blobs, so an Ollama server started with
``OLLAMA_MODELS`` set to this directory can run every cached model.  Partial downloads live in
``.mirror/partial/`` because Ollama deletes odd names in ``blobs/``.

Every path is built from a :class:`ModelName` or a validated hex digest, never from raw input.
Methods that fsync are meant to run in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..names import ModelName, is_digest

_HEX = re.compile(r"[0-9a-f]{64}")
_WANTS_TAG = re.compile(r"[0-9]{1,10}-[0-9]{1,10}")


def _os_reason(error: OSError) -> str:
    """Why a directory cannot be used, in words (``NotADirectoryError`` names the part that is a file)."""
    where = error.filename or ""
    if isinstance(error, NotADirectoryError | FileExistsError):
        while where and os.path.isdir(where) is False and os.path.dirname(where) != where:
            if os.path.exists(where):
                return f"{where} is a file, not a directory"
            where = os.path.dirname(where)
    if isinstance(error, PermissionError):
        return f"{where}: permission denied (the daemon runs as uid {os.geteuid()})"
    return f"{where}: {error.strerror or error}" if where else str(error.strerror or error)


def _check_hex(hexdigest: str) -> str:
    if not _HEX.fullmatch(hexdigest):
        raise ValueError(f"not a sha256 hex digest: {hexdigest!r}")
    return hexdigest


@dataclass(frozen=True)
class PartialState:
    """What a restart needs to resume a download: which chunks of the partial file are final, and how
    far each unfinished chunk got from its start (*filled*: chunk index -> bytes, only those above 0)."""

    size: int
    chunk_size: int
    done: frozenset[int]
    filled: Mapping[int, int] = field(default_factory=dict)


def _filled_marks(document: dict[str, Any], size: int, chunk_size: int) -> dict[int, int]:
    """The record's marks of unfinished chunks that make sense for this blob (others are dropped: the
    chunk is fetched again from its start, which is always safe)."""
    marks = document.get("filled")
    if not isinstance(marks, dict):
        return {}
    found: dict[int, int] = {}
    for key, mark in marks.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(mark, int)):
            continue
        index = int(key)
        length = min(chunk_size, size - index * chunk_size)
        if 0 < mark < length:
            found[index] = mark
    return found


class PartialReplaced(Exception):
    """The partial file's path no longer names the file a download wrote and verified."""


def same_file(path: str, fd: int) -> bool:
    """Whether *path* names the open file *fd* (rename keeps a file's inode; a new file has its own)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def pid_alive(pid: int) -> bool:
    """Whether process *pid* exists (worker processes of one daemon see each other's pids)."""
    if not 0 < pid < 2**22:  # Linux's pid_max limit; a made-up name must not stop the sweep
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.blobs_dir = os.path.join(self.root, "blobs")
        self.manifests_dir = os.path.join(self.root, "manifests")
        self.work_dir = os.path.join(self.root, ".mirror")
        self.partial_dir = os.path.join(self.work_dir, "partial")
        self.digest_manifests_dir = os.path.join(self.work_dir, "manifests")
        self.staged_dir = os.path.join(self.work_dir, "staged")  # tags whose blobs are not all here yet
        self.uploads_dir = os.path.join(self.work_dir, "uploads")  # blobs being pushed (private models)
        self._manifests_lock = threading.Lock()  # one manifest write or promotion at a time, per process

    def create(self) -> None:
        """Make the directories and check that files can be written there (at start-up, before the
        reactor runs); :class:`ConfigError` naming ``cache.directory`` when they cannot be used, so that
        the daemon stops with one line and exit status 2 (systemd does not restart it in a loop)."""
        try:
            for path in (
                self.blobs_dir,
                self.manifests_dir,
                self.partial_dir,
                self.digest_manifests_dir,
                self.staged_dir,
                self.uploads_dir,
            ):
                os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.work_dir):
                pass
        except OSError as e:
            raise ConfigError(f"cache.directory: cannot use {self.root}: {_os_reason(e)}") from None

    # --- blobs ---------------------------------------------------------------------------------

    def blob_path(self, hexdigest: str) -> str:
        return os.path.join(self.blobs_dir, "sha256-" + _check_hex(hexdigest))

    def blob_size(self, hexdigest: str) -> int | None:
        """The size of a complete blob, or ``None`` when it is not cached."""
        try:
            return os.stat(self.blob_path(hexdigest)).st_size
        except FileNotFoundError:
            return None

    def open_blob(self, hexdigest: str) -> int:
        """A read-only descriptor of a complete blob (``FileNotFoundError`` when it is not cached)."""
        return os.open(self.blob_path(hexdigest), os.O_RDONLY)

    def partial_path(self, hexdigest: str) -> str:
        return os.path.join(self.partial_dir, "sha256-" + _check_hex(hexdigest) + ".part")

    def state_path(self, hexdigest: str) -> str:
        return os.path.join(self.partial_dir, "sha256-" + _check_hex(hexdigest) + ".json")

    def read_partial_state(
        self, hexdigest: str, size: int, chunk_size: int, fd: int, *, unbound_ok: bool = False
    ) -> PartialState | None:
        """The recorded progress of the download in the open partial file *fd*, if it can be used.

        A record counts only for the file it was written for (its inode, kept in the record): a
        record left by an earlier file of the same blob must never vouch for this one's bytes.
        *unbound_ok* accepts a record from before records named their file (a lock holder resuming
        the file it found, only).  The size is checked first, so a record read after it was written
        for a fully reserved file (whose holder removed any stale record before reserving).
        """
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        if st.st_size != size:
            return None
        try:
            with open(self.state_path(hexdigest), encoding="utf-8") as f:
                document = json.load(f)
        except (OSError, ValueError):
            return None
        if (
            not isinstance(document, dict)
            or document.get("size") != size
            or document.get("chunk_size") != chunk_size
        ):
            return None
        bound = "inode" in document or not unbound_ok
        if bound and (document.get("inode"), document.get("device")) != (st.st_ino, st.st_dev):
            return None
        done = document.get("done")
        if not isinstance(done, list) or not all(isinstance(i, int) for i in done):
            return None
        return PartialState(size, chunk_size, frozenset(done), _filled_marks(document, size, chunk_size))

    def write_partial_state(self, hexdigest: str, fd: int, state: PartialState) -> None:
        """Record finished chunks durably: the data first, then the record of it (thread)."""
        os.fdatasync(fd)
        st = os.fstat(fd)
        document = {
            "size": state.size,
            "chunk_size": state.chunk_size,
            "done": sorted(state.done),
            "filled": {str(index): mark for index, mark in sorted(state.filled.items())},
            "inode": st.st_ino,  # the record is of this file only (see read_partial_state)
            "device": st.st_dev,
        }
        _atomic_write(self.state_path(hexdigest), json.dumps(document).encode())

    def forget_partial_state(self, hexdigest: str) -> None:
        """Remove a record that is not of the current partial file, before it is reserved (thread)."""
        path = self.state_path(hexdigest)
        if os.path.exists(path):
            _unlink(path)
            _fsync_dir(self.partial_dir)

    def partial_is(self, hexdigest: str, fd: int) -> bool:
        """Whether the partial file's path still names the open file *fd* (not removed or replaced)."""
        return same_file(self.partial_path(hexdigest), fd)

    def wants_path(self, hexdigest: str, tag: str) -> str:
        """Where a process following a download lists the chunks its readers wait on (*tag*:
        ``<pid>-<n>``, one file per following Fill)."""
        if not _WANTS_TAG.fullmatch(tag):
            raise ValueError(f"not a wants tag: {tag!r}")
        return self.partial_path(hexdigest) + ".wants." + tag

    def write_wants(self, hexdigest: str, tag: str, chunks: frozenset[int]) -> None:
        """Replace this follower's list of wanted chunks, or remove it when empty (thread).

        Not fsynced: it only steers a running download, and means nothing after a crash.
        """
        path = self.wants_path(hexdigest, tag)
        if not chunks:
            _unlink(path)
            return
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sorted(chunks), f)
        os.replace(tmp, path)

    def read_wants(self, hexdigest: str) -> frozenset[int]:
        """Every chunk of this blob that readers in other processes wait on (thread).

        The lists of processes that are gone are removed, so a crashed follower steers nothing.
        """
        prefix = "sha256-" + _check_hex(hexdigest) + ".part.wants."
        wanted: set[int] = set()
        try:
            with os.scandir(self.partial_dir) as entries:
                names = [e.name for e in entries if e.name.startswith(prefix)]
        except FileNotFoundError:
            return frozenset()
        for name in names:
            tag = name[len(prefix) :]
            if not _WANTS_TAG.fullmatch(tag):
                continue
            path = os.path.join(self.partial_dir, name)
            if not pid_alive(int(tag.split("-")[0])):
                _unlink(path)
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    chunks = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(chunks, list):
                wanted.update(i for i in chunks if isinstance(i, int) and not isinstance(i, bool))
        return frozenset(wanted)

    def publish_blob(self, hexdigest: str, fd: int) -> None:
        """Move a verified partial into ``blobs/`` atomically and durably (thread).

        The path is renamed, so it must still name the file that was verified through *fd*.
        """
        os.fsync(fd)
        if not self.partial_is(hexdigest, fd):
            raise PartialReplaced(f"the partial file of blob sha256:{hexdigest} was replaced; not published")
        os.replace(self.partial_path(hexdigest), self.blob_path(hexdigest))
        _fsync_dir(self.blobs_dir)
        _unlink(self.state_path(hexdigest))

    def upload_path(self, upload_id: str) -> str:
        """The file of a push's upload session (*upload_id*: 32 hex digits, made by the mirror)."""
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            raise ValueError(f"invalid upload id {upload_id!r}")
        return os.path.join(self.uploads_dir, upload_id)

    def publish_upload(self, hexdigest: str, upload_id: str, fd: int) -> None:
        """Move a pushed blob, verified through *fd*, into ``blobs/`` atomically and durably (thread)."""
        os.fsync(fd)
        os.replace(self.upload_path(upload_id), self.blob_path(hexdigest))
        _fsync_dir(self.blobs_dir)

    def discard_partial(self, hexdigest: str, fd: int | None = None) -> None:
        """Remove the partial file and its record; with *fd*, only if the path still names that file."""
        if fd is not None and not self.partial_is(hexdigest, fd):
            return
        _unlink(self.partial_path(hexdigest))
        _unlink(self.state_path(hexdigest))

    # --- manifests -----------------------------------------------------------------------------

    def manifest_path(self, name: ModelName) -> str:
        """Where a tag's manifest is once all its blobs are cached: what Ollama reads."""
        return os.path.join(self.manifests_dir, name.host, name.namespace, name.model, name.tag)

    def staged_manifest_path(self, name: ModelName) -> str:
        """Where a tag's manifest waits while some of its blobs are not cached yet (Ollama never looks
        there: a models directory must not list a model it cannot run)."""
        return os.path.join(self.staged_dir, name.host, name.namespace, name.model, name.tag)

    def read_manifest(self, name: ModelName) -> bytes | None:
        """The tag's newest manifest: staged (fetched, its blobs still coming) before published."""
        for path in (self.staged_manifest_path(name), self.manifest_path(name)):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    def manifest_stamp(self, name: ModelName) -> tuple[int, int, int] | None:
        """Inode, size and mtime of the file :meth:`read_manifest` reads (a new write is a new file)."""
        for path in (self.staged_manifest_path(name), self.manifest_path(name)):
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            return st.st_ino, st.st_size, st.st_mtime_ns
        return None

    def write_manifest(self, name: ModelName, data: bytes) -> bool:
        """Store a tag's manifest bytes verbatim, atomically (thread): into ``manifests/`` when all its
        blobs are cached (True), else staged until they are (:meth:`promote_manifest`)."""
        with self._manifests_lock:
            if self.blobs_present(data):
                _write_in(self.manifest_path(name), data)
                _unlink_if_holds(self.staged_manifest_path(name), data)  # (a newer one waits on)
                prune_empty_dirs(os.path.dirname(self.staged_manifest_path(name)), self.staged_dir)
                return True
            _write_in(self.staged_manifest_path(name), data)
            return False

    def promote_manifest(self, name: ModelName) -> bool | None:
        """(thread) Move the tag's staged manifest into ``manifests/`` if all its blobs are cached now:
        True when it moved, False when it must wait, None when nothing is staged for the tag."""
        staged = self.staged_manifest_path(name)
        with self._manifests_lock:
            try:
                with open(staged, "rb") as f:
                    data = f.read()
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not self.blobs_present(data):
                return False
            _write_in(self.manifest_path(name), data)
            _unlink_if_holds(staged, data)  # (unless another process staged a newer one meanwhile)
            prune_empty_dirs(os.path.dirname(staged), self.staged_dir)
            return True

    def stage_manifest(self, name: ModelName) -> None:
        """(thread) A published manifest whose blobs are no longer all cached goes back to waiting (a
        staged newer one wins: the published one just goes)."""
        path = self.manifest_path(name)
        with self._manifests_lock:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except (FileNotFoundError, NotADirectoryError):
                return
            if self.blobs_present(data):
                return
            if not os.path.exists(self.staged_manifest_path(name)):
                _write_in(self.staged_manifest_path(name), data)
            _unlink_if_holds(path, data)
            prune_empty_dirs(os.path.dirname(path), self.manifests_dir)

    def blobs_present(self, data: bytes) -> bool:
        """Whether every blob a manifest lists is cached (a manifest that lists none is not a model)."""
        blobs = manifest_blobs(data)  # (every digest in it checked to be sha256:<64 hex>)
        return bool(blobs) and all(self.blob_size(digest[7:]) is not None for digest, _ in blobs)

    def digest_manifest_path(self, hexdigest: str) -> str:
        return os.path.join(self.digest_manifests_dir, "sha256-" + _check_hex(hexdigest))

    def read_digest_manifest(self, hexdigest: str) -> bytes | None:
        try:
            with open(self.digest_manifest_path(hexdigest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_digest_manifest(self, hexdigest: str, data: bytes) -> None:
        _atomic_write(self.digest_manifest_path(hexdigest), data)


def _write_in(path: str, data: bytes) -> None:
    """:func:`_atomic_write`, making the directory first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _atomic_write(path, data)


def _unlink_if_holds(path: str, data: bytes) -> None:
    """Remove *path* if it still holds *data* (another process may have written it anew)."""
    try:
        with open(path, "rb") as f:
            if f.read() != data:
                return
    except (FileNotFoundError, NotADirectoryError):
        return
    _unlink(path)


def prune_empty_dirs(directory: str, stop: str) -> None:
    """Remove *directory* and its parents up to (not including) *stop* while they are empty (thread)."""
    while os.path.abspath(directory) != os.path.abspath(stop):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)


def _atomic_write(path: str, data: bytes) -> None:
    """Write a small file so that readers see the old or the new bytes, never a mix."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def manifest_blobs(data: bytes) -> list[tuple[str, int]]:
    """The ``(digest, size)`` of the config and every layer of a manifest.

    ``[]`` if it is not a manifest we can use: any digest that is not ``sha256:<64 hex>`` or any
    size that is not a whole number makes the whole manifest unusable (a digest becomes a path).
    """
    try:
        document: Any = json.loads(data)
        entries = [document["config"], *document["layers"]]
        blobs = [(e["digest"], e["size"]) for e in entries]
    except (ValueError, KeyError, TypeError):
        return []
    for digest, size in blobs:
        if not isinstance(digest, str) or not is_digest(digest):
            return []
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return []
    return blobs
