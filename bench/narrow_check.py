"""On the GPU: the train step with narrow expert gradients (`step.narrowed_names`: Pallas' tgmm
writes them in bfloat16) equals the step differentiating the float32 parameters, bit for bit.

  PYTHONPATH=. python3 bench/narrow_check.py [--layers 2] [--steps 3] [--loop scan|unrolled]

A mid-size model (D 1024, F 3584, 8 experts, vocab 32000; bf16 compute, float32 parameters,
dropless through the plan's kernels), batch 4 x 512 of random tokens, the same steps from the
same start with `narrow_gradients` on and off. Prints and writes ($OUT/narrow_check.json) per
leaf whether parameters and optimizer moments are bitwise equal after every step, the narrowed
names and the kernel plan. The CPU suite checks the same through megablox
(tests/train/test_narrow_gradients.py); this is the check through the GPU's own kernels.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mixtral_jax as mj
from bench.common import environment, synthetic_batch, write_json
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.parallel import sharding
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import (
    init_state,
    make_optimizer,
    make_train_step,
    narrowed_names,
    state_shardings,
)


def run(cfg, tc, narrow: bool, steps: int, batch) -> list:
    model = mj.init(cfg, 0)
    graphdef, params = nnx.graphdef(model), mj.get_params(model)
    del model
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    tx = make_optimizer(tc, params)
    state = init_state(params, tx, 0)
    step = make_train_step(
        graphdef,
        tx,
        tc,
        mesh=mesh,
        shardings=state_shardings(state.params, tx, mesh),
        narrow_gradients=narrow,
    )
    out = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        out.append(jax.tree.map(np.asarray, (state.params, state.opt_state, metrics)))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--loop", default="scan", choices=("scan", "unrolled"))
    args = p.parse_args()
    cfg = mj.ModelConfig(
        vocab_size=32000,
        embed_dim=1024,
        hidden_dim=3584,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=128,
        num_experts=8,
        num_experts_per_tok=2,
        compute=mj.ComputeConfig(dtype="bfloat16", param_dtype="float32", layer_loop=args.loop),
    )
    tc = TrainConfig(steps=100, batch_size=4, seq_len=512, warmup_steps=0, lr=1e-3)
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg.vocab_size, 4, 512))
    plan = kernel_plan.resolve(cfg, 4 * 512, cached=False)
    narrow = run(cfg, tc, True, args.steps, batch)
    wide = run(cfg, tc, False, args.steps, batch)
    rows, all_equal = [], True
    for i, (a, b) in enumerate(zip(narrow, wide)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            equal = x.dtype == y.dtype and x.tobytes() == y.tobytes()
            all_equal &= equal
            if not equal or i == len(narrow) - 1:
                diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
                rows.append(
                    {
                        "step": i + 1,
                        "leaf": jax.tree_util.keystr(path),
                        "equal": equal,
                        "diff": diff,
                    }
                )
    for r in rows:
        print(r)
    result = {
        "env": environment(),
        "plan": str(plan),
        "narrowed": sorted(narrowed_names(plan)),
        "loop": args.loop,
        "bitwise_equal": all_equal,
        "leaves": rows,
    }
    print(f"narrowed {result['narrowed']}; every leaf bitwise equal: {all_equal}")
    write_json(f"narrow_check_{args.loop}.json", result)


if __name__ == "__main__":
    main()
