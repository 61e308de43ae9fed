"""``server.workers``: worker processes share the port, download each blob once between them, are
restarted when they die, and stop with the daemon (the real daemon under twistd)."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from pathlib import Path

from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import PushedModel
from tests.support.puller import pull_blob_ranged

from .helpers import (
    CHUNK,
    CLIENT_TIMEOUT,
    UPSTREAM_SETTINGS,
    assert_blob_served,
    blob_records_bytes,
    fetch_blob,
    sha256_hex,
    wait_cached,
    wait_until,
)


def start_workers(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    server: dict[str, object] | None = None,
    start: bool = True,
) -> MirrorDaemon:
    """The daemon with two workers, its upstream behind ``proxy`` (small chunks, quick retries)."""
    config = {"upstream": UPSTREAM_SETTINGS, "server": {"workers": 2, **(server or {})}}
    return mirror_factory(upstream_url=proxy.url, config=config, start=start)


def worker_pids(mirror: MirrorDaemon) -> set[int]:
    """The supervisor's child processes: its workers."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == mirror.pid:
            pids.add(int(entry.name))
    return pids


def serving_pid(conn: http.client.HTTPConnection, pids: set[int]) -> int | None:
    """The worker holding the server side of this client connection (found through /proc)."""
    assert conn.sock is not None
    client_port = conn.sock.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == client_port:
            inodes.add(fields[9])
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


def one_connection_per_worker(mirror: MirrorDaemon, count: int) -> list[http.client.HTTPConnection]:
    """Open keep-alive connections until one of each worker is found (the kernel picks the worker)."""
    pids = worker_pids(mirror)
    assert len(pids) == count
    found: dict[int, http.client.HTTPConnection] = {}
    spare: list[http.client.HTTPConnection] = []
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=CLIENT_TIMEOUT)
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        pid = serving_pid(conn, pids)
        if pid is not None and pid not in found:
            found[pid] = conn
            if len(found) == count:
                break
        else:
            spare.append(conn)
    for conn in spare:
        conn.close()
    assert len(found) == count, f"only {len(found)} of {count} workers accepted connections"
    return list(found.values())


def test_workers_share_the_port_and_download_a_blob_once_between_them(
    mirror_factory: MirrorFactory, proxy: FaultProxy, big_model: PushedModel
) -> None:
    mirror = start_workers(mirror_factory, proxy)
    wait_until(lambda: len(worker_pids(mirror)) == 2, 15.0, "two workers running")
    connections = one_connection_per_worker(mirror, 2)
    blob = big_model.model_layer
    proxy.throttle(2 * 2**20)  # per connection: the download lasts long enough for both to ask
    path = f"/v2/{big_model.repo}/blobs/{blob.digest}"
    bodies: list[bytes | None] = [None, None]

    def get(i: int) -> None:
        connections[i].request("GET", path)
        response = connections[i].getresponse()
        bodies[i] = response.read() if response.status == 200 else None

    threads = [threading.Thread(target=get, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # the second asks while the first worker is downloading
    for thread in threads:
        thread.join(timeout=60)
    for conn in connections:
        conn.close()
    assert all(body is not None and sha256_hex(body) == blob.hex for body in bodies)
    wait_cached(mirror, blob)
    assert blob_records_bytes(proxy, blob) <= 1.05 * blob.size  # one download, not one per worker
    log = mirror.log_text()
    assert "another worker downloads it" in log and "downloaded by another worker, verified" in log
    assert "taking over" not in log


def test_an_ollama_style_pull_spread_over_workers_gets_every_part_and_one_download(
    mirror_factory: MirrorFactory, proxy: FaultProxy, big_model: PushedModel, tmp_path: Path
) -> None:
    """Go's 16 ranged parts land on whichever worker accepts them.  One worker starts the download
    (a reader of the first chunk); the other, following it, is asked for the far end of the blob,
    which nobody on the downloading worker waits for.  Every answer must hold the right bytes, no
    part may stall, and the blob must cross the upstream once.  (That the holder fetches a
    follower's chunks first is shown on a fake clock in test_fill.py.)"""
    mirror = start_workers(mirror_factory, proxy)
    wait_until(lambda: len(worker_pids(mirror)) == 2, 15.0, "two workers running")
    holder, follower = one_connection_per_worker(mirror, 2)
    blob = big_model.model_layer
    proxy.throttle(512 * 2**10)  # per connection: the download lasts seconds, so everything overlaps it
    path = f"/v2/{big_model.repo}/blobs/{blob.digest}"
    far = (blob.size - 512 * 2**10, blob.size - 1)
    answers: dict[str, bytes] = {}

    def get(name: str, conn: http.client.HTTPConnection, first: int, last: int) -> None:
        conn.request("GET", path, headers={"Range": f"bytes={first}-{last}"})
        response = conn.getresponse()
        answers[name] = response.read() if response.status == 206 else b""

    threads = [threading.Thread(target=get, args=("holder", holder, 0, CHUNK - 1))]
    threads[0].start()
    time.sleep(0.3)  # the first worker holds the download before the other is asked
    threads.append(threading.Thread(target=get, args=("follower", follower, *far)))
    threads[1].start()
    result = pull_blob_ranged(
        f"{mirror.url}{path}",
        blob.size,
        tmp_path / "blob",
        part_size_min=blob.size // 16,
        stall_timeout=15.0,
        max_stalls=0,  # a part starved for 15 s fails the test
        expected_digest=blob.digest,
        timeout=120.0,
    )
    for thread in threads:
        thread.join(timeout=60)
    holder.close()
    follower.close()
    assert all(part.completed == part.size and part.stalls == 0 for part in result.parts)
    content = (tmp_path / "blob").read_bytes()
    assert answers["holder"] == content[:CHUNK]
    assert answers["follower"] == content[far[0] :]
    wait_cached(mirror, blob)
    assert blob_records_bytes(proxy, blob) <= 1.05 * blob.size
    log = mirror.log_text()
    assert "another worker downloads it" in log and "taking over" not in log


def test_a_worker_that_dies_is_started_again_and_the_daemon_stops_them_all(
    mirror_factory: MirrorFactory, proxy: FaultProxy, small_model: PushedModel
) -> None:
    mirror = start_workers(mirror_factory, proxy)
    wait_until(lambda: len(worker_pids(mirror)) == 2, 15.0, "two workers running")
    first = worker_pids(mirror)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(worker_pids(mirror)) == 2 and victim not in worker_pids(mirror), 20.0, "a new worker"
    )
    for _ in range(6):  # whichever worker answers, it serves
        assert_blob_served(fetch_blob(mirror, small_model, small_model.model_layer), small_model.model_layer)
    assert "starting it again" in mirror.log_text()
    workers = worker_pids(mirror)
    mirror.stop()
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def test_two_workers_refuse_a_tls_endpoint_at_start_up(
    mirror_factory: MirrorFactory, proxy: FaultProxy
) -> None:
    mirror = start_workers(
        mirror_factory, proxy, {"listen": ["ssl:0:privateKey=k.pem:certKey=c.pem"]}, start=False
    )
    try:
        mirror.start(wait=False)
        code = mirror.wait_exit(timeout=20)
    finally:
        mirror.stop()
    assert code != 0
    assert "workers share tcp: and unix: endpoints only" in mirror.stderr_path.read_text()
