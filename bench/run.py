"""The benchmark: the mirror against nginx and the distribution registry, in one run, one table.

    python bench/run.py [--quick] [--out results.json]

Run from the repository root (it needs ``/usr/bin/docker-registry``, ``nginx``, ``curl`` and ``wrk``, and
the test dependencies). Loopback only. It

1. builds real GGUF models (``tests.support.models``): a large one (1 GiB model layer; 128 MiB with
   ``--quick``), one for the WAN-like part (256 MiB; 64 MiB) and a small one, and pushes them into a fresh
   distribution registry;
2. starts nginx (``sendfile on``) serving the large blob's very file in the registry's storage, and the
   WAN-like upstream: a throttling proxy (``tests.support.faultproxy``, 32 MiB/s per connection, as a
   CDN limits each connection, in a process of its own) in front of the registry;
3. starts the mirror (the real daemon under twistd) in front of the registry, and measures:

   - warm blob throughput with 1, 8 and 32 concurrent ``curl`` clients (each a process of its own),
     aggregate bytes / wall time, for the registry, nginx and the warm mirror;
   - cold pull-through of a large blob by an Ollama-style client (16 parallel ranged GETs, a process of
     its own): straight from the registry vs through a fresh mirror, over raw loopback (the mirror's CPU
     cost) and over the WAN-like throttle;
   - 32 ``curl`` clients arriving together on a cold blob at a fresh mirror: total time against one cold
     client, and the bytes the registry sent for the blob / its size;
   - manifest requests per second with ``wrk`` (mirror warm vs registry);
   - the daemon's peak RSS (``VmHWM``).

It prints one table of figures with the ratios the performance targets are stated in, and writes every
sample to ``--out``. Every measurement has a deadline; every process it starts is stopped at the end, also
on failure or Ctrl-C; the work directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from pull_1g import (  # noqa: E402
    Bench,
    BenchError,
    ThrottleProxy,
    _interrupt,
    kill_group,
    machine_busy,
    machine_info,
    proc_cpu_s,
    run_and_clean_up,
    settle,
    top_processes,
    tree_total,
    vm_hwm_mb,
)

from tests.support.daemon import MirrorDaemon  # noqa: E402
from tests.support.models import PushedModel  # noqa: E402
from tests.support.registry import free_port  # noqa: E402

MiB = 2**20
MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Row:
    """One line of the table."""

    what: str
    mirror: float | None
    baseline: float | None = None
    unit: str = ""
    ratio: float | None = None  # mirror against the baseline, in the direction the target is stated
    target: str = ""
    ok: bool | None = None
    note: str = ""


class Nginx:
    """nginx in the foreground (its own prefix and config), stopped with its process group."""

    def __init__(self, workdir: Path, server_block: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for sub in ("logs", "tmp"):
            (workdir / sub).mkdir(exist_ok=True)
        config = f"""
