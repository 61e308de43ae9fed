"""The cache index: what the files cannot say about them (when cached, last used, pull counts).

The files stay the truth: which models and blobs exist, and their sizes, come from the cache
directory, and :meth:`CacheIndex.reconcile` brings the index in line with them (at start and
before each sweep).  The index adds use: a model's first caching, last use and pull count, a
blob's last use, a tag's last revalidation.  It lives in SQLite under ``.mirror/``; if it is
missing or corrupt it is set aside and rebuilt from the files, with file times as a first guess.

Usage arrives as events on the reactor thread and is kept in memory until :meth:`flush` writes it
in one transaction (every few seconds and at shutdown): a crash loses seconds of "last used",
never the cache.  Every method that touches the database runs in a worker thread.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.logger import Logger

from ..events import Events
from ..names import ModelName
from .catalog import CachedModel

log = Logger(namespace="ollama_mirror.index")  # pinned: log names are public

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 5.0  # seconds a statement waits for another process's lock
OPEN_WAIT = 30.0  # seconds opening retries while another process holds the database locked
SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,          -- host/namespace/model:tag
    cached_at REAL NOT NULL,
    last_used REAL NOT NULL,
    pull_count INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    revalidated_at REAL
);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,        -- hex sha256
    size INTEGER NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    PRIMARY KEY (model, digest)
);
CREATE INDEX IF NOT EXISTS refs_by_digest ON refs(digest);
"""


@dataclass(frozen=True)
class ModelUsage:
    name: str
    cached_at: float
    last_used: float
    pull_count: int
    size: int


