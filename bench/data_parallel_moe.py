"""Issue 17 part 2 on real devices: a Pallas dropless MoE layer on a mesh without an expert axis
runs per device (`moe/data_parallel.py`) instead of on every device's copy of the whole batch.

  PYTHONPATH=. python bench/data_parallel_moe.py            # 2+ NVIDIA GPUs: gmm pallas
  PYTHONPATH=. python bench/data_parallel_moe.py --tiny     # 4 fake CPU devices, megablox
                                                            # interpreted (what CI can run)

For each mesh (data=N, fsdp=N over the N local devices) two phases:
  check  small widths, float32: the MoE layer's forward, aux losses and gradients (x, every
         parameter) on the mesh against the one-device dense oracle: max relative error.
  time   the 8x7B layer (D=4096, F=14336, E=8, top-2, bf16; --tokens per device) forward +
         backward, per device against the global path (the plan's token_mesh cleared:
         today's behaviour), median ms; and the largest row count of a grouped-matmul
         result in each compiled program (per device: ~ tokens*k; global: N times that).
Prints one line per mesh and phase; writes $OUT/data_parallel_moe.json; exits 1 when a
check exceeds 1e-5 (float32). --tiny runs both phases at tiny widths.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mixtral_jax as mj
from bench.common import environment, timed, write_json
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.model import moe as moe_block
from mixtral_jax.parallel import sharding as sh

SMALL = {"embed_dim": 64, "hidden_dim": 128, "num_experts": 8, "num_experts_per_tok": 2}
FULL = {"embed_dim": 4096, "hidden_dim": 14336, "num_experts": 8, "num_experts_per_tok": 2}


def _layer(cfg, mesh, seed=0):
    """The MoE block with its expert weights FSDP-sharded by the rules table."""
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(seed))
    block.router[...] = block.router[...] * 10.0
    graphdef, state = nnx.split(block)
    names = {"router": ("embed", "experts_logits"), "w_down": ("experts", "mlp", "embed")}

    def place(path, leaf):
        keys = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
        axes = next((v for k, v in names.items() if k in keys), ("experts", "embed", "mlp"))
        return NamedSharding(mesh, sh.logical_spec(mesh, leaf.shape, axes))

    return graphdef, jax.device_put(state, jax.tree_util.tree_map_with_path(place, state))


def _step(graphdef, plan):
    def loss(state, x, probe):
        out, aux = nnx.merge(graphdef, state)(x, plan=plan)
        value = jnp.sum(out.astype(jnp.float32) * probe)
        return value + aux.load_balance_loss + aux.router_z_loss, out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _gmm_rows(compiled_text: str, d: int, f: int) -> int:
    """Largest leading dimension of a 2-D result [rows, D or F] of the kernels' calls (custom
    calls on GPU; interpreted kernels are loops, so on CPU: any op's 2-D result of width F)."""
    rows = 0
    for line in compiled_text.splitlines():
        if "custom-call" not in line and "dynamic-update-slice" not in line:
            continue
        for m in re.finditer(r"\[(\d+),(\d+)\]", line.split("=")[1] if "=" in line else line):
            r, w = int(m.group(1)), int(m.group(2))
            if w in (d, f) and r > rows:
                rows = r
                break
    return rows


def _inputs(cfg, mesh, tokens, dtype):
    x = jax.random.normal(jax.random.key(1), (1, tokens, cfg.embed_dim), dtype)
    probe = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    rows = sh.batch_sharding(mesh, 2, leading=0)
    spec = NamedSharding(mesh, P(None, rows.spec[0]))
    return jax.device_put(x, spec), jax.device_put(probe, spec)


def check(spec, n, tiny):
    cfg = mj.ModelConfig.tiny(**SMALL, gmm_impl="megablox" if tiny else "auto")
    mesh = sh.make_mesh(sh.MeshConfig.parse(spec), jax.devices()[:n])
    graphdef, state = _layer(cfg, mesh)
    x, probe = _inputs(cfg, mesh, 64 * n, jnp.float32)
    plan = kernel_plan.resolve(cfg, 64 * n, cached=False, mesh=mesh)
    assert plan.token_mesh is mesh, f"{spec}: the plan does not run per device"
    (_, got), g_got = _step(graphdef, plan)(state, x, probe)
    one = jax.devices()[0]
    dense_cfg = cfg.replace(moe_impl="dense", gmm_impl="xla")
    dense = kernel_plan.resolve(dense_cfg, 64 * n, cached=False, mesh=None)
    local = jax.device_put((state, x, probe), one)
    (_, want), g_want = _step(graphdef, dense)(*local)
    errs = [
        float(
            np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) + 1e-30)
        )
        for a, b in zip(jax.tree.leaves((got, g_got)), jax.tree.leaves((want, g_want)), strict=True)
    ]
    return {"mesh": spec, "phase": "check", "max_rel_err": max(errs), "ok": max(errs) <= 1e-5}


def time_layer(spec, n, tiny, tokens, repeats):
    widths = SMALL if tiny else FULL
    dtype = "float32" if tiny else "bfloat16"
    gmm = "megablox" if tiny else "auto"
    cfg = mj.ModelConfig.tiny(**widths, gmm_impl=gmm, dtype=dtype, param_dtype=dtype)
    mesh = sh.make_mesh(sh.MeshConfig.parse(spec), jax.devices()[:n])
    graphdef, state = _layer(cfg, mesh)
    x, probe = _inputs(cfg, mesh, tokens * n, jnp.dtype(dtype))
    plan = kernel_plan.resolve(cfg, tokens * n, cached=False, mesh=mesh)
    row = {"mesh": spec, "phase": "time", "tokens_per_device": tokens, "gmm": plan.grouped_matmul}
    for name, p in (("per_device", plan), ("global", dataclasses.replace(plan, token_mesh=None))):
        step = _step(graphdef, p)
        compiled = step.lower(state, x, probe).compile()
        row[f"{name}_ms"] = 1e3 * timed(compiled, state, x, probe, repeats=repeats)
        row[f"{name}_gmm_rows"] = _gmm_rows(compiled.as_text(), cfg.embed_dim, cfg.hidden_dim)
        row[f"{name}_all_gathers"] = compiled.as_text().count(" all-gather(")
    row["gmm"] = row["gmm"].value
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="4 fake CPU devices, tiny widths")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per device (time phase)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    n = min(jax.device_count(), 4) if args.tiny else jax.device_count()
    if n < 2:
        sys.exit(f"needs 2 or more devices, found {jax.device_count()}")
    tokens = 32 if args.tiny else args.tokens
    rows = []
    for spec in (f"data={n}", f"fsdp={n}"):
        with jax.default_matmul_precision("highest"):  # the float32 check only
            rows.append(check(spec, n, args.tiny))
        rows.append(time_layer(spec, n, args.tiny, tokens, args.repeats))
        for r in rows[-2:]:
            print(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                )
            )
    write_json("data_parallel_moe.json", {"environment": environment(), "rows": rows})
    if not all(r["ok"] for r in rows if r["phase"] == "check"):
        sys.exit(1)


if __name__ == "__main__":
    main()
