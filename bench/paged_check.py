"""GPU check: the serving engine's greedy tokens with the paged attention Pallas kernel equal
those of the XLA gather path (the default), on a reduced-depth full-width 8x7B.

  python3 bench/paged_check.py [--layers 4] [--requests 24] [--max-tokens 48] [--batch 16]
      [--float32]   # float32 weights and compute: the two paths agree to rounding, so every
                    # token must (exits 1 otherwise); bf16 picks can flip at close calls
  JAX_PLATFORMS=cpu python3 bench/paged_check.py --tiny   # the code path (both runs use the
      gather: the kernel needs an NVIDIA GPU), to check this script's logic

One set of random bf16 weights made on the device (the LM head x10 so that greedy picks are not
near-ties of a random model: a tie decided by rounding would say nothing about the kernel), one
`Engine` per `paged_attention_impl` (xla, pallas) over those weights, the same requests
(prompts of 1 to ~700 random tokens, so rows span several blocks, and several decode batches
and attention spans are used, since `--batch` caps the rows and the rest wait in the queue).
Reports per request the tokens generated, whether every token agrees, and the first position
that differs; writes $OUT/paged_check.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import numpy as np

import mixtral_jax as mj
from bench.common import environment, random_model, write_json
from mixtral_jax.serve.engine import Engine, Request


def run_engine(model, prompts: list[list[int]], max_tokens: int, batch: int) -> dict:
    """{tokens per request, seconds} of one engine serving every prompt greedily."""
    longest = max(map(len, prompts)) + max_tokens
    engine = Engine(model, max_batch=batch, max_queue=len(prompts), max_context=longest)
    streams = [engine.submit(Request(p, max_tokens, ignore_eos=True)) for p in prompts]
    start = time.perf_counter()
    engine.start()
    tokens = []
    for stream in streams:
        out = []
        for event in stream:
            out.extend(event.tokens)
        tokens.append(out)
    engine.shutdown(cancel=True)
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tiny", action="store_true")
    p.add_argument(
        "--float32",
        action="store_true",
        help="float32 weights and compute, matmuls at full precision: the two paths then agree "
        "to rounding, so every token should",
    )
    args = p.parse_args()
    if args.float32:
        jax.config.update("jax_default_matmul_precision", "highest")
    dtype = "float32" if args.tiny or args.float32 else "bfloat16"
    base = mj.preset(
        "tiny" if args.tiny else "mixtral-8x7b",
        num_layers=args.layers,
        dtype=dtype,
        param_dtype=dtype,
    )
    params = mj.get_params(random_model(base))
    params["lm_head"] = jax.tree.map(lambda w: w * 10, params["lm_head"])
    rng = np.random.default_rng(0)
    top = 60 if args.tiny else 700
    lengths = [
        n for n in (1, 2, 15, 16, 17, 31, 33, 100, 127, 129, 255, 257, 400, 511, 513) if n < top
    ]
    lengths.append(top)
    lengths += rng.integers(1, top, max(0, args.requests - len(lengths))).tolist()
    prompts = [rng.integers(3, base.vocab_size, n).tolist() for n in lengths[: args.requests]]
    impls = ("off", "off") if args.tiny else ("off", "pallas")
    runs = {}
    for name, impl in zip(("gather", "kernel"), impls):
        cfg = base.replace(compute=base.compute.replace(paged_attention_impl=impl))
        runs[name] = run_engine(mj.from_params(cfg, params), prompts, args.max_tokens, args.batch)
    rows = []
    for n, a, b in zip(lengths, runs["gather"]["tokens"], runs["kernel"]["tokens"]):
        rows.append(
            {"prompt": n, "tokens": len(b), "equal": a == b, "first_diff": first_difference(a, b)}
        )
    equal = sum(r["equal"] for r in rows)
    summary = {
        "requests": len(rows),
        "all_tokens_equal": equal,
        "tokens_compared": sum(r["tokens"] for r in rows),
        "seconds": {k: v["seconds"] for k, v in runs.items()},
    }
    print(summary, flush=True)
    for r in rows:
        if not r["equal"]:
            print("differs:", r)
    write_json(
        "paged_check_float32.json" if args.float32 else "paged_check.json",
        {"env": environment(), "config": vars(args), "summary": summary, "rows": rows},
    )
    if args.float32 and equal != len(rows):
        raise SystemExit(f"float32: {len(rows) - equal} of {len(rows)} requests differ")


if __name__ == "__main__":
    main()