class CacheIndex(Events):
    """The SQLite index, fed by events (see the module docstring)."""

    def __init__(self, path: str, clock: object) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time
        self._db: sqlite3.Connection | None = None
        self._pending_models: dict[str, tuple[float, int]] = {}  # name -> (last used, pulls since flush)
        self._pending_blobs: dict[str, float] = {}
        self._pending_revalidated: dict[str, float] = {}

    # --- events (reactor thread) ---------------------------------------------------------------

    def _now(self) -> float:
        return float(self._clock.seconds())  # type: ignore[attr-defined]

    def model_used(self, name: ModelName, pulled: bool) -> None:
        key = str(name)
        _, pulls = self._pending_models.get(key, (0.0, 0))
        self._pending_models[key] = (self._now(), pulls + (1 if pulled else 0))

    def blob_used(self, hexdigest: str) -> None:
        self._pending_blobs[hexdigest] = self._now()

    def manifest_revalidated(self, name: ModelName) -> None:
        self._pending_revalidated[str(name)] = self._now()

    def take_pending(self) -> tuple[dict[str, tuple[float, int]], dict[str, float], dict[str, float]]:
        """Hand the usage gathered so far to a flush (called on the reactor thread)."""
        pending = (self._pending_models, self._pending_blobs, self._pending_revalidated)
        self._pending_models, self._pending_blobs, self._pending_revalidated = {}, {}, {}
        return pending

    # --- the database (worker threads) ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            self._db = self._open_waiting()
        except sqlite3.OperationalError:
            raise  # locked for too long, or cannot be opened at all: not a damaged file, leave it
        except sqlite3.DatabaseError as e:
            corrupt = f"{self.path}.corrupt-{int(time.time())}"
            log.warn(
                "cache index {path} is unreadable ({error}); moved to {corrupt}, rebuilt from the files",
                path=self.path,
                error=e,
                corrupt=corrupt,
            )
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, corrupt + suffix)
            self._db = self._open_waiting()
        return self._db

    def _open_waiting(self) -> sqlite3.Connection:
        """Open, waiting while other processes (worker processes starting together on a new cache)
        hold the database locked: SQLite's busy timeout does not cover every step of creating it."""
        deadline = time.monotonic() + OPEN_WAIT
        while True:
            try:
                return self._open()
            except sqlite3.OperationalError as e:
                if not _busy(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"unknown index schema version {version}")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("SELECT count(*) FROM models").fetchone()  # a damaged file fails here
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def flush(self, pending: tuple[dict[str, tuple[float, int]], dict[str, float], dict[str, float]]) -> None:
        """Write gathered usage in one transaction (worker thread)."""
        models, blobs, revalidated = pending
        if not (models or blobs or revalidated):
            return
        with self._lock:
            db = self._connect()
            with _transaction(db):
                for name, (used, pulls) in models.items():  # a model new since the last reconcile is added
                    db.execute(
                        "INSERT INTO models (name, cached_at, last_used, pull_count) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET last_used = max(last_used, excluded.last_used), "
                        "pull_count = pull_count + excluded.pull_count",
                        (name, used, used, pulls),
                    )
                for digest, used in blobs.items():
                    db.execute(
                        "INSERT INTO blobs (digest, size, last_used) VALUES (?, 0, ?) "
                        "ON CONFLICT(digest) DO UPDATE SET last_used = max(last_used, excluded.last_used)",
                        (digest, used),
                    )
                for name, when in revalidated.items():
                    db.execute("UPDATE models SET revalidated_at = ? WHERE name = ?", (when, name))

    def reconcile(self, models: Iterable[CachedModel], blob_sizes: dict[str, tuple[int, float]]) -> None:
        """Make the index list exactly the models and blobs on disk (worker thread).

        *blob_sizes* maps every blob file's hex digest to its size and mtime.  New entries start
        with the file's mtime as their time of caching and last use.
        """
        models = list(models)
        with self._lock:
            db = self._connect()
            with _transaction(db):
                known_models = {row[0] for row in db.execute("SELECT name FROM models")}
                on_disk = {str(m.name): m for m in models}
                for name in known_models - on_disk.keys():
                    db.execute("DELETE FROM models WHERE name = ?", (name,))
                for name, model in on_disk.items():
                    if name not in known_models:
                        db.execute(
                            "INSERT INTO models (name, cached_at, last_used, size) VALUES (?, ?, ?, ?)",
                            (name, model.modified, model.modified, model.size),
                        )
                    else:
                        db.execute("UPDATE models SET size = ? WHERE name = ?", (model.size, name))
                    db.execute("DELETE FROM refs WHERE model = ?", (name,))
                    db.executemany(
                        "INSERT OR IGNORE INTO refs (model, digest) VALUES (?, ?)",
                        [(name, digest) for digest, _ in model.blobs],
                    )
                known_blobs = {row[0] for row in db.execute("SELECT digest FROM blobs")}
                for digest in known_blobs - blob_sizes.keys():
                    db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
                for digest, (size, mtime) in blob_sizes.items():
                    db.execute(
                        "INSERT INTO blobs (digest, size, last_used) VALUES (?, ?, ?) "
                        "ON CONFLICT(digest) DO UPDATE SET size = excluded.size",
                        (digest, size, mtime),
                    )

    def model_usage(self) -> dict[str, ModelUsage]:
        """Every indexed model's usage, by ``str(ModelName)`` (worker thread)."""
        with self._lock:
            rows = self._connect().execute("SELECT name, cached_at, last_used, pull_count, size FROM models")
            return {row[0]: ModelUsage(*row) for row in rows}

    def blob_last_used(self) -> dict[str, float]:
        with self._lock:
            return dict(self._connect().execute("SELECT digest, last_used FROM blobs").fetchall())

    def forget_models(self, names: Iterable[str]) -> None:
        with self._lock:
            db = self._connect()
            with _transaction(db):
                db.executemany("DELETE FROM models WHERE name = ?", [(n,) for n in names])

    def forget_blobs(self, digests: Iterable[str]) -> None:
        with self._lock:
            db = self._connect()
            with _transaction(db):
                db.executemany("DELETE FROM blobs WHERE digest = ?", [(d,) for d in digests])


def _busy(error: sqlite3.OperationalError) -> bool:
    """Whether *error* says another connection holds the database (not that it is damaged)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    message = str(error)
    return "locked" in message or "busy" in message


class _transaction:
    """``BEGIN`` … ``COMMIT`` (or ``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


def read_model_usage(path: str) -> dict[str, ModelUsage]:
    """The models' usage from an index file, read-only (for tools beside a running daemon).

    ``{}`` when there is no index or it cannot be read: callers fall back to the files' times.  Never
    creates, migrates or sets aside the file, unlike :class:`CacheIndex`.
    """
    if not os.path.exists(path):
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT name, cached_at, last_used, pull_count, size FROM models").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    return {row[0]: ModelUsage(*row) for row in rows}
