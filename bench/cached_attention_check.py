"""GPU check: chunked prefill with cuDNN attention over the cache equals the XLA einsum path.

  PYTHONPATH=. python bench/cached_attention_check.py [--layers 2] [--prompt 1536] [--chunk 512]

A reduced-depth, full-width 8x7B (random bf16 weights on the device), one prompt prefilled in
chunks through `Generator` twice: `cached_attention_impl=cudnn` and `xla`. Reports the relative
error of the last-position logits (bf16: expect ~1e-2 or less) and whether the first greedy
tokens agree, with and without a sliding window. Writes $OUT/cached_attention_check.json.
"""

from __future__ import annotations

import argparse

import numpy as np

import mixtral_jax as mj
from bench.common import environment, random_model, write_json
from mixtral_jax.generate import Generator


def run(layers: int, prompt: int, chunk: int, window: int | None) -> dict:
    base = mj.preset(
        "mixtral-8x7b",
        num_layers=layers,
        dtype="bfloat16",
        param_dtype="bfloat16",
        sliding_window=window,
    )
    tokens = np.random.default_rng(0).integers(3, 32000, (1, prompt)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    out = {}
    params = mj.get_params(random_model(base))
    for impl in ("xla", "cudnn"):
        cfg = base.replace(cached_attention_impl=impl)
        generator = Generator(mj.from_params(cfg, params), prefill_chunk=chunk)
        result = generator.generate(tokens.tolist(), max_new_tokens=8, eos_id=None)
        logits, _, _, _ = generator.prefill(tokens, valid, cache_size=prompt + 16)
        out[impl] = (np.asarray(logits, np.float32), result.tokens[0])
    (want, want_ids), (got, got_ids) = out["xla"], out["cudnn"]
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return {
        "layers": layers,
        "prompt": prompt,
        "chunk": chunk,
        "window": window,
        "rel_err_last_logits": err,
        "greedy_xla": want_ids,
        "greedy_cudnn": got_ids,
        "greedy_equal": want_ids == got_ids,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompt", type=int, default=1536, help="a multiple of --chunk")
    p.add_argument("--chunk", type=int, default=512)
    args = p.parse_args()
    rows = [run(args.layers, args.prompt, args.chunk, w) for w in (None, 700)]
    write_json("cached_attention_check.json", {"env": environment(), "rows": rows})
    for r in rows:
        print(r, flush=True)


if __name__ == "__main__":
    main()
