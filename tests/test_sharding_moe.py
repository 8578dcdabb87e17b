"""Expert-parallel MoE (all-to-all over the expert axis) equals the dense oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import moe, moe_parallel, sharding as sh

E, D, F, M, K = 8, 16, 24, 64, 2


def _weights(seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (M, D))
    router = jax.random.normal(ks[1], (D, E))
    wg, wu = (0.2 * jax.random.normal(k, (E, D, F)) for k in ks[2:4])
    wd = 0.2 * jax.random.normal(ks[4], (E, F, D))
    return x, router, wg, wu, wd


@pytest.mark.parametrize("spec, skewed", [("expert=8", True), ("expert=4,data=2", False),
                                           ("expert=4,data=2", True),
                                           ("expert=2,fsdp=2,data=2", True)])
def test_expert_parallel_equals_dense(spec, skewed):
    mesh = sh.make_mesh(sh.MeshConfig.parse(spec))
    x, router, wg, wu, wd = _weights(1)
    if skewed:  # nearly every token picks experts 0 and 1
        x = jnp.abs(x)
        router = router.at[:, :2].add(1.0)
    routing = moe.route(x, router, K)
    if skewed:
        assert float(jnp.mean(routing.experts < 2)) > 0.9  # experts 0, 1 get > 90% of assignments
    want, _ = moe.moe_dense(x, routing, wg, wu, wd)

    def loss(fn, x, wg, wu, wd):
        out, _ = fn(x, moe.route(x, router, K), wg, wu, wd)
        return jnp.sum(out * jnp.cos(jnp.arange(D))), out

    ep = lambda *a: moe_parallel.moe_expert_parallel(*a, mesh=mesh)
    got, dropped = jax.jit(ep)(x, routing, wg, wu, wd)
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    g_ref = jax.grad(lambda *a: loss(moe.moe_dense, *a)[0], argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    g_ep = jax.jit(jax.grad(lambda *a: loss(ep, *a)[0], argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
    for a, b in zip(g_ep, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_capacity_drops_match_capacity_oracle():
    """Small capacity: the dropped count is each source device's overflow, and kept outputs
    equal the dense result restricted to kept assignments."""
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=8"))
    x, router, wg, wu, wd = _weights(2)
    router = router.at[:, 0].add(5.0)
    routing = moe.route(x, router, K)
    got, dropped = jax.jit(lambda *a: moe_parallel.moe_expert_parallel(
        *a, mesh=mesh, capacity_factor=1.0))(x, routing, wg, wu, wd)
    cap = int(np.ceil(1.0 * (M // 8) * K / E))
    keep = np.concatenate([np.asarray(moe_parallel.slots(routing.experts[i:i + M // 8], E)) < cap
                           for i in range(0, M, M // 8)])
    assert int(dropped) == int((~keep).sum()) > 0
    kept = routing.replace(weights=jnp.where(keep, routing.weights, 0.0))
    want, _ = moe.moe_dense(x, kept, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_indivisible_experts_is_one_line_error():
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=8"))
    x, router, wg, wu, wd = _weights(3)
    routing = moe.route(x, router[:, :6], K)
    with pytest.raises(ValueError, match="6 experts cannot be split over expert axis of size 8"):
        moe_parallel.moe_expert_parallel(x, routing, wg[:6], wu[:6], wd[:6], mesh=mesh)


@pytest.mark.parametrize("tokens", [1, 3, 13])
def test_fewer_or_uneven_tokens_are_padded_not_refused(tokens):
    """Decode sizes (fewer tokens than devices, or not a multiple): padding rows are added and
    removed; the output equals the dense oracle and nothing counts as dropped."""
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=4,data=2"))
    x, router, wg, wu, wd = _weights(2)
    x = x[:tokens]
    routing = moe.route(x, router, K)
    want, _ = moe.moe_dense(x, routing, wg, wu, wd)
    got, dropped = jax.jit(lambda *a: moe_parallel.moe_expert_parallel(
        *a, mesh=mesh, capacity_factor=None))(x, routing, wg, wu, wd)
    assert got.shape == (tokens, D) and int(dropped) == 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
