"""Decode throughput of the serving engine (continuous batching over the paged KV cache) on one
GPU: the full Mixtral 8x7B widths, random bf16 weights made on the device, beside the floor.

  python3 bench/engine.py [--layers 32] [--batches 1,16,64,256] [--prompt 128] [--max-tokens 512]
      [--steps 32] [--block-size 16] [--prefill-chunk 128] [--prefill-budget 512]
      [--set paged_attention_impl=pallas] [--one-batch] [--profile] [--unroll N]
      [--sampling greedy|temperature|top-p] [--hlo]
  JAX_PLATFORMS=cpu python3 bench/engine.py --preset tiny      # the code path, in seconds

Per batch size B, one `Engine(max_batch=B)`: warmup (every step shape compiled, timed), then
the prefill cost (`step_costs`: the compiled decode step of B active rows alone, fed its own
tokens back and, apart, fresh random tokens each call, each with how its routing spread over
the experts, since the step's cost depends on it; and with a
prefill group of q full chunks for each compiled q, timed directly: `itl_bound`, the step with
the whole budget over the step without, is how much a prefilling step stretches a running
stream's inter-token gap at this batch; the budget is chosen to keep it at 2 or below), then
B requests of `--prompt` random tokens and `--max-tokens` new ones (ignore_eos) submitted at
once and run by the engine's thread (fill_s: until all are prefilled, ceil(B x prompt /
budget) steps when the chunk divides the prompt). --sampling: every request greedy (default),
sampled at temperature 0.8 (no sort), or also with top_p 0.95 (the sampler's sort over the
vocabulary every step). Measured from the first decode step after every request has
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

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from bench.common import (
    copy_bandwidth_tbs,
    environment,
    kernel_summary,
    out_dir,
    print_kernel_rows,
    random_model,
    trace_kernels,
    write_json,
)
from bench.decode import step_bytes
from mixtral_jax.generate.sampling import SamplingParams
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.serve.engine import Engine, Request

SAMPLINGS = {
    "greedy": SamplingParams(),
    "temperature": SamplingParams(temperature=0.8),
    "top-p": SamplingParams(temperature=0.8, top_p=0.95),
}


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
        prefill_budget=args.prefill_budget,
        max_context=args.prompt + args.max_tokens,
        batches=(batch,) if args.one_batch else None,
        # every row at the full length: an allocation that does not fit fails here, loudly
        num_blocks=batch * -(-(args.prompt + args.max_tokens) // args.block_size) + 1,
    )
    start = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - start
    costs = step_costs(engine, batch, args.prompt, args.cost_reps, args.sampling, args.hlo)
    rng = np.random.default_rng(batch)
    streams = [
        engine.submit(
            Request(
                [int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt)],
                args.max_tokens,
                SAMPLINGS[args.sampling],
                seed=n,
                ignore_eos=True,
            )
        )
        for n in range(batch)
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
        **costs,
        "kernel_plan": str(kernel_plan.resolve(cfg, batch, cached=True, queries=1)),
        "profile": profile,
    }


def expert_load(experts, rows: int, num_experts: int) -> dict:
    """The routing of one decode step, experts [L, >= rows, k] (its first `rows` rows active):
    experts_used, the mean over layers of the experts some row chose (the floor assumes all E
    are read), and rows_max_over_mean, the mean over layers of the busiest expert's rows over
    the mean M*k/E (how uneven: an expert past its chunk of R rows takes a second slot)."""
    chosen = np.asarray(experts)[:, :rows]  # [L, M, k]
    counts = np.stack([np.bincount(layer.ravel(), minlength=num_experts) for layer in chosen])
    mean = rows * chosen.shape[-1] / num_experts
    return {
        "experts_used": float((counts > 0).sum(axis=1).mean()),
        "rows_max_over_mean": float((counts.max(axis=1) / mean).mean()),
    }


def step_costs(
    engine: Engine, batch: int, cached: int, reps: int, setting: str, hlo: bool = False
) -> dict:
    """ms of the compiled decode step of `batch` active rows (`cached` tokens each) alone, and
    with a prefill group of q full chunks of random tokens for each compiled q (median of
    `reps` calls after one); itl_bound: the largest group's step over the decode step alone.
    Every row's table spreads over distinct pool blocks, as real rows' do. Run on the idle
    engine after warmup (nothing compiles; what it writes, rows overwrite before they read it).

    The step's cost depends on its routing, i.e. on its rows' last tokens. Each call is fed the
    tokens the call before chose ("fed back": from random tokens once, then a random model's
    greedy picks, which may repeat and route unevenly), and, timed apart, fresh random tokens
    every call ("random tokens"); each with its routing (`expert_load`, from the last call)."""
    rng = np.random.default_rng(0)
    vocab, chunk = engine.cfg.vocab_size, engine.prefill_chunk
    slots, table, lengths, active, sampling = engine._decode_args([], batch)[0]
    slots[:], lengths[:], active[:] = np.arange(batch), cached, True
    params = SAMPLINGS[setting]
    sampling.temperature[:], sampling.top_p[:] = params.temperature, params.top_p
    decode = (slots, table, lengths, active, sampling)
    width = engine._width(min(max(cached + 1, chunk), engine.max_context))

    def spread(rows: int, first: int) -> np.ndarray:  # [rows, width] distinct blocks
        index = first + np.arange(rows * width)
        return (1 + index % (engine.num_blocks - 1)).reshape(rows, width).astype(np.int32)

    def random_last():
        return engine._committed(jnp.asarray(rng.integers(3, vocab, engine.max_batch), jnp.int32))

    decode = (decode[0], spread(batch, 0), *decode[2:])
    pool = engine._pool
    last = random_last()

    def timed(call, lasts=None) -> tuple[float, list]:
        """(median ms, the last call's outputs after pool and last); `lasts`: each call's."""
        nonlocal pool, last
        times = []
        for i in range(reps + 1):
            last = last if lasts is None else lasts[i]
            start = time.perf_counter()
            pool, last, *out = call(pool, last)
            jax.block_until_ready((pool, last, out))
            times.append(time.perf_counter() - start)
        return 1000 * float(np.median(times[1:])), out

    def decode_step(pool, last):
        return engine.steps.decode(pool, last, *decode)

    def load(routed) -> dict:
        return expert_load(routed.experts, batch, engine.cfg.num_experts)

    decode_ms, (fed_back,) = timed(decode_step)
    if hlo:  # the compiled decode step's optimized HLO: the profile's fusion names are its
        steps = engine.steps
        text = steps._decode.lower(steps.state, pool, last, *decode[:4]).compile().as_text()
        with open(os.path.join(out_dir(), f"decode_step_b{batch}.hlo"), "w") as f:
            f.write(text)
    with_prefill = {}
    for q in engine.chunk_rows:
        args = list(engine._chunk_args([], {}, q)[0])
        args[0] = rng.integers(3, vocab, (q, chunk)).astype(np.int32)  # tokens [q, C]
        args[1] = spread(q, batch * width)
        args[3] = np.full(q, chunk, np.int32)  # counts: full chunks
        with_prefill[q], _ = timed(
            lambda pool, last, a=tuple(args): engine.steps.decode_with_chunk(pool, last, decode, a)
        )
    random_ms, (fresh,) = timed(decode_step, [random_last() for _ in range(reps + 1)])
    engine._pool, engine._last = pool, engine._new_last()
    top = max(with_prefill)
    return {
        "decode_step_ms": decode_ms,
        "routing": load(fed_back),
        "decode_step_random_tokens_ms": random_ms,
        "routing_random_tokens": load(fresh),
        "prefill_step_ms": {f"{q}x{chunk}": ms for q, ms in with_prefill.items()},
        "itl_bound": with_prefill[top] / decode_ms,
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
        if seen["calls"] == 1 + reps:  # the last traced window: the engine steps on while the
            seen["end"] = engine.stats()["steps"]  # profiler stops and its file is parsed
        return jnp.zeros(())

    kernels = trace_kernels(window, reps=reps)
    steps = max(1, seen["end"] - seen["start"])
    summary = kernel_summary(kernels, per=steps)
    summary["steps"] = steps
    return summary


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=None, help="default: the preset's")
    p.add_argument("--batches", default=None, help="default 1,16,64,256 (tiny: 1,4)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128, tiny 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 512 (tiny 24)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 32, tiny 4)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--prefill-budget", type=int, default=None, help="default: 4 chunks")
    p.add_argument("--cost-reps", type=int, default=None, help="timed calls per step shape")
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
    p.add_argument("--sampling", choices=sorted(SAMPLINGS), default="greedy")
    p.add_argument("--hlo", action="store_true", help="write the decode step's optimized HLO")
    p.add_argument(
        "--one-batch",
        action="store_true",
        help="compile the decode batch B only (the fill runs at B, idle rows masked): a "
        "shorter warmup, the same timed window",
    )
    p.add_argument(
        "--unroll", type=int, default=None, help="layers per layer-scan iteration (plan default)"
    )
    args = p.parse_args(argv)
    if args.unroll is not None:
        kernel_plan.GPU_EXTEND_UNROLL = args.unroll
    tiny = args.preset == "tiny"
    batches = [int(b) for b in (args.batches or ("1,4" if tiny else "1,16,64,256")).split(",")]
    args.prompt = args.prompt or (8 if tiny else 128)
    args.max_tokens = args.max_tokens or (24 if tiny else 512)
    args.steps = args.steps or (4 if tiny else 32)
    args.cost_reps = args.cost_reps or (2 if tiny else 10)
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
            print_kernel_rows(summary, 25)
    payload = {
        "env": environment(),
        "config": {
            "preset": args.preset,
            "layers": cfg.num_layers,
            "prompt": args.prompt,
            "max_tokens": args.max_tokens,
            "block_size": args.block_size,
            "prefill_chunk": args.prefill_chunk,
            "prefill_budget": args.prefill_budget,
            "one_batch": args.one_batch,
            "set": args.set,
            "sampling": args.sampling,
        },
        "model_build_s": build_s,
        "copy_bandwidth_tbs": bandwidth,
        "decode": rows,
    }
    name = "engine_b" + "-".join(map(str, batches))
    name += "".join("_" + item.replace("=", "-") for item in args.set)
    write_json(f"{name}.json", payload)
    print(json.dumps(payload))
    return payload


if __name__ == "__main__":
    main()
