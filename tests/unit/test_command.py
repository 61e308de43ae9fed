"""The ``ollama-mirror`` command without a network: exit statuses, one-line errors, bundles refused,
the cache lock, and the prefetch list's rounds on a fake clock."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from ollama_mirror.cache.bundle import BundleError, export_bundle, import_bundle
from ollama_mirror.cache.lock import CacheLock
from ollama_mirror.cache.store import Store
from ollama_mirror.cli import main as cli
from ollama_mirror.cli.maintenance import at_once, sweeper_for
from ollama_mirror.cli.parser import build_parser
from ollama_mirror.cli.prefetch import PullView
from ollama_mirror.cli.progress import Progress
from ollama_mirror.config import load_config
from ollama_mirror.daemon.prefetch import PrefetchService
from ollama_mirror.daemon.service import StartupError, build_service
from ollama_mirror.fill.errors import PullFailed
from ollama_mirror.names import ModelName
from tests.support.cli import run_cli

TINY = ModelName.parse("tiny")


def make_cache(root: Path, models: dict[str, bytes]) -> Store:
    """A cache holding one model per name: a weights layer, a shared template, a config."""
    store = Store(str(root))
    store.create()

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        hexdigest = hashlib.sha256(data).hexdigest()
        Path(store.blob_path(hexdigest)).write_bytes(data)
        return {"mediaType": media_type, "digest": "sha256:" + hexdigest, "size": len(data)}

    for text, weights in models.items():
        manifest = {
            "schemaVersion": 2,
            "config": blob(json.dumps({"model_format": "gguf", "name": text}).encode(), "config"),
            "layers": [
                blob(weights, "application/vnd.ollama.image.model"),
                blob(b"{{ .Prompt }}", "application/vnd.ollama.image.template"),
            ],
        }
        store.write_manifest(ModelName.parse(text), json.dumps(manifest).encode())
    return store


def quiet() -> Progress:
    return Progress(sys.stderr, quiet=True)


def bundle_of(store: Store, *names: str) -> bytes:
    out = io.BytesIO()
    export_bundle(store, [ModelName.parse(n) for n in names], out, quiet())
    return out.getvalue()


def members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m, (tar.extractfile(m) or io.BytesIO()).read() if m.isreg() else b"") for m in tar]


def retar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def holdings(store: Store) -> list[str]:
    return sorted(
        str(p.relative_to(store.root))
        for area in (store.manifests_dir, store.blobs_dir, store.partial_dir)
        for p in Path(area).rglob("*")
        if p.is_file()
    )


# --- bundles -----------------------------------------------------------------------------------------


def test_export_then_import_round_trip(tmp_path: Path) -> None:
    source = make_cache(tmp_path / "a", {"tiny": os.urandom(300_000), "other": os.urandom(1000)})
    data = bundle_of(source, "tiny", "other")
    names = [m.name for m, _ in members(data)]
    assert (
        names[0] == "index.json" and len([n for n in names if n.startswith("blobs/")]) == 5
    )  # template once
    target = Store(str(tmp_path / "b"))
    report = import_bundle(target, io.BytesIO(data), quiet())
    assert sorted(report.models) == ["other:latest", "tiny:latest"]
    assert (report.blobs_added, report.blobs_present) == (5, 0)
    assert holdings(target) == [p for p in holdings(source) if not p.startswith(".mirror")]
    for name in ("tiny", "other"):
        assert target.read_manifest(ModelName.parse(name)) == source.read_manifest(ModelName.parse(name))


def test_export_refuses_a_blob_damaged_on_disk(tmp_path: Path) -> None:
    store = make_cache(tmp_path / "a", {"tiny": b"x" * 5000})
    weights = max(Path(store.blobs_dir).iterdir(), key=lambda p: p.stat().st_size)
    weights.write_bytes(b"y" * 5000)
    with pytest.raises(BundleError, match="does not match its digest"):
        bundle_of(store, "tiny")


def _unsafe(kind: str, data: bytes) -> bytes:
    entries = members(data)
    info = tarfile.TarInfo()
    if kind == "symlink":
        info = tarfile.TarInfo("blobs/sha256-" + "0" * 64)
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info = tarfile.TarInfo("manifests/registry.ollama.ai/library/tiny/evil")
        info.type, info.linkname = tarfile.LNKTYPE, "index.json"
    elif kind == "device":
        info = tarfile.TarInfo("blobs/sha256-" + "1" * 64)
        info.type = tarfile.CHRTYPE
    elif kind == "fifo":
        info = tarfile.TarInfo("blobs")
        info.type = tarfile.FIFOTYPE
    else:
        info = tarfile.TarInfo(kind)
        info.size = 1
        return retar([entries[0], (info, b"!"), *entries[1:]])
    return retar([entries[0], (info, b""), *entries[1:]])


@pytest.mark.parametrize(
    "kind",
    [
        "symlink",
        "hardlink",
        "device",
        "fifo",
        "../outside",
        "/absolute",
        "blobs/../../x",
        "manifests/registry.ollama.ai/library/tiny/../../../../../x",
        "manifests/registry.ollama.ai/lib rary/tiny/latest",
        "blobs/sha256-XYZ",
        "blobs\\..\\x",
        "extra.txt",
    ],
)
def test_import_refuses_members_that_are_not_plain_expected_files(tmp_path: Path, kind: str) -> None:
    data = bundle_of(make_cache(tmp_path / "a", {"tiny": b"w" * 1000}), "tiny")
    target = Store(str(tmp_path / "b"))
    with pytest.raises(BundleError, match="refused"):
        import_bundle(target, io.BytesIO(_unsafe(kind, data)), quiet())
    assert holdings(target) == []
    assert not (tmp_path / "outside").exists() and not (tmp_path / "x").exists()


def _tamper(data: bytes, how: str) -> bytes:
    entries = members(data)
    if how == "index-not-first":
        return retar([*entries[1:], entries[0]])
    if how == "blob-twice":
        return retar([*entries, entries[-1]])
    if how == "blob-missing":
        return retar(entries[:-1])
    if how == "unlisted-blob":
        extra = tarfile.TarInfo("blobs/sha256-" + hashlib.sha256(b"z").hexdigest())
        extra.size = 1
        return retar([*entries, (extra, b"z")])
    if how == "manifest-swapped":  # a manifest that is not the one the index names
        index, rest = entries[0], entries[1:]
        manifest_info, _ = next(e for e in rest if e[0].name.startswith("manifests/"))
        other = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
        manifest_info.size = len(other)
        return retar([index, *[(i, other if i is manifest_info else d) for i, d in rest]])
    if how == "not-a-bundle":
        info = tarfile.TarInfo("index.json")
        text = b'{"format": "something-else"}'
        info.size = len(text)
        return retar([(info, text)])
    if how == "not-tar":
        return b"this is not a tar file at all" * 100
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "index-not-first",
        "blob-twice",
        "blob-missing",
        "unlisted-blob",
        "manifest-swapped",
        "not-a-bundle",
        "not-tar",
    ],
)
def test_import_refuses_inconsistent_bundles_and_publishes_nothing(tmp_path: Path, how: str) -> None:
    data = bundle_of(make_cache(tmp_path / "a", {"tiny": b"w" * 1000, "other": b"v" * 10}), "tiny", "other")
    target = Store(str(tmp_path / "b"))
    with pytest.raises(BundleError):
        import_bundle(target, io.BytesIO(_tamper(data, how)), quiet())
    assert holdings(target) == []


def test_import_refuses_a_bundle_the_disk_cannot_hold(tmp_path: Path) -> None:
    data = bundle_of(make_cache(tmp_path / "a", {"tiny": b"w" * 1000}), "tiny")
    target = Store(str(tmp_path / "b"))
    with pytest.raises(BundleError, match="not enough disk space"):
        import_bundle(target, io.BytesIO(data), quiet(), min_free=2**62)
    assert holdings(target) == []


# --- the command: exit statuses and one-line errors --------------------------------------------------


def command(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return int(exited.value.code or 0), out, err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, "usage: ollama-mirror"),
        (("frobnicate",), 2, "invalid choice: 'frobnicate'"),
        (("prefetch",), 2, "name at least one model, or --from FILE"),
        (("prefetch", "../etc", "--cache-dir", "{tmp}"), 2, "'../etc' is not a model name"),
        (("prefetch", "x", "--from", "{tmp}/none.txt", "--cache-dir", "{tmp}"), 2, "cannot read"),
        (("prefetch", "x", "--mirror", "ftp://m"), 2, "--mirror wants a URL"),
        (("prefetch", "x", "--mirror", "http://m", "--cache-dir", "{tmp}"), 2, "leave out --config"),
        (("export", "tiny"), 2, "the following arguments are required: -o/--output"),
        (("export", "-o", "{tmp}/b.tar", "--cache-dir", "{tmp}/c"), 1, "is not a cache directory"),
        (("ls", "--cache-dir", "{tmp}", "--set", "cache.nope=1"), 2, "unknown key cache.nope"),
        (("ls", "--set", "cache.retention_days=-1", "--cache-dir", "{tmp}"), 2, "is negative"),
        (("import", "{tmp}/none.tar", "--cache-dir", "{tmp}/c"), 1, "cannot read {tmp}/none.tar"),
        (("rm", "tiny", "--cache-dir", "{tmp}/empty"), 1, "is not a cache directory"),
        (("health", "--mirror", "http://127.0.0.1:1", "--timeout", "5"), 1, "cannot reach mirror"),
    ],
)
def test_errors_are_one_line_with_a_documented_status(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    status, _, err = command(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert status == code
    assert message.replace("{tmp}", str(tmp_path)) in err
    if args:  # (no command at all prints the help)
        assert len(err.strip().splitlines()) == 1, err


def test_rm_says_which_models_were_not_cached_and_exits_3_when_others_were(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_cache(tmp_path, {"tiny": b"w" * 100, "other": b"v" * 100})
    status, out, err = command(capsys, "rm", "tiny", "ghost", "--cache-dir", str(tmp_path))
    assert status == 3
    assert out.startswith("deleted tiny:latest")
    assert err.strip() == "ollama-mirror: error: not in the cache: ghost:latest"
    status, _, _ = command(capsys, "rm", "ghost", "--cache-dir", str(tmp_path))
    assert status == 1
    status, out, _ = command(capsys, "ls", "--json", "--cache-dir", str(tmp_path))
    assert status == 0 and [m["name"] for m in json.loads(out)["models"]] == ["other:latest"]


def test_pin_keeps_a_tag_through_gc_beside_a_running_daemon_and_unpin_lets_it_go(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store = make_cache(tmp_path, {"tiny": b"w" * 100, "other": b"v" * 100})
    daemon_lock = CacheLock(store.work_dir)
    daemon_lock.acquire(exclusive=False)  # pins need no exclusive lock: a running daemon holds this
    try:
        status, out, _ = command(capsys, "pin", "tiny", "later", "--cache-dir", str(tmp_path))
    finally:
        daemon_lock.release()
    assert status == 0
    assert out.splitlines() == [
        "pinned tiny:latest",
        "pinned later:latest (not cached yet: kept once pulled)",
    ]
    _, out, _ = command(capsys, "ls", "--json", "--cache-dir", str(tmp_path))
    assert {m["name"]: m["pinned"] for m in json.loads(out)["models"]} == {
        "tiny:latest": True,
        "other:latest": False,
    }
    expire = ("--set", "cache.retention_days=0")
    status, out, _ = command(capsys, "gc", "--cache-dir", str(tmp_path), *expire)
    assert status == 0 and "removed other:latest;" in out
    status, out, _ = command(capsys, "unpin", "tiny", "--cache-dir", str(tmp_path))
    assert status == 0 and out == "unpinned tiny:latest\n"
    _, out, _ = command(capsys, "gc", "--cache-dir", str(tmp_path), *expire)
    assert "removed tiny:latest;" in out


def test_gc_applies_the_configured_limits(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    make_cache(tmp_path, {"tiny": b"w" * 100})
    status, out, _ = command(capsys, "gc", "--cache-dir", str(tmp_path))
    assert status == 0 and "removed no models" in out
    status, out, _ = command(capsys, "gc", "--cache-dir", str(tmp_path), "--set", "cache.retention_days=0")
    assert status == 0 and "removed tiny:latest" in out
    assert not list(Path(tmp_path, "manifests").rglob("latest"))


def test_maintenance_commands_wait_for_no_daemon_and_the_daemon_for_no_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store = make_cache(tmp_path, {"tiny": b"w" * 100})
    daemon_lock = CacheLock(store.work_dir)
    daemon_lock.acquire(exclusive=False)  # as a running daemon holds it
    try:
        hints = {
            "gc": "the running daemon sweeps by itself every cache.cleanup_interval seconds",
            "rm": "to rm through the running daemon, add --mirror URL",
            "prefetch": "to prefetch through the running daemon, add --mirror URL",
        }
        for args in (("gc",), ("rm", "tiny"), ("prefetch", "tiny")):
            status, _, err = command(capsys, *args, "--cache-dir", str(tmp_path))
            assert status == 1
            assert "a running ollama-mirror daemon or import is using this cache" in err
            assert hints[args[0]] in err and len(err.strip().splitlines()) == 1
    finally:
        daemon_lock.release()
    maintenance = CacheLock(store.work_dir)
    maintenance.acquire(exclusive=True)  # as gc holds it
    try:
        config = load_config(None, {}, {"cache.directory": str(tmp_path)})
        service = build_service(config, MemoryReactorClock())
        with pytest.raises(StartupError, match="maintenance command"):
            service.privilegedStartService()
    finally:
        maintenance.release()


def test_every_command_has_help() -> None:
    for name in ("prefetch", "ls", "export", "import", "gc", "rm", "health"):
        parser = build_parser()
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([name, "--help"])
        assert exited.value.code == 0


def test_the_console_script_runs_serve_with_the_daemons_options(tmp_path: Path) -> None:
    result = run_cli("serve", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in (b"--config", b"--listen", b"--set", b"--cache-dir"):
        assert option in result.stdout
    bad = run_cli("serve", "--set", "cache.prefetch=bad/../name", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.decode().strip().startswith("ollama-mirror: configuration error: cache.prefetch = ")


def test_progress_on_a_pipe_is_one_line_per_item() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False)
    progress.start("sha256:abc", 2_000_000)
    progress.update(1_000_000)
    progress.finish()
    progress.message("done")
    assert out.getvalue().splitlines() == ["sha256:abc: done (2.0 MB)", "done"]


def test_a_pull_shown_on_a_pipe_says_done_once_per_blob_and_shows_waits() -> None:
    """The mirror repeats a blob's last line (completed, then present once verified): one "done"."""
    out = io.StringIO()
    view = PullView(Progress(out, tty=False), ModelName.parse("tiny"))
    view.line({"status": "pulling manifest"})
    view.line({"status": "pulling manifest: waiting for http://registry.example to answer"})
    digest = "sha256:" + "ab" * 32
    for completed in (0, 5, 10, 10):
        view.line({"status": "pulling abababababab", "digest": digest, "total": 10, "completed": completed})
    view.line({"status": "verifying sha256 digest"})
    view.line({"status": "success"})
    assert out.getvalue().splitlines() == [
        "tiny:latest: pulling manifest",
        "tiny:latest: pulling manifest: waiting for http://registry.example to answer",
        "tiny:latest abababababab: done (10 B)",
    ]


