"""The MoE of one layer for a large decode batch (65-512 tokens) at Mixtral 8x7B widths: the
grouped-rows decode kernels (expert_decode_grouped.py) against what runs without them.

  PYTHONPATH=. python bench/expert_decode_grouped.py [--tokens 256] [--small]

For each token count, balanced random top-2 routing over 8 experts (each token's two experts
from random logits), one layer read from a 2-layer bf16 stack at alternating layers:

  grouped ...   decode_experts_grouped with R rows per chunk and tiles (CONFIGS; R from
                chunk_rows and tiles from default_tiles where None);
  all rows      expert_decode's kernels with every slot computing all M tokens (the <= 64-token
                path's approach, its limit lifted here; tiles from default_tiles(bm));
  sorted gmm    moe_dropless with the Pallas grouped matmul (the current fallback above 64).

Each row: device time of the call's kernels (profiler busy time, bench/common.trace_kernels:
launch gaps left out; the sort, gathers and combine included, routing not), the two expert
kernels' share, the weight bytes that must be read (every used expert's three matrices, once)
over that time in TB/s, its share of the 4.3 TB/s floor, the time x 32 layers (the step's MoE;
issue 18's target is <= 29 ms for the whole step), and the relative error against the dense
float32 oracle. `--small` runs the same at tiny widths on the CPU (kernels interpreted, wall
time, `xla` grouped matmul): it checks the script, not the speed.
Writes $OUT/expert_decode_grouped.json.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
    environment,
    expert_stacks,
    kernel_summary,
    timed,
    trace_kernels,
    write_json,
)
from mixtral_jax.kernels import expert_decode as ed
from mixtral_jax.kernels import expert_decode_grouped as grouped
from mixtral_jax.kernels.common import DecodeTiles, pow2_at_least
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops

E, TOPK, LAYERS, FLOOR_TBS, MODEL_LAYERS = 8, 2, 2, 4.3, 32
WIDTHS = {"full": (4096, 14336), "small": (64, 128)}
# (name, rows R or None for chunk_rows, gate_up tiles, down tiles; None: default_tiles(R)).
# DecodeTiles(block_n, block_k, splits, num_warps, num_stages). Six here, two baselines: 8.
CONFIGS = [
    ("grouped default", None, None, None),
    ("grouped R=64", 64, None, None),
    ("grouped R=128", 128, None, None),
    ("grouped R=128 gate_up bn=128", 128, DecodeTiles(128, 64, 1, 8, 3), None),
    ("grouped R=128 down 2 splits", 128, None, DecodeTiles(128, 64, 2, 8, 4)),
    ("grouped R=32", 32, None, None),
]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def all_rows(x, experts, weights, layer, *stacks, interpret=False):
    """expert_decode.decode_experts' algorithm past its 64-token limit: every slot (used
    expert) computes all M tokens, combine weight 0 for those that did not choose it."""
    m = x.shape[0]
    bm = pow2_at_least(m)
    slot_expert, num_used, combine = ed._slots(experts, weights, E)
    active = (jnp.arange(slot_expert.shape[0]) < num_used[0]).astype(jnp.int32)
    gate_up, down = grouped.default_tiles(bm)
    part = ed.expert_kernels(
        jnp.pad(x, ((0, bm - m), (0, 0))),
        slot_expert,
        active,
        jnp.pad(combine, ((0, 0), (0, bm - m))),
        stacks,
        layer,
        rows=m,
        gate_up_tiles=gate_up,
        down_tiles=down,
        interpret=interpret,
    )
    return jnp.sum(part[:, :, :m], axis=(0, 1))


def paths(small: bool) -> dict:
    """name -> jitted fn(x, experts, weights, layer, *stacks) -> [M, D] float32."""
    out = {}
    for name, rows, t1, t2 in CONFIGS:
        out[name] = jax.jit(
            lambda x, ex, wt, layer, *w, rows=rows, t1=t1, t2=t2: grouped.decode_experts_grouped(
                x, ex, wt, *w, layer, rows=rows, gate_up_tiles=t1, down_tiles=t2, interpret=small
            )
        )
    out["all rows"] = jax.jit(functools.partial(all_rows, interpret=small))
    gmm = "xla" if small else "pallas"

    def sorted_gmm(x, ex, wt, layer, *w):
        routing = moe_ops.Routing(logits=jnp.zeros((x.shape[0], E)), weights=wt, experts=ex)
        return moe_local.moe_dropless(x, routing, *w, gmm_impl=gmm, layer=layer)[0]

    out["sorted gmm"] = jax.jit(sorted_gmm)
    return out


def time_us(fn, args_of, small: bool) -> dict:
    """Device time of fn(*args_of(i)) per call (profiler), or wall time with --small."""
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(*args_of(state["i"]))

    if small:
        return {"busy_us": 1e6 * timed(call, repeats=2, warmup=1), "by_name": {}}
    return kernel_summary(trace_kernels(call, reps=10), per=10)


def measure(m: int, stacks, layers, small: bool) -> list[dict]:
    d, f = stacks[0].shape[2], stacks[0].shape[3]
    keys = jax.random.split(jax.random.key(m), 2)
    x = jax.random.normal(keys[0], (m, d), jnp.bfloat16)
    routing = moe_ops.route_logits(jax.random.normal(keys[1], (m, E)), TOPK)  # balanced random
    counts = np.bincount(np.asarray(routing.experts).ravel(), minlength=E)
    used = int(np.sum(counts > 0))
    weight_bytes = used * 3 * d * f * 2
    floor_us = weight_bytes / (FLOOR_TBS * 1e6)
    want = moe_local.moe_dense(
        x.astype(jnp.float32), routing, *(s[1].astype(jnp.float32) for s in stacks)
    )[0]
    print(
        f"\ntokens={m}: rows per expert {counts.min()}-{counts.max()} (mean {m * TOPK / E:.0f}),"
        f" chunk_rows {grouped.chunk_rows(m, TOPK, E)}, weights {weight_bytes / 1e6:.1f} MB,"
        f" floor {floor_us:.1f} us at {FLOOR_TBS} TB/s",
        flush=True,
    )
    rows, args = [], (x, routing.experts, routing.weights)
    for name, fn in paths(small).items():
        try:
            err = rel_err(fn(*args, layers[1], *stacks), want)
            s = time_us(fn, lambda i, args=args: (*args, layers[i % LAYERS], *stacks), small)
        except Exception as e:  # noqa: BLE001 (a config that does not compile)
            row = {"tokens": m, "path": name, "error": str(e).splitlines()[0][:200]}
            print(f"  {name:<30} error: {row['error']}", flush=True)
            rows.append(row)
            continue
        busy = s["busy_us"]
        kernels = {n: v["us"] for n, v in s["by_name"].items()}
        expert_us = sum(us for n, us in kernels.items() if "gate_up" in n or "expert_down" in n)
        row = {
            "tokens": m,
            "path": name,
            "busy_us": busy,
            "expert_kernels_us": expert_us,
            "TBps": weight_bytes / busy / 1e6,
            "share_of_floor": floor_us / busy,
            "ms_x32_layers": MODEL_LAYERS * busy / 1e3,
            "rel_err": err,
            "kernels": kernels,
        }
        print(
            f"  {name:<30} {busy:8.1f} us (expert kernels {expert_us:7.1f}) "
            f"{row['TBps']:5.2f} TB/s {100 * row['share_of_floor']:5.1f}% of floor, "
            f"x32 {row['ms_x32_layers']:5.1f} ms, err {err:.1e}",
            flush=True,
        )
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default=None, help="comma-separated (default 256; --small 65,128)")
    p.add_argument("--small", action="store_true", help="tiny widths on the CPU, interpreted")
    args = p.parse_args()
    tokens = args.tokens or ("65,128" if args.small else "256")
    d, f = WIDTHS["small" if args.small else "full"]
    stacks = expert_stacks(jax.random.split(jax.random.key(0), 3), LAYERS, E, d, f)
    layers = [jnp.int32(i) for i in range(LAYERS)]
    rows = []
    for m in [int(t) for t in tokens.split(",")]:
        rows += measure(m, stacks, layers, args.small)
    write_json(
        "expert_decode_grouped.json", {"env": environment(), "small": args.small, "rows": rows}
    )


if __name__ == "__main__":
    main()
