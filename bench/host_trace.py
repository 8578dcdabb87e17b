"""Where the host's time goes in the engine's batch-1 decode steps: the profiler's host events.

  python3 bench/host_trace.py [--layers 32] [--steps 16] [--top 40]
  JAX_PLATFORMS=cpu python3 bench/host_trace.py --preset tiny     # the code path

One engine at batch 1 driven on this thread (`Engine.run_once`, no engine thread: nothing
launches while the profiler stops). After the request is prefilled and a few steps have run,
`--steps` iterations are traced. Prints the host events (XLA's TraceMe annotations: thunk
execution, host syncs, copies, launches; nested events each count their own span) by total
time per iteration, and beside them the GPU's busy time and span per iteration (kernels from
`bench.common.device_kernels`). Under the profiler XLA runs command buffers as plain thunks.
Writes $OUT/host_trace.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import mixtral_jax as mj
from bench.common import (
    device_kernels,
    environment,
    is_gpu_plane,
    kernel_summary,
    random_model,
    write_json,
)
from mixtral_jax.serve.engine import Engine, Request


def host_events(profile) -> dict[str, list[int]]:
    """name -> [count, total ns] over every event of the non-GPU planes."""
    totals: dict[str, list[int]] = {}
    for plane in profile.planes:
        if is_gpu_plane(plane.name):
            continue
        for line in plane.lines:
            for ev in line.events:
                entry = totals.setdefault(ev.name, [0, 0])
                entry[0] += 1
                entry[1] += int(ev.duration_ns)
    return totals


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    tiny = args.preset == "tiny"
    changes = {} if args.layers is None else {"num_layers": args.layers}
    dtype = "float32" if tiny else "bfloat16"
    cfg = mj.preset(args.preset, dtype=dtype, param_dtype=dtype, **changes)
    model = random_model(cfg)
    engine = Engine(model, max_batch=1, max_queue=1, max_context=256, prefill_chunk=128)
    engine.warmup()
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, cfg.vocab_size, 64)]
    engine.submit(Request(prompt, 192, ignore_eos=True))
    for _ in range(8):  # prefill, then a few decode steps
        engine.run_once()
    where = tempfile.mkdtemp()
    start = time.perf_counter()
    with jax.profiler.trace(where):
        for _ in range(args.steps):
            engine.run_once()
        engine.run_once()  # delivers the last traced step's tokens (waits for it)
    wall_ms = 1000 * (time.perf_counter() - start) / (args.steps + 1)
    engine.shutdown(cancel=True)
    path = glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True)[0]
    profile = jax.profiler.ProfileData.from_file(path)
    per = args.steps + 1
    gpu = kernel_summary(device_kernels(profile), per=per)
    events = sorted(host_events(profile).items(), key=lambda kv: -kv[1][1])[: args.top]
    rows = [
        {"name": name, "count_per_step": c / per, "ms_per_step": ns / 1e6 / per}
        for name, (c, ns) in events
    ]
    summary = {
        "wall_ms_per_step_traced": wall_ms,
        "gpu_busy_ms_per_step": gpu.get("busy_us", 0) / 1000,
        "gpu_span_ms_per_step": gpu.get("span_us", 0) / 1000,
        "kernels_per_step": gpu.get("kernels", 0),
    }
    print(json.dumps(summary))
    for row in rows:
        print(f"{row['ms_per_step']:8.3f} ms {row['count_per_step']:8.1f}x  {row['name'][:100]}")
    write_json("host_trace.json", {"env": environment(), **summary, "host_events": rows})


if __name__ == "__main__":
    main()