worker_processes auto;
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        {server_block}
    }}
}}
"""
        self.config_path = workdir / "nginx.conf"
        self.config_path.write_text(config)
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(workdir), "-c", str(self.config_path), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "logs" / "stderr.log").open("wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                error = (workdir / "logs" / "error.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise BenchError(f"nginx did not start: {error}")
            time.sleep(0.05)

    def stop(self) -> None:
        kill_group(self.proc)


class FullBench(Bench):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.rows: list[Row] = []
        self.peak_rss: list[float] = []

    @contextlib.contextmanager
    def mirror(self, name: str, upstream_url: str, overrides: dict[str, str]) -> Iterator[MirrorDaemon]:
        """Bench.mirror, and when a measurement fails, the daemon's warnings and errors are shown."""
        with super().mirror(name, upstream_url, overrides) as daemon:
            try:
                yield daemon
            except BaseException:
                lines = [
                    line
                    for line in daemon.log_text().splitlines()
                    if re.search(r"#(warn|error|critical)", line)
                ]
                print(f"\ndaemon {name}: last warnings and errors:\n" + "\n".join(lines[-20:]))
                raise

    # -- clients -------------------------------------------------------------------------------------

    def curls(self, url: str, n: int, size: int, headers: dict[str, str] | None = None) -> float:
        """n concurrent curl processes GET url to /dev/null; wall seconds from the first start to the last
        end. Every one must get the whole body."""
        cmd = ["curl", "-s", "-o", "/dev/null", "--max-time", str(int(self.args.timeout))]
        for key, value in (headers or {}).items():
            cmd += ["-H", f"{key}: {value}"]
        cmd += ["-w", "%{http_code} %{size_download}", url]
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
            for _ in range(n)
        ]
        outputs: list[str] = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=self.args.timeout + 30)
                outputs.append(out)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{n} curls of {url}: no result within the deadline") from None
        finally:
            for proc in procs:
                kill_group(proc)
        elapsed = time.monotonic() - started
        for out in outputs:
            code, got = ([*out.split(), "?", "?"])[:2]
            if code not in ("200", "206") or got != str(size):
                raise BenchError(f"curl {url}: HTTP {code}, {got} of {size} bytes")
        return elapsed

    def wrk(self, url: str, headers: dict[str, str]) -> float:
        """Requests per second of ``wrk`` (2 threads, 32 connections) against url."""
        cmd = ["wrk", "-t2", "-c32", f"-d{self.args.wrk_seconds}s", "--latency"]
        for key, value in headers.items():
            cmd += ["-H", f"{key}: {value}"]
        out = subprocess.run(
            [*cmd, url], capture_output=True, text=True, timeout=self.args.wrk_seconds + 30, check=False
        ).stdout
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if match is None or errors is not None:
            raise BenchError(f"wrk {url} failed:\n{out[-2000:]}")
        return float(match.group(1))

    def record_rss(self, daemon: MirrorDaemon) -> float | None:
        rss = tree_total(daemon.pid, vm_hwm_mb)
        if rss is not None:
            self.peak_rss.append(rss)
        return rss

    # -- the suites ------------------------------------------------------------------------------------

    def warm(self, model: PushedModel, nginx: Nginx) -> None:
        assert self.registry is not None
        blob = model.model_layer
        size = blob.size
        print(f"\nwarm throughput, {size / MiB:.0f} MiB blob, curl clients")
        with self.mirror("warm", self.registry.url, {}) as daemon:
            mirror_url = daemon.url + f"/v2/{model.repo}/blobs/{blob.digest}"
            self.curls(mirror_url, 1, size)
            self.wait_published(daemon, blob.hex)
            urls = {
                "registry": model.blob_url(blob.digest),
                "nginx": nginx.url + "/blob",
                "mirror": mirror_url,
            }
            for clients in self.args.clients:
                rates: dict[str, float] = {}
                for name, url in urls.items():
                    settle(self.args.quiet_wait)
                    cpu0 = tree_total(daemon.pid, proc_cpu_s)
                    seconds = self.curls(url, clients, size)
                    rates[name] = clients * size / MiB / seconds
                    extra = ""
                    if name == "mirror":
                        cpu = (tree_total(daemon.pid, proc_cpu_s) or 0) - (cpu0 or 0)
                        extra = f", daemon {cpu:.2f} CPU s, peak RSS {self.record_rss(daemon) or 0:.0f} MB"
                    print(
                        f"- {clients:2d} clients, {name:8s}: {seconds:5.2f} s,{rates[name]:5.0f} MiB/s{extra}"
                    )
                ratio = rates["mirror"] / rates["registry"]
                target = 1.0
                self.rows.append(
                    Row(
                        f"warm, {clients} client{'s' if clients > 1 else ''}: MiB/s vs registry",
                        rates["mirror"],
                        rates["registry"],
                        "MiB/s",
                        ratio,
                        f">= {target:.1f}x",
                        ratio >= target,
                    )
                )
                nginx_ratio = rates["mirror"] / rates["nginx"]
                self.rows.append(
                    Row(
                        f"warm, {clients} client{'s' if clients > 1 else ''}: MiB/s vs nginx",
                        rates["mirror"],
                        rates["nginx"],
                        "MiB/s",
                        nginx_ratio,
                        ">= 0.8x (aim)" if clients == 32 else "",
                        nginx_ratio >= 0.8 if clients == 32 else None,
                    )
                )
            self.manifests(model, daemon)

    def manifests(self, model: PushedModel, daemon: MirrorDaemon) -> None:
        assert self.registry is not None
        print(f"\nmanifest requests per second, wrk 2 threads x 32 connections, {self.args.wrk_seconds} s")
        headers = {"Accept": MANIFEST_ACCEPT}
        mirror_url = daemon.url + f"/v2/{model.repo}/manifests/{model.tag}"
        warm_up = ["curl", "-s", "-o", "/dev/null", "-H", f"Accept: {MANIFEST_ACCEPT}", mirror_url]
        subprocess.run(warm_up, timeout=30, check=False)  # the tag is cached before the clock starts
        settle(self.args.quiet_wait)
        registry_rps = self.wrk(model.manifest_url, headers)
        print(f"- registry: {registry_rps:8.0f} requests/s")
        settle(self.args.quiet_wait)
        mirror_rps = self.wrk(mirror_url, headers)
        print(f"- mirror:   {mirror_rps:8.0f} requests/s, peak RSS {self.record_rss(daemon) or 0:.0f} MB")
        ratio = mirror_rps / registry_rps
        self.rows.append(
            Row(
                "manifests: requests/s vs registry",
                mirror_rps,
                registry_rps,
                "req/s",
                ratio,
                ">= 2.0x",
                ratio >= 2.0,
            )
        )

    def cold(self, model: PushedModel, group: str, upstream_url: str) -> None:
        """An Ollama-style 16-part pull straight from upstream_url vs through a fresh mirror on it."""
        assert self.registry is not None
        blob = model.model_layer
        path = f"/v2/{model.repo}/blobs/{blob.digest}"
        print(f"\ncold pull-through, {group}, {blob.size / MiB:.0f} MiB blob, 16-part ranged client")
        direct = self.measure(
            name=f"{group}.direct",
            label=f"{group}: direct",
            group=group,
            client="ranged",
            url=upstream_url + path,
            model=model,
            count_upstream=True,
        )
        with self.mirror(f"{group}.cold", upstream_url, {}) as daemon:
            cold = self.measure(
                name=f"{group}.mirror_cold",
                label=f"{group}: mirror cold",
                group=group,
                client="ranged",
                url=daemon.url + path,
                model=model,
                baseline=f"{group}.direct",
                daemon=daemon,
                count_upstream=True,
            )
            self.record_rss(daemon)
        ratio = cold.seconds / direct.seconds
        wan = group == "wan"
        self.rows.append(
            Row(
                f"cold {'WAN-like' if wan else 'raw loopback'}, 16-part pull: s vs direct",
                cold.seconds,
                direct.seconds,
                "s",
                ratio,
                "<= 1.15x" if wan else "(report)",
                ratio <= 1.15 if wan else None,
                f"upstream {cold.upstream_bytes / blob.size:.3f}x, daemon {cold.daemon_cpu_s or 0:.2f} CPU-s"
                if cold.upstream_bytes is not None
                else "",
            )
        )

    def herd(self, model: PushedModel, group: str, upstream_url: str) -> None:
        """``--herd`` curls at once on a cold blob vs one cold curl, each at a fresh mirror."""
        assert self.registry is not None
        blob = model.model_layer
        path = f"/v2/{model.repo}/blobs/{blob.digest}"
        n = self.args.herd
        wan = group == "wan"
        where = "WAN-like" if wan else "raw loopback"
        print(f"\n{n} curl clients arriving together on a cold {blob.size / MiB:.0f} MiB blob, {where}")
        with self.mirror(f"herd.{group}.one", upstream_url, {}) as daemon:
            settle(self.args.quiet_wait)
            one = self.curls(daemon.url + path, 1, blob.size)
            print(f"- 1 cold client: {one:.2f} s")
        with self.mirror(f"herd.{group}.many", upstream_url, {}) as daemon:
            settle(self.args.quiet_wait)
            offset = self.registry.log_offset()
            many = self.curls(daemon.url + path, n, blob.size)
            rss = self.record_rss(daemon)
            time.sleep(0.3)  # the registry logs a response once it has finished it
            written, requests, _ = self.registry.blob_bytes_since(offset, path)
            up = written / blob.size
            print(f"- {n} cold clients: {many:.2f} s, upstream {up:.3f}x blob in {requests} requests")
            print(f"  peak RSS {rss or 0:.0f} MB")
        ratio = many / one
        what = f"cold {where}, {n} clients at once"
        target = "<= 1.5x" if wan else "(report)"
        self.rows.append(
            Row(f"{what}: s vs 1 cold client", many, one, "s", ratio, target, ratio <= 1.5 if wan else None)
        )
        self.rows.append(Row(f"{what}: upstream bytes / blob", up, None, "x", up, "<= 1.05x", up <= 1.05))

    def run(self) -> None:  # type: ignore[override]
        with self.stack:
            registry = self.start_registry()
            big = self.build_and_push("library/bench", self.args.size_mib, 1)
            wan = self.build_and_push("library/bench-wan", self.args.wan_size_mib, 2)
            blob_file = (
                registry.storage_dir
                / "docker/registry/v2/blobs/sha256"
                / big.model_layer.hex[:2]
                / big.model_layer.hex
                / "data"
            )
            if not blob_file.exists():
                raise BenchError(f"cannot find the blob's file in the registry's storage: {blob_file}")
            nginx = Nginx(self.workdir / "nginx", f"location = /blob {{ alias {blob_file}; }}")
            self.stack.callback(nginx.stop)
            # The WAN-like upstream: a FaultProxy throttled per connection, in a process of its own (nginx's
            # limit_rate lets each connection send a second's worth at once, so parts of 16 MiB would not
            # be throttled at all).
            throttle = ThrottleProxy(registry.url, self.args.wan_rate_mib * MiB)
            self.stack.callback(throttle.stop)
            only = self.args.only
            if "warm" in only:
                self.warm(big, nginx)
            if "cold" in only:
                self.cold(big, "loopback", registry.url)
                self.cold(wan, "wan", throttle.url)
            if "herd" in only:
                self.herd(wan, "wan", throttle.url)
                self.herd(big, "loopback", registry.url)


