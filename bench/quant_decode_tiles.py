"""The quantized-weight kernels (int8 / int4 codes dequantized in registers) on one GPU at 8x7B widths.

  python3 bench/quant_decode_tiles.py [--tokens 1,64] [--parts experts,projection,gmm]
                                      [--quick] [--small] [--dequant float32,ptx]

Formats: bf16 (the float kernels, the baseline of the same run), int8 (one scale per output
channel) and int4 (groups of 128 rows of K, float32 scales), all made on the device from the
same random bf16 weights. Each measurement is one JSON line on stdout:

  experts     decode_experts at layer 1 of a 4-layer stack, per token count: the error against
              the dense oracle on the dequantized weights (float32), then kernel device time
              (profiler) of gate_up and down for the default tiles and (no --quick) a few tile
              choices; GB/s = bytes the kernel must read (the used experts' codes + scales)
              / its time, beside 4.3-4.8 TB/s. One token: both paths, "dot" (matrix units,
              the default) and "vector" (vector=True); more tokens: "dot" (every slot
              computes every token) and "grouped16" / "grouped32" (expert_decode_grouped:
              slots of 16 / 32 rows of one expert, so each row is computed once per expert
              it chose).
  projection  project_stacked: q, k, v in one launch, then o (attention widths of 8x7B); one
              token: both paths.
  gmm         the prefill grouped matmul (gmm_quant.gmm; bf16: gmm_pallas.gmm) on 2,048 and
              8,192 rows in 8 uneven groups, both expert shapes: TFLOP/s and weight GB/s
              (wall time of the jitted call, median of 10: a millisecond-long kernel);
              "default" is what gmm_quant.gmm runs (the bf16 kernel on the dequantized
              weight from gmm_quant.DEQUANTIZE_ROWS rows), "codes_kernel" the kernel reading
              codes: the pair sets DEQUANTIZE_ROWS.

--dequant runs the quantized formats once per way of making their tiles (`weight_tiles.DEQUANT`:
"auto", the default, the faster per format as measured; "float32"; or "ptx", inline PTX with no
conversion instruction, GPU only); every row names it. bf16 runs once.

--small runs tiny widths (on CPU: the kernels interpreted, wall-clock times) to check this
script's logic. Writes $OUT/quant_decode_tiles.json with every line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python3 bench/quant_decode_tiles.py` finds bench and mixtral_jax

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, kernel_summary, timed, trace_kernels, write_json
from mixtral_jax.kernels import decode_matmul as dm
from mixtral_jax.kernels import expert_decode as ed
from mixtral_jax.kernels import expert_decode_grouped as edg
from mixtral_jax.kernels import gmm_pallas, gmm_quant, quant, weight_tiles
from mixtral_jax.kernels.common import DecodeTiles
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops

LAYERS, TOPK = 4, 2
FULL = {"d": 4096, "f": 14336, "e": 8, "kv": 1024, "group": 128, "rows": (2048, 8192)}
SMALL = {"d": 64, "f": 96, "e": 8, "kv": 32, "group": 32, "rows": (40,)}
FORMATS = ("bf16", "int8", "int4")
# Tile alternatives to each default (DecodeTiles fields; block_k counts stored rows).
SWEEP = {
    ("dot", "gate_up"): [(64, 128, 1, 4, 4), (128, 128, 1, 4, 3), (64, 64, 1, 4, 6)],
    ("dot", "down"): [(64, 128, 4, 4, 4), (128, 128, 8, 8, 3), (64, 128, 1, 4, 4)],
    ("vector", "gate_up"): [(64, 64, 1, 4, 4), (128, 64, 1, 8, 4), (256, 32, 1, 8, 3)],
    ("vector", "down"): [(64, 64, 4, 4, 4), (128, 32, 8, 4, 3), (256, 32, 2, 8, 3)],
    ("dot", "projection"): [(64, 128, 8, 4, 3), (32, 128, 4, 4, 4)],
    ("vector", "projection"): [(128, 32, 4, 4, 4), (64, 64, 8, 4, 3)],
}
GMM_SWEEP = [  # block_m, block_n, block_k, group_m, num_warps, num_stages
    (128, 128, 64, 8, 4, 3),
    (128, 256, 64, 8, 8, 3),
]
LINES: list[dict] = []


def emit(row: dict) -> None:
    if row.get("format", "bf16") != "bf16":
        row = {**row, "dequant": weight_tiles.DEQUANT}
    LINES.append(row)
    print(json.dumps(row), flush=True)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def device_us(call, parts: tuple[str, ...]) -> dict[str, float]:
    """{part: us per call} of the kernels whose names contain each part (profiler device time on
    a GPU; on CPU the whole call's wall time under every part)."""
    if not on_gpu():
        us = timed(call, repeats=2, warmup=1) * 1e6
        return {p: us for p in parts}
    s = kernel_summary(trace_kernels(call, reps=20), per=20)
    return {p: sum(v["us"] for n, v in s["by_name"].items() if p in n) for p in parts}


def stored(w) -> int:
    """Bytes a kernel reads for a weight (codes + scales, or the float array)."""
    if isinstance(w, quant.QuantizedWeight):
        return quant.stored_bytes(w)
    return w.size * w.dtype.itemsize


def make_formats(key, shape, group: int) -> dict:
    """{format: stack} of one random bf16 stack [L, ...] and its int8 / int4 quantizations,
    made on the device one layer at a time (a float32 temporary of a whole stack is large)."""

    @jax.jit
    def make(key):
        return jax.lax.map(
            lambda k: (0.02 * jax.random.normal(k, shape[1:], jnp.float32)).astype(jnp.bfloat16),
            jax.random.split(key, shape[0]),
        )

    bf16 = make(key)
    q8 = jax.jit(lambda w: jax.lax.map(lambda x: quant.quantize(x, 8), w))(bf16)
    q4 = jax.jit(lambda w: jax.lax.map(lambda x: quant.quantize(x, 4, group), w))(bf16)
    return {"bf16": bf16, "int8": q8, "int4": q4}


def experts_part(
    sizes: dict, tokens: list[int], quick: bool, interpret: bool, formats=FORMATS
) -> None:
    d, f, e = sizes["d"], sizes["f"], sizes["e"]
    keys = jax.random.split(jax.random.key(0), 5)
    stacks = {
        name: make_formats(k, shape, sizes["group"])
        for name, k, shape in zip(
            ("w_gate", "w_up", "w_down"), keys, ((LAYERS, e, d, f),) * 2 + ((LAYERS, e, f, d),)
        )
    }
    router = jax.random.normal(keys[3], (d, e), jnp.bfloat16)

    def runner(kernel, **fixed):
        """kernel (decode_experts or decode_experts_grouped with `fixed` arguments) jitted as
        (x, experts, weights, layer, w_gate, w_up, w_down, t1=, t2=, vector=)."""

        def call(x, ex, wt, layer, wg, wu, wd, t1=None, t2=None, vector=False):
            one_token = {"vector": True} if vector else {}  # decode_experts only
            return kernel(
                x,
                ex,
                wt,
                wg,
                wu,
                wd,
                layer,
                gate_up_tiles=t1,
                down_tiles=t2,
                interpret=interpret,
                **fixed,
                **one_token,
            )

        return jax.jit(call, static_argnames=("t1", "t2", "vector"))

    run = runner(ed.decode_experts)
    grouped = {f"grouped{r}": runner(edg.decode_experts_grouped, rows=r) for r in (16, 32)}
    for m in tokens:
        x = jax.random.normal(keys[4], (m, d), jnp.bfloat16)
        routing = moe_ops.route(x, router, TOPK)
        used = len(set(np.asarray(routing.experts).ravel().tolist()))
        for fmt in formats:
            w = [stacks[n][fmt] for n in ("w_gate", "w_up", "w_down")]
            dense = [_dense(s[1]) for s in w]
            want = moe_local.moe_dense(x.astype(jnp.float32), routing, *dense)[0]
            one = [stored(s) / (LAYERS * e) for s in w]  # bytes of one expert's matrix
            nbytes = {"gate_up": used * (one[0] + one[1]), "down": used * one[2]}
            for path in ("dot", "vector") if m == 1 else ("dot", *grouped):
                vector = path == "vector"
                base = {"part": "experts", "path": path, "format": fmt, "tokens": m}
                call = grouped.get(path, run)
                measure = _expert_timer(call, x, routing, w, vector)
                try:
                    got = call(x, routing.experts, routing.weights, jnp.int32(1), *w, vector=vector)
                    err = rel_err(got, want)
                    us = measure(None, None)
                except Exception as error:  # noqa: BLE001 (a path that does not compile here)
                    emit({**base, "error": str(error)[:300]})
                    continue
                emit({**base, "experts_used": used, "rel_err_vs_dense_f32": err})
                total = sum(nbytes.values())
                emit(
                    {
                        **base,
                        "tiles": "default",
                        "gate_up_us": us["gate_up"],
                        "down_us": us["down"],
                        "GBps": total / (us["gate_up"] + us["down"]) / 1e3,
                        "floor_us_4.3TBs": total / 4.3e6,
                    }
                )
                if quick or fmt == "bf16" or m not in (1, max(tokens)) or path in grouped:
                    continue
                for kernel in ("gate_up", "down"):
                    for cfg in SWEEP[(path, kernel)]:
                        tiles = DecodeTiles(*cfg)
                        pair = (tiles, None) if kernel == "gate_up" else (None, tiles)
                        sweep_one(
                            {**base, "kernel": kernel},
                            cfg,
                            nbytes[kernel],
                            lambda m=measure, pair=pair, kernel=kernel: m(*pair)[kernel],
                        )


def _expert_timer(run, x, routing, w, vector: bool):
    """(gate_up tiles, down tiles) -> {kernel: us}, cycling through the stack's layers."""

    def measure(t1, t2):
        state = {"i": 0}

        def call():
            state["i"] += 1
            layer = jnp.int32(state["i"] % LAYERS)
            return run(x, routing.experts, routing.weights, layer, *w, t1=t1, t2=t2, vector=vector)

        return device_us(call, ("gate_up", "down"))

    return measure


def sweep_one(base: dict, cfg: tuple | str, nbytes: float, measure) -> None:
    """One tile choice (or "default"): its time and GB/s, or the error it failed with."""
    tiles = list(cfg) if isinstance(cfg, tuple) else cfg
    try:
        us = measure()
        emit({**base, "tiles": tiles, "us": us, "GBps": nbytes / us / 1e3})
    except Exception as err:  # noqa: BLE001 (a configuration that does not compile)
        emit({**base, "tiles": tiles, "error": str(err)[:300]})


def projection_part(
    sizes: dict, tokens: list[int], quick: bool, interpret: bool, formats=FORMATS
) -> None:
    d, kv = sizes["d"], sizes["kv"]
    keys = jax.random.split(jax.random.key(1), 5)
    shapes = {"q": (LAYERS, d, d), "k": (LAYERS, d, kv), "v": (LAYERS, d, kv), "o": (LAYERS, d, d)}
    w = {n: make_formats(k, s, sizes["group"]) for k, (n, s) in zip(keys, shapes.items())}
    run = jax.jit(
        lambda x, layer, q, k, v, o, t=None, vector=False: (
            dm.project_stacked(x, (q, k, v), layer, tiles=t, vector=vector, interpret=interpret),
            dm.project_stacked(x, (o,), layer, tiles=t, vector=vector, interpret=interpret),
        ),
        static_argnames=("t", "vector"),
    )
    for m in tokens:
        x = jax.random.normal(keys[4], (m, d), jnp.bfloat16)
        for fmt in formats:
            stacks = [w[n][fmt] for n in "qkvo"]
            nbytes = sum(stored(s) for s in stacks) / LAYERS
            for path in ("dot", "vector") if m == 1 else ("dot",):
                vector = path == "vector"
                base = {"part": "projection", "path": path, "format": fmt, "tokens": m}
                try:
                    (q, k, v), (o,) = run(x, jnp.int32(1), *stacks, vector=vector)
                except Exception as error:  # noqa: BLE001 (a path that does not compile here)
                    emit({**base, "error": str(error)[:300]})
                    continue
                err = max(
                    rel_err(got, x.astype(jnp.float32) @ _dense(s[1]))
                    for got, s in zip((q, k, v, o), stacks)
                )
                emit({**base, "rel_err_vs_f32": err})
                swept = not quick and m in (1, max(tokens))
                sweep = SWEEP[(path, "projection")] if swept else []
                for cfg in [None, *sweep]:
                    tiles = None if cfg is None else DecodeTiles(*cfg)

                    def measure(tiles=tiles, stacks=stacks, x=x, vector=vector):
                        state = {"i": 0}

                        def call():
                            state["i"] += 1
                            layer = jnp.int32(state["i"] % LAYERS)
                            return run(x, layer, *stacks, t=tiles, vector=vector)

                        return device_us(call, ("decode_projection",))["decode_projection"]

                    sweep_one(base, cfg or "default", nbytes, measure)


def _dense(w) -> jax.Array:
    return w.astype(jnp.float32) if not isinstance(w, quant.QuantizedWeight) else w.dequantize()


def gmm_part(sizes: dict, quick: bool, interpret: bool, formats=FORMATS) -> None:
    d, f, e = sizes["d"], sizes["f"], sizes["e"]
    keys = jax.random.split(jax.random.key(2), 4)
    for name, (k, n), key in (("gate", (d, f), keys[0]), ("down", (f, d), keys[1])):
        weights = make_formats(key, (1, e, k, n), sizes["group"])
        for rows in sizes["rows"]:
            cuts = np.sort(np.random.default_rng(rows).integers(0, rows, e - 1))
            gs = jnp.asarray(np.diff(np.concatenate([[0], cuts, [rows]])).astype(np.int32))
            lhs = jax.random.normal(keys[2], (rows, k), jnp.bfloat16)
            for fmt in formats:
                rhs = weights[fmt][0]
                want = jax.lax.ragged_dot(
                    lhs, _dense(rhs).astype(jnp.bfloat16), gs, preferred_element_type=jnp.float32
                )
                base = {"part": "gmm", "shape": name, "format": fmt, "rows": rows, "K": k, "N": n}
                choices = ["default"] if fmt == "bf16" else ["default", "codes_kernel"]
                if not quick and fmt != "bf16" and rows == max(sizes["rows"]):
                    choices += GMM_SWEEP
                for cfg in choices:
                    _gmm_row(base, _gmm_fn(fmt, cfg, gs, rows, interpret, rhs), lhs, rhs, want, cfg)


def _gmm_row(base: dict, fn, lhs, rhs, want, cfg) -> None:
    rows, k = lhs.shape
    tiles = list(cfg) if isinstance(cfg, tuple) else cfg
    try:
        got = fn(lhs, rhs)
        us = timed(fn, lhs, rhs, repeats=10) * 1e6  # ms-long: wall time will do
    except Exception as err:  # noqa: BLE001 (a configuration that does not compile)
        emit({**base, "tiles": tiles, "error": str(err)[:300]})
        return
    emit(
        {
            **base,
            "tiles": tiles,
            "rel_err_vs_f32": rel_err(got, want),
            "us": us,
            "TFLOPs": 2 * rows * k * base["N"] / us / 1e6,
            "weight_GBps": stored(rhs) / us / 1e3,
        }
    )


def _gmm_fn(fmt: str, cfg, gs, rows: int, interpret: bool, rhs):
    """The jitted grouped matmul of a format: "default" (gmm_quant.gmm, which dequantizes for
    the bf16 kernel from DEQUANTIZE_ROWS rows), "codes_kernel" (the kernel reading codes, its
    default tiles) or explicit tiles (block_m, block_n, block_k, group_m, warps, stages)."""
    if fmt == "bf16":
        return jax.jit(lambda x, w: gmm_pallas.gmm(x, w, gs, interpret))
    if cfg == "default":
        return jax.jit(lambda x, w: gmm_quant.gmm(x, w, gs, interpret))
    base = None if cfg == "codes_kernel" else gmm_pallas.Tiles(*cfg)
    tiles = gmm_quant.tiles_for(rhs, rows, 2, base=base)
    return jax.jit(
        lambda x, w: gmm_pallas._gmm_call(
            jnp.pad(x, ((0, -rows % tiles.block_m), (0, 0))), w, gs, tiles, False, interpret
        )[:rows]
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,64")
    p.add_argument("--parts", default="experts,projection,gmm")
    p.add_argument("--quick", action="store_true", help="default tiles only (no sweep)")
    p.add_argument("--small", action="store_true", help="tiny widths: this script's logic")
    p.add_argument("--dequant", default="auto", help="weight_tiles.DEQUANT values, in turn")
    args = p.parse_args()
    bad = [d for d in args.dequant.split(",") if d not in weight_tiles.DEQUANT_CHOICES]
    if bad:
        p.error(f"--dequant {bad[0]!r}: must be one of {', '.join(weight_tiles.DEQUANT_CHOICES)}")
    sizes = SMALL if args.small else FULL
    interpret = not on_gpu()
    tokens = [int(t) for t in args.tokens.split(",")]
    parts = args.parts.split(",")
    for i, dequant in enumerate(args.dequant.split(",")):
        if dequant == "ptx" and interpret:
            emit({"dequant": dequant, "skipped": "inline PTX runs on the GPU only"})
            continue
        weight_tiles.DEQUANT = dequant
        formats = FORMATS if i == 0 else tuple(f for f in FORMATS if f != "bf16")
        if "experts" in parts:
            experts_part(sizes, tokens, args.quick, interpret, formats)
        if "projection" in parts:
            projection_part(sizes, tokens, args.quick, interpret, formats)
        if "gmm" in parts:
            gmm_part(sizes, args.quick, interpret, formats)
    write_json("quant_decode_tiles.json", {"env": environment(), "sizes": sizes, "rows": LINES})


if __name__ == "__main__":
    main()
