"""The Pallas grouped-matmul kernels (gmm_pallas.py), run through Pallas' interpreter on CPU,
against jax.lax.ragged_dot: forward, d lhs and d rhs. The GPU run of the same check is in
bench/gmm_tiles.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.config import ConfigError, GmmImpl
from mixtral_jax.kernels import gmm_pallas
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops


def _vjp_both(fn, lhs, rhs, dy):
    out, vjp = jax.vjp(fn, lhs, rhs)
    return (out, *vjp(dy))


@pytest.mark.parametrize(
    "rows,k,n,sizes,dtype",
    [
        (40, 16, 24, [7, 0, 20, 5], jnp.float32),  # sum < rows: the last 8 rows come out zero
        (50, 20, 16, [3, 0, 0, 30, 17], jnp.float32),  # empty groups, none a tile multiple
        (64, 32, 32, [0, 64, 0], jnp.float32),  # one group holds everything
        (48, 32, 16, [16, 1, 31], jnp.bfloat16),
    ],
)
def test_kernel_equals_ragged_dot_forward_and_both_gradients(rows, k, n, sizes, dtype):
    keys = jax.random.split(jax.random.key(rows + k + n), 3)
    lhs = jax.random.normal(keys[0], (rows, k), dtype)
    rhs = jax.random.normal(keys[1], (len(sizes), k, n), dtype)
    dy = jax.random.normal(keys[2], (rows, n), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    kernel = jax.jit(functools.partial(_vjp_both, lambda x, w: gmm_pallas.gmm(x, w, gs, True)))
    oracle = jax.jit(functools.partial(_vjp_both, lambda x, w: jax.lax.ragged_dot(x, w, gs)))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for got, want in zip(kernel(lhs, rhs, dy), oracle(lhs, rhs, dy)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    if sum(sizes) < rows:
        assert np.all(np.asarray(kernel(lhs, rhs, dy)[0])[sum(sizes) :] == 0)


def test_schedule_lists_every_overlapping_group_and_tile():
    rng = np.random.default_rng(0)
    groups, block, rows = 5, 8, 40
    schedule = jax.jit(gmm_pallas.schedule, static_argnums=(1, 2))
    for _ in range(30):
        cuts = np.sort(rng.integers(0, rows + 1, groups))
        sizes = np.diff(np.concatenate([[0], cuts])).astype(np.int32)
        want, start = [], 0
        for g, size in enumerate(list(sizes) + [rows - sizes.sum()]):  # + the rows past the end
            want += [
                (g, t) for t in range(start // block, (start + size - 1) // block + 1) if size > 0
            ]
            start += size
        group, tile = schedule(jnp.asarray(sizes), rows, block)
        got = [(int(g), int(t)) for g, t in zip(group, tile) if g >= 0]
        assert got == want
        assert len(group) >= len(want)


def test_tiles_fit_small_problems_and_stay_powers_of_two():
    tiles = gmm_pallas.fit_tiles(gmm_pallas.DEFAULT["gmm"], 3, 20, 24)
    assert (tiles.block_m, tiles.block_k, tiles.block_n) == (16, 32, 32)
    big = gmm_pallas.tiles_for("gmm", 4096, 14336, 32768)
    assert gmm_pallas.fit_tiles(big, 32768, 4096, 14336) == big
    assert gmm_pallas.tiles_for("gmm", 4096, 14336, 2) == gmm_pallas.DECODE


def test_tiles_shrink_to_fit_shared_memory_for_wider_dtypes():
    for kernel in ("gmm", "gmm_t", "tgmm"):
        for itemsize in (2, 4):
            t = gmm_pallas.tiles_for(kernel, 4096, 14336, 32768, itemsize)
            other = t.block_m * t.block_n if kernel == "tgmm" else t.block_k * t.block_n
            assert (
                t.num_stages * (t.block_m * t.block_k + other) * itemsize <= gmm_pallas.SMEM_BYTES
            )
    assert (
        gmm_pallas.tiles_for("gmm", 4096, 14336, 32768, 4).num_stages
        < gmm_pallas.tiles_for("gmm", 4096, 14336, 32768, 2).num_stages
    )


def test_entry_point_chooses_ragged_dot_on_cpu_and_refuses_pallas():
    assert kernel_plan.resolve_gmm("auto") == GmmImpl.XLA
    with pytest.raises(ConfigError, match="gmm_impl='pallas' needs an NVIDIA GPU"):
        kernel_plan.resolve_gmm("pallas")


def test_moe_dropless_through_the_kernel_equals_the_dense_oracle(monkeypatch):
    """The whole dropless MoE with the Pallas kernel (interpreted) in place of ragged_dot."""
    real = gmm_pallas.gmm
    monkeypatch.setattr(gmm_pallas, "gmm", lambda l, r, g: real(l, r, g, True))
    pallas = functools.partial(moe_local.moe_dropless, gmm_impl=GmmImpl.PALLAS)  # the plan's choice
    assert_moe_equals_the_dense_oracle(pallas, seed=3)


MOE_TOKENS, MOE_WIDTH = 12, 16  # the oracle problem: M tokens of D, F = 32, E = 4, top-2


def assert_moe_equals_the_dense_oracle(path, seed: int) -> None:
    """path(x, routing, w_gate, w_up, w_down) -> (out, dropped) gives moe_dense's output and
    gradients (x and the three expert weights; float32, <= 1e-5) on random tokens and routing."""
    m, d, f, e = MOE_TOKENS, MOE_WIDTH, 32, 4
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (m, d))
    router = jax.random.normal(keys[1], (d, e))
    w = [
        jax.random.normal(keys[i], s) * 0.3
        for i, s in ((2, (e, d, f)), (3, (e, d, f)), (4, (e, f, d)))
    ]

    def loss(fn, x, *w):
        out, _ = fn(x, moe_ops.route(x, router, 2), *w)
        return jnp.sum(jnp.sin(out)), out

    def grad(fn):
        return jax.jit(jax.value_and_grad(functools.partial(loss, fn), (0, 1, 2, 3), has_aux=True))

    (_, got), g_got = grad(path)(x, *w)
    (_, want), g_want = grad(moe_local.moe_dense)(x, *w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_stacked_kernel_reads_the_chosen_layer_of_the_stack():
    keys = jax.random.split(jax.random.key(7), 2)
    lhs = jax.random.normal(keys[0], (20, 16))
    stack = jax.random.normal(keys[1], (3, 4, 16, 32))  # [L, E, K, N]
    gs = jnp.asarray([5, 0, 9, 6], jnp.int32)
    run = jax.jit(lambda x, w, i: gmm_pallas.gmm_stacked(x, w, gs, i, interpret=True))
    for layer in (0, 2):
        np.testing.assert_allclose(
            run(lhs, stack, layer), jax.lax.ragged_dot(lhs, stack[layer], gs), rtol=1e-5, atol=1e-5
        )