def render(rows: list[Row], peak_rss: float | None) -> str:
    def fmt(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" if unit in ("s", "x") else f"{value:.0f}"

    table = [("measurement", "mirror", "baseline", "ratio", "target", "ok", "notes")]
    for r in rows:
        table.append(
            (
                r.what,
                fmt(r.mirror, r.unit),
                fmt(r.baseline, r.unit),
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
                r.target,
                "" if r.ok is None else ("yes" if r.ok else "NO"),
                r.note,
            )
        )
    if peak_rss is not None:
        table.append(
            (
                "daemon peak RSS (MB; workers summed)",
                f"{peak_rss:.0f}",
                "-",
                "-",
                "<= 200",
                "yes" if peak_rss <= 200 else "NO",
                "",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = []
    for n, line in enumerate(table):
        lines.append(
            "  ".join(
                c.ljust(w) if i in (0, 4, 6) else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="small data (128 MiB / 64 MiB blobs) for a smoke run")
    p.add_argument("--size-mib", type=int, default=None, help="large model layer (default 1024; --quick 128)")
    p.add_argument("--wan-size-mib", type=int, default=None, help="WAN model layer (default 256; --quick 64)")
    p.add_argument("--wan-rate-mib", type=float, default=32.0, help="WAN throttle, MiB/s per connection")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument(
        "--only",
        type=lambda s: set(s.split(",")),
        default={"warm", "cold", "herd"},
        help="parts to run: warm (with manifests), cold, herd (comma-separated; default all)",
    )
    p.add_argument("--herd", type=int, default=32, help="clients arriving together on a cold blob")
    p.add_argument(
        "--wrk-seconds", type=int, default=None, help="duration of each wrk run (default 5; --quick 2)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each measurement, seconds")
    p.add_argument("--quiet-wait", type=float, default=5.0, help="wait this long at most for an idle CPU")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="daemon override (repeatable)")
    p.add_argument("--keep-logs", type=Path, default=None, metavar="DIR", help="copy each daemon's log here")
    args = p.parse_args(argv)
    args.size_mib = args.size_mib or (128 if args.quick else 1024)
    args.wan_size_mib = args.wan_size_mib or (64 if args.quick else 256)
    args.wrk_seconds = args.wrk_seconds or (2 if args.quick else 5)
    args.set = dict(item.split("=", 1) for item in (args.set or []))
    # what pull_1g's Bench reads
    args.parts, args.go_parts, args.fill = 16, False, "zeros"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("curl", "wrk") if shutil.which(tool) is None]
    if missing or not Path(NGINX).exists():
        print(
            f"missing tools: {', '.join(missing) or 'nginx'} (apt-get install -y curl wrk nginx-light)",
            file=sys.stderr,
        )
        return 2
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-", dir=args.workdir))
    signal.signal(signal.SIGTERM, _interrupt)
    bench = FullBench(args, workdir)
    busy_at_start, top_at_start = machine_busy(), top_processes()
    if busy_at_start > 0.15:
        print(f"warning: the machine is {busy_at_start:.0%} busy before the benchmark: compare ratios only")
    started = time.monotonic()
    error = run_and_clean_up(bench.run, workdir)
    peak = max(bench.peak_rss) if bench.peak_rss else None
    if bench.rows:
        print("\n" + render(bench.rows, peak))
        print(
            "\nratio: warm and manifests = mirror / baseline throughput (higher is better); cold = mirror"
            " seconds / baseline seconds (lower is better); all measured in this run on this machine."
        )
    for daemon in bench.daemons:
        if daemon.get("log_errors"):
            print(f"daemon {daemon['name']} logged errors: {daemon['log_errors'][:3]}")
    if args.out is not None:
        result = {
            "error": error,
            "elapsed_s": time.monotonic() - started,
            "machine": {**machine_info(), "busy_at_start": busy_at_start, "top_at_start": top_at_start},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": [vars(r) for r in bench.rows],
            "peak_rss_mb": peak,
            "samples": [vars(s) for s in bench.samples],
            "daemons": bench.daemons,
        }
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")
    print(f"elapsed {time.monotonic() - started:.0f} s")
    return 1 if error else 0


if __name__ == "__main__":
    raise SystemExit(main())
