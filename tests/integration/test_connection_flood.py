"""One address opening thousands of idle connections cannot starve the others.

The daemon runs with an open-file limit of 4,096, as a service manager might set it.  A flood of 5,000
idle connections comes from 127.0.0.2; meanwhile a client on 127.0.0.1 pulls a model.  Without caps the
flood takes every descriptor and the pull fails (connection reset); with them, the flood gets its share,
the rest of it is answered 503 and closed, and the pull completes.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from collections.abc import Iterator

import pytest

from tests.integration.helpers import assert_blob_served, fetch_blob, get_manifest, wait_until
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.models import PushedModel, http_request

FLOOD = 5_000
OPEN_FILES = 4_096
FLOOD_SOURCE = "127.0.0.2"


@pytest.fixture
def enough_descriptors() -> Iterator[None]:
    """This test process opens FLOOD sockets: its own limit must allow them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FLOOD + 512
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"this process may open only {hard} files; the flood needs {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def flood(port: int, count: int, deadline: float) -> list[socket.socket]:
    """*count* connections from FLOOD_SOURCE that send nothing; those the mirror closed are dropped."""
    held = []
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((FLOOD_SOURCE, 0))
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        held.append(s)
    return held


def answered_503(s: socket.socket, deadline: float) -> bool:
    """Whether the mirror answers this connection 503 (it may still sit in the listen queue a while)."""
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return s.recv(4096).startswith(b"HTTP/1.1 503")
    except OSError:
        return False


def refused_count(mirror: MirrorDaemon) -> float:
    metrics = http_request("GET", mirror.url + "/metrics").body.decode()
    return next(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("ollama_mirror_connections_refused_total ")
    )


def test_a_flood_of_idle_connections_from_one_address_leaves_room_for_a_normal_pull(
    mirror_factory: MirrorFactory, small_model: PushedModel, enough_descriptors: None
) -> None:
    mirror = mirror_factory(open_files=OPEN_FILES)
    sockets = flood(mirror.port, FLOOD, time.monotonic() + 60)
    try:
        assert len(sockets) == FLOOD
        time.sleep(1.0)  # let the mirror accept (and refuse) them all

        assert get_manifest(mirror, small_model).status == 200  # from 127.0.0.1, meanwhile
        for blob in small_model.blobs:
            assert_blob_served(fetch_blob(mirror, small_model, blob), blob)

        deadline = time.monotonic() + 30
        refused = sum(answered_503(s, deadline) for s in sockets[-200:])
        assert refused == 200  # the latest of the flood were told to come back later
        wait_until(  # all but what server.max_connections_per_client lets in
            lambda: refused_count(mirror) >= FLOOD - 1024, 30.0, "every connection of the flood refused"
        )
        log = mirror.log_text()
        assert log.count("refusing new connections") == 1  # once a minute, not once per connection
        assert "from 127.0.0.2 (server.max_connections_per_client)" in log
        assert mirror.is_running()
    finally:
        for s in sockets:
            s.close()
