"""Issue 3's equivalence check on real devices (2 or 4 GPUs): the sharded model equals one device.

  PYTHONPATH=. python bench/mesh_check.py            # every mesh that fits the local devices
  PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
      python bench/mesh_check.py                      # the same on fake CPU devices

For each mesh: parameters created sharded equal model.init's, every parameter's sharding equals
the rules table, and the float32 forward logits and gradients (CE + load-balancing loss, MoE
expert-parallel under the mesh) equal the single-device result within 1e-5 (relative to each
tensor's largest value). Prints a table and writes $OUT/mesh_check.json; exits 1 on a failure.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from bench.common import environment, write_json
from mixtral_jax.parallel import sharding as sh


def meshes(n: int) -> list[str]:
    out = [f"data={n}", f"expert={n}", f"fsdp={n}", f"tensor={n}"]
    if n >= 4:
        out += [f"expert={n // 2},data=2", f"fsdp={n // 2},tensor=2"]
    if n >= 16:
        out.append(f"data=2,fsdp=2,expert={n // 8},tensor=2")
    return out


def loss_fn(cfg, params, tokens):
    out = mj.from_params(cfg, params)(tokens)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return jnp.mean(nll) + cfg.router_aux_loss_coef * out.aux.load_balance_loss, out.logits


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def main():
    jax.config.update("jax_default_matmul_precision", "highest")
    n = jax.device_count()
    cfg = mj.ModelConfig.tiny(num_experts=max(4, n), moe_impl="dropless")
    params = mj.get_params(mj.init(cfg, seed=3))
    tokens = jax.random.randint(jax.random.key(0), (4 * n, 16), 0, cfg.vocab_size)
    grad = jax.value_and_grad(lambda p, t: loss_fn(cfg, p, t), has_aux=True)
    one = jax.devices()[0]
    (_, logits_1), grads_1 = jax.jit(grad)(*jax.device_put((params, tokens), one))
    rows, ok = [], True
    for spec in meshes(n):
        mesh = sh.make_mesh(sh.MeshConfig.parse(spec))
        sharded = mj.init_params(cfg, mesh, seed=3)
        want = sh.param_shardings(mj.param_shapes(cfg), mesh)
        placed = all(
            x.sharding.is_equivalent_to(w, x.ndim)
            for x, w in zip(jax.tree.leaves(sharded), jax.tree.leaves(want))
        )
        init_err = max(
            max_rel(x, y) for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(params))
        )
        with sh.active(mesh):
            step = jax.jit(lambda p, t: grad(p, t))  # fresh trace inside the mesh context
            (_, logits), grads = step(sharded, jax.device_put(tokens, sh.batch_sharding(mesh)))
        logit_err = max_rel(logits, logits_1)
        grad_err = max(
            max_rel(g, g1) for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1))
        )
        passed = placed and init_err <= 1e-6 and logit_err <= 1e-5 and grad_err <= 1e-5
        ok &= passed
        rows.append(
            {
                "mesh": spec,
                "shardings_match_rules": placed,
                "init_rel_err": init_err,
                "logits_rel_err": logit_err,
                "grads_rel_err": grad_err,
                "pass": passed,
            }
        )
        print(rows[-1], flush=True)
    write_json("mesh_check.json", {"env": environment(), "rows": rows})
    print(f"\n{n} devices ({jax.devices()[0].device_kind})")
    print(f"{'mesh':>28} {'rules':>6} {'logits err':>11} {'grads err':>10} {'':>5}")
    for r in rows:
        print(
            f"{r['mesh']:>28} {r['shardings_match_rules']!s:>6} {r['logits_rel_err']:>11.1e} "
            f"{r['grads_rel_err']:>10.1e} {'PASS' if r['pass'] else 'FAIL':>5}"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
