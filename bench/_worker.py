"""Helper processes for ``bench/pull_1g.py``: each runs in a process of its own, so that no client or proxy
shares an interpreter (and a GIL) with another part of the measurement.

``python bench/_worker.py ranged URL SIZE DEST [--parts N | --go-parts] [--digest D] [--timeout S]``
    Go-style parallel ranged GETs of ``URL`` (``tests.support.puller.pull_blob_ranged``) into ``DEST``;
    prints one JSON line: ``elapsed`` (the ranged download only), ``bytes``, ``parts``, the status codes
    seen, retries, and, with ``--digest``, whether the file's sha256 matched (checked after the clock
    stopped).

``python bench/_worker.py proxy UPSTREAM --rate BYTES_PER_S``
    A ``tests.support.faultproxy.FaultProxy`` in front of ``UPSTREAM`` with ``throttle(rate)`` per connection;
    prints ``{"url": ...}`` once listening, and stops when its standard input reaches EOF (or on SIGTERM).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.puller import GO_MAX_PART_SIZE, GO_MIN_PART_SIZE, PullError, pull_blob_ranged  # noqa: E402

HASH_READ = 4 * 2**20


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_READ):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def run_ranged(args: argparse.Namespace) -> int:
    size: int = args.size
    if args.go_parts:
        part_min, part_max = GO_MIN_PART_SIZE, GO_MAX_PART_SIZE
    else:  # exactly ``parts`` parts (the last one may be shorter)
        part_min = part_max = max(1, -(-size // args.parts))
    dest = Path(args.dest)
    cpu0 = time.process_time()
    try:
        result = pull_blob_ranged(
            args.url,
            size,
            dest,
            part_size_min=part_min,
            part_size_max=part_max,
            stall_timeout=args.stall_timeout,
            timeout=args.timeout,
        )
    except PullError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    report: dict[str, object] = {
        "elapsed": result.elapsed,
        "bytes": sum(p.completed for p in result.parts),
        "parts": len(result.parts),
        "statuses": sorted({s for p in result.parts for s in p.statuses}),
        "retries": sum(max(0, p.attempts - 1) for p in result.parts),
        "cpu_s": time.process_time() - cpu0,
    }
    if args.digest:
        report["digest_ok"] = file_digest(dest) == args.digest
    print(json.dumps(report))
    return 0


def run_proxy(args: argparse.Namespace) -> int:
    proxy = FaultProxy(args.upstream, upstream_timeout=args.upstream_timeout)
    proxy.throttle(args.rate)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)

    def wait_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed our stdin (or died)
        stop.set()

    proxy.start()
    try:
        print(json.dumps({"url": proxy.url, "pid": os.getpid()}), flush=True)
        threading.Thread(target=wait_stdin, daemon=True).start()
        while not stop.wait(0.2):
            pass
    finally:
        proxy.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/_worker.py")
    sub = parser.add_subparsers(dest="command", required=True)
    ranged = sub.add_parser("ranged", help="Go-style parallel ranged GETs of one blob URL")
    ranged.add_argument("url")
    ranged.add_argument("size", type=int)
    ranged.add_argument("dest")
    ranged.add_argument("--parts", type=int, default=16)
    ranged.add_argument("--go-parts", action="store_true", help="Go's clamp(size/16, 100 MB, 1000 MB)")
    ranged.add_argument("--digest", default="")
    ranged.add_argument("--timeout", type=float, default=600.0)
    ranged.add_argument("--stall-timeout", type=float, default=30.0)
    proxy = sub.add_parser("proxy", help="a throttling FaultProxy in front of UPSTREAM")
    proxy.add_argument("upstream")
    proxy.add_argument("--rate", type=float, required=True, help="bytes per second per connection")
    proxy.add_argument("--upstream-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    return run_ranged(args) if args.command == "ranged" else run_proxy(args)


if __name__ == "__main__":
    raise SystemExit(main())
