"""Push benchmark: one blob pushed the way Ollama pushes it, to the distribution registry and to the mirror.

One command, one run, loopback only::

    python bench/push.py [--quick] [--size-mib 1024] [--repeat N] [--out results.json]

What it does (every figure a ratio against a baseline measured in the same run):

1. writes a blob of ``--size-mib`` MiB (default 1024, ``--quick`` 256; random bytes) to a file, with its
   sha256, a small config blob and a manifest naming both, and makes an Ollama key
   (``tests.support.ollamakey.OllamaKey``);
2. each round pushes that blob to two fresh targets, in turn, the order alternating from round to round
   (round 1 the registry first, round 2 the mirror first, ...):

   - the baseline: a distribution registry (``pull_1g.InfoRegistry``: Debian's ``docker-registry`` as
     packaged, ``log.level: info`` with its access log, the ``inmemory`` blob descriptor cache), no auth;
   - the measured case: the real daemon (``twistd -n ollama-mirror``, the checkout's code first on
     ``PYTHONPATH``) with ``private.namespaces`` ``["bench"]`` and ``private.push_authorized_keys`` a file
     holding the key's public line, otherwise its defaults (``logging.level`` ``INFO``, an access-log line
     per request);

   with the same client (``bench/_worker.py push``, a process of its own), which sends what Ollama's
   ``server/upload.go`` sends: ``HEAD`` of the blob (404); ``POST /v2/bench/push/blobs/uploads/`` (the
   mirror answers 401; a token request signed with the key as Ollama signs it; the ``POST`` again with
   ``Authorization: Bearer``) → 202 and a ``Location``; the blob in parts of clamp(size/16, 100 MB,
   1,000 MB) (100 MB up to 1.6 GB: 11 parts for 1 GiB, 3 for 256 MiB), one after another, each a ``PATCH``
   of the last ``Location`` with ``Content-Range: <a>-<b>`` (no ``bytes`` prefix), ``Content-Type:
   application/octet-stream`` and its ``Content-Length``, streamed from the file with ``sendfile`` (the
   blob is never in memory); ``PUT <Location>?digest=sha256:...`` → 201. The clock runs from the ``HEAD``
   to the ``201``. Untimed, the client then pushes the config blob and ``PUT``s the manifest (201);
3. after each push, outside the clock, checks that the target holds the blob: the registry, ``HEAD``
   (200, its ``Content-Length``) and a ``GET`` of the whole blob whose sha256 must be the digest; the
   mirror, ``HEAD`` (200), two ranged ``GET``s (a window across the first part boundary and the last
   4 KiB: 206, the file's bytes) and the file ``blobs/sha256-<hex>`` in its cache (size and sha256), with
   nothing left in its uploads directory; both, the manifest by tag (the bytes pushed);
4. prints a table: seconds (median, and the range over rounds), MiB/s, mirror throughput / registry
   throughput (the target: >= 0.8x) from the medians and per round, the commit ``PUT``'s seconds (the
   mirror ``fsync``s the blob before it answers), the server's CPU seconds during the push (for the
   mirror, split into its main (reactor) thread and its other threads: the ``ollama-mirror-io`` pool that
   writes and hashes), the client's, and the daemon's peak RSS; ``--out`` gets every sample as JSON.

What the distribution registry (2.8, Debian's) expects of these requests: a ``PATCH`` without
``Content-Type`` or with ``application/octet-stream``; it ignores ``Content-Range`` (the body is appended
where the upload ends; 3.x checks it: ``<a>-<b>``, ``a`` = the upload's size, ``Content-Length`` =
``b - a + 1``); each 202's ``Location`` carries a signed ``_state`` with the offset, so each part must
go to the ``Location`` the one before it was answered with, and the commit adds ``digest`` to that query.

Every wait has a deadline (``--timeout``); every process started is stopped and the work directory removed
at the end, even on error, Ctrl-C or SIGTERM. ``--py-spy EXE --keep-logs DIR`` records the daemon during
each push with py-spy (raw collapsed stacks per thread).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _worker import ollama_part_size  # noqa: E402
from cluster import LOG_PROBLEM, Profiler  # noqa: E402
from pull_1g import (  # noqa: E402
    WORKER,
    BenchError,
    InfoRegistry,
    busy_before,
    finish,
    parse_set,
    print_log_problems,
    proc_cpu_s,
    run_and_clean_up,
    run_bounded,
    settle,
    tree_total,
    vm_hwm_mb,
    work_directory,
)

from tests.support.daemon import MirrorDaemon  # noqa: E402
from tests.support.ollamakey import OllamaKey  # noqa: E402
from tests.support.registry import free_port  # noqa: E402

MiB = 2**20
REPO = "bench/push"  # a private namespace on the mirror (private.namespaces = ["bench"])
TAG = "latest"
TARGET = 0.8  # mirror throughput / registry throughput, at least
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
WRITE_CHUNK = 4 * MiB
HTTP_TIMEOUT = 60.0
TARGETS = ("registry", "mirror")
LABELS = {"registry": "registry (distribution 2.8)", "mirror": "mirror (private namespace)"}
# What every daemon here logs: no Ollama runs behind it (backend.url), and nothing listens at its upstream.
EXPECTED_WARNING = re.compile(r"\[ollama_mirror\.health#warn\] (backend|upstream) \S+ is not answering")


@dataclass
class Blob:
    path: Path
    size: int
    hex: str
    config: Path
    config_digest: str
    manifest: bytes
    manifest_path: Path

    @property
    def digest(self) -> str:
        return f"sha256:{self.hex}"


@dataclass
class Sample:
    """One push of the blob to one target."""

    target: str  # "registry" or "mirror"
    round: int
    position: int  # 0: pushed first in its round, 1: second
    seconds: float  # HEAD to the commit's 201
    size: int
    parts: int
    part_size: int
    commit_s: float | None = None  # the commit PUT alone
    start_s: float | None = None  # the POST (with the mirror's 401, token request and POST again)
    server_cpu_s: float | None = None  # the server's user+system seconds during the push
    main_thread_cpu_s: float | None = None  # the daemon's main (reactor) thread
    other_threads_cpu_s: float | None = None  # the daemon's other threads (its I/O pool)
    client_cpu_s: float | None = None
    rss_mb: float | None = None  # the daemon's VmHWM after the push
    busy_before: float | None = None  # machine CPU use (0..1) in the second before the push
    verify_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds if self.seconds > 0 else float("nan")


def thread_cpu_s(pid: int, tid: int) -> float | None:
    """User + system CPU seconds one thread of a live process has used so far."""
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(WRITE_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def file_bytes(path: Path, offset: int, count: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(count)


def manifest_of(config_digest: str, config_size: int, layer_digest: str, layer_size: int) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.ollama.image.model",
                    "digest": layer_digest,
                    "size": layer_size,
                }
            ],
        },
        separators=(",", ":"),
    ).encode()


class Http:
    """Plain requests for the checks after a push (a connection each, the body streamed)."""

    def __init__(self, base_url: str, timeout: float = HTTP_TIMEOUT) -> None:
        host, _, port = base_url.removeprefix("http://").partition(":")
        self.host, self.port, self.timeout = host, int(port), timeout

    @contextlib.contextmanager
    def open(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> Iterator[http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, headers=headers or {})
            yield conn.getresponse()
        finally:
            conn.close()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        with self.open("GET", path, headers) as response:
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    def head(self, path: str) -> tuple[int, dict[str, str]]:
        with self.open("HEAD", path) as response:
            response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}

    def sha256(self, path: str) -> tuple[int, int, str]:
        """(status, bytes, sha256 hex) of a GET, hashed as it arrives."""
        sha, count = hashlib.sha256(), 0
        with self.open("GET", path) as response:
            while chunk := response.read(WRITE_CHUNK):
                sha.update(chunk)
                count += len(chunk)
            return response.status, count, sha.hexdigest()


class PushBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.stack = contextlib.ExitStack()
        self.samples: list[Sample] = []
        self.daemons: list[dict[str, Any]] = []
        self.setup: dict[str, Any] = {}
        self.key = OllamaKey("bench@push")
        self._serial = 0

    def new_dir(self, prefix: str) -> Path:
        self._serial += 1
        path = self.workdir / f"{prefix}-{self._serial}"
        path.mkdir(parents=True)
        return path

    # -- set-up --------------------------------------------------------------------------------------

    def make_blob(self) -> Blob:
        """The blob's file (written in pieces, hashed as it is written), its config and manifest."""
        started = time.monotonic()
        path = self.workdir / "blob"
        size = self.args.size_mib * MiB
        sha = hashlib.sha256()
        with path.open("wb") as fh:
            left = size
            while left:
                n = min(WRITE_CHUNK, left)
                piece = os.urandom(n) if self.args.fill == "random" else bytes(n)
                sha.update(piece)
                fh.write(piece)
                left -= n
        config = self.workdir / "config.json"
        config.write_bytes(json.dumps({"model_format": "gguf", "model_family": "bench"}).encode())
        config_digest = "sha256:" + file_sha256(config)
        manifest = manifest_of(config_digest, config.stat().st_size, "sha256:" + sha.hexdigest(), size)
        manifest_path = self.workdir / "manifest.json"
        manifest_path.write_bytes(manifest)
        key_path = self.workdir / "id_ed25519.pem"
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
        )

        key_path.write_bytes(
            self.key.private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        )
        key_path.chmod(0o600)
        (self.workdir / "push_keys").write_text(f'namespaces="bench" {self.key.public_line()}\n')
        blob = Blob(path, size, sha.hexdigest(), config, config_digest, manifest, manifest_path)
        part_size = self.part_size(size)
        self.setup.update(
            {
                "blob_digest": blob.digest,
                "blob_size": size,
                "part_size": part_size,
                "parts": -(-size // part_size),
                "fill": self.args.fill,
                "make_blob_s": time.monotonic() - started,
            }
        )
        print(
            f"blob {blob.digest[:19]}… {size} bytes ({size / MiB:.0f} MiB), {self.setup['parts']} parts "
            f"of {part_size} bytes, written in {time.monotonic() - started:.1f} s"
        )
        return blob

    def part_size(self, size: int) -> int:
        return self.args.part_mb * 1000 * 1000 if self.args.part_mb else ollama_part_size(size)

    # -- the targets ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def registry(self) -> Iterator[InfoRegistry]:
        root = self.new_dir("registry")
        registry = InfoRegistry(root, start_timeout=min(60.0, self.args.timeout))
        try:
            yield registry
        finally:
            registry.stop()
            shutil.rmtree(root, ignore_errors=True)

    @contextlib.contextmanager
    def mirror(self, round_: int) -> Iterator[MirrorDaemon]:
        """A fresh daemon and cache that take pushes to ``bench/*`` with the bench's key; on the way out
        its warnings and errors are recorded, it is stopped and its directory deleted."""
        root = self.new_dir("mirror")
        config = {
            "private": {
                "namespaces": ["bench"],
                "push_authorized_keys": str(self.workdir / "push_keys"),
            }
        }
        # Nothing listens at the upstream address: a private name is never asked of an upstream.
        daemon = MirrorDaemon(
            root / "cache",
            f"http://127.0.0.1:{free_port()}",
            config=config,
            workdir=root / "daemon",
            overrides=self.args.set,
            start=False,
            start_timeout=min(60.0, self.args.timeout),
        )
        record: dict[str, Any] = {"round": round_, "overrides": dict(self.args.set)}
        try:
            daemon.start()
            record["pid"] = daemon.pid
            yield daemon
        except BaseException:
            lines = [line for line in daemon.log_text().splitlines() if LOG_PROBLEM.search(line)]
            if lines:
                print("\nthe daemon's last warnings and errors:\n" + "\n".join(lines[-20:]))
            raise
        finally:
            record["exit_code"] = daemon.stop()
            log = daemon.log_text()
            problems = [line for line in log.splitlines() if LOG_PROBLEM.search(line)]
            record["log_problems"] = [line for line in problems if not EXPECTED_WARNING.search(line)][:40]
            record["log_expected"] = [line for line in problems if EXPECTED_WARNING.search(line)][:5]
            record["log_lines"] = log.count("\n")
            record["stderr"] = daemon.stderr_text()[-2000:]
            self.daemons.append(record)
            if self.args.keep_logs is not None and daemon.log_path.exists():
                self.args.keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(daemon.log_path, self.args.keep_logs / f"{root.name}.twistd.log")
            shutil.rmtree(root, ignore_errors=True)

    # -- one push ------------------------------------------------------------------------------------

    def push(
        self, target: str, base_url: str, pid: int | None, blob: Blob, round_: int, position: int
    ) -> Sample:
        """The client pushes the blob (then, untimed, the rest of the model) to *base_url*; the server
        *pid*'s CPU time is read around it."""
        busy = settle(self.args.quiet_wait)
        is_mirror = target == "mirror"
        cmd = [sys.executable, str(WORKER), "push", base_url, REPO, str(blob.path), "--digest", blob.digest]
        cmd += [
            "--part-size",
            str(self.part_size(blob.size)),
            "--timeout",
            str(min(120.0, self.args.timeout)),
        ]
        cmd += ["--tag", TAG, "--config", str(blob.config), "--manifest", str(blob.manifest_path)]
        if is_mirror:
            cmd += ["--key", str(self.workdir / "id_ed25519.pem")]
        profiler = None
        if is_mirror and self.args.py_spy is not None and pid is not None:
            assert self.args.keep_logs is not None
            self.args.keep_logs.mkdir(parents=True, exist_ok=True)
            output = self.args.keep_logs / f"mirror-push-round{round_ + 1}.txt"
            profiler = Profiler(self.args.py_spy, pid, output, self.args.py_spy_rate)
        print(f"- {LABELS[target]} ...", end=" ", flush=True)
        cpu0 = tree_total(pid, proc_cpu_s) if is_mirror else proc_cpu_s(pid)
        main0 = thread_cpu_s(pid, pid) if is_mirror and pid is not None else None
        try:
            out = run_bounded(f"push to the {target}", cmd, self.args.timeout)
        finally:
            cpu1 = tree_total(pid, proc_cpu_s) if is_mirror else proc_cpu_s(pid)
            main1 = thread_cpu_s(pid, pid) if is_mirror and pid is not None else None
            if profiler is not None:
                profiler.stop()
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        requests = report.get("requests", [])

        def seconds_of(what: str) -> float | None:
            return next((r["seconds"] for r in requests if r["what"] == what), None)

        sample = Sample(
            target=target,
            round=round_,
            position=position,
            seconds=float(report["elapsed"]),
            size=blob.size,
            parts=int(report["parts"]),
            part_size=int(report["part_size"]),
            commit_s=seconds_of("blob commit"),
            start_s=seconds_of("blob start"),
            client_cpu_s=report.get("cpu_s"),
            busy_before=busy,
            extra={"client": report},
        )
        if cpu0 is not None and cpu1 is not None:
            sample.server_cpu_s = cpu1 - cpu0
        if main0 is not None and main1 is not None and sample.server_cpu_s is not None:
            sample.main_thread_cpu_s = main1 - main0
            sample.other_threads_cpu_s = sample.server_cpu_s - sample.main_thread_cpu_s
        if is_mirror:
            sample.rss_mb = vm_hwm_mb(pid)
        if profiler is not None:
            sample.extra["profile"] = str(profiler.output)
        print(f"{sample.seconds:.2f} s, {sample.mib_s:.0f} MiB/s", end="", flush=True)
        return sample

    # -- the checks after a push (untimed) -------------------------------------------------------------

    def check_manifest(self, http: Http, blob: Blob) -> None:
        status, _, body = http.get(f"/v2/{REPO}/manifests/{TAG}", {"Accept": MANIFEST_V2})
        if status != 200 or body != blob.manifest:
            raise BenchError(f"manifest {REPO}:{TAG}: HTTP {status}, {body[:300]!r}")

    def check_head(self, http: Http, blob: Blob) -> None:
        status, headers = http.head(f"/v2/{REPO}/blobs/{blob.digest}")
        if status != 200 or headers.get("content-length") != str(blob.size):
            length = headers.get("content-length")
            raise BenchError(f"HEAD of the blob after its push: HTTP {status}, Content-Length {length}")

    def verify_registry(self, registry: InfoRegistry, blob: Blob) -> None:
        http = Http(registry.url, self.args.timeout)
        self.check_head(http, blob)
        status, count, hexdigest = http.sha256(f"/v2/{REPO}/blobs/{blob.digest}")
        if status != 200 or count != blob.size or hexdigest != blob.hex:
            raise BenchError(f"the registry's blob: HTTP {status}, {count} bytes, sha256 {hexdigest}")
        self.check_manifest(http, blob)

    def verify_mirror(self, daemon: MirrorDaemon, blob: Blob, part_size: int) -> None:
        http = Http(daemon.url, self.args.timeout)
        self.check_head(http, blob)
        boundary = min(part_size, blob.size)  # (a window across the first part boundary, and the end)
        for offset in (max(0, boundary - 2048), max(0, blob.size - 4096)):
            count = min(4096, blob.size - offset)
            status, _, body = http.get(
                f"/v2/{REPO}/blobs/{blob.digest}", {"Range": f"bytes={offset}-{offset + count - 1}"}
            )
            if status != 206 or body != file_bytes(blob.path, offset, count):
                raise BenchError(
                    f"the mirror's bytes {offset}-{offset + count - 1}: HTTP {status}, wrong bytes"
                )
        cached = daemon.cache_dir / "blobs" / f"sha256-{blob.hex}"
        if not cached.exists() or cached.stat().st_size != blob.size or file_sha256(cached) != blob.hex:
            raise BenchError(f"the mirror's cache does not hold the blob's bytes at {cached.name}")
        uploads = daemon.cache_dir / ".mirror" / "uploads"
        left = list(uploads.iterdir()) if uploads.exists() else []
        if left:
            raise BenchError(f"upload files left in the mirror's cache: {[p.name for p in left]}")
        self.check_manifest(http, blob)

    # -- a round -------------------------------------------------------------------------------------

    def one(self, target: str, blob: Blob, round_: int, position: int) -> None:
        part_size = self.part_size(blob.size)
        if target == "registry":
            with self.registry() as registry:
                sample = self.push(target, registry.url, registry.pid, blob, round_, position)
                started = time.monotonic()
                self.verify_registry(registry, blob)
        else:
            with self.mirror(round_) as daemon:
                sample = self.push(target, daemon.url, daemon.pid, blob, round_, position)
                started = time.monotonic()
                self.verify_mirror(daemon, blob, part_size)
        sample.verify_s = time.monotonic() - started
        print(f" (checked in {sample.verify_s:.1f} s)")
        self.samples.append(sample)

    def run(self) -> None:
        with self.stack:
            blob = self.make_blob()
            for round_ in range(self.args.repeat):
                order = TARGETS if round_ % 2 == 0 else TARGETS[::-1]
                print(f"\nround {round_ + 1} of {self.args.repeat}: {order[0]} first")
                for position, target in enumerate(order):
                    self.one(target, blob, round_, position)


# --- reporting ----------------------------------------------------------------------------------------


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per target (medians over rounds), the mirror's with its ratios against the registry."""
    by_target = {t: [s for s in samples if s.target == t] for t in TARGETS}
    medians = {t: statistics.median(s.seconds for s in group) for t, group in by_target.items() if group}
    registry_by_round = {s.round: s.seconds for s in by_target["registry"]}
    rows: list[dict[str, Any]] = []
    for target, group in by_target.items():
        if not group:
            continue
        secs = medians[target]

        def median_of(attr: str, group: list[Sample] = group) -> float | None:
            values = [getattr(s, attr) for s in group if getattr(s, attr) is not None]
            return statistics.median(values) if values else None

        row: dict[str, Any] = {
            "target": target,
            "label": LABELS[target],
            "size": group[0].size,
            "parts": group[0].parts,
            "part_size": group[0].part_size,
            "seconds": secs,
            "seconds_min": min(s.seconds for s in group),
            "seconds_max": max(s.seconds for s in group),
            "mib_s": group[0].size / MiB / secs if secs > 0 else None,
            "speed_vs_registry": None,
            "speed_vs_registry_rounds": [],
            "target_ratio": None,
            "ok": None,
            "commit_s": median_of("commit_s"),
            "start_s": median_of("start_s"),
            "server_cpu_s": median_of("server_cpu_s"),
            "main_thread_cpu_s": median_of("main_thread_cpu_s"),
            "other_threads_cpu_s": median_of("other_threads_cpu_s"),
            "client_cpu_s": median_of("client_cpu_s"),
            "peak_rss_mb": max((s.rss_mb for s in group if s.rss_mb is not None), default=None),
            "rounds": len(group),
            "all_seconds": [s.seconds for s in group],
            "max_busy_before": max((s.busy_before or 0.0) for s in group),
        }
        if target == "mirror" and "registry" in medians and secs > 0:
            speed = medians["registry"] / secs
            per_round = [
                registry_by_round[s.round] / s.seconds for s in group if s.round in registry_by_round
            ]
            row.update(
                speed_vs_registry=speed,
                speed_vs_registry_rounds=per_round,
                target_ratio=f">= {TARGET:g}x",
                ok=speed >= TARGET,
            )
        rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    headers = (
        "push",
        "seconds",
        "range s",
        "MiB/s",
        "speed x registry",
        "per round",
        "target",
        "ok",
        "commit s",
        "server CPU s",
        "main thread",
        "other threads",
        "client CPU s",
        "peak RSS MB",
    )
    table = []
    for row in rows:
        rounds = row["speed_vs_registry_rounds"]
        table.append(
            (
                row["label"],
                fmt(row["seconds"], ".2f"),
                f"{row['seconds_min']:.2f}-{row['seconds_max']:.2f}",
                fmt(row["mib_s"], ".0f"),
                fmt(row["speed_vs_registry"], ".2f"),
                f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds else "-",
                row["target_ratio"] or "",
                "" if row["ok"] is None else ("yes" if row["ok"] else "NO"),
                fmt(row["commit_s"], ".2f"),
                fmt(row["server_cpu_s"], ".2f"),
                fmt(row["main_thread_cpu_s"], ".2f"),
                fmt(row["other_threads_cpu_s"], ".2f"),
                fmt(row["client_cpu_s"], ".2f"),
                fmt(row["peak_rss_mb"], ".0f"),
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        padded = (
            c.ljust(w) if i in (0, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in table)])


def verdict(rows: list[dict[str, Any]]) -> str | None:
    row = next((r for r in rows if r["target"] == "mirror"), None)
    if row is None or row["speed_vs_registry"] is None:
        return None
    rounds = row["speed_vs_registry_rounds"]
    return (
        f"target: a push to the mirror at >= {TARGET:g}x the registry's throughput: "
        f"{row['speed_vs_registry']:.2f}x (per round {min(rounds):.2f}-{max(rounds):.2f}), "
        f"{'met' if row['ok'] else 'NOT met'}"
    )


# --- command line -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/push.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="a 256 MiB blob (a smoke run)")
    p.add_argument("--size-mib", type=int, default=None, help="blob size (default 1024; --quick 256)")
    p.add_argument(
        "--part-mb", type=int, default=0, help="part size in MB (10^6 bytes); default Ollama's choice"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each push, seconds")
    p.add_argument("--quiet-wait", type=float, default=15.0, help="wait this long at most for an idle CPU")
    p.add_argument("--repeat", type=int, default=1, help="rounds (the order alternates); medians shown")
    p.add_argument("--fill", choices=("random", "zeros"), default="random", help="the blob's bytes")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="daemon override (repeatable)")
    p.add_argument("--keep-logs", type=Path, default=None, metavar="DIR", help="copy each daemon's log here")
    p.add_argument(
        "--py-spy",
        default=None,
        metavar="EXE",
        help="record the daemon during each push with this py-spy (raw stacks into --keep-logs)",
    )
    p.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
    args = p.parse_args(argv)
    if args.py_spy is not None and args.keep_logs is None:
        p.error("--py-spy needs --keep-logs DIR (where the profiles go)")
    args.size_mib = args.size_mib or (256 if args.quick else 1024)
    args.set = parse_set(args.set)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = work_directory(args, "bench-push-")
    bench = PushBench(args, workdir)
    before = busy_before()
    started = time.monotonic()
    error = run_and_clean_up(bench.run, workdir)
    rows = summarize(bench.samples)
    if rows:
        print("\n" + render_table(rows))
        print(
            "\nseconds = from the blob's HEAD to the commit's 201 (median; range over rounds); speed x "
            "registry = registry seconds / mirror seconds (medians; per round: that round's pair), the "
            "throughput ratio the target is stated in; commit = the PUT ?digest= alone; server CPU = "
            "user+system seconds the registry or the daemon used during the push (the daemon's split into "
            "its main, reactor, thread and its other threads, which write and hash); client CPU = the "
            "pushing process's."
        )
        line = verdict(rows)
        if line:
            print(line)
    print_log_problems(bench.daemons, lambda daemon: f"the daemon of round {daemon['round'] + 1}")
    sections = {
        "setup": bench.setup,
        "rows": rows,
        "daemons": bench.daemons,
        "samples": [asdict(s) for s in bench.samples],
    }
    return finish(args, started, error, before, sections)


if __name__ == "__main__":
    raise SystemExit(main())
