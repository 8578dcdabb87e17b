"""The Pallas grouped-matmul kernels on the GPU: correctness against ragged_dot, then a tile sweep.

  PYTHONPATH=. python bench/gmm_tiles.py [--tokens 16384] [--quick]

1. Correctness: gmm forward and both gradients equal `jax.lax.ragged_dot` on random shapes,
   including empty groups and groups that are not multiples of the tile (float32 and bfloat16).
2. Sweep: each kernel (gmm = forward, gmm_t = d lhs, tgmm = d rhs) at Mixtral 8x7B widths
   (A = 2 x tokens assignments over 8 experts, D = 4096, F = 14336; the up/gate shape K=D, N=F
   and the down shape K=F, N=D) for a list of tile configurations, in TFLOP/s of useful work,
   beside one dense XLA matmul with the same FLOPs measured in the same run.
3. --decode-rows 512 (or 256): only the gmm forward at that many rows (a batch-256 or -128
   decode step's token-expert rows) in 8 uneven groups, at both 8x7B shapes, for
   DECODE_ROW_CONFIGS (decode-friendly tiles beside the training tiles the fallback runs
   today): profiler device time, GB/s of the weights read (every expert's, once) and the share
   of 4.3 TB/s. `--small` runs that mode at tiny widths on the CPU (interpreted; wall time).
Writes $OUT/gmm_tiles.json (or $OUT/gmm_decode_rows.json).
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, kernel_summary, timed, trace_kernels, write_json
from mixtral_jax.kernels import gmm_pallas as gp


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def correctness() -> list[dict]:
    cases = [
        (256, 128, 256, [0, 100, 0, 156]),
        (1000, 192, 320, [37, 0, 500, 63, 0, 400]),
        (4096, 512, 1024, [1024, 1, 2047, 0, 1000, 0, 0, 0]),
        (300, 64, 96, [10, 20, 30]),
    ]
    rows = []
    for (a, k, n, sizes), dtype in itertools.product(cases, (jnp.float32, jnp.bfloat16)):
        keys = jax.random.split(jax.random.key(a + k + n), 3)
        lhs = jax.random.normal(keys[0], (a, k), dtype)
        rhs = jax.random.normal(keys[1], (len(sizes), k, n), dtype)
        dy = jax.random.normal(keys[2], (a, n), dtype)
        gs = jnp.asarray(sizes, jnp.int32)
        outs = {}
        exact = functools.partial(jax.lax.ragged_dot, precision=jax.lax.Precision.HIGHEST)
        for name, f in (("pallas", gp.gmm), ("ragged_dot", exact)):
            out, vjp = jax.vjp(lambda x, w, f=f, gs=gs: f(x, w, gs), lhs, rhs)
            outs[name] = (out, *vjp(dy))
        errs = [rel_err(p, r) for p, r in zip(outs["pallas"], outs["ragged_dot"])]
        limit = 1e-5 if dtype == jnp.float32 else 1e-2
        # The stacked form (decode inside the layer scan) reads layer 1 of a 2-layer stack.
        stack = jnp.stack([rhs[::-1], rhs])
        errs.append(rel_err(gp.gmm_stacked(lhs, stack, gs, jnp.int32(1)), outs["ragged_dot"][0]))
        row = {
            "shape": [a, k, n],
            "groups": sizes,
            "dtype": jnp.dtype(dtype).name,
            "rel_err_out_dlhs_drhs_stacked": errs,
            "pass": max(errs) <= limit,
        }
        print(row, flush=True)
        rows.append(row)
    return rows


TGMM_CONFIGS = [  # tgmm only: block_m steps the rows; (block_k, block_n) tile the output
    (128, 128, 128, 8, 3),
    (64, 128, 128, 4, 4),
    (64, 256, 128, 8, 3),
    (64, 128, 256, 8, 3),
    (64, 256, 128, 8, 4),
    (128, 128, 128, 4, 3),
    (64, 128, 128, 8, 4),
    (32, 256, 128, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 256, 64, 8, 4),
]

CONFIGS = [  # block_m, block_n, block_k, num_warps, num_stages
    (128, 128, 64, 4, 3),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 4, 3),
    (128, 128, 128, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 4),
    (128, 128, 32, 4, 5),
]


def sweep(tokens: int, configs, kernels=("gmm", "gmm_t", "tgmm")) -> list[dict]:
    e, d, f, topk = 8, 4096, 14336, 2
    a = tokens * topk
    rng = np.random.default_rng(0)
    sizes = np.bincount(rng.integers(0, e, a), minlength=e)  # balanced-ish, not tile multiples
    gs = jnp.asarray(sizes, jnp.int32)
    rows = []
    for k, n in ((d, f), (f, d)):
        keys = jax.random.split(jax.random.key(k), 3)
        lhs = jax.random.normal(keys[0], (a, k), jnp.bfloat16)
        rhs = jax.random.normal(keys[1], (e, k, n), jnp.bfloat16) * 0.02
        dy = jax.random.normal(keys[2], (a, n), jnp.bfloat16)
        w = rhs[0]
        flops = 2 * a * k * n
        dense = flops / timed(jax.jit(lambda x, w: x @ w), lhs, w) / 1e12
        dense_t = flops / timed(jax.jit(lambda g, w: g @ w.T), dy, w) / 1e12
        print(f"K={k} N={n}: dense {dense:.0f} TFLOP/s, dense transposed {dense_t:.0f}", flush=True)
        for cfg in configs:
            tiles = gp.Tiles(
                block_m=cfg[0], block_n=cfg[1], block_k=cfg[2], num_warps=cfg[3], num_stages=cfg[4]
            )
            calls = {
                "gmm": jax.jit(
                    lambda x, w, t=tiles, gs=gs: gp._gmm_call(x, w, gs, t, False, False)
                ),
                "gmm_t": jax.jit(lambda g, w, t=tiles: gp._gmm_call(g, w, gs, t, True, False)),
                "tgmm": jax.jit(lambda x, g, t=tiles: gp._tgmm_call(x, g, gs, e, t, False)),
            }
            args = {"gmm": (lhs, rhs), "gmm_t": (dy, rhs), "tgmm": (lhs, dy)}
            row = {
                "K": k,
                "N": n,
                "tiles": list(cfg),
                "dense_tflops": dense,
                "dense_t_tflops": dense_t,
            }
            for name, fn in calls.items():
                if name not in kernels:
                    continue
                try:
                    row[name] = flops / timed(fn, *args[name]) / 1e12
                except Exception as err:  # noqa: BLE001 (a config that does not compile: registers, smem)
                    row[name] = None
                    row[name + "_error"] = str(err).splitlines()[0][:200]
            print(row, flush=True)
            rows.append(row)
    return rows


DECODE_CONFIGS = [
    (16, bn, bk, 4, st) for bn in (32, 64, 128) for bk in (64, 128, 256) for st in (3, 4)
]


def decode_sweep(configs) -> list[dict]:
    """gmm forward at decode sizes (2 and 16 assignments = 1 and 8 tokens), in GB/s of the
    weights of the experts that have rows (what the kernel must read)."""
    e, d, f = 8, 4096, 14336
    rows = []
    for a, sizes in ((2, [1, 0, 0, 1, 0, 0, 0, 0]), (16, [3, 2, 0, 4, 1, 2, 3, 1])):
        gs = jnp.asarray(sizes, jnp.int32)
        used = sum(1 for x in sizes if x)
        for k, n in ((d, f), (f, d)):
            lhs = jax.random.normal(jax.random.key(a), (a, k), jnp.bfloat16)
            rhs = jax.random.normal(jax.random.key(k), (e, k, n), jnp.bfloat16)
            lhs_p = jnp.pad(lhs, ((0, 16 - a % 16 if a % 16 else 0), (0, 0)))
            for cfg in configs:
                tiles = gp.Tiles(
                    block_m=cfg[0],
                    block_n=cfg[1],
                    block_k=cfg[2],
                    num_warps=cfg[3],
                    num_stages=cfg[4],
                )
                fn = jax.jit(lambda x, w, t=tiles, gs=gs: gp._gmm_call(x, w, gs, t, False, False))
                try:
                    ms = 1e3 * timed(fn, lhs_p, rhs, repeats=30)
                    row = {
                        "rows": a,
                        "K": k,
                        "N": n,
                        "tiles": list(cfg),
                        "ms": ms,
                        "GBps": used * k * n * 2 / ms / 1e6,
                    }
                except Exception as err:  # noqa: BLE001 (a config that does not compile)
                    row = {
                        "rows": a,
                        "K": k,
                        "N": n,
                        "tiles": list(cfg),
                        "error": str(err).splitlines()[0][:200],
                    }
                print(row, flush=True)
                rows.append(row)
    return rows


DECODE_ROW_CONFIGS = [  # block_m, block_n, block_k, num_warps, num_stages
    (128, 256, 64, 8, 4),  # the training tiles the fallback runs above 64 rows (reference)
    (16, 64, 256, 4, 3),  # gmm_pallas.DECODE (<= 64 rows)
    (16, 128, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (32, 128, 128, 4, 4),
    (32, 128, 64, 8, 4),
    (32, 64, 256, 4, 3),
    (64, 64, 128, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 128, 8, 3),
    (64, 64, 256, 8, 3),
    (16, 128, 256, 8, 3),
]


def decode_rows_sweep(rows: int, configs, small: bool = False) -> list[dict]:
    """gmm forward over `rows` rows in 8 uneven groups (random assignment counts, no tile
    multiples) at the up/gate shape (K=D, N=F) and the down shape (K=F, N=D)."""
    e, d, f = (8, 64, 128) if small else (8, 4096, 14336)
    sizes = np.bincount(np.random.default_rng(rows).integers(0, e, rows), minlength=e)
    gs = jnp.asarray(sizes, jnp.int32)
    print(f"rows={rows} groups {sizes.tolist()}", flush=True)
    out = []
    for k, n in ((d, f), (f, d)):
        lhs = jax.random.normal(jax.random.key(rows), (rows, k), jnp.bfloat16)
        rhs = 0.02 * jax.random.normal(jax.random.key(k), (e, k, n), jnp.bfloat16)
        weight_bytes, floor_us = e * k * n * 2, e * k * n * 2 / 4.3e6
        for cfg in configs:
            tiles = gp.Tiles(*cfg[:3], num_warps=cfg[3], num_stages=cfg[4])
            tiles = gp._fit_shared_memory(gp.fit_tiles(tiles, rows, k, n), "gmm", 2)
            fitted = [tiles.block_m, tiles.block_n, tiles.block_k, tiles.num_warps]
            lhs_p = jnp.pad(lhs, ((0, -rows % tiles.block_m), (0, 0)))
            fn = jax.jit(lambda x, w, t=tiles: gp._gmm_call(x, w, gs, t, False, small))
            row = {"rows": rows, "K": k, "N": n, "tiles": list(cfg)}
            row["fitted"] = [*fitted, tiles.num_stages]  # after the shared-memory fit
            try:
                if small:
                    us = 1e6 * timed(fn, lhs_p, rhs, repeats=2, warmup=1)
                else:
                    trace = trace_kernels(lambda fn=fn, x=lhs_p, w=rhs: fn(x, w), reps=10)
                    by_name = kernel_summary(trace, per=10)["by_name"]
                    us = sum(v["us"] for name, v in by_name.items() if "gmm" in name)
                row.update(us=us, GBps=weight_bytes / us / 1e3, share=floor_us / us)
                print(
                    f"  K={k:>5} N={n:>5} {row['fitted']}: {us:7.1f} us {row['GBps']:6.0f} GB/s "
                    f"{100 * row['share']:5.1f}% of 4.3 TB/s",
                    flush=True,
                )
            except Exception as err:  # noqa: BLE001 (a config that does not compile)
                row["error"] = str(err).splitlines()[0][:200]
                print(f"  K={k:>5} N={n:>5} {cfg}: error {row['error']}", flush=True)
            out.append(row)
    for k in (d, f):
        ok = [r for r in out if r["K"] == k and "us" in r]
        if ok:
            best = min(ok, key=lambda r: r["us"])
            print(f"best K={k}: {best['tiles']} {best['us']:.1f} us {100 * best['share']:.1f}%")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--quick", action="store_true", help="first two configurations only")
    p.add_argument("--tgmm-only", action="store_true", help="sweep TGMM_CONFIGS for tgmm")
    p.add_argument("--decode", action="store_true", help="also sweep DECODE_CONFIGS")
    p.add_argument("--correctness-only", action="store_true")
    p.add_argument("--decode-rows", type=int, help="only sweep DECODE_ROW_CONFIGS at these rows")
    p.add_argument("--small", action="store_true", help="--decode-rows at tiny widths, on CPU")
    args = p.parse_args()
    if args.decode_rows:
        rows = decode_rows_sweep(args.decode_rows, DECODE_ROW_CONFIGS, args.small)
        write_json("gmm_decode_rows.json", {"env": environment(), "rows": rows})
        return
    checks = correctness()
    if args.correctness_only:
        write_json("gmm_correctness.json", {"env": environment(), "correctness": checks})
        print(f"\ncorrectness: {sum(c['pass'] for c in checks)}/{len(checks)} pass")
        return
    decode = decode_sweep(DECODE_CONFIGS) if args.decode else []
    for a in sorted({r["rows"] for r in decode}):
        for k in sorted({r["K"] for r in decode}):
            ok = [r for r in decode if r["rows"] == a and r["K"] == k and "ms" in r]
            best = max(ok, key=lambda r: r["GBps"])
            print(f"decode rows={a} K={k}: best {best['GBps']:.0f} GB/s with {best['tiles']}")
    if args.tgmm_only:
        rows = sweep(args.tokens, TGMM_CONFIGS, kernels=("tgmm",))
    else:
        rows = sweep(args.tokens, CONFIGS[:2] if args.quick else CONFIGS)
    write_json(
        "gmm_tiles.json",
        {
            "env": environment(),
            "tokens": args.tokens,
            "correctness": checks,
            "decode": decode,
            "sweep": rows,
        },
    )
    print(f"\ncorrectness: {sum(c['pass'] for c in checks)}/{len(checks)} pass")
    for kernel in ("gmm", "gmm_t", "tgmm"):
        for k in sorted({r["K"] for r in rows}):
            best = max(
                (r for r in rows if r["K"] == k and r.get(kernel)),
                key=lambda r: r[kernel],
                default=None,
            )
            if best:
                print(
                    f"{kernel:>6} K={k:>5}: best {best[kernel]:.0f} TFLOP/s with {best['tiles']}"
                    f" (dense {best['dense_tflops']:.0f})"
                )


if __name__ == "__main__":
    main()
