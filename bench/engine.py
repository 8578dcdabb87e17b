"""Decode throughput of the serving engine (continuous batching over the paged KV cache) on one
GPU: the full Mixtral 8x7B widths, random bf16 weights made on the device, beside the floor.

  python3 bench/engine.py [--layers 32] [--batches 1,16,64,256] [--prompt 128] [--max-tokens 512]
      [--steps 32] [--block-size 16] [--prefill-chunk 256] [--prefill-rows 1]
      [--set paged_attention_impl=pallas] [--profile] [--unroll N]
  JAX_PLATFORMS=cpu python3 bench/engine.py --preset tiny      # the code path, in seconds

Per batch size B, one `Engine(max_batch=B)`: warmup (both step shapes compiled, timed), then B
requests of `--prompt` random tokens and `--max-tokens` new ones (ignore_eos) submitted at once
and run by the engine's thread. Measured from the first decode step after every request has
been prefilled (decode only: no prefill chunk between steps) over `--steps` decode steps, from
the engine's counters: output tokens/s and ms per step, through the engine's whole loop (host
bookkeeping, per-row sampling, block tables) as a server runs it.

The floor of a step: the weight bytes it must read (bench/decode.step_bytes: attention and
router of every layer, the experts B tokens touch in expectation, the LM head), and beside it
the same plus the KV bytes of the rows' tokens (k and v, every layer), at the copy bandwidth
measured in the same run. Writes $OUT/engine_b<batches>[_<settings>].json and prints one JSON
line. --profile traces the running engine for a moment after the timed window and lists the GPU
kernels per decode step, with busy time against span: a span well above the busy time is time
the device waited for the host.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

# 93 GB of bf16 weights and a pool for 256 rows of 640 tokens (21.5 GB) need more than JAX's
# default preallocation of 75% of the GPU's memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python3 bench/engine.py`: bench.* and mixtral_jax from the repository

import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from bench.common import (
    copy_bandwidth_tbs,
    environment,
    kernel_summary,
    random_model,
    trace_kernels,
    write_json,
)
from bench.decode import step_bytes
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.serve.engine import Engine, Request


def kv_bytes(cfg: mj.ModelConfig, tokens: int) -> float:
    """Bytes of k and v for `tokens` cached tokens over every layer (bf16)."""
    return 2.0 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * tokens


def wait_for(engine: Engine, ready, timeout: float, poll: float = 0.0005) -> dict:
    """Polls engine.stats() until ready(stats); returns (time.perf_counter(), stats)."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        stats = engine.stats()
        if ready(stats):
            return time.perf_counter(), stats
        time.sleep(poll)
    raise TimeoutError(f"engine did not get there in {timeout:.0f} s: {engine.stats()}")


def measure(model, batch: int, args, bandwidth_tbs: float) -> dict:
    """Decode-only tokens/s of `batch` rows through one engine, beside its floors."""
    cfg = model.cfg
    engine = Engine(
        model,
        max_batch=batch,
        max_queue=batch,
        block_size=args.block_size,
        prefill_chunk=args.prefill_chunk,
        prefill_rows=args.prefill_rows,
        max_context=args.prompt + args.max_tokens,
        # every row at the full length: an allocation that does not fit fails here, loudly
        num_blocks=batch * -(-(args.prompt + args.max_tokens) // args.block_size) + 1,
    )
    start = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - start
    rng = np.random.default_rng(batch)
    streams = [
        engine.submit(
            Request(
                [int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt)],
                args.max_tokens,
                ignore_eos=True,
            )
        )
        for _ in range(batch)
    ]
    engine.start()
    start = time.perf_counter()

    def decoding_only(s):  # every request holds a row and has been prefilled
        return s["running"] == batch and not s["prefilling"] and not s["queue_depth"]

    t0, s0 = wait_for(engine, lambda s: decoding_only(s) and s["steps"] >= 1, timeout=900)
    fill_s = t0 - start
    t1, s1 = wait_for(engine, lambda s: s["steps"] >= s0["steps"] + args.steps, timeout=900)
    profile = trace_engine(engine) if args.profile else None
    engine.shutdown(cancel=True)
    for stream in streams:
        list(stream)  # drain: every stream ended
    steps = s1["steps"] - s0["steps"]
    if s1["running"] < batch or s1["prefill_calls"] != s0["prefill_calls"]:
        raise RuntimeError(f"rows left or prefilled during the window: {s0} -> {s1}")
    tokens = s1["generated_tokens"] - s0["generated_tokens"]
    step_s = (t1 - t0) / steps
    calls = s1["calls"] - s0["calls"]
    dispatch_ms = 1000 * (s1["dispatch_s"] - s0["dispatch_s"]) / calls
    wait_ms = 1000 * (s1["wait_s"] - s0["wait_s"]) / calls
    mean_cached = args.prompt + (s0["generated_tokens"] + s1["generated_tokens"]) / 2 / batch
    floor_s = step_bytes(cfg, batch) / (bandwidth_tbs * 1e12)
    floor_kv_s = (step_bytes(cfg, batch) + kv_bytes(cfg, batch * mean_cached)) / (
        bandwidth_tbs * 1e12
    )
    del engine
    gc.collect()
    return {
        "batch": batch,
        "output_tokens_per_s": tokens / (t1 - t0),
        "step_ms": 1000 * step_s,
        "steps": steps,
        "dispatch_ms_per_call": dispatch_ms,
        "token_wait_ms_per_call": wait_ms,
        "unroll": kernel_plan.GPU_EXTEND_UNROLL,
        "weights_floor_step_ms": 1000 * floor_s,
        "share_of_weights_floor": floor_s / step_s,
        "weights_kv_floor_step_ms": 1000 * floor_kv_s,
        "share_of_weights_kv_floor": floor_kv_s / step_s,
        "mean_cached_tokens": mean_cached,
        "compile_s": compile_s,
        "fill_s": fill_s,
        "kernel_plan": str(kernel_plan.resolve(cfg, batch, cached=True, queries=1)),
        "profile": profile,
    }


