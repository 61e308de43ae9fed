"""Pull benchmark: a 1 GiB model layer straight from the distribution registry and through the mirror.

One command, one run, loopback only::

    python bench/pull_1g.py [--size-mib 1024] [--wan-size-mib 256] [--out results.json]

What it does (every figure a ratio against a baseline measured in the same run):

1. builds a real GGUF model whose model layer is ``--size-mib`` MiB and pushes it into a fresh
   ``docker-registry`` (``tests.support.registry.RegistryProcess``, logging at ``info`` so that every response
   has an ``http.response.written`` field);
2. over raw loopback, times a Go-style pull of that blob (16 parallel ranged GETs, ``bench/_worker.py ranged``
   in a process of its own) and a single-stream ``curl`` GET of it: straight from the registry, through a
   cold mirror (a fresh ``twistd -n ollama-mirror`` and cache for each of the two clients), and again through
   the now warm mirror; for the cold pulls it sums what the registry wrote for that blob (upstream bytes /
   blob size) and reads the daemon's ``VmHWM`` (peak RSS);
3. over a WAN-like upstream (``--wan-size-mib``, default 256 MiB): a throttling ``FaultProxy`` (32 MiB/s per
   connection, in a process of its own) in front of the registry; the same two clients straight through such
   a proxy, and through a cold mirror whose upstream is such a proxy, once per ``--wan-connections`` value
   (``upstream.connections_per_blob``, default 4 and 16);
4. prints a table (seconds, MiB/s, mirror time / registry time of the same client in the same run, upstream
   bytes ratio, daemon peak RSS) and writes everything to ``--out`` as JSON.

Every measurement has a deadline (``--timeout``); every process started is stopped at the end, even on error.
Pulled copies and mirror caches are deleted as soon as they have been measured, so the disk holds at most
about four copies of the blob at a time. The clock of the ranged pull stops when the last byte is written; the
file's sha256 is checked afterwards, outside the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.daemon import MirrorDaemon  # noqa: E402
from tests.support.models import PushedModel, build_model, push_model  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402

MiB = 2**20
WORKER = Path(__file__).resolve().with_name("_worker.py")
REPO = "library/bench"
WAN_REPO = "library/bench-wan"
QUIET_BUSY = 0.15  # the machine counts as quiet below this CPU use (both cores together)


class BenchError(RuntimeError):
    """A measurement failed or overran its deadline; the message says which and why."""


@dataclass
class Sample:
    """One measurement."""

    name: str  # stable key, e.g. "loopback.mirror_cold.ranged"
    label: str  # what the table shows
    group: str  # "loopback" or "wan"
    client: str  # "ranged" (the Go-style parallel pull) or "curl"
    seconds: float
    size: int
    baseline: str | None = None  # the name of the direct measurement this one is compared with
    upstream_bytes: int | None = None
    upstream_requests: int | None = None
    rss_mb: float | None = None  # the daemon's VmHWM right after this measurement
    daemon_cpu_s: float | None = None  # CPU the daemon used from the request until the blob was published
    busy_before: float | None = None  # machine CPU use (0..1) in the second before the measurement
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds if self.seconds > 0 else float("nan")


# --- small process helpers ----------------------------------------------------------------------------


def kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def run_bounded(what: str, cmd: list[str], timeout: float) -> str:
    """Run ``cmd`` in its own session; its stdout, or BenchError on failure or after ``timeout`` s."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO_ROOT
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise BenchError(f"{what}: no result within {timeout:.0f} s (killed)") from None
    finally:
        kill_group(proc)
    if proc.returncode != 0:
        raise BenchError(
            f"{what}: exit status {proc.returncode}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
        )
    return out