# --- the prefetch list ---------------------------------------------------------------------------------


class FakePuller:
    """Fails *name* the first *failures* times, then succeeds; every pull takes one clock second."""

    def __init__(self, clock: Clock, failures: int) -> None:
        self.clock = clock
        self.failures = failures
        self.pulled: list[str] = []

    async def pull(self, name: ModelName, emit: Any) -> list[str]:
        from twisted.internet.task import deferLater

        await deferLater(self.clock, 1)
        self.pulled.append(name.display())
        if name.model == "flaky" and self.failures > 0:
            self.failures -= 1
            raise PullFailed("upstream said 503")
        return ["abc"]


def test_the_prefetch_list_runs_at_start_then_every_interval_and_retries_failures() -> None:
    clock = Clock()
    puller = FakePuller(clock, failures=1)
    service = PrefetchService(puller, ("tiny", "flaky"), 600, clock)  # type: ignore[arg-type]
    service.startService()
    clock.advance(1)
    clock.advance(1)
    first = service.last_round
    assert first is not None and first.failed == {"flaky": "upstream said 503"} and "tiny" in first.fetched
    clock.advance(600)
    clock.advance(1)
    clock.advance(1)
    assert service.rounds == 2 and service.last_round is not first
    assert service.last_round is not None and service.last_round.failed == {}
    assert puller.pulled == ["tiny:latest", "flaky:latest"] * 2
    stopped: Deferred[None] = service.stopService()  # type: ignore[assignment]
    assert stopped.called


