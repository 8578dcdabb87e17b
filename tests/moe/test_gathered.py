"""The few-token decode path of the MoE (moe_local.moe_gathered) against the dense oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.model import moe as moe_block
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops


@pytest.mark.parametrize("tokens,topk", [(1, 1), (1, 2), (3, 2)])
def test_gathered_equals_dense_oracle_forward_and_gradients(tokens, topk):
    d, f, e = 16, 24, 8
    keys = jax.random.split(jax.random.PRNGKey(tokens * 10 + topk), 5)
    x = jax.random.normal(keys[0], (tokens, d))
    router = jax.random.normal(keys[1], (d, e))
    wg = jax.random.normal(keys[2], (e, d, f)) * 0.2
    wu = jax.random.normal(keys[3], (e, d, f)) * 0.2
    wd = jax.random.normal(keys[4], (e, f, d)) * 0.2

    def loss(fn, x, wg, wu, wd):
        out, _ = fn(x, moe_ops.route(x, router, topk), wg, wu, wd)
        return jnp.sum(out * jnp.cos(out)), out

    (_l1, o1), g1 = jax.value_and_grad(
        lambda *a: loss(moe_local.moe_gathered, *a), (0, 1, 2, 3), has_aux=True
    )(x, wg, wu, wd)
    (_l2, o2), g2 = jax.value_and_grad(
        lambda *a: loss(moe_local.moe_dense, *a), (0, 1, 2, 3), has_aux=True
    )(x, wg, wu, wd)
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Unchosen experts get exactly zero gradient: nothing else was read.
    chosen = np.zeros(e, bool)
    chosen[np.asarray(moe_ops.route(x, router, topk).experts).ravel()] = True
    assert np.all(np.asarray(g1[1])[~chosen] == 0) and np.any(np.asarray(g1[1])[chosen] != 0)


def test_moe_block_single_token_takes_the_gathered_path_with_the_dense_result(monkeypatch):
    from flax import nnx

    from mixtral_jax.config import preset

    cfg = preset("tiny", moe_impl="dropless", dtype="float32", param_dtype="float32")
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 1, cfg.embed_dim))
    xs = x.reshape(1, -1)
    routing = moe_ops.route(xs, block.router[...], cfg.num_experts_per_tok)
    want, _ = moe_local.moe_dense(
        xs, routing, block.w_gate[...], block.w_up[...], block.w_down[...]
    )

    def refuse(*a, **k):
        raise AssertionError("one token must not take the sorted grouped-matmul path")

    monkeypatch.setattr(moe_block, "moe_dropless", refuse)
    out, _ = block(x)
    np.testing.assert_allclose(out.reshape(1, -1), want, rtol=1e-5, atol=1e-6)
