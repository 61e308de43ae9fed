"""Fleet benchmark: many Ollama servers behind one address, against the rate limit as shipped.

    python bench/fleet.py [--pullers 32] [--size-mib 32] [--seconds 10] [--out results.json]

Run from the repository root (it needs ``/usr/bin/docker-registry`` and the test dependencies; ``wrk``, if
installed, measures request rates, else a threaded client does). Loopback only: every client is on
127.0.0.1, one address, as a fleet behind a NAT is. Each part runs twice in the same run, on a fresh daemon
with ``security.rate_limit_requests`` as shipped and on one with the limit off (the baseline):

1. fleet: ``--pullers`` Go-style pullers (``tests.support.puller``, 16 ranged parts per blob, each a process
   of its own) pull one cold model at once: how many succeed, and the wall time against the baseline's;
2. warm rate: requests per second for one fresh manifest from one address (``--seconds``, 32 connections):
   the limited daemon against the baseline, and how many answers were 429;
3. enumeration: ``--names`` requests for distinct unknown models from one address (what the limit is for):
   how many the mirror refused with 429, and how many it sent upstream.

It prints one table and writes every figure to ``--out``. Every process it starts is stopped at the end, also
on failure; the work directory is removed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ollama_mirror.config import SecurityConfig  # noqa: E402
from tests.support.daemon import MirrorDaemon  # noqa: E402
from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.models import MiB, build_model, push_model  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402

ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
SHIPPED = SecurityConfig().rate_limit_requests
SETTINGS = {"as shipped": SHIPPED, "off (baseline)": 0}


def fleet(daemon: MirrorDaemon, pullers: int, workdir: Path, timeout: float) -> dict[str, Any]:
    """*pullers* processes pull ``library/fleet`` at once; successes and wall time."""
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.puller",
                daemon.url,
                "library/fleet",
                "latest",
                str(workdir / str(i)),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(pullers)
    ]
    errors: list[str] = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            errors.append("timed out")
            continue
        if process.returncode != 0:
            errors.append(err.strip()[-200:])
    return {
        "succeeded": pullers - len(errors),
        "pullers": pullers,
        "seconds": time.monotonic() - started,
        "errors": Counter(errors).most_common(3),
    }


def warm_rate(daemon: MirrorDaemon, seconds: float) -> dict[str, Any]:
    """Requests per second for one fresh manifest, 32 connections, one address."""
    path = "/v2/library/fleet/manifests/latest"
    wrk = shutil.which("wrk")
    if wrk is not None:
        script = Path(tempfile.mkstemp(suffix=".lua")[1])
        script.write_text(
            f'wrk.headers["Accept"] = "{ACCEPT}"\n'
            "statuses = {}\n"
            "response = function(status) statuses[status] = (statuses[status] or 0) + 1 end\n"
        )
        out = subprocess.run(
            [wrk, "-t2", "-c32", f"-d{seconds:g}s", "-s", str(script), daemon.url + path],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout
        script.unlink()
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {"client": "wrk", "requests_per_s": rate, "refused": int(non_2xx.group(1)) if non_2xx else 0}
    counts: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        while time.monotonic() < deadline:
            connection.request("GET", path, headers={"Accept": ACCEPT})
            response = connection.getresponse()
            response.read()
            with lock:
                counts[response.status] += 1

    threads = [threading.Thread(target=client) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(counts.values())
    return {"client": "python threads", "requests_per_s": total / seconds, "refused": total - counts[200]}


def enumeration(daemon: MirrorDaemon, upstream: FaultProxy, names: int) -> dict[str, Any]:
    """*names* requests for distinct unknown models from one address: refused, and sent upstream."""
    before = upstream.requests_for("/manifests/")
    statuses: Counter[int] = Counter()
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    for i in range(names):
        connection.request("GET", f"/v2/library/nothing-{i}/manifests/latest", headers={"Accept": ACCEPT})
        response = connection.getresponse()
        response.read()
        statuses[response.status] += 1
    return {
        "requests": names,
        "refused": statuses[429],
        "sent_upstream": upstream.requests_for("/manifests/") - before,
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"shipped_rate_limit_requests": SHIPPED}
    registry = RegistryProcess(workdir / "registry")
    try:
        push_model(
            registry.url,
            "library/fleet",
            "latest",
            build_model(workdir / "model", size=args.size_mib * MiB, seed=32),
        )
        for label, limit in SETTINGS.items():
            with FaultProxy(registry.url) as upstream:
                daemon = MirrorDaemon(
                    workdir / f"cache-{limit}",
                    upstream.url,
                    config={"security": {"rate_limit_requests": limit}},
                    workdir=workdir / f"mirror-{limit}",
                )
                try:
                    results[label] = {
                        "fleet": fleet(daemon, args.pullers, workdir / f"pulled-{limit}", args.timeout),
                        "warm": warm_rate(daemon, args.seconds),
                        "enumeration": enumeration(daemon, upstream, args.names),
                    }
                finally:
                    daemon.cleanup()
                    shutil.rmtree(workdir / f"pulled-{limit}", ignore_errors=True)
    finally:
        registry.stop()
    return results


def render(results: dict[str, Any]) -> str:
    shipped, off = results["as shipped"], results["off (baseline)"]
    rows = [
        (
            "fleet: pullers that succeeded",
            f"{shipped['fleet']['succeeded']}/{shipped['fleet']['pullers']}",
            f"{off['fleet']['succeeded']}/{off['fleet']['pullers']}",
            "",
        ),
        (
            "fleet: wall time (s)",
            f"{shipped['fleet']['seconds']:.1f}",
            f"{off['fleet']['seconds']:.1f}",
            f"{shipped['fleet']['seconds'] / off['fleet']['seconds']:.2f}x",
        ),
        (
            f"warm manifest, one address ({shipped['warm']['client']}): req/s",
            f"{shipped['warm']['requests_per_s']:.0f}",
            f"{off['warm']['requests_per_s']:.0f}",
            f"{shipped['warm']['requests_per_s'] / off['warm']['requests_per_s']:.2f}x",
        ),
        (
            "warm manifest: answers refused (429)",
            str(shipped["warm"]["refused"]),
            str(off["warm"]["refused"]),
            "",
        ),
        (
            f"enumeration of {shipped['enumeration']['requests']} unknown names: refused",
            str(shipped["enumeration"]["refused"]),
            str(off["enumeration"]["refused"]),
            "",
        ),
        (
            "enumeration: requests sent upstream",
            str(shipped["enumeration"]["sent_upstream"]),
            str(off["enumeration"]["sent_upstream"]),
            "",
        ),
    ]
    head = ("", f"limit as shipped ({results['shipped_rate_limit_requests']}/min)", "limit off", "ratio")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *rows]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pullers", type=int, default=32)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--names", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        results = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
