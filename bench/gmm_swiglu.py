"""The fused gate+up+SwiGLU grouped matmul (kernels/gmm_swiglu.py) on the GPU: correctness
against the unfused pair, its speed beside the pair, and a sweep of its tiles.

  PYTHONPATH=. python bench/gmm_swiglu.py [--tokens 16384] [--no-sweep]
  PYTHONPATH=. python bench/gmm_swiglu.py --tiny     # CPU: the same code, interpreted, tiny

1. Correctness: "gate+up", h = silu(x W_gate) * (x W_up) and its gradients w.r.t. x, W_gate,
   W_up (gmm_swiglu), and "ffn", y = h W_down and its four gradients (expert_ffn, whose
   backward fuses the SwiGLU's), fused against `gmm_pallas.gmm` calls + SwiGLU (float32,
   bfloat16; empty and uneven groups): one line per case, max relative error of each output,
   "ok" within 1e-5 / 2e-2.
2. Speed at 8x7B widths (A = 2 x tokens rows over 8 experts, D = 4096, F = 14336): forward and
   forward + backward, fused and unfused, ms and TFLOP/s of useful work (4 A D F forward for
   gate+up, 6 A D F for the ffn; x3 forward + backward).
3. Sweep: the fused forward kernel's tiles (gmm_swiglu.FUSED) and the backward d h kernel's
   (FUSED_BWD) over a few configurations, each kernel alone (TFLOP/s of 4 A D F forward,
   2 A D F for the backward's d h).
Writes $OUT/gmm_swiglu.json.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, timed, write_json
from mixtral_jax.kernels import gmm_pallas, gmm_swiglu
from mixtral_jax.kernels.gmm_pallas import Tiles

SWEEP = [
    Tiles(128, 128, 64, num_warps=8, num_stages=4),  # the default
    Tiles(128, 128, 64, num_warps=8, num_stages=3),
    Tiles(128, 128, 32, num_warps=4, num_stages=4),
    Tiles(64, 256, 64, num_warps=8, num_stages=3),
    Tiles(256, 128, 64, num_warps=8, num_stages=3),
    Tiles(128, 64, 64, num_warps=4, num_stages=4),
]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def paths(gs, interpret: bool) -> dict:
    """{kind: (fused, unfused)}: "gate+up" (x, w_gate, w_up) -> h, "ffn" (+ w_down) -> y."""

    def fused(x, wg, wu):
        return gmm_swiglu.gmm_swiglu(x, wg, wu, gs, interpret)

    def unfused(x, wg, wu):
        gate = gmm_pallas.gmm(x, wg, gs, interpret)
        return jax.nn.silu(gate) * gmm_pallas.gmm(x, wu, gs, interpret)

    def ffn_fused(x, wg, wu, wd):
        return gmm_swiglu.expert_ffn(x, wg, wu, wd, gs, interpret)

    def ffn_unfused(x, wg, wu, wd):
        return gmm_pallas.gmm(unfused(x, wg, wu), wd, gs, interpret)

    return {"gate+up": (fused, unfused), "ffn": (ffn_fused, ffn_unfused)}


def with_grads(fn, ct):
    def both(*args):
        out, vjp = jax.vjp(fn, *args)
        return (out, *vjp(ct))

    return jax.jit(both)


def inputs(rows: int, d: int, f: int, groups: int, dtype, seed: int = 0):
    """x [A, D], w_gate, w_up [G, D, F], w_down [G, F, D], cotangents dh [A, F], dy [A, D]."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (rows, d), dtype)
    wg, wu = (jax.random.normal(k, (groups, d, f), dtype) * d**-0.5 for k in keys[1:3])
    wd = jax.random.normal(keys[3], (groups, f, d), dtype) * f**-0.5
    dh = jax.random.normal(keys[4], (rows, f), dtype)
    return x, wg, wu, wd, dh, jax.random.normal(keys[5], (rows, d), dtype)


def correctness(interpret: bool) -> list[dict]:
    cases = [(256, 128, 256, [0, 100, 0, 156]), (1000, 192, 320, [37, 0, 500, 63, 0, 300])]
    if interpret:
        cases = [(40, 16, 24, [7, 0, 20, 5])]
    rows = []
    for (a, d, f, sizes), dtype in itertools.product(cases, (jnp.float32, jnp.bfloat16)):
        x, wg, wu, wd, dh, dy = inputs(a, d, f, len(sizes), dtype, seed=a)
        gs = jnp.asarray(sizes, jnp.int32)
        for kind, (fused, unfused) in paths(gs, interpret).items():
            args, ct = ((x, wg, wu), dh) if kind == "gate+up" else ((x, wg, wu, wd), dy)
            pairs = zip(with_grads(fused, ct)(*args), with_grads(unfused, ct)(*args))
            errs = [rel_err(p, q) for p, q in pairs]
            limit = 1e-5 if dtype == jnp.float32 else 2e-2
            row = {"kind": kind, "shape": [a, d, f], "groups": sizes, "errors": errs}
            row.update(dtype=jnp.dtype(dtype).name, ok=all(e <= limit for e in errs))
            rows.append(row)
            print(
                f"  {kind:>7} {row['dtype']:>8} {a}x{d}x{f} groups {sizes}: rel err of out, dx, "
                "dWg, dWu(, dWd) "
                + ", ".join(f"{e:.1e}" for e in errs)
                + ("  ok" if row["ok"] else "  FAIL"),
                flush=True,
            )
    return rows


