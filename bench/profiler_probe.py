"""What the JAX profiler records on this machine: planes, their lines and event counts.

  python3 bench/profiler_probe.py

Traces a few matmuls and prints, per plane of the xplane file, its name and each line's name
and event count, plus the first few event names of the busiest lines: how `bench.common.
trace_kernels` must look for GPU kernels on this jax version (it found none on jax 0.11.2 in one
run). Also prints where CUPTI would be loaded from.
"""

from __future__ import annotations

import glob
import os
import tempfile

import jax
import jax.numpy as jnp


def main():
    x = jnp.ones((2048, 2048), jnp.bfloat16)
    f = jax.jit(lambda a: (a @ a).sum())
    jax.block_until_ready(f(x))
    where = tempfile.mkdtemp()
    with jax.profiler.trace(where):
        for _ in range(3):
            out = f(x)
        jax.block_until_ready(out)
    paths = glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True)
    print("xplane files:", paths)
    for path in paths:
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            lines = list(plane.lines)
            print(f"plane {plane.name!r}: {len(lines)} lines")
            for line in lines:
                events = list(line.events)
                names = sorted({e.name for e in events})[:4]
                print(f"  line {line.name!r}: {len(events)} events, e.g. {names}")
    libs = glob.glob("/usr/local/**/libcupti*", recursive=True)
    libs += glob.glob("/usr/lib/**/libcupti*", recursive=True)
    print("libcupti candidates:", libs[:6], "LD_LIBRARY_PATH:", os.environ.get("LD_LIBRARY_PATH"))


if __name__ == "__main__":
    main()
