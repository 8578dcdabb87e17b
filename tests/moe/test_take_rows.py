"""moe/ops.take_rows: the sort by expert and the unsort as gathers whose gradient is a gather
too. Forward and gradient equal plain indexing under autodiff (bit for bit: each row of the
gradient is the same sum), and the backward holds no scatter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.moe import ops as moe_ops


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sort_and_unsort_equal_plain_indexing_forward_and_gradient(dtype):
    m, d, topk, e = 13, 8, 2, 4
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (m, d), dtype)
    experts = jax.random.randint(keys[1], (m, topk), 0, e)
    order, _ = moe_ops.sort_by_expert(experts, e)
    dy = jax.random.normal(keys[2], (m * topk, d), dtype)
    inverse = jnp.argsort(order)
    cases = [  # (ours, plain indexing)
        (lambda x: moe_ops.sort_rows(x, order, topk), lambda x: x[order // topk]),
        (
            lambda y: moe_ops.take_rows(y, inverse, order, 1),
            lambda y: y[inverse],
        ),
    ]
    for arg, (ours, plain) in zip((x, dy), cases):
        got, got_vjp = jax.vjp(ours, arg)
        want, want_vjp = jax.vjp(plain, arg)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        ct = jax.random.normal(keys[3], got.shape, dtype)
        np.testing.assert_array_equal(
            np.asarray(got_vjp(ct)[0], np.float32), np.asarray(want_vjp(ct)[0], np.float32)
        )
        backward = jax.jit(lambda a, c, f=ours: jax.vjp(f, a)[1](c)).lower(arg, ct).as_text()
        assert "scatter" not in backward
