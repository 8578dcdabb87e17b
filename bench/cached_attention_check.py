"""GPU check: chunked prefill with cuDNN attention over the cache equals the XLA einsum path.

  PYTHONPATH=. python bench/cached_attention_check.py [--layers 2] [--prompt 1536] [--chunk 512]

A reduced-depth, full-width 8x7B (random bf16 weights on the device), one prompt prefilled in
chunks through `Generator` three times: `cached_attention_impl=xla`, then cudnn with the chunk's
attention as one masked call (`chunk_attention_impl=masked`) and split in two unmasked parts
merged by log-sum-exp (`split`; model/chunk_attention.py). Reports, for each cudnn form, the
relative error of the last-position logits against xla (bf16: expect ~1e-2 or less) and whether
the first greedy tokens agree, for a prompt 37 tokens short of the width (left padding), with
and without a sliding window (a window under the cache keeps the masked call: both cudnn rows
then run the same code). Writes $OUT/cached_attention_check.json.

  PYTHONPATH=. JAX_PLATFORMS=cpu python bench/cached_attention_check.py --tiny   # the code path:
      the tiny preset, the einsum in place of cudnn (prompt 192, chunks of 64)
"""

from __future__ import annotations

import argparse

import numpy as np

import mixtral_jax as mj
from bench.common import environment, random_model, write_json
from mixtral_jax.generate import Generator
from mixtral_jax.generate.sampler import left_pad


def run(layers: int, prompt: int, chunk: int, window: int | None, tiny: bool = False) -> dict:
    base = mj.preset(
        "tiny" if tiny else "mixtral-8x7b",
        num_layers=layers,
        dtype="float32" if tiny else "bfloat16",
        param_dtype="float32" if tiny else "bfloat16",
        sliding_window=window,
    )
    fast = "xla" if tiny else "cudnn"
    # 37 tokens short of the width: left padding in the first chunk, then in every prefix
    ids = np.random.default_rng(0).integers(3, base.vocab_size, prompt - 37).tolist()
    tokens, valid = left_pad([ids], prompt)
    out = {}
    params = mj.get_params(random_model(base))
    runs = (("reference", "xla", "masked"), (f"{fast}_masked", fast, "masked"))
    for label, impl, form in runs + ((f"{fast}_split", fast, "split"),):
        cfg = base.replace(cached_attention_impl=impl, chunk_attention_impl=form)
        generator = Generator(mj.from_params(cfg, params), prefill_chunk=chunk)
        result = generator.generate([ids], max_new_tokens=8, eos_id=None)
        logits, _, _, _ = generator.prefill(tokens, valid, cache_size=prompt + 16)
        out[label] = (
            np.asarray(logits, np.float32),
            result.tokens[0],
        )
    want, want_ids = out.pop("reference")
    row = {"layers": layers, "prompt": prompt, "chunk": chunk, "window": window}
    for name, (got, got_ids) in out.items():
        row[f"rel_err_last_logits_{name}"] = float(
            np.linalg.norm(got - want) / np.linalg.norm(want)
        )
        row[f"greedy_equal_{name}"] = want_ids == got_ids
    row["greedy_xla"] = want_ids
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompt", type=int, default=1536, help="a multiple of --chunk")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="CPU: tiny preset, einsum for cudnn")
    args = p.parse_args()
    if args.tiny:
        args.prompt, args.chunk = 192, 64
    windows = (None, 100) if args.tiny else (None, 700)
    rows = [run(args.layers, args.prompt, args.chunk, w, args.tiny) for w in windows]
    write_json("cached_attention_check.json", {"env": environment(), "rows": rows})
    for r in rows:
        print(r, flush=True)


if __name__ == "__main__":
    main()