def vm_hwm_mb(pid: int | None) -> float | None:
    """The peak resident set size (``VmHWM``) of a live process, in MB (10^6 bytes)."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 / 1e6 if match else None


def proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a live process (all its threads) has used so far."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # fields 3.. of proc(5); utime and stime are 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_total(pid: int | None, measure: Callable[[int | None], float | None]) -> float | None:
    """``measure`` summed over the daemon and its children (the workers, with ``server.workers``)."""
    if pid is None:
        return None
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
    values = [v for v in (measure(p) for p in pids) if v is not None]
    return sum(values) if values else None


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies over all CPUs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return idle, sum(fields)


def machine_busy(seconds: float = 1.0) -> float:
    """Fraction of CPU time (all cores) spent busy during the next ``seconds``."""
    idle0, total0 = cpu_times()
    time.sleep(seconds)
    idle1, total1 = cpu_times()
    total = total1 - total0
    return 0.0 if total <= 0 else 1.0 - (idle1 - idle0) / total


def settle(max_wait: float) -> float:
    """Flush dirty pages (so that one measurement's writeback does not land in the next), then wait up to
    ``max_wait`` s for the machine to go quiet. Returns the last CPU-busy sample."""
    os.sync()
    deadline = time.monotonic() + max_wait
    busy = machine_busy()
    while busy > QUIET_BUSY and time.monotonic() < deadline:
        busy = machine_busy()
    if busy > QUIET_BUSY:
        print(f"  (warning: machine {busy:.0%} busy before this measurement: numbers may be noisy)")
    return busy


class InfoRegistry(RegistryProcess):
    """The registry as it is normally run (Debian's packaged configuration): ``log.level: info`` with its
    access log (each response gets a ``response completed`` line carrying ``http.response.written``,
    which gives the upstream byte counts), and the ``inmemory`` blob descriptor cache."""

    def _write_config(self) -> None:
        super()._write_config()
        config = json.loads(self.config_path.read_text())
        config["log"]["level"] = "info"
        config["storage"]["cache"] = {"blobdescriptor": "inmemory"}
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def blob_bytes_since(self, offset: int, path: str) -> tuple[int, int, int]:
        """(``http.response.written`` sum, GET count, combined-log byte sum) of GETs of ``path`` since
        ``offset`` in the log."""
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        written = requests = combined = 0
        combined_re = re.compile(r'"GET (\S+) HTTP/[\d.]+" \d{3} (\d+)')
        for line in text.splitlines():
            if 'msg="response completed' in line:
                uri = re.search(r'http\.request\.uri="([^"]+)"', line)
                method = re.search(r"http\.request\.method=(\w+)", line)
                nbytes = re.search(r"http\.response\.written=(\d+)", line)
                if uri and method and nbytes and method.group(1) == "GET" and uri.group(1) == path:
                    written += int(nbytes.group(1))
                    requests += 1
            else:
                match = combined_re.search(line)
                if match and match.group(1) == path:
                    combined += int(match.group(2))
        return written, requests, combined


class ThrottleProxy:
    """``bench/_worker.py proxy``: a FaultProxy throttled per connection, in a process of its own."""

    def __init__(
        self, upstream: str, rate: float, start_timeout: float = 15.0, *, keep_host: bool = False
    ) -> None:
        cmd = [sys.executable, str(WORKER), "proxy", upstream, "--rate", str(rate)]
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            cmd + (["--keep-host"] if keep_host else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd=REPO_ROOT,
        )
        try:
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout)
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                raise BenchError(f"throttling proxy did not start within {start_timeout:.0f} s")
            self.url: str = json.loads(line)["url"]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
        kill_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- the benchmark ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.registry: InfoRegistry | None = None
        self.samples: list[Sample] = []
        self.daemons: list[dict[str, Any]] = []
        self.stack = contextlib.ExitStack()
        self._serial = 0

    # -- set-up ------------------------------------------------------------------------------------

    def start_registry(self) -> InfoRegistry:
        registry = InfoRegistry(self.workdir / "registry")
        self.stack.callback(registry.stop)
        self.registry = registry
        return registry

    def build_and_push(self, repo: str, size_mib: int, seed: int) -> PushedModel:
        assert self.registry is not None
        build_dir = self.workdir / f"build-{seed}"
        started = time.monotonic()
        try:
            built = build_model(build_dir, size=size_mib * MiB, seed=seed, name="bench", fill=self.args.fill)
            pushed = push_model(self.registry.url, repo, "latest", built)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)  # the registry has its own copy
        layer = pushed.model_layer
        print(
            f"model {repo}:latest pushed in {time.monotonic() - started:.1f} s: "
            f"model layer {layer.digest[:19]}… {layer.size} bytes ({layer.size / MiB:.1f} MiB)"
        )
        return pushed

    def new_dir(self, prefix: str) -> Path:
        self._serial += 1
        path = self.workdir / f"{prefix}-{self._serial}"
        path.mkdir(parents=True)
        return path

    @contextlib.contextmanager
    def mirror(self, name: str, upstream_url: str, overrides: dict[str, str]) -> Iterator[MirrorDaemon]:
        """A fresh daemon with a fresh cache; on the way out its VmHWM is recorded, it is stopped and its
        cache deleted."""
        root = self.new_dir("mirror")
        all_overrides = dict(self.args.set or {})
        all_overrides.update(overrides)
        daemon = MirrorDaemon(
            root / "cache", upstream_url, workdir=root / "daemon", overrides=all_overrides, start=False
        )
        record: dict[str, Any] = {"name": name, "overrides": all_overrides}
        try:
            daemon.start()
            record["pid"] = daemon.pid
            yield daemon
        finally:
            record["vmhwm_mb"] = vm_hwm_mb(daemon.pid) if daemon.is_running() else None
            record["exit_code"] = daemon.stop()
            log = daemon.log_text()
            record["log_errors"] = [
                line for line in log.splitlines() if "[-] " in line and ("error" in line.lower())
            ][:20]
            self.daemons.append(record)
            if self.args.keep_logs is not None and daemon.log_path.exists():
                self.args.keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(daemon.log_path, self.args.keep_logs / f"{name}.twistd.log")
            shutil.rmtree(root, ignore_errors=True)

    # -- clients -----------------------------------------------------------------------------------

    @property
    def ranged_label(self) -> str:
        return "ranged, Go part sizes" if self.args.go_parts else f"ranged x{self.args.parts}"

    def ranged(self, url: str, size: int, digest: str, *, discover: bool = False) -> dict[str, Any]:
        """The Go-style parallel ranged pull in its own process; returns the worker's report. With
        *discover*, *url* is a registry blob URL: the worker sends Ollama's HEAD and discovery GET first
        and reads the ranges from the discovery's ``Location``."""
        dest_dir = self.new_dir("pulled")
        cmd = [
            sys.executable,
            str(WORKER),
            "ranged",
            url,
            str(size),
            str(dest_dir / "blob"),
            "--digest",
            digest,
            "--timeout",
            str(self.args.timeout),
        ]
        cmd += ["--go-parts"] if self.args.go_parts else ["--parts", str(self.args.parts)]
        cmd += ["--discover"] if discover else []
        try:
            out = run_bounded(f"ranged pull of {url}", cmd, self.args.timeout + 30)
        finally:
            shutil.rmtree(dest_dir, ignore_errors=True)
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        if "error" in report:
            raise BenchError(f"ranged pull of {url} failed: {report['error']}")
        if report.get("bytes") != size or not report.get("digest_ok"):
            raise BenchError(f"ranged pull of {url} got a wrong blob: {report}")
        return report

    def curl(self, url: str, size: int) -> dict[str, Any]:
        """A plain single-stream GET with curl, body to /dev/null."""
        out = run_bounded(
            f"curl {url}",
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                str(int(self.args.timeout)),
                "-w",
                "%{http_code} %{time_total} %{size_download}",
                url,
            ],
            self.args.timeout + 10,
        )
        code, seconds, downloaded = out.split()
        if code != "200" or int(downloaded) != size:
            raise BenchError(f"curl {url}: HTTP {code}, {downloaded} of {size} bytes")
        return {"elapsed": float(seconds), "bytes": int(downloaded), "status": int(code)}

    def measure(
        self,
        *,
        name: str,
        label: str,
        group: str,
        client: str,
        url: str,
        model: PushedModel,
        baseline: str | None = None,
        daemon: MirrorDaemon | None = None,
        count_upstream: bool = False,
    ) -> Sample:
        assert self.registry is not None
        layer = model.model_layer
        busy = settle(self.args.quiet_wait)
        offset = self.registry.log_offset()
        daemon_cpu0 = tree_total(daemon.pid if daemon is not None else None, proc_cpu_s)
        registry_cpu0 = proc_cpu_s(self.registry.pid)
        children_cpu0 = children_cpu_s()
        started = time.monotonic()
        print(f"- {label} ...", end=" ", flush=True)
        if client == "curl":
            report = self.curl(url, layer.size)
        else:
            report = self.ranged(url, layer.size, layer.digest)
        sample = Sample(
            name=name,
            label=label,
            group=group,
            client=client,
            seconds=float(report["elapsed"]),
            size=layer.size,
            baseline=baseline,
            busy_before=busy,
            extra={"client": report, "wall_s": time.monotonic() - started},
        )
        if client == "curl":  # the ranged worker reports its own CPU time (download only)
            report["cpu_s"] = children_cpu_s() - children_cpu0
        if daemon is not None:
            published = self.wait_published(daemon, layer.hex)
            # An upper bound: the cache is looked at only once the client is done.
            sample.extra["published_seen_after_s"] = published - started
            sample.rss_mb = vm_hwm_mb(daemon.pid)
            daemon_cpu1 = tree_total(daemon.pid, proc_cpu_s)
            if daemon_cpu0 is not None and daemon_cpu1 is not None:
                sample.daemon_cpu_s = daemon_cpu1 - daemon_cpu0
        registry_cpu1 = proc_cpu_s(self.registry.pid)
        if registry_cpu0 is not None and registry_cpu1 is not None:
            sample.extra["registry_cpu_s"] = registry_cpu1 - registry_cpu0
        if count_upstream:
            time.sleep(0.3)  # the registry logs a response after it has finished it
            path = f"/v2/{model.repo}/blobs/{layer.digest}"
            written, requests, combined = self.registry.blob_bytes_since(offset, path)
            sample.upstream_bytes = written
            sample.upstream_requests = requests
            sample.extra["upstream_bytes_combined_log"] = combined
        print(f"{sample.seconds:.2f} s, {sample.mib_s:.0f} MiB/s")
        self.samples.append(sample)
        return sample

    def wait_published(self, daemon: MirrorDaemon, hexdigest: str) -> float:
        """Wait until the daemon's cache holds the verified blob; the monotonic time it was seen."""
        blob = daemon.cache_dir / "blobs" / f"sha256-{hexdigest}"
        deadline = time.monotonic() + self.args.timeout
        while not blob.exists():
            if not daemon.is_running():
                raise BenchError(f"the daemon died\n{daemon.diagnostics()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the mirror did not publish {hexdigest[:12]} within {self.args.timeout} s")
            time.sleep(0.02)
        return time.monotonic()

    # -- the suites --------------------------------------------------------------------------------

    def loopback(self, model: PushedModel) -> None:
        assert self.registry is not None
        layer = model.model_layer
        direct_url = model.blob_url(layer.digest)
        blob_path = f"/v2/{model.repo}/blobs/{layer.digest}"
        common: dict[str, Any] = {"group": "loopback", "model": model}
        print(f"\nraw loopback, {layer.size / MiB:.0f} MiB blob")
        self.measure(
            name="loopback.registry.ranged",
            label=f"registry direct, {self.ranged_label}",
            client="ranged",
            url=direct_url,
            **common,
        )
        self.measure(
            name="loopback.registry.curl",
            label="registry direct, curl",
            client="curl",
            url=direct_url,
            **common,
        )
        with self.mirror("loopback.cold_ranged", self.registry.url, {}) as daemon:
            url = daemon.url + blob_path
            self.measure(
                name="loopback.mirror_cold.ranged",
                label=f"mirror cold, {self.ranged_label}",
                client="ranged",
                url=url,
                baseline="loopback.registry.ranged",
                daemon=daemon,
                count_upstream=True,
                **common,
            )
            self.measure(
                name="loopback.mirror_warm.ranged",
                label=f"mirror warm, {self.ranged_label}",
                client="ranged",
                url=url,
                baseline="loopback.registry.ranged",
                daemon=daemon,
                count_upstream=True,
                **common,
            )
            self.measure(
                name="loopback.mirror_warm.curl",
                label="mirror warm, curl",
                client="curl",
                url=url,
                baseline="loopback.registry.curl",
                daemon=daemon,
                count_upstream=True,
                **common,
            )
        with self.mirror("loopback.cold_curl", self.registry.url, {}) as daemon:
            self.measure(
                name="loopback.mirror_cold.curl",
                label="mirror cold, curl",
                client="curl",
                url=daemon.url + blob_path,
                baseline="loopback.registry.curl",
                daemon=daemon,
                count_upstream=True,
                **common,
            )

    def wan(self, model: PushedModel) -> None:
        assert self.registry is not None
        layer = model.model_layer
        rate = self.args.wan_rate_mib * MiB
        blob_path = f"/v2/{model.repo}/blobs/{layer.digest}"
        common: dict[str, Any] = {"group": "wan", "model": model, "count_upstream": True}
        print(
            f"\nWAN-like upstream ({self.args.wan_rate_mib:g} MiB/s per connection), "
            f"{layer.size / MiB:.0f} MiB blob"
        )
        for client, label in (("ranged", self.ranged_label), ("curl", "curl")):
            proxy = ThrottleProxy(self.registry.url, rate)
            try:
                self.measure(
                    name=f"wan.registry.{client}",
                    label=f"registry via throttle, {label}",
                    client=client,
                    url=proxy.url + blob_path,
                    **common,
                )
            finally:
                proxy.stop()
        for connections in self.args.wan_connections:
            for client, label in (("ranged", self.ranged_label), ("curl", "curl")):
                proxy = ThrottleProxy(self.registry.url, rate)
                try:
                    overrides = {"upstream.connections_per_blob": str(connections)}
                    with self.mirror(f"wan.c{connections}.{client}", proxy.url, overrides) as daemon:
                        self.measure(
                            name=f"wan.mirror_cold_c{connections}.{client}",
                            label=f"mirror cold, {connections} upstream conns, {label}",
                            client=client,
                            url=daemon.url + blob_path,
                            baseline=f"wan.registry.{client}",
                            daemon=daemon,
                            **common,
                        )
                finally:
                    proxy.stop()

    def run(self) -> None:
        with self.stack:
            self.start_registry()
            loop_model = None if self.args.skip_loopback else self.build_and_push(REPO, self.args.size_mib, 1)
            wan_model = (
                None if self.args.skip_wan else self.build_and_push(WAN_REPO, self.args.wan_size_mib, 2)
            )
            for round_ in range(self.args.repeat):
                if self.args.repeat > 1:
                    print(f"\n=== round {round_ + 1} of {self.args.repeat}")
                if loop_model is not None:
                    self.loopback(loop_model)
                if wan_model is not None:
                    self.wan(wan_model)


# --- reporting ----------------------------------------------------------------------------------------


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per measurement name (the median over rounds), in first-seen order, with ratios."""
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
        ups = [s.upstream_bytes for s in group if s.upstream_bytes is not None]
        rss = [s.rss_mb for s in group if s.rss_mb is not None]
        cpu = [s.daemon_cpu_s for s in group if s.daemon_cpu_s is not None]
        row: dict[str, Any] = {
            "name": name,
            "label": first.label,
            "group": first.group,
            "client": first.client,
            "size": first.size,
            "seconds": secs,
            "mib_s": first.size / MiB / secs if secs > 0 else None,
            "baseline": first.baseline,
            "ratio_vs_registry": (
                secs / seconds[first.baseline] if first.baseline and first.baseline in seconds else None
            ),
            "upstream_bytes": max(ups) if ups else None,
            "upstream_ratio": max(ups) / first.size if ups else None,
            "upstream_requests": max(s.upstream_requests or 0 for s in group) if ups else None,
            "daemon_peak_rss_mb": max(rss) if rss else None,
            "daemon_cpu_s": statistics.median(cpu) if cpu else None,
            "rounds": len(group),
            "all_seconds": [s.seconds for s in group],
            "max_busy_before": max((s.busy_before or 0.0) for s in group),
        }
        rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    headers = (
        "measurement",
        "seconds",
        "MiB/s",
        "x registry",
        "upstream/blob",
        "peak RSS MB",
        "daemon CPU s",
    )
    table = [
        (
            f"[{row['group']}] {row['label']}",
            fmt(row["seconds"], ".2f"),
            fmt(row["mib_s"], ".0f"),
            fmt(row["ratio_vs_registry"], ".2f"),
            fmt(row["upstream_ratio"], ".3f"),
            fmt(row["daemon_peak_rss_mb"], ".0f"),
            fmt(row["daemon_cpu_s"], ".2f"),
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in table:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def top_processes(n: int = 6) -> list[str]:
    """The busiest processes on the machine (``ps``), to tell whether something else was running."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,nice,args", "--sort=-pcpu"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[:160] for line in out.splitlines()[: n + 1]]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "nice": os.nice(0),
        "top_processes_at_end": top_processes(),
    }
    with contextlib.suppress(OSError):
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        info["cpu"] = model.group(1) if model else None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_head"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    return info


