"""Device-to-host copy rates of a training state, by how the host memory is obtained.

  PYTHONPATH=. python bench/d2h.py [--gb 10 --arrays 44]   # GPU machine
  PYTHONPATH=. python bench/d2h.py --gb 0.05 --arrays 4    # a check on CPU

A checkpoint save copies every shard of the state to the host before Orbax writes it. On the
H200 that copy ran at 1-2 GB/s (BENCHMARKS.md, save stall), far below the link. This measures
the same bytes (float32 arrays of equal size) copied each way, twice in a row (the second time
shows what reusing memory the process already touched gains):

  asarray        copy_to_host_async on every array, then np.asarray each (what the save does)
  device_get     jax.device_get of the list
  threads        np.asarray of each array from 8 threads
  pinned         device_put to the device's pinned_host memory, then np.asarray
  pinned_jit     one jitted identity whose outputs are placed in pinned_host memory
  into_buffers   copy_to_host_async, then np.copyto into numpy buffers allocated (and touched)
                 once, before the timed copies
  chunks         each array copied in 64 MiB pieces (slices made on the device) into buffers
                 allocated once

Prints one JSON line per method and pass; writes $OUT/d2h.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, write_json

CHUNK = 64 << 20


def _state(gb: float, arrays: int) -> list[jax.Array]:
    n = int(gb * 1e9 / 4 / arrays)
    make = jax.jit(lambda k: jax.random.normal(k, (n,), jnp.float32))
    return [make(jax.random.key(i)) for i in range(arrays)]


def _asarray(xs, _):
    for x in xs:
        x.copy_to_host_async()
    return [np.asarray(x) for x in xs]


def _device_get(xs, _):
    return jax.device_get(xs)


def _threads(xs, _):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(np.asarray, xs))


def _pinned(xs, _):
    dev = xs[0].devices().pop()
    try:
        where = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    except Exception as e:
        raise RuntimeError(f"no pinned_host memory: {e}") from e
    host = [jax.device_put(x, where) for x in xs]
    return [np.asarray(h) for h in host]


def _pinned_jit(xs, _):
    """One compiled program whose outputs live in pinned host memory (XLA's host offload)."""
    dev = xs[0].devices().pop()
    where = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    host = jax.jit(lambda xs: [x for x in xs], out_shardings=[where] * len(xs))(xs)
    jax.block_until_ready(host)
    return [np.asarray(h) for h in host]


def _into_buffers(xs, buffers):
    for x in xs:
        x.copy_to_host_async()
    for x, b in zip(xs, buffers):
        np.copyto(b, np.asarray(x))
    return buffers


def _chunks(xs, buffers):
    step = CHUNK // 4
    for x, b in zip(xs, buffers):
        pieces = [x[i : i + step] for i in range(0, x.shape[0], step)]
        for p in pieces:
            p.copy_to_host_async()
        for i, p in zip(range(0, x.shape[0], step), pieces):
            b[i : i + step] = np.asarray(p)
    return buffers


METHODS = {
    "asarray": _asarray,
    "device_get": _device_get,
    "threads": _threads,
    "pinned": _pinned,
    "pinned_jit": _pinned_jit,
    "into_buffers": _into_buffers,
    "chunks": _chunks,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=10.0)
    p.add_argument("--arrays", type=int, default=44)
    p.add_argument("--methods", default=",".join(METHODS))
    a = p.parse_args()
    xs = _state(a.gb, a.arrays)
    jax.block_until_ready(xs)
    nbytes = sum(x.nbytes for x in xs)
    buffers = [np.ones(x.shape, x.dtype) for x in xs]  # allocated and touched once
    rows = []
    for name in a.methods.split(","):
        for attempt in (1, 2):
            start, out = time.perf_counter(), None
            try:
                out = METHODS[name](xs, buffers)
                seconds = time.perf_counter() - start
                ok = bool(np.array_equal(out[-1][:1000], np.asarray(xs[-1][:1000])))
                row = {"method": name, "pass": attempt, "s": seconds, "ok": ok}
                row["GB_per_s"] = nbytes / 1e9 / seconds
            except Exception as e:  # noqa: BLE001 - a method this backend lacks
                row = {"method": name, "pass": attempt, "error": str(e).splitlines()[0][:200]}
            del out
            rows.append(row)
            print(row, flush=True)
    write_json("d2h.json", {"environment": environment(), "bytes": nbytes, "rows": rows})


if __name__ == "__main__":
    main()
