"""The serving engine with a KV pool too small for every row at once (preemption), beside the
same requests in a pool that holds them all.

  python3 bench/preempt.py [--layers 4] [--batch 64] [--prompt 128] [--max-tokens 256]
      [--pool-share 0.5] [--block-size 16] [--prefill-chunk 256]
  JAX_PLATFORMS=cpu python3 bench/preempt.py --tiny       # the code path on CPU, in seconds

Two engines over one model (Mixtral 8x7B widths with `--layers` layers, random bf16 weights made
on the device, bench/common.random_model; --tiny: the tiny preset in float32): one whose pool
holds every row at its full length, one with `--pool-share` of those blocks. Each gets the same
`--batch` greedy requests of `--prompt` random tokens and `--max-tokens` new ones (ignore_eos) at
once, runs them on its own thread to the end, and is timed from submit to the last token. Per
pool: wall seconds, output tokens/s, preemptions, requests complete (exactly max_tokens tokens,
finish 'length'); and how many of the constrained run's requests produced exactly the
unconstrained run's tokens (a recomputed prefix can round differently from its decode steps in
bf16, so a near-tie may go the other way: the share and the first position that differs are
reported, not asserted). Prints one JSON line, writes $OUT/preempt.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python3 bench/preempt.py`: bench.* and mixtral_jax from the repository

import numpy as np

import mixtral_jax as mj
from bench.common import environment, random_model, write_json
from mixtral_jax.serve.engine import Engine, Request


def run(model, requests: list[Request], num_blocks: int, args) -> dict:
    """Every request through one engine with `num_blocks` blocks: its figures and tokens."""
    engine = Engine(
        model,
        max_batch=len(requests),
        max_queue=len(requests),
        block_size=args.block_size,
        num_blocks=num_blocks,
        prefill_chunk=args.prefill_chunk,
        max_context=args.prompt + args.max_tokens,
    )
    engine.warmup()
    start = time.perf_counter()
    streams = [engine.submit(r) for r in requests]
    engine.start()
    events = [list(stream) for stream in streams]
    wall = time.perf_counter() - start
    stats = engine.stats()
    engine.shutdown()
    tokens = [[t for e in ev for t in e.tokens] for ev in events]
    complete = sum(
        len(t) == args.max_tokens and ev[-1].finish == "length" for t, ev in zip(tokens, events)
    )
    figures = {
        "num_blocks": num_blocks,
        "wall_s": wall,
        "output_tokens_per_s": sum(map(len, tokens)) / wall,
        "preemptions": stats["preemptions"],
        "complete": complete,
        "calls": stats["calls"],
        "prefill_calls": stats["prefill_calls"],
    }
    return figures, tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="the tiny preset in float32 (CPU)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="requests (default 64, tiny 8)")
    p.add_argument("--prompt", type=int, default=None, help="default 128 (tiny 12)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 256 (tiny 40)")
    p.add_argument("--pool-share", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=None, help="default 16 (tiny 4)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="default 256 (tiny 8)")
    args = p.parse_args()
    tiny = args.tiny
    args.batch = args.batch or (8 if tiny else 64)
    args.prompt = args.prompt or (12 if tiny else 128)
    args.max_tokens = args.max_tokens or (40 if tiny else 256)
    args.block_size = args.block_size or (4 if tiny else 16)
    args.prefill_chunk = args.prefill_chunk or (8 if tiny else 256)
    if not 0 < args.pool_share <= 1:
        sys.exit(f"error: --pool-share {args.pool_share} must be in (0, 1]")
    if tiny:
        cfg = mj.preset("tiny", max_seq_len=args.prompt + args.max_tokens)
    else:
        cfg = mj.preset(
            "mixtral-8x7b", dtype="bfloat16", param_dtype="bfloat16", num_layers=args.layers
        )
    model = random_model(cfg)
    rng = np.random.default_rng(0)
    requests = [
        Request(
            [int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt)],
            args.max_tokens,
            ignore_eos=True,
        )
        for _ in range(args.batch)
    ]
    per_row = math.ceil((args.prompt + args.max_tokens - 1) / args.block_size)
    full = args.batch * per_row + 1
    small = max(per_row + 1, int(args.pool_share * (full - 1)) + 1)
    whole, want = run(model, requests, full, args)
    print(json.dumps({"pool": "whole", **whole}), file=sys.stderr, flush=True)
    short, got = run(model, requests, small, args)
    print(json.dumps({"pool": "short", **short}), file=sys.stderr, flush=True)
    differ = [d for d in (first_difference(a, b) for a, b in zip(got, want)) if d is not None]
    payload = {
        "env": environment(),
        "config": {**vars(args), "layers": cfg.num_layers, "blocks_per_row": per_row},
        "whole_pool": whole,
        "short_pool": short,
        "requests_equal": args.batch - len(differ),
        "first_differences": sorted(differ),
    }
    write_json("preempt.json", payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
