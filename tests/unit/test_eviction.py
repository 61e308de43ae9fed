"""Cache lifecycle with real files on a fake clock: the index, retention, LRU under a cap, admission."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ollama_mirror.cache import index as index_module
from ollama_mirror.cache.catalog import Catalog
from ollama_mirror.cache.eviction import CacheLifecycle, NoRoom, Sweeper
from ollama_mirror.cache.index import CacheIndex
from ollama_mirror.cache.pins import Pins
from ollama_mirror.cache.store import Store
from ollama_mirror.config import load_config
from ollama_mirror.events import Events
from ollama_mirror.names import ModelName, PrivateNamespaces
from ollama_mirror.runner import InlineRunner

DAY = 86400.0
SHARED = b"{{ .Prompt }}"  # a template layer every model here shares


class Cache:
    """A cache directory with models written straight to disk, and a Sweeper over it."""

    def __init__(self, tmp_path: Path, private: tuple[str, ...] = (), **cache_settings: str) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000_000)  # a plausible "now" for file times
        self.store = Store(str(tmp_path / "cache"))
        self.store.create()
        self.config = load_config(None, {}, {f"cache.{k}": v for k, v in cache_settings.items()}).cache
        self.index = CacheIndex(os.path.join(self.store.work_dir, "index.sqlite3"), self.clock)
        self.protected: set[str] = set()
        self.pins = Pins(self.store.work_dir)
        self.evictions: list[tuple[Any, ...]] = []
        recorder = self

        class Recorder(Events):
            def evicted(self, models: int, blobs: int, size: int, reason: str) -> None:
                recorder.evictions.append((models, blobs, size, reason))

        self.sweeper = Sweeper(
            self.store,
            Catalog(self.store),
            self.index,
            self.config,
            InlineRunner(),
            self.clock,
            Recorder(),
            protected=lambda: self.protected,
            private=PrivateNamespaces(private),
            pins=self.pins,
        )

    def write_blob(self, data: bytes, age: float = 0.0) -> str:
        hexdigest = hashlib.sha256(data).hexdigest()
        path = self.store.blob_path(hexdigest)
        Path(path).write_bytes(data)
        when = self.clock.seconds() - age
        os.utime(path, (when, when))
        return hexdigest

    def add_model(self, name: str, size: int, age: float = 0.0) -> ModelName:
        """A model of *size* weight bytes plus the shared template, last touched *age* seconds ago."""
        model = ModelName.parse(name)
        weights = self.write_blob(name.encode().ljust(size, b"w"), age)
        template = self.write_blob(SHARED, age)
        config = self.write_blob(json.dumps({"model_format": "gguf", "name": name}).encode(), age)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "config": {"digest": "sha256:" + config, "size": 50},
                "layers": [
                    {"digest": "sha256:" + weights, "size": size},
                    {"digest": "sha256:" + template, "size": len(SHARED)},
                ],
            }
        ).encode()
        self.store.write_manifest(model, manifest)
        when = self.clock.seconds() - age
        os.utime(self.store.manifest_path(model), (when, when))
        return model

    def weights(self, name: str, size: int) -> str:
        return hashlib.sha256(name.encode().ljust(size, b"w")).hexdigest()

    def sweep(self, room: int = 0) -> Any:
        return result(Deferred.fromCoroutine(self.sweeper.sweep(room)))

    def names(self) -> list[str]:
        return sorted(m.name.display() for m in Catalog(self.store).models())


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "did not complete"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def test_models_unused_for_the_retention_period_go_and_shared_blobs_stay(tmp_path: Path) -> None:
    cache = Cache(tmp_path, retention_days="30")
    cache.add_model("old", 100, age=31 * DAY)
    cache.add_model("recent", 100, age=29 * DAY)
    report = cache.sweep()
    assert cache.names() == ["recent:latest"]
    assert report.removed_models == ["registry.ollama.ai/library/old:latest"]
    assert not os.path.exists(cache.store.blob_path(cache.weights("old", 100)))
    assert os.path.exists(cache.store.blob_path(hashlib.sha256(SHARED).hexdigest()))  # 'recent' uses it
    assert ("retention", 1) in [(e[3], e[0]) for e in cache.evictions]


def test_a_full_disk_does_not_stop_the_sweep_that_would_free_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(tmp_path, retention_days="30")
    cache.add_model("old", 100, age=31 * DAY)
    cache.add_model("recent", 100)

    def full(*args: Any) -> None:
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = sqlite3.SQLITE_FULL  # as SQLite sets it
        raise error

    for write in ("flush", "reconcile", "forget_models", "forget_blobs"):
        monkeypatch.setattr(cache.index, write, full)
    report = cache.sweep()
    assert report.index_skipped
    assert cache.names() == ["recent:latest"]  # the files went all the same
    assert not os.path.exists(cache.store.blob_path(cache.weights("old", 100)))


def test_an_index_failure_that_is_not_a_full_disk_still_fails_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(tmp_path)

    def broken(*args: Any) -> None:
        raise sqlite3.DatabaseError("file is not a database")

    monkeypatch.setattr(cache.index, "reconcile", broken)
    with pytest.raises(sqlite3.DatabaseError):
        cache.sweep()


def test_use_recorded_in_the_index_keeps_a_model(tmp_path: Path) -> None:
    cache = Cache(tmp_path, retention_days="30")
    old = cache.add_model("old", 100, age=40 * DAY)
    cache.sweeper.index.model_used(old, True)  # pulled just now: the file's age no longer counts
    cache.sweep()
    assert cache.names() == ["old:latest"]
    assert cache.index.model_usage()[str(old)].pull_count == 1


def test_least_recently_used_models_go_first_until_under_the_cap(tmp_path: Path) -> None:
    cache = Cache(tmp_path, max_size_gb="0.000001")  # 1000 bytes
    for age, name in [(5, "a"), (1, "b"), (9, "c"), (3, "d")]:
        cache.add_model(name, 300, age=age * 3600)
    report = cache.sweep()
    # each model is 300 weight bytes + its config; the template is shared. Oldest first: c, a, ...
    assert report.removed_models[:2] == [
        "registry.ollama.ai/library/c:latest",
        "registry.ollama.ai/library/a:latest",
    ]
    assert report.cache_bytes <= 1000
    assert "b:latest" in cache.names()  # the most recently used stays
    assert report.cache_bytes == sum(os.path.getsize(p) for p in Path(cache.store.blobs_dir).iterdir())


def test_pushed_models_are_never_evicted_nor_emptied_with_the_cache_but_removed_on_purpose(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path, private=("team", "lab-*"), max_size_gb="0.000001", retention_days="1")
    cache.add_model("team/mine", 600, age=40 * DAY)  # past retention, and alone over the cap
    cache.add_model("lab-7/other", 100, age=40 * DAY)
    cache.add_model("pulled", 300, age=40 * DAY)
    cache.sweep()
    assert cache.names() == ["lab-7/other:latest", "team/mine:latest"]
    assert os.path.exists(cache.store.blob_path(cache.weights("team/mine", 600)))
    report = result(Deferred.fromCoroutine(cache.sweeper.clear()))  # DELETE /mirror/cache
    assert report.removed_models == [] and cache.names() == ["lab-7/other:latest", "team/mine:latest"]
    assert os.path.exists(cache.store.blob_path(hashlib.sha256(SHARED).hexdigest()))
    removed = result(Deferred.fromCoroutine(cache.sweeper.delete_model(ModelName.parse("team/mine"))))
    assert removed is not None and cache.names() == ["lab-7/other:latest"]


def test_pinned_tags_outlive_retention_and_the_cap_until_unpinned_and_a_delete_drops_the_pin(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path, max_size_gb="0.000001", retention_days="1")  # 1000 bytes
    keep = cache.add_model("keep", 900, age=40 * DAY)  # past retention, and the least recently used
    cache.add_model("other", 900, age=2 * DAY)
    assert cache.pins.pin(keep) and not cache.pins.pin(keep)  # (a second pin changes nothing)
    cache.sweep()
    assert cache.names() == ["keep:latest"]
    assert os.path.exists(cache.store.blob_path(cache.weights("keep", 900)))
    report = result(Deferred.fromCoroutine(cache.sweeper.clear()))  # DELETE /mirror/cache keeps it too
    assert report.removed_models == [] and cache.names() == ["keep:latest"]
    assert Pins(cache.store.work_dir).names() == {str(keep)}  # (another process reads the same pins)
    assert cache.pins.unpin(keep)
    cache.sweep()
    assert cache.names() == []
    again = cache.add_model("keep", 900)
    cache.pins.pin(again)
    assert result(Deferred.fromCoroutine(cache.sweeper.delete_model(again))) is not None
    assert cache.pins.names() == frozenset()  # removed on purpose: its pin went with it


def test_a_damaged_pins_file_pins_nothing_and_the_next_pin_rewrites_it(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    Path(cache.pins.path).write_text('{"pinned": ["ok", "no//good", 7]')  # truncated JSON
    assert cache.pins.names() == frozenset()
    Path(cache.pins.path).write_text('{"pinned": ["ok", "no//good", 7]}')
    assert cache.pins.names() == {"registry.ollama.ai/library/ok:latest"}
    cache.pins.pin(ModelName.parse("two"))
    assert json.loads(Path(cache.pins.path).read_text())["pinned"] == [
        "registry.ollama.ai/library/ok:latest",
        "registry.ollama.ai/library/two:latest",
    ]


def test_nothing_being_downloaded_or_served_is_removed(tmp_path: Path) -> None:
    cache = Cache(tmp_path, max_size_gb="0.0000001", retention_days="1")  # 100 bytes: everything must go
    cache.add_model("busy", 300, age=10 * DAY)
    cache.add_model("idle", 300, age=10 * DAY)
    cache.protected = {cache.weights("busy", 300)}  # a client is reading it
    cache.sweep()
    assert cache.names() == ["busy:latest"]
    assert os.path.exists(cache.store.blob_path(cache.weights("busy", 300)))


def test_orphaned_blobs_and_abandoned_partials_go_after_a_grace_period(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.add_model("kept", 100)
    fresh_orphan = cache.write_blob(b"fetched by digest a minute ago", age=60)
    old_orphan = cache.write_blob(b"fetched by digest two hours ago", age=7200)
    partial = Path(cache.store.partial_path("a" * 64))
    partial.write_bytes(b"x")
    os.utime(partial, (cache.clock.seconds() - 2 * DAY,) * 2)
    running = Path(cache.store.partial_path("b" * 64))
    running.write_bytes(b"x")
    os.utime(running, (cache.clock.seconds() - 2 * DAY,) * 2)
    cache.protected = {"b" * 64}
    ollama_own = Path(cache.store.blobs_dir) / ("sha256-" + "c" * 64 + "-partial")
    ollama_own.write_bytes(b"Ollama's own partial download")
    report = cache.sweep()
    assert os.path.exists(cache.store.blob_path(fresh_orphan))
    assert not os.path.exists(cache.store.blob_path(old_orphan))
    assert not partial.exists() and running.exists() and ollama_own.exists()
    assert report.removed_partials == 1
    assert cache.names() == ["kept:latest"]


def test_the_index_is_rebuilt_from_the_files_when_deleted_or_corrupt(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    model = cache.add_model("m", 100, age=DAY)
    cache.sweep()
    assert set(cache.index.model_usage()) == {str(model)}
    cache.index.close()
    Path(cache.index.path).write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(cache.index.path + suffix).unlink(missing_ok=True)
    cache.sweep()
    usage = cache.index.model_usage()
    assert set(usage) == {str(model)}
    assert usage[str(model)].cached_at == pytest.approx(cache.clock.seconds() - DAY)
    assert list(Path(cache.store.work_dir).glob("index.sqlite3.corrupt-*"))
    cache.index.close()
    os.unlink(cache.index.path)
    cache.sweep()
    assert set(cache.index.model_usage()) == {str(model)}


def test_a_crash_between_writing_a_blob_and_the_index_is_repaired(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.add_model("first", 100)
    cache.sweep()
    cache.add_model("second", 100)  # on disk, never told to the index (as after a crash)
    cache.sweep()
    assert {u.split("/")[-1] for u in cache.index.model_usage()} == {"first:latest", "second:latest"}
    with sqlite3.connect(cache.index.path) as db:
        digests = {row[0] for row in db.execute("SELECT digest FROM blobs")}
    assert cache.weights("second", 100) in digests


def test_admission_refuses_a_blob_larger_than_the_cache_and_makes_room_otherwise(tmp_path: Path) -> None:
    cache = Cache(tmp_path, max_size_gb="0.000001", min_free_gb="0")
    cache.add_model("old", 400, age=DAY)
    cache.add_model("new", 400)
    cache.sweep()

    class Incoming:
        digest = "sha256:" + "d" * 64
        resumed_bytes = 0
        allocated_bytes = 0

        def __init__(self, size: int) -> None:
            self.size = size

    with pytest.raises(NoRoom, match=r"more than the whole cache may hold \(cache.max_size_gb = 1e-06\)"):
        result(Deferred.fromCoroutine(cache.sweeper.admit(Incoming(2000))))  # type: ignore[arg-type]
    result(Deferred.fromCoroutine(cache.sweeper.admit(Incoming(500))))  # type: ignore[arg-type]
    assert cache.names() == ["new:latest"]  # the least recently used went to make room


def test_admission_refuses_when_the_disk_would_be_too_full(tmp_path: Path) -> None:
    cache = Cache(tmp_path, min_free_gb="1000000")  # a petabyte must stay free

    class Incoming:
        digest = "sha256:" + "d" * 64
        size = 10
        resumed_bytes = 0
        allocated_bytes = 0

    with pytest.raises(NoRoom, match="not enough disk space .* cache.min_free_gb = 1e\\+06"):
        result(Deferred.fromCoroutine(cache.sweeper.admit(Incoming())))  # type: ignore[arg-type]


def test_admission_never_counts_the_downloads_own_partial_file_against_it(tmp_path: Path) -> None:
    cache = Cache(tmp_path, max_size_gb="10000000", min_free_gb="0")

    class Resuming:  # a petabyte blob whose partial file already takes all but 10 bytes of it
        digest = "sha256:" + "d" * 64
        size = 10**15
        resumed_bytes = 0  # (no record of progress: a crash before the first one)
        allocated_bytes = 10**15 - 10

    result(Deferred.fromCoroutine(cache.sweeper.admit(Resuming())))  # type: ignore[arg-type]
    Resuming.allocated_bytes = 0
    with pytest.raises(NoRoom, match="not enough disk space"):
        result(Deferred.fromCoroutine(cache.sweeper.admit(Resuming())))  # type: ignore[arg-type]


def test_clear_removes_everything_not_in_use(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.add_model("a", 100)
    cache.add_model("b", 100)
    cache.protected = {cache.weights("b", 100)}
    report = result(Deferred.fromCoroutine(cache.sweeper.clear()))
    assert sorted(report.removed_models) == [
        "registry.ollama.ai/library/a:latest",
        "registry.ollama.ai/library/b:latest",
    ]
    assert cache.names() == []
    assert [p.name for p in Path(cache.store.blobs_dir).iterdir()] == ["sha256-" + cache.weights("b", 100)]


def test_sweeps_run_on_schedule_and_a_failing_one_does_not_stop_them(tmp_path: Path) -> None:
    cache = Cache(tmp_path, cleanup_interval="60")
    runs: list[float] = []
    original = cache.sweeper._sweep

    def flaky(*args: Any) -> Any:
        runs.append(cache.clock.seconds())
        if len(runs) == 2:
            raise OSError("disk hiccup")
        return original(*args)

    cache.sweeper._sweep = flaky  # type: ignore[method-assign]
    lifecycle = CacheLifecycle(cache.sweeper, cache.clock)
    lifecycle.startService()
    assert len(runs) == 1  # at start
    cache.clock.advance(60)
    assert len(runs) == 2  # failed, logged
    cache.clock.advance(60)
    assert len(runs) == 3  # and the next one still ran
    assert runs[2] - runs[0] == 120
    result(lifecycle.stopService())


def test_revalidation_and_deletes_are_recorded_in_the_index(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    kept = cache.add_model("kept", 100)
    gone = cache.add_model("gone", 100)
    cache.sweep()
    cache.index.manifest_revalidated(kept)
    cache.sweep()  # flushes what was gathered
    with sqlite3.connect(cache.index.path) as db:
        revalidated = dict(db.execute("SELECT name, revalidated_at FROM models").fetchall())
    assert revalidated[str(kept)] == cache.clock.seconds() and revalidated[str(gone)] is None
    cache.protected = {cache.weights("gone", 100)}  # a download of it is running: its weights stay
    removed = result(Deferred.fromCoroutine(cache.sweeper.delete_model(gone)))
    assert removed is not None and cache.weights("gone", 100) not in removed
    assert os.path.exists(cache.store.blob_path(cache.weights("gone", 100)))
    assert set(cache.index.model_usage()) == {str(kept)}
    assert cache.names() == ["kept:latest"]
    assert result(Deferred.fromCoroutine(cache.sweeper.delete_model(gone))) is None


def test_a_partial_download_a_worker_holds_keeps_its_old_record(tmp_path: Path) -> None:
    """Another worker resumed a download a day later: its file and record both stay."""
    cache = Cache(tmp_path)
    partial = Path(cache.store.partial_path("d" * 64))
    record = Path(cache.store.state_path("d" * 64))
    partial.write_bytes(b"x")
    record.write_text("{}")
    for path in (partial, record):
        os.utime(path, (cache.clock.seconds() - 2 * DAY,) * 2)
    holder = os.open(partial, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        report = cache.sweep()
        assert partial.exists() and record.exists()
        assert report.removed_partials == 0
    finally:
        os.close(holder)
    report = cache.sweep()  # once nobody holds it, both go
    assert not partial.exists() and not record.exists()
    assert report.removed_partials == 2


def test_a_young_partial_file_keeps_its_old_record_and_a_lone_record_goes(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    partial = Path(cache.store.partial_path("e" * 64))
    record = Path(cache.store.state_path("e" * 64))
    lone = Path(cache.store.state_path("f" * 64))
    partial.write_bytes(b"x")
    for path in (record, lone):
        path.write_text("{}")
        os.utime(path, (cache.clock.seconds() - 2 * DAY,) * 2)
    os.utime(partial, (cache.clock.seconds() - 60,) * 2)
    cache.sweep()
    assert partial.exists() and record.exists() and not lone.exists()


def test_an_index_another_worker_holds_locked_is_waited_for_not_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers starting together on a new cache: "database is locked" is not corruption."""
    monkeypatch.setattr(index_module, "BUSY_TIMEOUT", 0.01)
    path = str(tmp_path / "index.sqlite3")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # another worker creating the database
    try:
        monkeypatch.setattr(index_module, "OPEN_WAIT", 0.2)
        with pytest.raises(sqlite3.OperationalError):
            CacheIndex(path, Clock()).model_usage()  # locked for too long: an error, nothing moved
        assert not list(tmp_path.glob("index.sqlite3.corrupt-*"))
        monkeypatch.setattr(index_module, "OPEN_WAIT", 10.0)
        release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
        release.start()
        index = CacheIndex(path, Clock())
        assert index.model_usage() == {}  # waited until the other worker was done
        release.join()
        index.close()
    finally:
        other.close()
    assert not list(tmp_path.glob("index.sqlite3.corrupt-*"))