# --- command line -------------------------------------------------------------------------------------


def parse_set(values: list[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--set wants SECTION.KEY=VALUE, got {value!r}")
        result[key] = val
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/pull_1g.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--size-mib", type=int, default=1024, help="model layer size for the loopback part")
    p.add_argument("--wan-size-mib", type=int, default=256, help="model layer size for the WAN part")
    p.add_argument("--wan-rate-mib", type=float, default=32.0, help="WAN throttle, MiB/s per connection")
    p.add_argument(
        "--wan-connections",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[4, 16],
        help="upstream.connections_per_blob values to try over the WAN (comma-separated; default 4,16)",
    )
    p.add_argument("--parts", type=int, default=16, help="parallel ranged parts of the Go-style pull")
    p.add_argument(
        "--go-parts",
        action="store_true",
        help="split like Go does, clamp(size/16, 100 MB, 1000 MB) (11 parts for 1 GiB, 3 for 256 MiB)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each measurement, seconds")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="wait this long at most for an idle CPU")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the table shows the median")
    p.add_argument("--fill", choices=("zeros", "random"), default="zeros", help="tensor bytes of the model")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="daemon override (repeatable)")
    p.add_argument("--skip-loopback", action="store_true")
    p.add_argument("--skip-wan", action="store_true")
    p.add_argument("--keep-logs", type=Path, default=None, metavar="DIR", help="copy each daemon's log here")
    args = p.parse_args(argv)
    args.set = parse_set(args.set)
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_and_clean_up(run: Callable[[], None], workdir: Path) -> str | None:
    """Run a benchmark, always removing its work directory; the error it ended with, if any."""
    error: str | None = None
    try:
        run()
    except (BenchError, KeyboardInterrupt) as exc:
        error = str(exc) or type(exc).__name__
        print(f"\nbenchmark FAILED: {error}", file=sys.stderr)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        print(f"\nbenchmark FAILED: {error}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return error


def work_directory(args: argparse.Namespace, prefix: str) -> Path:
    """A fresh work directory (under ``--workdir`` when given); from now on SIGTERM still runs every
    clean-up."""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=args.workdir))
    signal.signal(signal.SIGTERM, _interrupt)
    return workdir


