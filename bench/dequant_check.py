"""GPU check: the quantized kernels give bit-identical outputs with the PTX tiles and the float32 tiles.

  python3 bench/dequant_check.py [--tokens 1,7,64]
  JAX_PLATFORMS=cpu python3 bench/dequant_check.py   # lowers the PTX path for CUDA only

Both tile makers (`weight_tiles.DEQUANT`) give the codes exactly in bfloat16, so every kernel
reading them (the decode experts, the stacked projection, the grouped matmul) must compute the
same bits either way: any difference is a bug in the PTX (`kernels/dequant_ptx.py`) or in how
Triton packs its registers. int8 and int4 (group 128), bfloat16, at 8x7B-like shapes of reduced
width. On a GPU: prints one JSON line per (kernel, format, tokens) with the largest difference
and exits 1 if any is not 0. On CPU (no inline assembly in interpret mode) it only lowers each
call for CUDA. Writes $OUT/dequant_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, write_json
from mixtral_jax.kernels import decode_matmul, expert_decode, gmm_quant, quant, weight_tiles

D, F, E = 1024, 2048, 8


def calls(bits: int, tokens: int) -> dict:
    """{kernel: (jitted function, arguments)} over random quantized weights."""
    keys = jax.random.split(jax.random.key(bits * 100 + tokens), 6)

    def qw(key, shape):
        return quant.quantize(0.05 * jax.random.normal(key, shape), bits, 128, jnp.bfloat16)

    stacks = [qw(k, (2, E) + s) for k, s in zip(keys[:3], ((D, F), (D, F), (F, D)))]
    x = jax.random.normal(keys[3], (tokens, D), jnp.bfloat16)
    top = jax.lax.top_k(jax.random.normal(keys[4], (tokens, E)), 2)
    routing = (top[1].astype(jnp.int32), jax.nn.softmax(top[0], axis=-1))
    proj = qw(keys[5], (2, D, 1536))
    rows = 128
    sizes = jnp.array([40, 0, 30, 58, 0, 0, 0, 0], jnp.int32)
    return {
        "decode_experts": (
            jax.jit(lambda x, ex, wt, *w: expert_decode.decode_experts(x, ex, wt, *w, layer=1)),
            (x, *routing, *stacks),
        ),
        "project_stacked": (
            jax.jit(lambda x, s: decode_matmul.project_stacked(x, (s,), 1)[0]),
            (x, proj),
        ),
        "gmm": (
            jax.jit(lambda x, w: gmm_quant.gmm(x, w, sizes, False)),
            (jnp.tile(x, (rows // tokens + 1, 1))[:rows], stacks[0][1]),
        ),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,7,64")
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    found = weight_tiles.DEQUANT
    rows, bad = [], 0
    for bits in (8, 4):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for name, (fn, fn_args) in calls(bits, tokens).items():
                row = {"kernel": name, "bits": bits, "tokens": tokens}
                if not on_gpu:
                    weight_tiles.DEQUANT = "ptx"
                    fn.trace(*fn_args).lower(lowering_platforms=("cuda",))
                    row["lowered_for_cuda"] = True
                else:
                    out = {}
                    for dequant in ("float32", "ptx"):
                        weight_tiles.DEQUANT = dequant
                        fn.clear_cache()  # DEQUANT is read when the kernel is traced
                        out[dequant] = np.asarray(fn(*fn_args), np.float32)
                    diff = float(np.max(np.abs(out["ptx"] - out["float32"])))
                    row.update(max_abs_diff=diff, max_abs=float(np.max(np.abs(out["float32"]))))
                    bad += diff != 0 or not np.all(np.isfinite(out["ptx"]))
                weight_tiles.DEQUANT = found
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_json("dequant_check.json", {"env": environment(), "rows": rows, "failures": bad})
    print(json.dumps({"failures": bad, "checked": len(rows), "on_gpu": on_gpu}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
