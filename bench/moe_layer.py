"""One Mixtral 8x7B MoE layer (D=4096, F=14336, 8 experts, top-2), bf16: our paths, the ideal,
and the PyTorch peer, forward and forward+backward, in one run.

  PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 python bench/moe_layer.py [--tokens 16384]

Useful FLOPs are the same for every row: 3 matmuls x 2 x (tokens x top-k) x D x F forward, 3x that
forward+backward. Rows:
  ideal             one dense matmul chain over the 2T routed rows (no routing): the ceiling
  dropless pallas   moe_dropless with our Pallas-Triton grouped matmul (gmm_pallas.py)
  dropless xla      moe_dropless with jax.lax.ragged_dot
  capacity 1.25     sort into [E, C, D] buffers, batched einsum (padded FLOPs not counted)
  peer              transformers MixtralSparseMoeBlock (PyTorch), in a subprocess first, so the
                    two frameworks never hold the GPU at the same time
Writes $OUT/moe_layer.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.common import environment, run_peer, timed, write_json
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--no-xla", action="store_true", help="skip the slow ragged_dot rows")
    args = p.parse_args()
    peer_row = run_peer(["bench/peer_moe.py", "--tokens", str(args.tokens)], timeout=300)
    print("peer:", peer_row, flush=True)

    t, d, f, e, topk = args.tokens, 4096, 14336, 8, 2
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
    router = jax.random.normal(keys[1], (d, e), jnp.float32) * 0.02
    w = tuple(
        jax.random.normal(keys[i], s, jnp.bfloat16) * 0.02
        for i, s in ((2, (e, d, f)), (3, (e, d, f)), (4, (e, f, d)))
    )
    flops = 3 * 2 * (t * topk) * d * f

    def ideal(x2, wg, wu, wd):
        return (jax.nn.silu(x2 @ wg) * (x2 @ wu)) @ wd

    x2 = jax.random.normal(keys[5], (t * topk, d), jnp.bfloat16)
    dense_w = (w[0][0], w[1][0], w[2][0])

    def layer(impl):
        if impl == "capacity":
            cap = int(-(-1.25 * t * topk // e))
            return lambda x, *w: moe_local.moe_capacity(
                x, moe_ops.route(x, router, topk), *w, capacity=cap
            )[0]
        return lambda x, *w: moe_local.moe_dropless(
            x, moe_ops.route(x, router, topk), *w, gmm_impl=impl
        )[0]

    def fwd_bwd(fn):
        return jax.jit(
            jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
        )

    rows = {}
    cases = [
        ("ideal", ideal, (x2, *dense_w)),
        ("dropless pallas", layer("pallas"), (x, *w)),
        ("capacity 1.25", layer("capacity"), (x, *w)),
    ]
    if not args.no_xla:
        cases.append(("dropless xla", layer("xla"), (x, *w)))
    for name, fn, a in cases:
        fwd_ms = 1e3 * timed(jax.jit(fn), *a)
        both_ms = 1e3 * timed(fwd_bwd(fn), *a)
        rows[name] = {
            "forward_ms": fwd_ms,
            "forward_backward_ms": both_ms,
            "forward_tflops": flops / fwd_ms / 1e9,
            "forward_backward_tflops": 3 * flops / both_ms / 1e9,
        }
        print(name, rows[name], flush=True)
    if "forward_ms" in peer_row:
        rows["peer (transformers)"] = {
            "forward_ms": peer_row["forward_ms"],
            "forward_backward_ms": peer_row["forward_backward_ms"],
            "forward_tflops": flops / peer_row["forward_ms"] / 1e9,
            "forward_backward_tflops": 3 * flops / peer_row["forward_backward_ms"] / 1e9,
        }
    ideal_row = rows["ideal"]
    for r in rows.values():
        r["forward_vs_ideal"] = ideal_row["forward_ms"] / r["forward_ms"]
        r["forward_backward_vs_ideal"] = ideal_row["forward_backward_ms"] / r["forward_backward_ms"]
    write_json(
        "moe_layer.json",
        {
            "env": environment(),
            "tokens": t,
            "useful_flops_fwd": flops,
            "peer": peer_row,
            "rows": rows,
        },
    )
    print(f"\nMoE layer, {t} tokens, bf16; TFLOP/s of useful work (share of the ideal)")
    print(f"{'path':>20} {'fwd ms':>8} {'fwd TF/s':>9} {'fwd+bwd ms':>11} {'fwd+bwd TF/s':>13}")
    for name, r in rows.items():
        print(
            f"{name:>20} {r['forward_ms']:>8.2f} {r['forward_tflops']:>5.0f} "
            f"({r['forward_vs_ideal']:.0%}) {r['forward_backward_ms']:>11.2f} "
            f"{r['forward_backward_tflops']:>7.0f} ({r['forward_backward_vs_ideal']:.0%})"
        )


if __name__ == "__main__":
    main()