def test_a_round_in_progress_is_stopped_with_the_daemon() -> None:
    clock = Clock()
    service = PrefetchService(FakePuller(clock, 0), ("tiny",), 0, clock)  # type: ignore[arg-type]
    service.startService()
    clock.advance(0)  # the round starts and waits for its pull
    assert service.rounds == 1 and service.last_round is None
    stopped: Deferred[None] = service.stopService()  # type: ignore[assignment]
    assert stopped.called
    assert not clock.getDelayedCalls()


def test_a_sweep_during_a_long_import_keeps_its_staging_files(tmp_path: Path) -> None:
    """The sweeper removes temporary files untouched for an hour, but not those of a running import."""
    data = bundle_of(
        make_cache(tmp_path / "a", {"tiny": b"w" * 300_000, "other": b"v" * 300_000}), "tiny", "other"
    )
    target = Store(str(tmp_path / "b"))
    config = load_config(None, {}, {"cache.directory": target.root})
    swept: list[int] = []

    class SweepMidway(Progress):
        def start(self, label: str, total: int) -> None:
            staged = list(Path(target.partial_dir).glob("import-*.part"))
            if len(staged) == 2 and not swept:  # an hour has passed for the first ones...
                for path in staged:
                    os.utime(path, (os.path.getmtime(path) - 7200,) * 2)
            super().start(label, total)

        def update(self, done: int) -> None:
            super().update(done)
            staged = list(Path(target.partial_dir).glob("import-*.part"))
            if len(staged) >= 3 and not swept:  # ...and the daemon sweeps while this blob arrives
                sweeper = sweeper_for(config)
                report = at_once(sweeper.sweep())
                sweeper.index.close()
                swept.append(report.removed_partials)

    report = import_bundle(target, io.BytesIO(data), SweepMidway(io.StringIO(), quiet=True))
    assert swept == [0]
    assert sorted(report.models) == ["other:latest", "tiny:latest"]


