"""Expert-parallel MoE (all-to-all over the expert axis) equals the dense oracle."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from mixtral_jax.config import Exchange
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.moe import expert_parallel as moe_parallel
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops
from mixtral_jax.parallel import sharding as sh

E, D, F, M, K = 8, 16, 24, 64, 2


def _weights(seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (M, D))
    router = jax.random.normal(ks[1], (D, E))
    wg, wu = (0.2 * jax.random.normal(k, (E, D, F)) for k in ks[2:4])
    wd = 0.2 * jax.random.normal(ks[4], (E, F, D))
    return x, router, wg, wu, wd


@pytest.mark.parametrize(
    "spec, skewed",
    [
        ("expert=8", True),
        ("expert=4,data=2", False),
        ("expert=4,data=2", True),
        ("expert=2,fsdp=2,data=2", True),
    ],
)
def test_expert_parallel_equals_dense(spec, skewed):
    mesh = sh.make_mesh(sh.MeshConfig.parse(spec))
    x, router, wg, wu, wd = _weights(1)
    if skewed:  # nearly every token picks experts 0 and 1
        x = jnp.abs(x)
        router = router.at[:, :2].add(1.0)
    routing = moe_ops.route(x, router, K)
    if skewed:
        assert float(jnp.mean(routing.experts < 2)) > 0.9  # experts 0, 1 get > 90% of assignments
    want, _ = moe_local.moe_dense(x, routing, wg, wu, wd)

    def loss(fn, x, wg, wu, wd):
        out, _ = fn(x, moe_ops.route(x, router, K), wg, wu, wd)
        return jnp.sum(out * jnp.cos(jnp.arange(D))), out

    ep = lambda *a: moe_parallel.moe_expert_parallel(*a, mesh=mesh)
    got, dropped = jax.jit(ep)(x, routing, wg, wu, wd)
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    g_ref = jax.grad(lambda *a: loss(moe_local.moe_dense, *a)[0], argnums=(0, 1, 2, 3))(
        x, wg, wu, wd
    )
    g_ep = jax.jit(jax.grad(lambda *a: loss(ep, *a)[0], argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
    for a, b in zip(g_ep, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_capacity_drops_match_capacity_oracle():
    """Small capacity: the dropped count is each source device's overflow, and kept outputs
    equal the dense result restricted to kept assignments."""
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=8"))
    x, router, wg, wu, wd = _weights(2)
    router = router.at[:, 0].add(5.0)
    routing = moe_ops.route(x, router, K)
    got, dropped = jax.jit(
        lambda *a: moe_parallel.moe_expert_parallel(*a, mesh=mesh, capacity_factor=1.0)
    )(x, routing, wg, wu, wd)
    cap = int(np.ceil(1.0 * (M // 8) * K / E))
    keep = np.concatenate(
        [
            np.asarray(moe_ops.group_positions(routing.experts[i : i + M // 8], E)) < cap
            for i in range(0, M, M // 8)
        ]
    )
    assert int(dropped) == int((~keep).sum()) > 0
    kept = routing.replace(weights=jnp.where(keep, routing.weights, 0.0))
    want, _ = moe_local.moe_dense(x, kept, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_indivisible_experts_is_one_line_error():
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=8"))
    x, router, wg, wu, wd = _weights(3)
    routing = moe_ops.route(x, router[:, :6], K)
    with pytest.raises(ValueError, match="6 experts cannot be split over expert axis of size 8"):
        moe_parallel.moe_expert_parallel(x, routing, wg[:6], wu[:6], wd[:6], mesh=mesh)


@pytest.mark.parametrize("tokens", [1, 3, 13])
def test_fewer_or_uneven_tokens_are_padded_not_refused(tokens):
    """Decode sizes (fewer tokens than devices, or not a multiple): padding rows are added and
    removed; the output equals the dense oracle and nothing counts as dropped."""
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=4,data=2"))
    x, router, wg, wu, wd = _weights(2)
    x = x[:tokens]
    routing = moe_ops.route(x, router, K)
    want, _ = moe_local.moe_dense(x, routing, wg, wu, wd)
    got, dropped = jax.jit(
        lambda *a: moe_parallel.moe_expert_parallel(*a, mesh=mesh, capacity_factor=None)
    )(x, routing, wg, wu, wd)
    assert got.shape == (tokens, D) and int(dropped) == 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- the dropless ragged exchange ------------------------------------------------------------
def _real_ragged_all_to_all_runs() -> bool:
    """Runs jax.lax.ragged_all_to_all on 2 devices of this backend: True, or False when the
    backend does not implement it."""
    mesh = sh.make_mesh(sh.MeshConfig(data=2), jax.devices()[:2])

    def f(x):
        zero, one = jnp.zeros((2,), jnp.int32), jnp.ones((2,), jnp.int32)
        return jax.lax.ragged_all_to_all(
            x, jnp.zeros_like(x), zero.at[1].set(1), one, zero, one, axis_name="data"
        )

    try:
        jax.jit(
            jax.shard_map(f, mesh=mesh, in_specs=PS("data"), out_specs=PS("data"), check_vma=False)
        )(jnp.arange(4.0))
    except Exception:  # noqa: BLE001
        return False
    return True


def test_exchange_choice_follows_what_the_backend_compiles():
    """AUTO is ragged exactly where ragged_all_to_all really runs (not on XLA:CPU of jax 0.10.2),
    capacity otherwise and whenever a capacity factor asks for drops; impossible choices are
    one-line errors."""
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=4,data=2"))
    supported = _real_ragged_all_to_all_runs()
    assert kernel_plan.ragged_all_to_all_supported(jax.devices()[0].platform) == supported
    auto = kernel_plan.resolve_exchange("auto", mesh, None)
    assert auto == (Exchange.RAGGED if supported else Exchange.CAPACITY)
    assert kernel_plan.resolve_exchange("auto", mesh, 1.25) == Exchange.CAPACITY
    with pytest.raises(ValueError, match="'ragged_emulated' is dropless and takes no capacity"):
        kernel_plan.resolve_exchange("ragged_emulated", mesh, 1.25)
    if not supported:
        with pytest.raises(ValueError, match="'ragged' needs ragged_all_to_all, which the cpu"):
            kernel_plan.resolve_exchange("ragged", mesh, None)


def test_emulated_ragged_all_to_all_follows_the_documented_example():
    """The example of jax.lax.ragged_all_to_all's docstring (axis of size 2)."""
    mesh = sh.make_mesh(sh.MeshConfig(data=2), jax.devices()[:2])
    i32 = lambda *rows: jnp.array(rows, jnp.int32)
    operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)
    args = (
        operand,
        jnp.zeros((2, 4)),
        i32([0, 1], [0, 1]),
        i32([1, 2], [1, 1]),
        i32([0, 0], [1, 2]),
        i32([1, 1], [2, 1]),
    )
    fn = lambda *a: moe_parallel.emulated_ragged_all_to_all(*(v[0] for v in a), axis_name="data")[
        None
    ]
    got = jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=PS("data"), out_specs=PS("data"), check_vma=False)
    )(*args)
    np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize("spec, bias", [("expert=8", 1.0), ("expert=2,fsdp=2,data=2", 10.0)])
