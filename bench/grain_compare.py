"""Grain (+ ArrayRecord) against our token shards on this machine: write, then shuffle + pack.

  PYTHONPATH=. python bench/grain_compare.py [--docs 100000] [--batches 400] [--dir /tmp/grain_cmp]

Needs `pip install grain==0.2.18 array-record==0.8.6` (not a dependency: this is the measurement
behind choosing our shards). The same synthetic token documents (lengths uniform in [20, 600),
seeded) are written both ways, then read back as batches of 16 packed rows of 129 tokens in a
seeded global document order: Grain's `MapDataset.source(ArrayRecordDataSource).shuffle(seed)`
into `FirstFitPackIterDataset(num_packing_bins=64)`, against our `ShardSet` + `BatchIterator`
(first fit over 64 open rows). Each side runs in a fresh process; prints one JSON line each
(write seconds, packed rows per second, checkpoint state bytes, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WIDTH, BATCH = 129, 16


def _documents(n: int):
    rng = np.random.default_rng(0)
    for length in rng.integers(20, 600, n):
        yield rng.integers(3, 32000, length, dtype=np.int32)


def _ours(n: int, batches: int, out: str) -> dict:
    from mixtral_jax.data import loader, shards

    start = time.perf_counter()
    writer = shards.ShardWriter(out, 0, 32000)
    for doc in _documents(n):
        writer.add(doc)
    marker = writer.close({})
    index = {
        "format": shards.FORMAT,
        "dtype": "uint16",
        "tokens": marker["tokens"],
        "max_id": marker["max_id"],
        "shards": [{"shard": 0, "docs": marker["docs"], "tokens": marker["tokens"]}],
    }
    with open(os.path.join(out, shards.INDEX), "w") as f:
        json.dump(index, f)
    write_s = time.perf_counter() - start
    docs = shards.ShardSet(out)
    it = loader.BatchIterator(docs, loader.Split(docs.num_docs, 0.0, 0), BATCH, WIDTH - 1, 0)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return _result("ours", write_s, batches / (time.perf_counter() - start), it.state)


def _grain(n: int, batches: int, out: str) -> dict:
    import grain
    import grain.experimental as ge
    from array_record.python import array_record_module as ar

    path = os.path.join(out, "docs.array_record")
    start = time.perf_counter()
    writer = ar.ArrayRecordWriter(path, "group_size:1")  # random access per record
    for doc in _documents(n):
        writer.write(doc.tobytes())
    writer.close()
    write_s = time.perf_counter() - start
    ds = (
        grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path]))
        .shuffle(seed=0)
        .map(lambda b: {"tokens": np.frombuffer(b, np.int32)[:WIDTH]})
        .to_iter_dataset()
    )
    ds = ge.FirstFitPackIterDataset(ds, length_struct={"tokens": WIDTH}, num_packing_bins=64)
    it = iter(ds.batch(BATCH))
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return _result("grain", write_s, batches / (time.perf_counter() - start), it.get_state())


def _result(impl: str, write_s: float, batches_per_s: float, state) -> dict:
    return {
        "impl": impl,
        "write_s": round(write_s, 2),
        "rows_per_s": round(batches_per_s * BATCH),
        "state_bytes": len(json.dumps(state, default=str)),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--dir", default="/tmp/grain_cmp")
    p.add_argument("--impl", choices=("ours", "grain"), help="(internal) run one side here")
    args = p.parse_args()
    if args.impl:
        out = os.path.join(args.dir, args.impl)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        run = _ours if args.impl == "ours" else _grain
        print(json.dumps({"docs": args.docs, **run(args.docs, args.batches, out)}))
        return
    for impl in ("ours", "grain"):
        cmd = [sys.executable, __file__, "--impl", impl, "--docs", str(args.docs)]
        cmd += ["--batches", str(args.batches), "--dir", args.dir]
        path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=path))


if __name__ == "__main__":
    main()