def test_client_commands_send_the_api_key_and_say_when_it_is_missing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str | None] = []

    class Guarded(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Authorization") != "Bearer s3cret":
                body = b'{"error": "unauthorized"}'
                self.send_response(401)
            else:
                body = b'{"status":"pulling manifest"}\n{"status":"success"}\n'
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, _, err = command(capsys, "prefetch", "tiny", "--mirror", url)
        assert status == 1
        assert "refused the request (401 unauthorized): give --api-key or set OLLAMA_MIRROR_API_KEY" in err
        status, _, err = command(capsys, "prefetch", "tiny", "--mirror", url, "--api-key", "s3cret")
        assert status == 0, err
        monkeypatch.setenv("OLLAMA_MIRROR_API_KEY", "s3cret")
        status, _, err = command(capsys, "prefetch", "tiny", "--mirror", url)
        assert status == 0, err
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert seen == [None, "Bearer s3cret", "Bearer s3cret"]


def test_the_prefetch_list_skips_what_the_model_rules_refuse() -> None:
    from ollama_mirror.security.modelrules import ModelRules

    clock = Clock()
    puller = FakePuller(clock, 0)
    rules = ModelRules([], ["secret"])
    service = PrefetchService(puller, ("tiny", "secret"), 0, clock, rules.check)  # type: ignore[arg-type]
    service.startService()
    clock.advance(0)
    clock.advance(1)
    assert puller.pulled == ["tiny:latest"]
    assert service.last_round is not None
    assert "blocked by the rule 'secret' in security.blocked_models" in service.last_round.failed["secret"]
    service.stopService()