def test_ragged_exchange_equals_dense(spec, bias):
    """The ragged path's bookkeeping (offsets, regrouping, the way back), with the collective
    emulated on backends without it: forward and gradients equal the dense oracle. bias 10:
    every assignment goes to experts 0 and 1, both on expert shard 0 of 2, so every source fills
    the receive buffer's worst case."""
    mesh = sh.make_mesh(sh.MeshConfig.parse(spec))
    x, router, wg, wu, wd = _weights(1)
    x, router = jnp.abs(x), router.at[:, :2].add(bias)
    routing = moe_ops.route(x, router, K)
    if bias > 5:
        assert bool(jnp.all(routing.experts < 2))
    want, _ = moe_local.moe_dense(x, routing, wg, wu, wd)
    ep = lambda *a: moe_parallel.moe_expert_parallel(*a, mesh=mesh, exchange="ragged_emulated")
    got, dropped = jax.jit(ep)(x, routing, wg, wu, wd)
    assert int(dropped) == 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def loss(fn, *a):
        return jnp.sum(fn(a[0], moe_ops.route(a[0], router, K), *a[1:])[0] * jnp.cos(jnp.arange(D)))

    g_ref = jax.grad(partial(loss, moe_local.moe_dense), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    g_ep = jax.jit(jax.grad(partial(loss, ep), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
    for a, b in zip(g_ep, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_ragged_exchange_pads_few_tokens():
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=4,data=2"))
    x, router, wg, wu, wd = _weights(2)
    routing = moe_ops.route(x[:3], router, K)
    want, _ = moe_local.moe_dense(x[:3], routing, wg, wu, wd)
    got, _ = jax.jit(
        lambda *a: moe_parallel.moe_expert_parallel(*a, mesh=mesh, exchange="ragged_emulated")
    )(x[:3], routing, wg, wu, wd)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
