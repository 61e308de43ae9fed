"""How long one cache sweep takes on a large cache.

``PYTHONPATH=. python bench/sweep_time.py [--models 1000 --blobs-per-model 10]``

Builds a cache of small generated files (every model with its own blobs), then times a first sweep
(the index built from scratch), a second one (nothing to do) and one that evicts half the models by
size. Prints seconds for each; the sweep runs on this thread, as it would in the daemon's worker thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from ollama_mirror.cache.catalog import Catalog
from ollama_mirror.cache.eviction import Sweeper
from ollama_mirror.cache.index import CacheIndex
from ollama_mirror.cache.store import Store
from ollama_mirror.config import load_config
from ollama_mirror.events import Events
from ollama_mirror.names import ModelName
from ollama_mirror.runner import InlineRunner


def build(root: Path, models: int, blobs_per_model: int) -> Store:
    store = Store(str(root))
    store.create()
    for m in range(models):
        layers = []
        for b in range(blobs_per_model):
            data = f"model {m} blob {b}".encode() * 8
            digest = hashlib.sha256(data).hexdigest()
            Path(store.blob_path(digest)).write_bytes(data)
            layers.append({"digest": "sha256:" + digest, "size": len(data)})
        manifest = {"schemaVersion": 2, "config": layers[0], "layers": layers[1:]}
        store.write_manifest(ModelName.parse(f"bench/model{m}:latest"), json.dumps(manifest).encode())
    return store


def timed_sweep(sweeper: Sweeper) -> float:
    started = time.perf_counter()
    d = Deferred.fromCoroutine(sweeper.sweep())
    assert d.called
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--blobs-per-model", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        store = build(Path(tmp) / "cache", args.models, args.blobs_per_model)
        print(
            f"built {args.models} models, {args.models * args.blobs_per_model} blobs in "
            f"{time.perf_counter() - started:.1f} s"
        )
        clock = Clock()
        clock.advance(time.time())
        total = sum(p.stat().st_size for p in Path(store.blobs_dir).iterdir())
        config = load_config(
            None, {}, {"cache.max_size_gb": str(total / 2 / 1e9), "cache.min_free_gb": "0"}
        ).cache
        index = CacheIndex(str(Path(store.work_dir) / "index.sqlite3"), clock)
        unlimited = load_config(None, {}, {"cache.min_free_gb": "0"}).cache
        sweeper = Sweeper(store, Catalog(store), index, unlimited, InlineRunner(), clock, Events(), set)
        print(f"first sweep (index built):   {timed_sweep(sweeper):.2f} s")
        print(f"second sweep (nothing to do): {timed_sweep(sweeper):.2f} s")
        sweeper.config = config
        seconds = timed_sweep(sweeper)
        report = sweeper.last_report
        assert report is not None
        print(
            f"evicting sweep:              {seconds:.2f} s ({len(report.removed_models)} models, "
            f"{report.removed_blobs} blobs removed)"
        )


if __name__ == "__main__":
    main()
