"""The fused gate/up grouped matmul with SwiGLU in its epilogue (gmm_swiglu.py), run through
Pallas' interpreter on CPU, against the unfused path (two ragged_dots, then SwiGLU): the
output and its gradients with respect to x, w_gate and w_up."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.config import GmmImpl
from mixtral_jax.kernels import gmm_pallas, gmm_swiglu
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe.ops import swiglu
from tests.kernels.test_gmm_pallas import (
    MOE_TOKENS,
    MOE_WIDTH,
    assert_moe_equals_the_dense_oracle,
)


def unfused(x, w_gate, w_up, gs):
    return swiglu(jax.lax.ragged_dot(x, w_gate, gs), jax.lax.ragged_dot(x, w_up, gs))


def _vjp_all(fn, x, w_gate, w_up, dh):
    out, vjp = jax.vjp(fn, x, w_gate, w_up)
    return (out, *vjp(dh))


def unfused_ffn(x, w_gate, w_up, w_down, gs):
    return jax.lax.ragged_dot(unfused(x, w_gate, w_up, gs), w_down, gs)


def test_expert_ffn_equals_unfused_forward_and_four_gradients():
    """Float32; empty groups, uneven ones, rows past the last group (zeros)."""
    rows, d, f, sizes = 50, 20, 24, [3, 0, 0, 30, 9]
    keys = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(keys[0], (rows, d))
    w_gate, w_up = (jax.random.normal(k, (len(sizes), d, f)) * 0.3 for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (len(sizes), f, d)) * 0.3
    dy = jax.random.normal(keys[4], (rows, d))
    gs = jnp.asarray(sizes, jnp.int32)

    def run(fn):
        out, vjp = jax.vjp(lambda *a: fn(*a, gs), x, w_gate, w_up, w_down)
        return (out, *vjp(dy))

    got_all = jax.jit(lambda: run(lambda *a: gmm_swiglu.expert_ffn(*a, True)))()
    want_all = jax.jit(lambda: run(unfused_ffn))()
    for name, got, want in zip(("y", "dx", "dwg", "dwu", "dwd"), got_all, want_all):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name
        )
    assert np.all(np.asarray(got_all[0])[sum(sizes) :] == 0)


@pytest.mark.parametrize(
    "rows,d,f,sizes,dtype",
    [
        # empty groups, uneven ones (none a tile multiple), sum < rows: the last 8 rows are zero
        (50, 20, 24, [3, 0, 0, 30, 9], jnp.float32),
        (48, 32, 16, [16, 1, 31], jnp.bfloat16),
    ],
)
def test_fused_equals_unfused_forward_and_three_gradients(rows, d, f, sizes, dtype):
    keys = jax.random.split(jax.random.key(rows + d + f), 4)
    x = jax.random.normal(keys[0], (rows, d), dtype)
    w_gate, w_up = (jax.random.normal(k, (len(sizes), d, f), dtype) * 0.3 for k in keys[1:3])
    dh = jax.random.normal(keys[3], (rows, f), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    fused = jax.jit(
        functools.partial(_vjp_all, lambda x, g, u: gmm_swiglu.gmm_swiglu(x, g, u, gs, True))
    )
    oracle = jax.jit(functools.partial(_vjp_all, lambda x, g, u: unfused(x, g, u, gs)))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    got_all, want_all = fused(x, w_gate, w_up, dh), oracle(x, w_gate, w_up, dh)
    for name, got, want in zip(("h", "dx", "dw_gate", "dw_up"), got_all, want_all):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=name)
    h = np.asarray(got_all[0])
    assert np.all(h[sum(sizes) :] == 0)
    for g, size in enumerate(sizes):  # an empty group gets zero weight gradients
        if size == 0:
            assert np.all(np.asarray(got_all[2])[g] == 0) and np.all(np.asarray(got_all[3])[g] == 0)


def test_saved_residuals_are_the_pre_activations_and_tiles_fit_shared_memory():
    keys = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(keys[0], (20, 16))
    w_gate, w_up = (jax.random.normal(k, (3, 16, 24)) for k in keys[1:])
    gs = jnp.asarray([6, 0, 11], jnp.int32)
    (h_only,) = gmm_swiglu._call(x, w_gate, w_up, gs, save=False, interpret=True)
    h, gate, up = gmm_swiglu._call(x, w_gate, w_up, gs, save=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(h_only), np.asarray(h))
    for got, w in ((gate, w_gate), (up, w_up)):
        want = jax.lax.ragged_dot(x, w, gs)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for itemsize in (2, 4):
        t = gmm_swiglu.tiles_for(32768, itemsize)
        need = t.num_stages * (t.block_m * t.block_k + 2 * t.block_k * t.block_n) * itemsize
        assert need <= gmm_pallas.SMEM_BYTES
        b = gmm_swiglu.bwd_tiles_for(32768, itemsize)
        assert (
            b.num_stages * (b.block_m + b.block_n) * b.block_k * itemsize <= gmm_pallas.SMEM_BYTES
        )
    assert gmm_swiglu.tiles_for(4).block_m == gmm_pallas.DECODE.block_m  # decode-sized calls


def test_dropless_moe_with_the_fused_kernel_equals_the_dense_oracle(monkeypatch):
    """The whole dropless MoE as the plan runs it with fused_swiglu (both kernels interpreted):
    output and gradients with respect to x and the three expert weights."""
    calls, real_ffn = [], gmm_swiglu.expert_ffn

    def interpreted(lhs, w_gate, w_up, w_down, gs):
        calls.append(lhs.shape)
        return real_ffn(lhs, w_gate, w_up, w_down, gs, True)

    monkeypatch.setattr(gmm_swiglu, "expert_ffn", interpreted)
    fused = functools.partial(moe_local.moe_dropless, gmm_impl=GmmImpl.PALLAS, fused_swiglu=True)
    assert_moe_equals_the_dense_oracle(fused, seed=5)
    assert calls == [(MOE_TOKENS * 2, MOE_WIDTH)]  # the fused kernels ran, on the sorted rows
