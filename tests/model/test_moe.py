"""The MoE block: every dispatch path against the dense oracle, capacity drops, router and aux maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.model import moe as moe_block
from mixtral_jax.moe import ops as moe_ops


def _moe_and_input(cfg, seed=0, tokens=(3, 7)):
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(seed))
    # Larger router weights than the init: decisive routing, so all paths pick the same experts.
    block.router[...] = block.router[...] * 20.0
    x = jax.random.normal(jax.random.key(seed + 1), (*tokens, cfg.embed_dim))
    return block, x


def _run(cfg, params, x, token_mask=None):
    """Forward and gradient (wrt params and x) of sum(out * fixed random) with `cfg.moe_impl`."""
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(0))
    nnx.update(block, params)
    graphdef, _ = nnx.split(block)
    probe = jax.random.normal(jax.random.key(9), x.shape)

    def loss(state, x):
        out, aux = nnx.merge(graphdef, state)(x, token_mask)
        return jnp.sum(out * probe) + aux.load_balance_loss + aux.router_z_loss, (out, aux)

    (_, (out, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return out, aux, grads


@pytest.mark.parametrize("impl,capacity_factor", [("dropless", 1.0), ("capacity", 4.0)])
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_dispatch_paths_equal_dense_oracle_forward_and_gradients(impl, capacity_factor, topk):
    cfg = mj.ModelConfig.tiny(num_experts=5, num_experts_per_tok=topk)
    block, x = _moe_and_input(cfg, seed=topk)
    params = nnx.state(block, nnx.Param)
    ref_out, ref_aux, ref_grads = _run(cfg.replace(moe_impl="dense"), params, x)
    out, aux, grads = _run(cfg.replace(moe_impl=impl, capacity_factor=capacity_factor), params, x)

    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * scale
    assert float(aux.dropped_fraction) == 0.0
    np.testing.assert_array_equal(aux.tokens_per_expert, ref_aux.tokens_per_expert)
    assert int(jnp.sum(aux.tokens_per_expert)) == 3 * 7 * topk


def test_capacity_drops_later_tokens_exactly():
    """Hand-built: 6 tokens, 2 experts, top-1; 5 tokens want expert 0, whose capacity is 2."""
    cfg = mj.ModelConfig.tiny(
        num_experts=2, num_experts_per_tok=1, moe_impl="capacity", capacity_factor=2 * 2 / 6
    )  # C = ceil(cf * 6 * 1 / 2) = 2
    assert cfg.capacity(6) == 2
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(0))
    d = cfg.embed_dim
    router = np.zeros((d, 2), np.float32)
    router[0, 0], router[1, 1] = 10.0, 10.0  # feature 0 -> expert 0, feature 1 -> expert 1
    block.router[...] = jnp.asarray(router)
    x = np.zeros((1, 6, d), np.float32)
    x[0, [0, 1, 2, 4, 5], 0] = 1.0  # tokens 0,1,2,4,5 -> expert 0
    x[0, 3, 1] = 1.0  # token 3 -> expert 1
    x[0, :, 2:] = np.random.default_rng(0).normal(size=(6, d - 2))
    out, aux = block(jnp.asarray(x))

    dense_block = moe_block.MoE(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(0))
    nnx.update(dense_block, nnx.state(block, nnx.Param))
    ref, _ = dense_block(jnp.asarray(x))
    kept = [0, 1, 3]  # first two of expert 0 (in token order) and the only one of expert 1
    dropped = [2, 4, 5]
    np.testing.assert_allclose(out[0, kept], ref[0, kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[0, dropped], 0.0)
    np.testing.assert_array_equal(aux.tokens_per_expert, [5, 1])
    assert float(aux.dropped_fraction) == pytest.approx(3 / 6)


def test_route_renormalises_and_breaks_ties_to_lower_index():
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 3.0, 2.0]], jnp.float32)
    # x = identity rows, router = logits: the router logits are exactly `logits`.
    routing = moe_ops.route(jnp.eye(2, dtype=jnp.float32), logits, 2)
    np.testing.assert_array_equal(routing.experts, [[0, 1], [1, 2]])
    np.testing.assert_allclose(routing.weights, [[0.5, 0.5], [0.5, 0.5]], rtol=1e-6)
    third = moe_ops.route(jnp.eye(2, dtype=jnp.float32), logits, 3)
    p = np.exp([3.0, 3.0, 2.0]) / np.exp([3.0, 3.0, 2.0]).sum()
    np.testing.assert_allclose(third.weights[1], p, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(third.weights, axis=-1), 1.0, rtol=1e-6)


def _aux_for_logits(logits, topk, mask=None):
    logits = jnp.asarray(logits, jnp.float32)
    routing = moe_ops.route(jnp.eye(logits.shape[0], dtype=jnp.float32), logits, topk)
    mask = jnp.ones(logits.shape[0]) if mask is None else jnp.asarray(mask, jnp.float32)
    return moe_block.routing_aux(routing, mask, jnp.zeros((), jnp.int32))


def test_balanced_router_gives_load_balance_loss_topk_and_skew_raises_it():
    num_experts, topk = 4, 2
    balanced = np.zeros((8, num_experts))
    for t in range(8):  # token t prefers experts t and t+1 (mod E): every expert equally loaded
        balanced[t, t % num_experts] = 5.0
        balanced[t, (t + 1) % num_experts] = 5.0
    aux = _aux_for_logits(balanced, topk)
    np.testing.assert_allclose(aux.expert_fraction, [0.5] * 4, rtol=1e-6)
    assert float(aux.load_balance_loss) == pytest.approx(2.0, rel=1e-6)

    skewed = np.zeros((8, num_experts))
    skewed[:, 0], skewed[:, 1] = 5.0, 4.0  # everyone picks experts 0 and 1
    skewed_aux = _aux_for_logits(skewed, topk)
    assert float(skewed_aux.load_balance_loss) > 2.5

    top1 = _aux_for_logits(np.eye(4)[np.arange(8) % 4] * 5.0, 1)
    assert float(top1.load_balance_loss) == pytest.approx(1.0, rel=1e-6)


def test_router_z_loss_and_statistics_ignore_masked_tokens():
    logits = np.random.default_rng(0).normal(size=(6, 4)) * 3
    mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
    aux = _aux_for_logits(logits, 2, mask)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(aux.router_z_loss) == pytest.approx(np.sum(lse**2 * mask) / mask.sum(), rel=1e-5)
    real = _aux_for_logits(logits[mask == 1], 2)
    np.testing.assert_array_equal(aux.tokens_per_expert, real.tokens_per_expert)
    np.testing.assert_allclose(aux.router_prob, real.router_prob, rtol=1e-6)
    assert float(aux.load_balance_loss) == pytest.approx(float(real.load_balance_loss), rel=1e-6)


def test_router_jitter_only_with_a_key_and_reproducible():
    cfg = mj.ModelConfig.tiny(router_jitter_noise=0.1)
    block, x = _moe_and_input(cfg)
    plain, _ = block(x)
    plain_again, _ = block(x, None, None)
    np.testing.assert_array_equal(plain, plain_again)
    noisy, _ = block(x, None, jax.random.key(3))
    noisy_again, _ = block(x, None, jax.random.key(3))
    np.testing.assert_array_equal(noisy, noisy_again)
    assert float(jnp.max(jnp.abs(noisy - plain))) > 1e-3
    no_jitter_cfg = cfg.replace(router_jitter_noise=0.0)
    quiet = moe_block.MoE(no_jitter_cfg, rngs=nnx.Rngs(0))
    nnx.update(quiet, nnx.state(block, nnx.Param))
    np.testing.assert_array_equal(quiet(x, None, jax.random.key(3))[0], plain)


def test_sort_by_expert_is_stable_and_counts():
    experts = jnp.array([[2, 0], [0, 1], [2, 1]], jnp.int32)
    order, sizes = moe_ops.sort_by_expert(experts, 4)
    np.testing.assert_array_equal(order, [1, 2, 3, 5, 0, 4])
    np.testing.assert_array_equal(sizes, [2, 2, 2, 0])