def test_a_following_workers_list_of_wanted_chunks_stays_while_it_lives(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    mine = Path(cache.store.wants_path("a" * 64, f"{os.getpid()}-1"))
    gone = Path(cache.store.wants_path("a" * 64, "999999999-1"))  # (above any pid_max)
    absurd = Path(cache.store.wants_path("b" * 64, "9999999999-1"))  # os.kill would overflow
    for path in (mine, gone, absurd):
        path.write_text("[3]")
        os.utime(path, (cache.clock.seconds() - 2 * DAY,) * 2)
    cache.sweep()
    assert mine.exists() and not gone.exists() and not absurd.exists()


# --- manifests/ holds only models whose blobs are all here ---------------------------------------------


def test_a_manifest_whose_blobs_are_missing_waits_among_the_staged_until_they_are_in(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    name = cache.add_model("whole", 100)
    weights = cache.weights("whole", 100)
    os.unlink(cache.store.blob_path(weights))  # (an operator, or an older cache that wrote it early)
    cache.sweep()
    assert not os.path.exists(cache.store.manifest_path(name))  # Ollama would list it and fail to run it
    assert os.path.exists(cache.store.staged_manifest_path(name))
    assert cache.names() == []
    assert [m.name for m in Catalog(cache.store).models(complete_only=False)] == [name]  # `ls --all`

    cache.write_blob(b"whole".ljust(100, b"w"))  # the blob is back
    cache.sweep()
    assert os.path.exists(cache.store.manifest_path(name))
    assert not os.path.exists(cache.store.staged_manifest_path(name))
    assert cache.names() == ["whole:latest"]


def test_a_manifest_written_before_its_blobs_is_staged_and_deleting_the_tag_removes_it(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path)
    name = ModelName.parse("later")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"digest": "sha256:" + "c" * 64, "size": 10},
            "layers": [{"digest": "sha256:" + "d" * 64, "size": 20}],
        }
    ).encode()
    cache.store.write_manifest(name, manifest)
    assert cache.store.read_manifest(name) == manifest  # served to registry clients meanwhile
    assert not os.path.exists(cache.store.manifest_path(name))
    assert cache.store.promote_manifest(name) is False  # its blobs are not here
    assert Catalog(cache.store).delete(name) == []
    assert cache.store.read_manifest(name) is None
