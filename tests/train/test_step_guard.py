"""The compiled train step: the numerics guard, gradient clipping, the weight-decay mask and the
router z-loss, each checked so that removing it makes a test fail."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.train import data, trainer
from mixtral_jax.train.config import TrainConfig, load_run_config
from mixtral_jax.train.step import (
    init_state,
    make_optimizer,
    make_train_step,
    split_micro_batches,
    state_shardings,
)


def _setup(tx=None, **train):
    """(train config, graphdef, optimizer, state) of a 1-layer tiny model (V=64)."""
    tc = TrainConfig(batch_size=4, seq_len=24, warmup_steps=0, **train)
    model = mj.init(mj.ModelConfig.tiny(num_layers=1, vocab_size=64), 0)
    params = mj.get_params(model)
    tx = tx if tx is not None else make_optimizer(tc, params)
    return tc, nnx.graphdef(model), tx, init_state(params, tx, 0)


def _step(graphdef, tx, tc, state, batch=None):
    """One step on the 1x1x1x1 mesh: (new state, metrics); the input state is donated."""
    mesh = trainer.make_run_mesh(load_run_config(None))
    step = make_train_step(
        graphdef, tx, tc, mesh=mesh, shardings=state_shardings(state.params, tx, mesh)
    )
    batch = _batch() if batch is None else batch
    return step(state, jax.tree.map(jnp.asarray, split_micro_batches(batch, tc.grad_accum)))


def _batch(seed=0):
    rows = data.pack(
        [np.random.default_rng(seed + i).integers(3, 64, 40).astype(np.int32) for i in range(6)],
        24,
        seed,
    )
    return data.make_batch(rows, np.arange(4))


def _host(tree):
    return jax.tree.map(np.array, tree)


def _assert_rejected(state, m, before):
    assert not bool(m["finite"]) and int(state.bad_steps) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, _host(state.params), before)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host(state.params)))


def test_update_that_overflows_is_rejected_though_loss_and_gradient_are_finite():
    """lr 1e39 is inf in float32: loss and gradient norm are finite, the update is not."""
    tc, graphdef, tx, state = _setup(tx=optax.sgd(1e39))
    before = _host(state.params)
    state, m = _step(graphdef, tx, tc, state)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    _assert_rejected(state, m, before)


def test_non_finite_optimizer_state_is_rejected():
    """An update that leaves the parameters finite but poisons the optimizer state."""

    def update(grads, count, params=None):
        return jax.tree.map(jnp.zeros_like, grads), count + jnp.inf

    tx = optax.GradientTransformation(lambda p: jnp.zeros((), jnp.float32), update)
    tc, graphdef, tx, state = _setup(tx=tx)
    before = _host(state.params)
    state, m = _step(graphdef, tx, tc, state)
    _assert_rejected(state, m, before)
    assert float(state.opt_state) == 0.0  # the poisoned state was not kept


def test_gradient_norm_overflow_is_rejected_though_the_update_is_finite():
    """A huge (finite) loss weight: loss and every gradient finite, their squared sum overflows,
    clipping then zeroes the update. Only the gradient-norm check rejects this step."""
    tc, graphdef, tx, state = _setup(aux_loss_coef=1e30, router_z_loss_coef=0.0)
    before = _host(state.params)
    state, m = _step(graphdef, tx, tc, state)
    assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))
    _assert_rejected(state, m, before)


def _tree(value):
    """A params-like tree: a matrix, a norm scale, the embedding (every leaf = value)."""
    return {
        "embed": {"embedding": jnp.full((4, 3), value)},
        "layers": {"attn": {"wq": jnp.full((3, 3), value)}},
        "final_norm": {"scale": jnp.full((3,), value)},
    }


def test_gradients_are_clipped_to_clip_norm():
    """AdamW with eps=1 is not scale-invariant: the update is -lr * g / (|g| + 1) for the
    clipped g of the first step."""
    tc = TrainConfig(warmup_steps=0, lr=1.0, eps=1.0, weight_decay=0.0, clip_norm=0.5)
    params = _tree(0.0)
    tx = make_optimizer(tc, params)
    grads = _tree(10.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = float(optax.tree.norm(grads))
    g = 10.0 * 0.5 / norm  # every entry after clipping to norm 0.5
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_allclose(leaf, -g / (g + 1.0), rtol=1e-5)


@pytest.mark.parametrize("decay_everything", [False, True])
def test_weight_decay_skips_norm_scales_and_the_embedding(decay_everything):
    """With zero gradients only decay moves a weight: matrices shrink, norm scales and the
    embedding stay unless decay_norms_and_embeddings."""
    tc = TrainConfig(
        warmup_steps=0, lr=0.5, weight_decay=0.1, decay_norms_and_embeddings=decay_everything
    )
    params = _tree(1.0)
    tx = make_optimizer(tc, params)
    updates, _ = tx.update(_tree(0.0), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["layers"]["attn"]["wq"], 1.0 - 0.5 * 0.1)
    kept = 1.0 - 0.5 * 0.1 if decay_everything else 1.0
    np.testing.assert_allclose(new["final_norm"]["scale"], kept)
    np.testing.assert_allclose(new["embed"]["embedding"], kept)


def test_router_z_loss_is_in_the_loss_and_its_gradient():
    """loss = CE + aux * load balance + z_coef * z-loss, and the z term moves the weights."""
    results = []
    for z_coef in (0.0, 10.0):
        tc, graphdef, tx, state = _setup(aux_loss_coef=0.5, router_z_loss_coef=z_coef)
        state, m = _step(graphdef, tx, tc, state)
        want = (
            float(m["ce"])
            + 0.5 * float(m["load_balance_loss"])
            + z_coef * float(m["router_z_loss"])
        )
        assert float(m["router_z_loss"]) > 0
        np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-6)
        results.append(_host(state.params))
    router = [r["layers"]["moe"]["router"] for r in results]
    assert np.abs(router[1] - router[0]).max() > 1e-4
