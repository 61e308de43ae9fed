"""The ``ollama-mirror`` command against real parts: the registry fixture, the real daemon, bundles on disk.

- ``prefetch`` straight into a cache directory and through a running mirror, then ``ls``;
- ``export`` → ``import`` into a second cache while a daemon with no upstream serves it, then real pulls;
- a damaged bundle (one flipped byte, truncated, an import killed or stopped midway) adds nothing;
- the daemon's ``cache.prefetch`` list; ``gc``/``rm`` next to a running daemon.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import ollama
import pytest

from tests.integration.helpers import go_pull, sha256_file, wait_until
from tests.support.cli import cli_command, cli_env, run_cli, stderr_lines
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.filesystems import read_only
from tests.support.models import MiB, ModelFactory, PushedModel
from tests.support.registry import RegistryProcess, free_port

UPSTREAM_HOST = "registry.ollama.ai"
FAST_UPSTREAM = ("--set", "upstream.chunk_size=256KiB", "--set", "upstream.retry_delay=0.1")


@pytest.fixture(scope="module")
def second_model(model_factory: ModelFactory) -> PushedModel:
    """A ~1 MiB model that shares its template, params and license blobs with ``small_model``."""
    return model_factory("library/opsmodel", "latest", MiB, 9)


def short(model: PushedModel) -> str:
    return model.repo.removeprefix("library/")


def on_cache(cache: Path, registry: RegistryProcess | None = None) -> tuple[str, ...]:
    upstream = registry.url if registry is not None else f"http://127.0.0.1:{free_port()}"
    return ("--cache-dir", str(cache), "--set", f"upstream.url={upstream}", *FAST_UPSTREAM)


def assert_holds(cache: Path, model: PushedModel) -> None:
    """The model is complete in the cache: its manifest bytes verbatim, every blob whole and verified."""
    manifest = cache / "manifests" / UPSTREAM_HOST / model.repo / model.tag
    assert manifest.read_bytes() == model.manifest
    for blob in model.blobs:
        path = cache / "blobs" / blob.cache_name
        assert path.stat().st_size == blob.size
        assert sha256_file(path) == blob.hex


def cache_files(cache: Path) -> dict[str, list[str]]:
    """What a cache holds, by area (manifests, blobs, partial): relative paths."""
    areas = {
        "manifests": cache / "manifests",
        "blobs": cache / "blobs",
        "partial": cache / ".mirror" / "partial",
    }
    return {
        area: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
        for area, root in areas.items()
    }


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = [line for line in stderr_lines(result) if line.startswith("ollama-mirror: error:")]
    assert len(lines) == 1, result.stderr
    assert b"Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def bundle(
    registry: RegistryProcess, small_model: PushedModel, second_model: PushedModel, tmp_path: Path
) -> Path:
    """Both models prefetched straight into a cache, then exported to ``bundle.tar``."""
    source = tmp_path / "source"
    result = run_cli("prefetch", short(small_model), short(second_model), *on_cache(source, registry))
    assert result.returncode == 0, result.stderr
    path = tmp_path / "bundle.tar"
    result = run_cli(
        "export", short(small_model), short(second_model), "-o", str(path), "--cache-dir", str(source)
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "bundle.tar.partial").exists()
    return path


# --- prefetch and ls -------------------------------------------------------------------------------


def test_prefetch_on_a_cache_directory_then_ls(
    registry: RegistryProcess, small_model: PushedModel, second_model: PushedModel, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    result = run_cli(
        "prefetch",
        short(small_model),
        short(second_model),
        "--cache-dir",
        str(cache),
        "--upstream-url",
        registry.url,
    )
    assert result.returncode == 0, result.stderr
    progress = result.stderr.decode().splitlines()
    assert "prefetch: 2 of 2 models cached" in progress
    for model in (small_model, second_model):  # each blob reported done once, on a pipe as in a log
        for blob in model.blobs:
            label = f"{model.short_name} {blob.hex[:12]}: done"
            assert len([line for line in progress if line.startswith(label)]) == 1, progress
        assert f"{model.short_name}: pulling manifest" in progress
    assert_holds(cache, small_model)
    assert_holds(cache, second_model)
    assert cache_files(cache)["partial"] == []

    listing = run_cli("ls", "--json", "--cache-dir", str(cache))
    assert listing.returncode == 0, listing.stderr
    models = {m["name"]: m for m in json.loads(listing.stdout)["models"]}
    assert set(models) == {"tiny:latest", "opsmodel:latest"}
    for model in (small_model, second_model):
        entry = models[model.short_name]
        assert entry["size"] == model.total_size
        assert entry["digest"] == model.manifest_hex
        assert entry["complete"] is True
        assert entry["pull_count"] == 1  # from the cache index the prefetch updated

    table = run_cli("ls", "--cache-dir", str(cache))
    assert table.returncode == 0
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "LAST", "USED", "PULLS"]
    assert sorted(line.split()[0] for line in lines[1:]) == ["opsmodel:latest", "tiny:latest"]

    again = run_cli("prefetch", short(small_model), *on_cache(cache, registry))  # cached: nothing fetched
    assert again.returncode == 0, again.stderr
    assert "tiny:latest: cached (0 blobs fetched)" in again.stderr.decode()


def test_prefetch_through_a_running_mirror(mirror: MirrorDaemon, small_model: PushedModel) -> None:
    result = run_cli("prefetch", short(small_model), "--mirror", mirror.url)
    assert result.returncode == 0, result.stderr
    assert_holds(mirror.cache_dir, small_model)
    progress = result.stderr.decode().splitlines()
    assert "tiny:latest: cached on " + mirror.url in progress
    for blob in small_model.blobs:
        assert len([line for line in progress if line.startswith(f"tiny:latest {blob.hex[:12]}: done")]) == 1

    partial = run_cli("prefetch", short(small_model), "no-such-model", "--mirror", mirror.url)
    assert partial.returncode == 3, partial.stderr  # some models failed, the others are cached
    line = one_error_line(partial)
    assert "1 of 2 models cached" in line and "no-such-model:latest" in line


def test_prefetch_from_a_file_and_its_errors(
    registry: RegistryProcess, small_model: PushedModel, tmp_path: Path
) -> None:
    names = tmp_path / "models.txt"
    names.write_text(f"# warm before the training run\n{short(small_model)}   # the small one\n\n")
    cache = tmp_path / "cache"
    result = run_cli("prefetch", "--from", str(names), *on_cache(cache, registry))
    assert result.returncode == 0, result.stderr
    assert_holds(cache, small_model)

    failed = run_cli("prefetch", "no-such-model", *on_cache(tmp_path / "other", registry))
    assert failed.returncode == 1
    assert "no-such-model:latest: pull model manifest: file does not exist" in one_error_line(failed)

    away = run_cli("prefetch", short(small_model), "--mirror", f"http://127.0.0.1:{free_port()}")
    assert away.returncode == 1
    assert "cannot reach mirror" in one_error_line(away)


# --- export and import -----------------------------------------------------------------------------


def test_export_import_round_trip_into_a_served_air_gapped_cache(
    bundle: Path,
    small_model: PushedModel,
    second_model: PushedModel,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert names[0] == "index.json"
    assert {m["name"] for m in index["models"]} == {
        f"{UPSTREAM_HOST}/{small_model.repo}:latest",
        f"{UPSTREAM_HOST}/{second_model.repo}:latest",
    }
    shared = {b.digest for b in small_model.blobs} & {b.digest for b in second_model.blobs}
    assert shared  # the template, params and license blobs are shipped once
    assert len([n for n in names if n.startswith("blobs/")]) == len(
        {b.digest for b in (*small_model.blobs, *second_model.blobs)}
    )

    # The site has no upstream at all; its daemon is serving an empty cache while the import runs.
    site = mirror_factory(upstream_url=f"http://127.0.0.1:{free_port()}")
    assert ollama.Client(host=site.url, timeout=30).list().models == []
    result = run_cli("import", str(bundle), "--cache-dir", str(site.cache_dir))
    assert result.returncode == 0, result.stderr
    assert "imported 2 models" in result.stderr.decode()
    assert cache_files(site.cache_dir)["partial"] == []

    listed = {str(m.model): m.size for m in ollama.Client(host=site.url, timeout=30).list().models}
    assert listed == {
        small_model.short_name: small_model.total_size,
        second_model.short_name: second_model.total_size,
    }
    for model in (small_model, second_model):
        pulled = go_pull(site, model, tmp_path / f"pulled-{short(model)}")
        assert pulled.manifest_bytes == model.manifest
        for digest, size, path in pulled.blobs:
            blob = model.blob(digest)
            assert size == blob.size and sha256_file(path) == blob.hex

    again = run_cli("import", str(bundle), "--cache-dir", str(site.cache_dir))  # idempotent
    assert again.returncode == 0, again.stderr
    assert "0 blobs added" in again.stderr.decode()


def test_export_to_standard_output_and_import_from_standard_input(
    bundle: Path, small_model: PushedModel, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    streamed = run_cli("export", short(small_model), "-o", "-", "--cache-dir", str(source))
    assert streamed.returncode == 0, streamed.stderr
    target = tmp_path / "target"
    result = run_cli("import", "-", "--cache-dir", str(target), input=streamed.stdout)
    assert result.returncode == 0, result.stderr
    assert_holds(target, small_model)

    missing = run_cli("export", "not-cached", "-o", str(tmp_path / "x.tar"), "--cache-dir", str(source))
    assert missing.returncode == 1
    assert "model not-cached:latest is not in the cache" in one_error_line(missing)
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.partial").exists()


def member_offset(bundle: Path, prefix: str, largest: bool = True) -> tuple[int, int]:
    """(offset of the data, size) of the largest (or smallest) member whose name starts with *prefix*."""
    with tarfile.open(bundle) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
    member = (max if largest else min)(members, key=lambda m: m.size)
    return member.offset_data, member.size


@pytest.mark.parametrize("where", ["blob", "manifest", "index"])
def test_a_bundle_with_one_flipped_byte_adds_nothing(bundle: Path, tmp_path: Path, where: str) -> None:
    data = bytearray(bundle.read_bytes())
    if where == "index":
        start, size = member_offset(bundle, "index.json")
        text = data[start : start + size]
        position = start + text.index(b'"sha256:') + 20  # inside a digest: still JSON, now wrong
    else:
        start, size = member_offset(bundle, "blobs/" if where == "blob" else "manifests/")
        position = start + size // 2
    data[position] ^= 0x01
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))

    target = tmp_path / "target"
    result = run_cli("import", str(damaged), "--cache-dir", str(target))
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.endswith("; nothing was imported"), line
    assert cache_files(target) == {"manifests": [], "blobs": [], "partial": []}


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.7, None])
def test_a_truncated_bundle_adds_nothing(bundle: Path, tmp_path: Path, fraction: float | None) -> None:
    """Cut anywhere, down to the last byte of the last blob (None); the tar's end padding is not data."""
    data = bundle.read_bytes()
    with tarfile.open(bundle) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + last.size - 1 if fraction is None else int(len(data) * fraction)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:end])
    target = tmp_path / "target"
    result = run_cli("import", str(cut), "--cache-dir", str(target))
    assert result.returncode == 1
    assert "nothing was imported" in one_error_line(result)
    assert cache_files(target) == {"manifests": [], "blobs": [], "partial": []}


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_an_import_stopped_midway_leaves_no_model(
    bundle: Path, small_model: PushedModel, second_model: PushedModel, tmp_path: Path, how: signal.Signals
) -> None:
    """The bundle arrives through a pipe; the import is stopped once it has staged a blob."""
    data = bundle.read_bytes()
    biggest, size = member_offset(bundle, "blobs/")
    target = tmp_path / "target"
    process = subprocess.Popen(
        cli_command("import", "-", "--cache-dir", str(target)),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=cli_env(),
        start_new_session=True,
    )
    try:
        assert process.stdin is not None
        process.stdin.write(data[: biggest + size // 2])  # halfway through the largest blob
        process.stdin.flush()
        partial = target / ".mirror" / "partial"
        wait_until(lambda: any(partial.glob("import-*.part")), 30, "the import to stage a blob")
        process.send_signal(how)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    files = cache_files(target)
    assert files["manifests"] == [] and files["blobs"] == []
    if how == signal.SIGTERM:  # cleaned up on the way out
        assert code == 130
        assert files["partial"] == []
        assert process.stderr is not None and b"ollama-mirror: error: interrupted" in process.stderr.read()
        return
    # Killed: only staging files are left, where the sweeper removes abandoned temporary files.
    assert files["partial"] and all(name.startswith("import-") for name in files["partial"])
    hours_ago = time.time() - 2 * 3600
    for name in files["partial"]:
        os.utime(partial / name, (hours_ago, hours_ago))
    swept = run_cli("gc", "--cache-dir", str(target))
    assert swept.returncode == 0, swept.stderr
    assert cache_files(target) == {"manifests": [], "blobs": [], "partial": []}
    retried = run_cli("import", str(bundle), "--cache-dir", str(target))  # and the import can be run again
    assert retried.returncode == 0, retried.stderr
    assert_holds(target, small_model)
    assert_holds(target, second_model)


def test_a_bundle_with_a_path_outside_the_cache_is_refused(tmp_path: Path) -> None:
    for member in ("../escape", "/etc/evil", "blobs/../../x", "manifests/a/b/c"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            index = b'{"format": "ollama-mirror-bundle", "version": 1, "models": [], "blobs": []}'
            info = tarfile.TarInfo("index.json")
            info.size = len(index)
            tar.addfile(info, io.BytesIO(index))
            info = tarfile.TarInfo(member)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        target = tmp_path / "target"
        result = run_cli("import", "-", "--cache-dir", str(target), input=buffer.getvalue())
        assert result.returncode == 1
        assert "refused" in one_error_line(result), member
        assert not (tmp_path / "escape").exists()
        assert cache_files(target) == {"manifests": [], "blobs": [], "partial": []}


# --- the daemon's prefetch list, and maintenance beside a daemon -----------------------------------


def test_the_prefetch_list_is_warmed_at_start(
    mirror_factory: MirrorFactory, small_model: PushedModel
) -> None:
    daemon = mirror_factory(
        config={
            "cache": {"prefetch": [short(small_model), "no-such-model"], "prefetch_interval": 3600},
            "upstream": {"chunk_size": "256KiB"},
        }
    )
    wait_until(lambda: "prefetch round:" in daemon.log_text(), 30, "the first prefetch round")
    assert_holds(daemon.cache_dir, small_model)  # nobody asked for it
    log = daemon.log_text()
    assert "prefetch round: 1 of 2 models cached" in log
    assert "prefetch of no-such-model failed: pull model manifest: file does not exist" in log


def test_a_bad_name_in_the_prefetch_list_stops_start_up(mirror_factory: MirrorFactory) -> None:
    daemon = mirror_factory(config={"cache": {"prefetch": ["../etc"]}}, start=False)
    daemon.start(wait=False)
    assert daemon.wait_exit() == 2
    assert 'cache.prefetch = ["../etc"]' in daemon.stderr_text() + daemon.stdout_text()


@pytest.mark.parametrize("where", ["a file", "below a file", "read-only"])
def test_an_unusable_cache_directory_stops_start_up_with_one_line(
    mirror_factory: MirrorFactory, tmp_path: Path, where: str
) -> None:
    """Exit status 2, as for every configuration error (systemd's RestartPreventExitStatus=2 then does
    not restart the daemon in a loop), and one line naming the key and the reason, no traceback."""
    a_file = tmp_path / "cache-file"
    a_file.write_text("not a directory")
    read_only_dir = tmp_path / "ro"
    read_only_dir.mkdir()
    cache = {"a file": a_file, "below a file": a_file / "cache", "read-only": read_only_dir}[where]
    daemon = mirror_factory(cache_dir=cache, start=False)
    with read_only(read_only_dir) if where == "read-only" else contextlib.nullcontext():
        daemon.start(wait=False)
        assert daemon.wait_exit() == 2
    output = (daemon.stderr_text() + daemon.stdout_text()).strip()
    assert output.startswith("ollama-mirror: configuration error: cache.directory: cannot use"), output
    assert "Traceback" not in output and len(output.splitlines()) == 1
    assert {"a file": "is a file", "below a file": "is a file", "read-only": "Read-only"}[where] in output


def test_gc_rm_and_health_beside_a_running_daemon(mirror: MirrorDaemon, small_model: PushedModel) -> None:
    health = run_cli("health", "--mirror", mirror.url)
    assert health.returncode == 0, health.stderr  # no backend Ollama here: degraded, but serving
    assert health.stdout.decode().startswith(("ok", "degraded"))
    assert run_cli("prefetch", short(small_model), "--mirror", mirror.url).returncode == 0
    for command in (("gc",), ("rm", short(small_model))):
        busy = run_cli(*command, "--cache-dir", str(mirror.cache_dir))
        assert busy.returncode == 1
        assert "a running ollama-mirror daemon or import is using this cache" in one_error_line(busy)
    assert_holds(mirror.cache_dir, small_model)

    removed = run_cli("rm", short(small_model), "--mirror", mirror.url)
    assert removed.returncode == 0, removed.stderr
    assert not (mirror.cache_dir / "manifests" / UPSTREAM_HOST / small_model.repo / small_model.tag).exists()
    gone = run_cli("rm", short(small_model), "--mirror", mirror.url)
    assert gone.returncode == 1
    assert "not in the cache: tiny:latest" in one_error_line(gone)
