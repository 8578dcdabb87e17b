"""One Mixtral 8x7B expert layer at decode sizes (1-8 tokens): moe_gathered, moe_dropless with
the Pallas grouped matmul and with ragged_dot, against the bandwidth floor of the experts used.

Floor: bytes of the k chosen experts' three matrices / copy bandwidth measured in the same run.
Run: python -m bench.moe_decode  (writes $OUT/moe_decode.json when OUT is set)
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops


def timed(fn, *args, reps=50):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def main():
    d, f, e, k, dt = 4096, 14336, 8, 2, jnp.bfloat16
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    w = [
        jax.random.normal(keys[i], s, dt) * 0.02
        for i, s in ((0, (e, d, f)), (1, (e, d, f)), (2, (e, f, d)))
    ]
    router = jax.random.normal(keys[3], (d, e), dt)
    res = {"jax": jax.__version__, "device": str(jax.devices()[0])}
    paths = (
        ("gathered", moe_local.moe_gathered),
        ("dropless", lambda *a: moe_local.moe_dropless(*a, gmm_impl="xla")),
        ("pallas", lambda *a: moe_local.moe_dropless(*a, gmm_impl="pallas")),
    )
    sizes = (1, 2, 3, 8)
    for m in sizes:
        x = jax.random.normal(keys[4], (m, d), dt)
        fns = {
            name: jax.jit(lambda x, a, b, c, fn=fn: fn(x, moe_ops.route(x, router, k), a, b, c)[0])
            for name, fn in paths
        }
        outs = {n: np.asarray(fn(x, *w), np.float32) for n, fn in fns.items()}
        err = max(
            float(np.max(np.abs(outs[n] - outs["dropless"])) / np.max(np.abs(outs["dropless"])))
            for n in ("gathered", "pallas")
        )
        times = {n: timed(fn, x, *w) for n, fn in fns.items()}
        chosen = len(set(np.asarray(moe_ops.route(x, router, k).experts).ravel().tolist()))
        res[f"M={m}"] = {
            "ms": {n: t * 1e3 for n, t in times.items()},
            "rel_err": err,
            "distinct_experts": chosen,
        }
    # Copy bandwidth in the same run: read+write one expert-sized bf16 array.
    a = w[0]
    copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    bw = 2 * a.nbytes / timed(copy, a)
    res["copy_GBps"] = bw / 1e9
    for m in sizes:
        r = res[f"M={m}"]
        floor = r["distinct_experts"] * 3 * d * f * 2 / bw
        r["floor_ms"] = floor * 1e3
        for name, _ in paths:
            r[f"{name}_pct_of_floor"] = 100 * floor / (r["ms"][name] / 1e3)
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "moe_decode.json"), "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
