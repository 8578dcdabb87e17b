"""The attention projections of a serving step (hundreds of rows) through `project_stacked`,
against XLA's matmul of the same layer: tile and row-tile choices, timed whole (the kernel and
the XLA sum of its split-K partials).

  PYTHONPATH=. python bench/projection_rows.py [--tokens 128,256,512] [--device-time] [--wide]

8x7B widths, bf16, a stack of 4 layers read at a traced layer (as inside the layer scan): q, k,
v in one launch from x [M, 4096], then o. Beside each kernel choice: `xla_slice` (x @
w[layer], XLA's dynamic slice then its matmul: what the scan's slices cost) and `xla_static`
(x @ w of an unstacked weight: the dense matmul alone). Reports us, TFLOP/s, and weight bytes
/ time. --device-time: the calls' kernel time from the profiler (busy time, no dispatch);
--wide: more tile choices. Writes $OUT/projection_rows.json.

  PYTHONPATH=. JAX_PLATFORMS=cpu python bench/projection_rows.py --small   # the code path
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.common import environment, kernel_summary, timed, trace_kernels, write_json
from mixtral_jax.kernels import decode_matmul as dm
from mixtral_jax.kernels.common import DecodeTiles

LAYERS = 4
# (row_tile, DecodeTiles fields: block_n, block_k, splits, num_warps, num_stages); None: default
SWEEP = [
    None,
    (64, (64, 128, 4, 4, 4)),  # the decode tiles (before ROWS)
    (64, (128, 64, 1, 4, 4)),
    (64, (128, 128, 1, 4, 3)),
    (64, (64, 128, 1, 4, 4)),
    (64, (128, 64, 2, 4, 4)),
    (128, (128, 64, 1, 4, 3)),
    (128, (128, 64, 1, 8, 3)),
    (128, (64, 64, 1, 4, 4)),
    (128, (256, 64, 1, 8, 3)),
    (256, (128, 64, 1, 8, 3)),
]
# --wide: more choices at 256 rows, timed by the profiler (whole calls' wall time hid ~100 us
# of dispatch under every choice: 157 us whole against ~64 us of kernels in the engine's step)
WIDE_SWEEP = [
    (64, (128, 64, 1, 8, 4)),
    (64, (128, 64, 1, 4, 3)),
    (64, (128, 64, 1, 4, 5)),
    (64, (128, 32, 1, 4, 6)),
    (64, (256, 64, 1, 8, 3)),
    (64, (64, 64, 1, 4, 4)),
    (64, (128, 128, 1, 8, 3)),
    (128, (128, 64, 1, 8, 4)),
    (128, (128, 32, 1, 8, 5)),
    (128, (64, 128, 1, 4, 3)),
    (128, (256, 32, 1, 8, 4)),
    (128, (64, 64, 1, 8, 4)),
    (256, (64, 64, 1, 8, 3)),
    (256, (64, 64, 1, 4, 3)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="128,256,512")
    p.add_argument("--small", action="store_true", help="tiny widths on CPU (interpret mode)")
    p.add_argument(
        "--device-time",
        action="store_true",
        help="kernel time from the profiler (busy time of each call), not whole calls",
    )
    p.add_argument("--wide", action="store_true", help="also WIDE_SWEEP's choices")
    args = p.parse_args()
    sweep = SWEEP + (WIDE_SWEEP if args.wide else [])

    def seconds_of(fn, *a, repeats):
        if not args.device_time:
            return timed(fn, *a, repeats=repeats)
        summary = kernel_summary(trace_kernels(lambda: fn(*a), reps=repeats), per=repeats)
        # no GPU kernels in the trace (the CPU): whole calls instead
        return summary["busy_us"] * 1e-6 or timed(fn, *a, repeats=repeats)

    d, kv = (64, 32) if args.small else (4096, 1024)
    interpret = args.small
    keys = jax.random.split(jax.random.key(0), 5)
    shapes = {"q": (LAYERS, d, d), "k": (LAYERS, d, kv), "v": (LAYERS, d, kv), "o": (LAYERS, d, d)}
    w = {n: 0.02 * jax.random.normal(k, s, jnp.bfloat16) for k, (n, s) in zip(keys, shapes.items())}
    weight_bytes = sum(x.nbytes for x in w.values()) / LAYERS
    params = sum(x.size for x in w.values()) / LAYERS
    rows = []

    def emit(row):
        rows.append(row)
        print(row, flush=True)

    for m in (int(t) for t in args.tokens.split(",")):
        x = jax.random.normal(keys[4], (m, d), jnp.bfloat16)
        flops = 2 * m * params

        def report(name, seconds, m=m, flops=flops, **extra):
            emit(
                {
                    "tokens": m,
                    "path": name,
                    **extra,
                    "us": round(seconds * 1e6, 2),
                    "tflops": round(flops / seconds / 1e12, 1),
                    "weight_tbs": round(weight_bytes / seconds / 1e12, 3),
                }
            )

        want = None
        for cfg in sweep:
            row_tile, tiles = (None, None) if cfg is None else (cfg[0], DecodeTiles(*cfg[1]))
            fn = jax.jit(
                lambda x, layer, q, k, v, o, tiles=tiles, row_tile=row_tile: (
                    *dm.project_stacked(
                        x, (q, k, v), layer, tiles=tiles, row_tile=row_tile, interpret=interpret
                    ),
                    *dm.project_stacked(
                        x, (o,), layer, tiles=tiles, row_tile=row_tile, interpret=interpret
                    ),
                )
            )
            try:
                got = fn(x, jnp.int32(1), *w.values())
                if want is None:
                    want = [x.astype(jnp.float32) @ w[n][1].astype(jnp.float32) for n in "qkvo"]
                err = max(
                    float(jnp.max(jnp.abs(g.astype(jnp.float32) - t)) / jnp.max(jnp.abs(t)))
                    for g, t in zip(got, want)
                )
                seconds = seconds_of(
                    fn, x, jnp.int32(1), *w.values(), repeats=3 if interpret else 20
                )
            except Exception as error:  # noqa: BLE001 (a choice that does not compile)
                emit({"tokens": m, "path": "kernel", "cfg": cfg, "error": str(error)[:300]})
                continue
            report("kernel", seconds, cfg=cfg or "default", rel_err=err)

        sliced = jax.jit(lambda x, layer, q, k, v, o: [x @ s[layer] for s in (q, k, v, o)])
        report("xla_slice", seconds_of(sliced, x, jnp.int32(1), *w.values(), repeats=20))
        one = [s[1] for s in w.values()]
        static = jax.jit(lambda x, q, k, v, o: [x @ s for s in (q, k, v, o)])
        report("xla_static", seconds_of(static, x, *one, repeats=20))
    write_json("projection_rows.json", {"env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
