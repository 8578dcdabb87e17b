"""Why is the engine's batch-1 decode step longer than its kernels? Variants in one process.

  python3 bench/host_bound.py [--layers 32] [--steps 48] [--variants base,poll10,unroll,transfer]
  JAX_PLATFORMS=cpu python3 bench/host_bound.py --preset tiny     # the code path

One model (random bf16 weights made on the device), then per variant a fresh `Engine` at batch 1
through `bench/engine.measure`, printing one JSON line: step ms, the host's dispatch ms per call
(time inside the compiled call: it returns only when a host-synchronising op inside it, a while
loop's or a conditional's predicate, has been reached on the device) and its wait for tokens.
Variants (each a change of the code the step runs, applied here only):
  base     the engine as it is
  poll10   the benchmark polls the engine's counters every 10 ms instead of 0.5 ms (the GIL)
  unroll   the layer scan fully unrolled (no while loop)
  transfer the step's host inputs copied to the device first, timed apart from the call: the
           time `jax.device_put` takes to return and until the copies are done (if these wait
           for the step before, the host is held by its inputs, not by the launch)
Run it again with XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async for the stream-ordered allocator.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax

import mixtral_jax as mj
from bench import engine as engine_bench
from bench.common import copy_bandwidth_tbs, environment, random_model, write_json
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.serve import steps as serve_steps

KEYS = (
    "step_ms",
    "output_tokens_per_s",
    "dispatch_ms_per_call",
    "token_wait_ms_per_call",
    "unroll",
    "compile_s",
)
TIMES = {"put_s": 0.0, "ready_s": 0.0, "calls": 0}


def decode_with_inputs_put_first(original):
    """`Steps.decode` that copies its host inputs to the device first, timing the copies."""

    def decode(self, pool, last, *host):
        start = time.perf_counter()
        moved = jax.device_put(host)
        TIMES["put_s"] += time.perf_counter() - start
        jax.block_until_ready(moved)
        TIMES["ready_s"] += time.perf_counter() - start
        TIMES["calls"] += 1
        return original(self, pool, last, *moved)

    return decode


def run_variant(name: str, model, args, bandwidth: float) -> dict:
    saved = (engine_bench.wait_for, kernel_plan.GPU_EXTEND_UNROLL)
    decode = serve_steps.Steps.decode
    TIMES.update(put_s=0.0, ready_s=0.0, calls=0)
    try:
        if name == "transfer":
            serve_steps.Steps.decode = decode_with_inputs_put_first(decode)
        if name == "poll10":
            engine_bench.wait_for = functools.partial(saved[0], poll=0.01)
        if "unroll" in name:
            kernel_plan.GPU_EXTEND_UNROLL = model.cfg.num_layers
        row = engine_bench.measure(model, 1, args, bandwidth)
    finally:
        serve_steps.Steps.decode = decode
        engine_bench.wait_for, kernel_plan.GPU_EXTEND_UNROLL = saved
    out = {"variant": name, **{k: row[k] for k in KEYS}}
    if TIMES["calls"]:  # over every decode call of the run (warmup's too)
        out["put_ms_per_call"] = 1000 * TIMES["put_s"] / TIMES["calls"]
        out["put_ready_ms_per_call"] = 1000 * TIMES["ready_s"] / TIMES["calls"]
    out["allocator"] = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="default 48 (tiny 4)")
    p.add_argument("--variants", default="base,poll10,unroll,transfer")
    args = p.parse_args()
    tiny = args.preset == "tiny"
    changes = {} if args.layers is None else {"num_layers": args.layers}
    dtype = "float32" if tiny else "bfloat16"
    cfg = mj.preset(args.preset, dtype=dtype, param_dtype=dtype, **changes)
    run_args = argparse.Namespace(
        block_size=16,
        prefill_chunk=128,
        prefill_budget=512,
        one_batch=True,
        cost_reps=1,
        prompt=8 if tiny else 128,
        max_tokens=24 if tiny else 512,
        steps=args.steps or (4 if tiny else 48),
        profile=False,
    )
    bandwidth = 0.05 if tiny else copy_bandwidth_tbs()
    start = time.perf_counter()
    model = random_model(cfg)
    print(json.dumps({"model_build_s": time.perf_counter() - start, "jax": jax.__version__}))
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(name, model, run_args, bandwidth))
        print(json.dumps(rows[-1]), flush=True)
    write_json("host_bound.json", {"env": environment(), "layers": cfg.num_layers, "rows": rows})


if __name__ == "__main__":
    main()
