"""A daemon killed again and again while a large blob trickles in resumes from every byte it had.

The mirror runs with its default chunk size (16 MiB), so a resume that kept only whole chunks would fetch
most of what arrived before each kill again.  The upstream is a :class:`FaultProxy` that counts the bytes
it sends for the blob and lets them through slowly while the kills go on; each life of the daemon gets a
client asking for the blob (which starts or resumes the fill) and a SIGKILL at a random moment.  After the
last kill the throttle goes and the blob completes: it must be published once, correct, and cost the
upstream at most a tenth more than its size (and at most 1 MiB more per kill).
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.integration.helpers import (
    CONNECTIONS,
    MirrorStarter,
    assert_valid_models_dir,
    blob_records_bytes,
    blob_url,
    cached_blob,
    get_manifest,
    partial_files,
    wait_cached,
    wait_until,
)
from tests.support.faultproxy import FaultProxy
from tests.support.models import KiB, MiB, ModelFactory, PushedModel

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")  # after every fault: Ollama can run the cache

BLOB_MIB = 200
TRICKLE = 512 * KiB  # per upstream connection while the kills go on: ~2 MiB/s for the blob
LIFE = (0.3, 1.5)  # seconds each life of the daemon downloads before its SIGKILL, drawn at random
MAX_UPSTREAM_RATIO = 1.1
LOST_PER_KILL = 1 * MiB  # at most, fetched again per kill


@pytest.fixture(scope="module")
def large_model(model_factory: ModelFactory) -> PushedModel:
    return model_factory("library/large", "latest", BLOB_MIB * MiB, 7)


def drain_blob(url: str, stop: threading.Event) -> None:
    """GET the blob and throw its bytes away (the request starts the fill; the kill ends it)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        while not stop.is_set() and response.read(256 * KiB):
            pass
    except (OSError, http.client.HTTPException):
        pass  # the daemon was killed under us: expected
    finally:
        conn.close()


@pytest.mark.parametrize("kills", [5, 20])
def test_repeated_kills_during_a_fill_cost_at_most_a_tenth_more(
    start_mirror: MirrorStarter, proxy: FaultProxy, large_model: PushedModel, kills: int
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    mirror = start_mirror(upstream={"chunk_size": "16MiB", "connections_per_blob": CONNECTIONS})
    blob = large_model.model_layer
    part, record = partial_files(mirror, blob)
    published = cached_blob(mirror, blob)
    assert get_manifest(mirror, large_model).status == 200
    proxy.clear_records()
    proxy.throttle(TRICKLE, path=blob.hex)

    for life in range(kills):
        stop = threading.Event()
        client = threading.Thread(target=drain_blob, args=(blob_url(mirror, large_model, blob), stop))
        client.start()
        wait_until(part.exists, 15.0, "the partial file")
        time.sleep(rng.uniform(*LIFE))
        mirror.kill()
        stop.set()
        client.join(timeout=30)
        assert not client.is_alive()
        assert not published.exists(), f"published during life {life} (seed {seed}): the trickle is too fast"
        assert part.stat().st_size == blob.size  # kept, at full size, for the next life
        assert_valid_models_dir(mirror.cache_dir)  # the model is not in manifests/ before its blob
        mirror.start()

    proxy.throttle(None)
    stop = threading.Event()
    drain_blob(blob_url(mirror, large_model, blob), stop)
    wait_cached(mirror, blob, timeout=120.0)  # published, its size and sha256 checked
    assert not part.exists() and not record.exists()

    fetched = blob_records_bytes(proxy, blob)
    ratio = fetched / blob.size
    print(
        f"\n{kills} kills (seed {seed}): upstream sent {fetched} bytes for a {blob.size}-byte blob: {ratio:.3f}x"
    )
    assert ratio <= MAX_UPSTREAM_RATIO, f"seed {seed}: {ratio:.3f}x the blob fetched after {kills} kills"
    # Each kill may cost what arrived since the last record (a few hundred KiB), never a chunk's worth.
    assert fetched - blob.size <= kills * LOST_PER_KILL, f"seed {seed}: {fetched - blob.size} bytes lost"
