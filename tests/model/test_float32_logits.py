"""The LM head's logits: float32 sums forward, the backward in the compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.model.layers import float32_logits


def _autodiff(x, w):
    return jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)


def _case(dtype):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (2, 5, 16)).astype(dtype)
    w = jax.random.normal(k2, (16, 40)).astype(dtype)
    g = jax.random.normal(k3, (2, 5, 40))
    return x, w, g


def test_float32_compute_is_autodiffs_gradient_exactly():
    x, w, g = _case(jnp.float32)
    out, vjp = jax.vjp(float32_logits, x, w)
    want, want_vjp = jax.vjp(_autodiff, x, w)
    np.testing.assert_array_equal(out, want)
    for got, ref in zip(vjp(g), want_vjp(g)):
        np.testing.assert_array_equal(got, ref)


def test_bf16_forward_is_float32_and_the_gradient_is_the_bf16_cotangents():
    x, w, g = _case(jnp.bfloat16)
    out, vjp = jax.vjp(float32_logits, x, w)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, _autodiff(x, w))
    dx, dw = vjp(g)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    gb = g.astype(jnp.bfloat16).astype(jnp.float32)  # what the backward multiplies
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
    np.testing.assert_allclose(dx.astype(jnp.float32), gb @ wf.T, rtol=1e-2, atol=1e-2)
    want_dw = jnp.einsum("BTD,BTV->DV", xf, gb)
    np.testing.assert_allclose(dw.astype(jnp.float32), want_dw, rtol=1e-2, atol=2e-2)
