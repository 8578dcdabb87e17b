"""Attention on the GPU: cuDNN flash attention (attention.fused_attention) against our XLA
einsum attention, for correctness and speed. Mixtral widths: 32 query heads, 8 kv heads, H=128.

  PYTHONPATH=. python bench/attention.py [--batch 4] [--seq 4096]

Cases: causal only; packed documents (segment ids, as train.py feeds); a 1024-token sliding
window; left padding (whose first rows see no key at all: both kernels must stay finite there).
Writes $OUT/attention.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, timed, write_json
from mixtral_jax.model.attention import dot_product_attention, fused_attention, make_attention_mask


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    args = p.parse_args()
    b, s, n, kv, h = args.batch, args.seq, 32, 8, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, s, n, h), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, s, kv, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, s, kv, h), jnp.bfloat16)
    dy = jax.random.normal(keys[3], (b, s, n, h), jnp.bfloat16)
    docs = np.cumsum(np.random.default_rng(0).random((b, s)) < 4 / s, axis=1) + 1
    padding = np.ones((b, s), np.int32)
    padding[:, :100] = 0
    cases = {
        "causal": (None, {}),
        "packed documents": (None, {"segment_ids": jnp.asarray(docs)}),
        "window 1024": (1024, {}),
        "left padding": (None, {"attention_mask": padding}),
    }
    flops = 4 * b * s * s * n * h / 2  # causal: half the score matrix
    rows = {}
    for name, (window, extra) in cases.items():
        mask = make_attention_mask(s, s, sliding_window=window, **extra)
        seen = np.broadcast_to(np.asarray(mask.any(-1)), (b, s))  # rows with a visible key
        # Rows that see no key carry no loss in training: their output gradient is zero.
        dy_seen = dy * jnp.asarray(seen, dy.dtype)[:, :, None, None]
        fns = {
            "xla": lambda q, k, v, m=mask: dot_product_attention(q, k, v, m),
            "cudnn": lambda q, k, v, m=mask, w=window: fused_attention(q, k, v, m, w, "cudnn"),
        }
        outs, row = {}, {}
        for impl, fn in fns.items():
            grad = jax.jit(lambda q, k, v, fn=fn, dy=dy_seen: jax.vjp(fn, q, k, v)[1](dy))
            outs[impl] = (jax.jit(fn)(q, k, v), *grad(q, k, v))
            row[impl + "_forward_ms"] = 1e3 * timed(jax.jit(fn), q, k, v)
            row[impl + "_forward_backward_ms"] = 1e3 * timed(grad, q, k, v)
        errs = []
        for i, (got, want) in enumerate(zip(outs["cudnn"], outs["xla"])):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            if i == 0:  # the output: rows that see a key
                got, want = got[seen], want[seen]
            errs.append(float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
        row.update(
            rel_err_out_dq_dk_dv=errs,
            cudnn_finite=bool(
                all(np.isfinite(np.asarray(o, np.float32)).all() for o in outs["cudnn"])
            ),
            cudnn_forward_tflops=flops / row["cudnn_forward_ms"] / 1e9,
        )
        rows[name] = row
        print(name, row, flush=True)
    write_json("attention.json", {"env": environment(), "batch": b, "seq": s, "rows": rows})


if __name__ == "__main__":
    main()