def speed(tokens: int, d: int, f: int, experts: int, interpret: bool, repeats: int) -> dict:
    rows = 2 * tokens
    x, wg, wu, wd, dh, dy = inputs(rows, d, f, experts, jnp.bfloat16)
    counts = np.random.default_rng(0).multinomial(rows, np.ones(experts) / experts)
    gs = jnp.asarray(counts, jnp.int32)
    out = {}
    for kind, pair in paths(gs, interpret).items():
        args, ct = ((x, wg, wu), dh) if kind == "gate+up" else ((x, wg, wu, wd), dy)
        flops = (4 if kind == "gate+up" else 6) * rows * d * f
        for name, fn in zip(("fused", "unfused"), pair):
            fwd = timed(jax.jit(fn), *args, repeats=repeats)
            both = timed(with_grads(fn, ct), *args, repeats=repeats)
            r = out[f"{kind} {name}"] = {
                "forward_ms": 1e3 * fwd,
                "forward_backward_ms": 1e3 * both,
                "forward_tflops": flops / fwd / 1e12,
                "forward_backward_tflops": 3 * flops / both / 1e12,
            }
            print(
                f"  {kind:>7} {name:>8}: forward {r['forward_ms']:.2f} ms "
                f"({r['forward_tflops']:.0f} TFLOP/s), fwd+bwd {r['forward_backward_ms']:.2f} ms "
                f"({r['forward_backward_tflops']:.0f})",
                flush=True,
            )
    return out


def sweep(tokens: int, d: int, f: int, experts: int, interpret: bool, repeats: int) -> list:
    """Each of SWEEP as the forward kernel's tiles (gmm_swiglu.FUSED: h from x) and as the
    backward d h kernel's (FUSED_BWD: d gate, d up from dy), timed alone."""
    rows = 2 * tokens
    x, wg, wu, wd, _, dy = inputs(rows, d, f, experts, jnp.bfloat16)
    gs = jnp.asarray(np.full(experts, rows // experts), jnp.int32)
    gate, up = x @ wg[0], x @ wu[0]  # any [A, F] values
    kernels = {
        "FUSED": lambda: gmm_swiglu.gmm_swiglu(x, wg, wu, gs, interpret),
        "FUSED_BWD": lambda: gmm_swiglu._bwd_call(dy, wd, gate, up, gs, interpret=interpret),
    }
    results, defaults = [], (gmm_swiglu.FUSED, gmm_swiglu.FUSED_BWD)
    try:
        for (name, call), tiles in itertools.product(kernels.items(), SWEEP):
            setattr(gmm_swiglu, name, tiles)
            t = tiles
            entry = {"kernel": name, "tiles": t.__dict__}
            shape = f"{name:>9} {t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}"
            try:
                seconds = timed(jax.jit(call), repeats=repeats)
                flops = (4 if name == "FUSED" else 2) * rows * d * f
                entry.update(ms=1e3 * seconds, tflops=flops / seconds / 1e12)
                print(f"  {shape}: {entry['ms']:.2f} ms {entry['tflops']:.0f} TFLOP/s", flush=True)
            except Exception as err:  # noqa: BLE001 (a tile that does not compile is a row)
                entry["error"] = str(err).splitlines()[0][:200]
                print(f"  {shape}: {entry['error']}", flush=True)
            results.append(entry)
            gmm_swiglu.FUSED, gmm_swiglu.FUSED_BWD = defaults
            jax.clear_caches()
    finally:
        gmm_swiglu.FUSED, gmm_swiglu.FUSED_BWD = defaults
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU: interpreted, tiny widths")
    args = p.parse_args()
    interpret = args.tiny
    tokens, d, f, e = (32, 32, 64, 4) if args.tiny else (args.tokens, 4096, 14336, 8)
    repeats = 1 if args.tiny else args.repeats
    print("1. correctness, fused against two gmm + SwiGLU", flush=True)
    checks = correctness(interpret)
    print(f"2. speed: {2 * tokens} rows, D={d}, F={f}, {e} experts, bf16", flush=True)
    timing = speed(tokens, d, f, e, interpret, repeats)
    tiles = []
    if not args.no_sweep:
        print("3. sweep of the fused kernels' tiles", flush=True)
        tiles = sweep(tokens, d, f, e, interpret, repeats)
    write_json(
        "gmm_swiglu.json",
        {
            "env": environment(),
            "tokens": tokens,
            "correct": checks,
            "speed": timing,
            "sweep": tiles,
        },
    )
    print("all correct" if all(c["ok"] for c in checks) else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()
