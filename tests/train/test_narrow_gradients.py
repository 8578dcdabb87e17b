"""The train step differentiates with respect to bfloat16 casts of the expert weights where
the grouped matmul is a kernel writing their gradient in bfloat16 (`step.narrowed_names`), and
carries those gradients narrow. Against the oracle (the same step differentiating the float32
parameters): state and metrics after every step equal bit for bit, through megablox (the
interpreted kernel here; Pallas' tgmm on the GPU writes its gradient the same way: checked
there by bench/narrow_check.py), scanned and unrolled layers, with and without gradient
accumulation, and with a frozen part."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.parallel import sharding
from mixtral_jax.train import trainable
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import (
    cast_named,
    init_state,
    make_optimizer,
    make_train_step,
    narrowed_names,
    split_micro_batches,
    state_shardings,
)

MEGABLOX = {"dtype": "bfloat16", "param_dtype": "float32", "gmm_impl": "megablox"}


def _batches(cfg, tc, steps):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        tokens = rng.integers(0, cfg.vocab_size, (tc.batch_size, tc.seq_len + 1)).astype(np.int32)
        batch = {
            "tokens": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "positions": np.broadcast_to(
                np.arange(tc.seq_len, dtype=np.int32), tokens[:, 1:].shape
            ),
            "segment_ids": np.ones_like(tokens[:, 1:]),
            "loss_mask": np.ones(tokens[:, 1:].shape, np.float32),
        }
        out.append(jax.tree.map(jnp.asarray, split_micro_batches(batch, tc.grad_accum)))
    return out


def _run(cfg, tc, narrow, part=None, steps=2):
    """(host params, optimizer state, metrics) after each of `steps` steps from one start;
    `part`: a trainable.Partition (the rest frozen)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    params = mj.get_params(mj.init(cfg, 0))
    graphdef, frozen = nnx.graphdef(mj.abstract(cfg)), None
    if part is not None:
        graphdef = nnx.graphdef(trainable.abstract_model(cfg, part))
        frozen = (part, params)
        params = part.train_part(params, cfg, seed=1)
    tx = make_optimizer(tc, params)
    state = init_state(params, tx, 0)
    step = make_train_step(
        graphdef,
        tx,
        tc,
        mesh=mesh,
        shardings=state_shardings(state.params, tx, mesh),
        frozen=frozen,
        narrow_gradients=narrow,
    )
    history = []
    for batch in _batches(cfg, tc, steps):
        state, metrics = step(state, batch)
        history.append(jax.tree.map(np.asarray, (state.params, state.opt_state, metrics)))
    return history


def _assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_narrow_gradients_equal_float32_differentiation_bit_for_bit():
    """Scanned layers, no accumulation: the narrow gradients reach the guard's cond as they are."""
    cfg = mj.ModelConfig.tiny(num_layers=2, **MEGABLOX)
    tc = TrainConfig(batch_size=4, seq_len=8, warmup_steps=0, lr=3e-3)
    _assert_bitwise(_run(cfg, tc, narrow=True), _run(cfg, tc, narrow=False))


def test_narrow_gradients_unrolled_accumulated_with_a_frozen_part_bit_for_bit():
    """Unrolled layers, two micro-batches accumulated (float32 accumulator plus bfloat16
    gradients), one expert's rows of w_gate training (a narrowed leaf viewed by rows) and the
    LM head, the rest frozen."""
    cfg = mj.ModelConfig.tiny(num_layers=1, layer_loop="unrolled", **MEGABLOX)
    rows = trainable.select(mj.param_shapes(cfg), ("layers.0.moe.experts[1].w_gate", "lm_head"))
    part = trainable.Partition(lcfg=None, rows=rows)
    tc = TrainConfig(batch_size=4, seq_len=8, warmup_steps=0, grad_accum=2, lr=3e-3)
    _assert_bitwise(_run(cfg, tc, narrow=True, part=part), _run(cfg, tc, narrow=False, part=part))


def test_only_kernel_written_expert_gradients_are_narrowed():
    cfg = mj.ModelConfig.tiny(num_layers=1, **MEGABLOX)
    params = mj.get_params(mj.init(cfg, 0))

    def narrowed(changes, dtype=jnp.bfloat16):
        plan = kernel_plan.resolve(cfg.replace(**changes), 64, cached=False)
        tree = cast_named(params, dtype, narrowed_names(plan))
        return {
            "/".join(getattr(k, "key", str(k)) for k in path)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if x.dtype != jnp.float32
        }

    assert narrowed({}) == {f"layers/moe/{n}" for n in ("w_gate", "w_up", "w_down")}
    assert narrowed({}, jnp.float32) == set()  # float32 compute: nothing to narrow
    assert narrowed({"gmm_impl": "xla"}) == set()  # ragged_dot: an XLA op
    assert narrowed({"moe_impl": "capacity"}) == set()  # einsums
    # expert parallelism: the ragged exchange runs the kernel, the capacity one einsums
    mesh = sharding.make_mesh(sharding.MeshConfig.parse("expert=2"), jax.devices()[:2])
    for exchange, want in (("ragged_emulated", 3), ("capacity", 0)):
        plan = kernel_plan.resolve(
            cfg.replace(expert_exchange=exchange), 64, cached=False, mesh=mesh
        )
        assert plan.expert_mesh is not None and len(narrowed_names(plan)) == want
