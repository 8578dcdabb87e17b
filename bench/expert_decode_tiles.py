"""The decode expert kernels (expert_decode.py) on one GPU at Mixtral 8x7B widths.

  PYTHONPATH=. python bench/expert_decode_tiles.py [--tokens 1,8,64] [--quick]

1. Correctness: `decode_experts` at layer 1 of a 4-layer bf16 stack equals the dense oracle
   (`moe_local.moe_dense` in float32) for each token count.
2. Tile sweep (kernel device time from the profiler, so launch gaps are left out): the gate/up
   kernel's tiles with the down kernel's default, then the down kernel's tiles (splits of F
   included) with the gate/up default; achieved bandwidth = the used experts' weight bytes the
   kernel streams / its time, beside the 4.3 TB/s datasheet-level copy bandwidth and the JAX
   copy bandwidth measured in the same run.
3. The whole MoE of one layer (routing included), the decode kernels against the sorted Pallas
   grouped-matmul path (`moe_dropless`, stacked): device time and kernel launches per layer.
4. --projection: the attention projections of decode (decode_matmul.project_stacked: q, k, v in
   one launch, then o) at 8x7B widths, per tile choice, against the bandwidth floor.
Writes $OUT/expert_decode_tiles.json (or $OUT/decode_projection_tiles.json).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
    copy_bandwidth_tbs,
    environment,
    expert_stacks,
    kernel_summary,
    trace_kernels,
    write_json,
)
from mixtral_jax.kernels import decode_matmul as dm
from mixtral_jax.kernels import expert_decode as ed
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops

D, F, E, K, LAYERS = 4096, 14336, 8, 2, 4

GATE_UP_CONFIGS = [  # block_n, block_k, num_warps, num_stages
    (64, 128, 4, 4),
    (32, 128, 4, 4),
    (32, 256, 4, 3),
    (64, 64, 4, 6),
    (64, 256, 4, 3),
    (128, 64, 4, 4),
    (128, 128, 8, 3),
    (16, 256, 4, 4),
    (32, 64, 4, 6),
    (64, 128, 8, 4),
    (32, 128, 2, 5),
    (64, 64, 2, 8),
]
DOWN_CONFIGS = [  # block_n, block_k, splits, num_warps, num_stages
    (64, 128, 4, 4, 4),
    (64, 128, 1, 4, 4),
    (64, 128, 2, 4, 4),
    (64, 128, 7, 4, 4),
    (64, 256, 4, 4, 3),
    (32, 128, 4, 4, 4),
    (32, 256, 2, 4, 4),
    (128, 64, 4, 4, 5),
    (128, 128, 8, 8, 3),
    (64, 64, 8, 4, 6),
    (32, 128, 8, 4, 5),
    (64, 128, 14, 4, 4),
    (16, 256, 4, 4, 4),
    (64, 128, 4, 8, 4),
]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def kernel_us(summary: dict, part: str) -> float:
    return sum(v["us"] for n, v in summary["by_name"].items() if part in n)


def measure(m: int, key, stacks, router, layers, copy_tbs: float, quick: bool) -> dict:
    """Correctness, tile sweep and whole-layer comparison at m tokens."""
    x = jax.random.normal(key, (m, D), jnp.bfloat16)
    routing = moe_ops.route(x, router, K)
    used = len(set(np.asarray(routing.experts).ravel().tolist()))
    expert_bytes = used * D * F * 2  # one matrix of each used expert
    run = jax.jit(
        lambda x, ex, wt, layer, *w, t1=None, t2=None: ed.decode_experts(
            x, ex, wt, *w, layer, gate_up_tiles=t1, down_tiles=t2
        ),
        static_argnames=("t1", "t2"),
    )
    got = run(x, routing.experts, routing.weights, layers[1], *stacks)
    want = moe_local.moe_dense(
        x.astype(jnp.float32), routing, *(s[1].astype(jnp.float32) for s in stacks)
    )[0]
    size = {
        "tokens": m,
        "experts_used": used,
        "rel_err_vs_dense_f32": rel_err(got, want),
        "floor_us_4.3TBs": 3 * expert_bytes / 4.3e6,
        "floor_us_copy": 3 * expert_bytes / (copy_tbs * 1e6),
    }

    def timed_tiles(t1, t2):
        state = {"i": 0}

        def call():
            state["i"] += 1
            return run(
                x,
                routing.experts,
                routing.weights,
                layers[state["i"] % LAYERS],
                *stacks,
                t1=t1,
                t2=t2,
            )

        return kernel_summary(trace_kernels(call, reps=20), per=20)

    sweeps = {"gate_up": [], "down": []}
    if not quick:
        for cfg in GATE_UP_CONFIGS:
            t1 = ed.DecodeTiles(cfg[0], cfg[1], 1, cfg[2], cfg[3])
            try:
                us = kernel_us(timed_tiles(t1, None), "gate_up")
                sweeps["gate_up"].append(
                    {"tiles": list(cfg), "us": us, "TBps": 2 * expert_bytes / us / 1e6}
                )
            except Exception as err:  # noqa: BLE001 (a config that does not compile)
                sweeps["gate_up"].append({"tiles": list(cfg), "error": str(err)[:200]})
        for cfg in DOWN_CONFIGS:
            t2 = ed.DecodeTiles(*cfg)
            try:
                us = kernel_us(timed_tiles(None, t2), "down")
                sweeps["down"].append(
                    {"tiles": list(cfg), "us": us, "TBps": expert_bytes / us / 1e6}
                )
            except Exception as err:  # noqa: BLE001
                sweeps["down"].append({"tiles": list(cfg), "error": str(err)[:200]})
    size["sweep"] = sweeps
    default = timed_tiles(None, None)
    size["default_tiles"] = {
        "gate_up_us": kernel_us(default, "gate_up"),
        "down_us": kernel_us(default, "down"),
        "busy_us": default["busy_us"],
        "kernels": default["kernels"],
        "by_name": default["by_name"],
    }
    # The whole layer's MoE: routing + experts, decode kernels vs the sorted Pallas gmm path.
    paths = {
        "decode_kernels": jax.jit(
            lambda x, layer, *w: ed.decode_experts(x, *_route(x, router), *w, layer)
        ),
        "sorted_gmm": jax.jit(
            lambda x, layer, *w: moe_local.moe_dropless(
                x, moe_ops.route(x, router, K), *w, gmm_impl="pallas", layer=layer
            )[0]
        ),
    }
    size["layer"] = {}
    for name, fn in paths.items():
        state = {"i": 0}

        def call(fn=fn, state=state):
            state["i"] += 1
            return fn(x, layers[state["i"] % LAYERS], *stacks)

        s = kernel_summary(trace_kernels(call, reps=20), per=20)
        size["layer"][name] = {
            "busy_us": s["busy_us"],
            "span_us": s["span_us"],
            "kernels": s["kernels"],
            "by_name": s["by_name"],
        }
    return size


PROJECTION_CONFIGS = [  # block_n, block_k, splits, num_warps, num_stages
    (64, 128, 4, 4, 4),
    (64, 128, 1, 4, 4),
    (64, 128, 2, 4, 4),
    (32, 128, 4, 4, 4),
    (128, 64, 4, 4, 5),
    (64, 256, 4, 4, 3),
    (64, 128, 8, 4, 4),
    (32, 256, 8, 4, 4),
    (128, 128, 4, 8, 3),
    (64, 64, 8, 4, 6),
]


def projection_sweep(tokens: list[int]) -> None:
    """q, k, v (one launch) and o of one layer at 8x7B widths, read from a 4-layer stack."""
    keys = jax.random.split(jax.random.key(1), 5)
    shapes = {
        "q": (LAYERS, D, D),
        "k": (LAYERS, D, 1024),
        "v": (LAYERS, D, 1024),
        "o": (LAYERS, D, D),
    }
    w = {
        n: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(jnp.bfloat16)
        for k, (n, s) in zip(keys, shapes.items())
    }
    layers = [jnp.int32(i) for i in range(LAYERS)]
    rows = []
    for m in tokens:
        x = jax.random.normal(keys[4], (m, D), jnp.bfloat16)
        run = jax.jit(
            lambda x, layer, q, k, v, o, t=None: (
                dm.project_stacked(x, (q, k, v), layer, tiles=t),
                dm.project_stacked(x, (o,), layer, tiles=t),
            ),
            static_argnames=("t",),
        )
        (q, k, v), (o,) = run(x, layers[1], *w.values())
        err = max(
            rel_err(got, x.astype(jnp.float32) @ w[n][1].astype(jnp.float32))
            for got, n in zip((q, k, v, o), "qkvo")
        )
        for cfg in [None, *PROJECTION_CONFIGS]:
            tiles = None if cfg is None else ed.DecodeTiles(*cfg)
            state = {"i": 0}

            def call(run=run, x=x, tiles=tiles, state=state):
                state["i"] += 1
                return run(x, layers[state["i"] % LAYERS], *w.values(), t=tiles)

            try:
                s = kernel_summary(trace_kernels(call, reps=20), per=20)
                us = kernel_us(s, "decode_projection")
                row = {
                    "tokens": m,
                    "tiles": cfg or "default",
                    "us": us,
                    "TBps": 2 * (2 * D * D + 2 * D * 1024) / us / 1e6,
                    "rel_err": err,
                    "busy_us": s["busy_us"],
                    "kernels": s["kernels"],
                }
            except Exception as e:  # noqa: BLE001 (a config that does not compile)
                row = {"tokens": m, "tiles": cfg, "error": str(e)[:200]}
            rows.append(row)
            print(row, flush=True)
    write_json("decode_projection_tiles.json", {"env": environment(), "rows": rows})
    floor = 2 * (2 * D * D + 2 * D * 1024) / 4.3e6
    print(f"\nprojections of one layer (q+k+v+o), floor {floor:.1f} us at 4.3 TB/s")
    for r in sorted((r for r in rows if "us" in r), key=lambda r: (r["tokens"], r["us"])):
        print(
            f"  tokens={r['tokens']:>3} {r['tiles']}: {r['us']:.1f} us {r['TBps']:.2f} TB/s "
            f"(err {r['rel_err']:.1e})"
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,8,64")
    p.add_argument("--quick", action="store_true", help="default tiles only (no sweep)")
    p.add_argument("--projection", action="store_true", help="the projection sweep only")
    args = p.parse_args()
    if args.projection:
        projection_sweep([int(t) for t in args.tokens.split(",")])
        return
    keys = jax.random.split(jax.random.key(0), 5)
    stacks = expert_stacks(keys[:3], LAYERS, E, D, F)
    router = jax.random.normal(keys[3], (D, E), jnp.bfloat16)
    copy_tbs = copy_bandwidth_tbs()
    layers = [jnp.int32(i) for i in range(LAYERS)]
    result = {"env": environment(), "copy_bandwidth_tbs": copy_tbs, "sizes": []}
    for m in [int(t) for t in args.tokens.split(",")]:
        size = measure(m, keys[4], stacks, router, layers, copy_tbs, args.quick)
        result["sizes"].append(size)
        print(
            {k: v for k, v in size.items() if k not in ("sweep", "layer", "default_tiles")},
            flush=True,
        )
    write_json("expert_decode_tiles.json", result)

    print(f"\ncopy bandwidth (JAX, read+write) {copy_tbs:.2f} TB/s")
    for size in result["sizes"]:
        m = size["tokens"]
        print(
            f"\ntokens={m} experts used={size['experts_used']} rel err "
            f"{size['rel_err_vs_dense_f32']:.1e} floor {size['floor_us_4.3TBs']:.0f} us at "
            f"4.3 TB/s"
        )
        for kernel in ("gate_up", "down"):
            ok = [r for r in size["sweep"][kernel] if "us" in r]
            for r in sorted(ok, key=lambda r: r["us"])[:4]:
                print(f"  {kernel:>8} {r['tiles']}: {r['us']:.1f} us {r['TBps']:.2f} TB/s")
        dt = size["default_tiles"]
        print(f"  default tiles: gate_up {dt['gate_up_us']:.1f} us, down {dt['down_us']:.1f} us")
        for name, s in size["layer"].items():
            print(
                f"  layer MoE {name:>15}: busy {s['busy_us']:.1f} us, span {s['span_us']:.1f}"
                f" us, {s['kernels']:.0f} kernels"
            )


def _route(x, router):
    routing = moe_ops.route(x, router, K)
    return routing.experts, routing.weights


if __name__ == "__main__":
    main()