def trace_engine(engine: Engine, reps: int = 4, window_s: float = 0.05) -> dict:
    """The GPU kernels of the running engine's decode steps over reps x window_s seconds,
    per step (`bench.common.kernel_summary`), and how many steps that was."""
    seen = {"calls": 0}

    def window():
        seen["calls"] += 1
        if seen["calls"] == 2:  # the first traced window (trace_kernels runs one untraced)
            seen["start"] = engine.stats()["steps"]
        time.sleep(window_s)
        return jnp.zeros(())

    kernels = trace_kernels(window, reps=reps)
    steps = max(1, engine.stats()["steps"] - seen["start"])
    summary = kernel_summary(kernels, per=steps)
    summary["steps"] = steps
    return summary


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=None, help="default: the preset's")
    p.add_argument("--batches", default=None, help="default 1,16,64,256 (tiny: 1,4)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128, tiny 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 512 (tiny 24)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 32, tiny 4)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--prefill-rows", type=int, default=1)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="compute setting, e.g. paged_attention_impl=pallas (repeatable)",
    )
    p.add_argument(
        "--bandwidth-tbs", type=float, default=None, help="default: measured (tiny: 0.05 nominal)"
    )
    p.add_argument("--profile", action="store_true", help="GPU kernels per decode step")
    p.add_argument(
        "--unroll", type=int, default=None, help="layers per layer-scan iteration (plan default)"
    )
    args = p.parse_args()
    if args.unroll is not None:
        kernel_plan.GPU_EXTEND_UNROLL = args.unroll
    tiny = args.preset == "tiny"
    batches = [int(b) for b in (args.batches or ("1,4" if tiny else "1,16,64,256")).split(",")]
    args.prompt = args.prompt or (8 if tiny else 128)
    args.max_tokens = args.max_tokens or (24 if tiny else 512)
    args.steps = args.steps or (4 if tiny else 32)
    changes = dict(item.split("=", 1) for item in args.set)
    if args.layers is not None:
        changes["num_layers"] = args.layers
    dtype = "float32" if tiny else "bfloat16"
    cfg = mj.preset(args.preset, dtype=dtype, param_dtype=dtype, **changes)
    bandwidth = args.bandwidth_tbs or (0.05 if tiny else copy_bandwidth_tbs())
    start = time.perf_counter()
    model = random_model(cfg)
    build_s = time.perf_counter() - start
    rows = []
    for batch in batches:
        rows.append(measure(model, batch, args, bandwidth))
        summary = rows[-1]["profile"]
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
        if summary:
            print(
                f"batch {batch}: per decode step busy {summary['busy_us']:.0f} us, span "
                f"{summary['span_us']:.0f} us, {summary['kernels']:.0f} launches "
                f"({summary['steps']} steps traced)"
            )
            for name, v in list(summary["by_name"].items())[:25]:
                print(f"  {v['us']:8.1f} us {v['count']:6.1f}x  {name[:90]}")
    payload = {
        "env": environment(),
        "config": {
            "preset": args.preset,
            "layers": cfg.num_layers,
            "prompt": args.prompt,
            "max_tokens": args.max_tokens,
            "block_size": args.block_size,
            "prefill_chunk": args.prefill_chunk,
            "prefill_rows": args.prefill_rows,
            "set": args.set,
        },
        "model_build_s": build_s,
        "copy_bandwidth_tbs": bandwidth,
        "decode": rows,
    }
    name = "engine_b" + "-".join(map(str, batches))
    name += "".join("_" + item.replace("=", "-") for item in args.set)
    write_json(f"{name}.json", payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