def print_log_problems(daemons: list[dict[str, Any]], title: Callable[[dict[str, Any]], str]) -> None:
    """The warnings and errors each daemon logged (``log_problems``), five lines each at most."""
    for daemon in daemons:
        problems = daemon.get("log_problems")
        if problems:
            print(f"{title(daemon)} logged {len(problems)} warnings/errors:")
            print("\n".join("  " + entry[:300] for entry in problems[:5]))


def finish(
    args: argparse.Namespace,
    started: float,
    error: str | None,
    before: tuple[float, list[str]],
    sections: dict[str, Any],
) -> int:
    """The end of every benchmark: the run as JSON (its error, duration, machine, arguments, then
    *sections*) into ``--out`` when asked, the elapsed time, and the exit status (1 after an error)."""
    busy_at_start, top_at_start = before
    result = {
        "error": error,
        "elapsed_s": time.monotonic() - started,
        "machine": {**machine_info(), "busy_at_start": busy_at_start, "top_at_start": top_at_start},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **sections,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")
    print(f"elapsed {time.monotonic() - started:.0f} s")
    return 1 if error else 0


def busy_before() -> tuple[float, list[str]]:
    """How busy the machine is before a benchmark, and its busiest processes (said when it is not quiet)."""
    busy, top = machine_busy(), top_processes()
    if busy > QUIET_BUSY:
        print(f"warning: the machine is {busy:.0%} busy before the benchmark:")
        print("\n".join("  " + line for line in top))
    return busy, top


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("curl") is None:
        print("curl is required", file=sys.stderr)
        return 2
    workdir = work_directory(args, "bench-pull-")
    bench = Bench(args, workdir)
    before = busy_before()
    started = time.monotonic()
    error = run_and_clean_up(bench.run, workdir)
    rows = summarize(bench.samples)
    if rows:
        print("\n" + render_table(rows))
        print(
            "\nx registry = mirror seconds / registry seconds for the same client in the same run "
            "(WAN rows: against the registry behind the same throttle); upstream/blob = bytes the "
            "registry wrote for the blob during that measurement / blob size; peak RSS = the daemon's "
            "VmHWM after that measurement; daemon CPU = user+system seconds the daemon used from the "
            "request until the blob was in its cache."
        )
    for daemon in bench.daemons:
        if daemon.get("log_errors"):
            print(f"daemon {daemon['name']} logged errors: {daemon['log_errors'][:3]}")
    sections = {"rows": rows, "daemons": bench.daemons, "samples": [asdict(s) for s in bench.samples]}
    return finish(args, started, error, before, sections)


if __name__ == "__main__":
    raise SystemExit(main())
