"""The kernels over quantized weights (int8 / int4 codes dequantized in registers), run through
Pallas' interpreter on CPU, against the dequantize-then-matmul oracle: the decode experts
(expert_decode.py), the stacked decode projections (decode_matmul.py) and the grouped matmul
(gmm_quant.py). float32 <= 1e-5 relative; bfloat16 <= 2e-3, against the same products of
bfloat16 inputs and the float32 dequantized weights, summed in float32 and rounded where the
kernels round (h between the expert matmuls, the outputs).
The GPU run of the same kernels is bench/quant_decode_tiles.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from mixtral_jax.kernels import decode_matmul, expert_decode, gmm_quant, quant, weight_tiles
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _stacks(key, layers, e, d, f, bits, group, dtype):
    """Quantized [L, E, D, F] x2 and [L, E, F, D] stacks, bfloat16 scales for bfloat16."""
    keys = jax.random.split(key, 3)
    scale_dtype = jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32
    return [
        quant.quantize(0.3 * jax.random.normal(k, (layers, e) + s), bits, group, scale_dtype)
        for k, s in zip(keys, ((d, f), (d, f), (f, d)))
    ]


@pytest.mark.parametrize(
    "m,bits,group,dtype,vector",
    [
        (1, 8, None, jnp.float32, False),  # batch-1 decode, one scale per output channel
        (1, 4, 32, jnp.bfloat16, True),  # one token on the vector units
        (7, 4, 32, jnp.bfloat16, False),  # 3 groups over D, 5 over F; bf16 codes and scales
        (64, 8, 32, jnp.float32, False),  # the widest decode call (bm = 64 tiles), odd groups
    ],
)
def test_decode_experts_equal_the_oracle(m, bits, group, dtype, vector):
    e, d, f = 8, 96, 160
    keys = jax.random.split(jax.random.key(m * bits), 3)
    x = jax.random.normal(keys[0], (m, d), dtype)
    logits = jax.random.normal(keys[1], (m, e)).at[:, 5:].set(-1e9)  # experts 5-7 unused
    top = jax.lax.top_k(logits, 2)
    experts, weights = top[1].astype(jnp.int32), jax.nn.softmax(top[0], axis=-1)
    w = _stacks(keys[2], 2, e, d, f, bits, group, dtype)
    run = jax.jit(
        lambda x, ex, wt, *w, vector=False: expert_decode.decode_experts(
            x, ex, wt, *w, layer=1, vector=vector, interpret=True
        ),
        static_argnames="vector",
    )
    got = run(x, experts, weights, *w, vector=vector)
    assert got.shape == (m, d) and got.dtype == jnp.float32
    dense = [s[1].dequantize() for s in w]
    if dtype == jnp.float32:  # every expert densely, float32
        routing = moe_ops.Routing(logits=logits, experts=experts, weights=weights)
        want = moe_local.moe_dense(x, routing, *dense)[0]
        assert _rel(got, want) <= 1e-5
        if m == 1:  # the vector path on the same quantized stacks, and on float stacks
            assert _rel(run(x, experts, weights, *w, vector=True), want) <= 1e-5
            float_stacks = [s.dequantize() for s in w]
            assert _rel(run(x, experts, weights, *float_stacks, vector=True), want) <= 1e-5
    else:
        want = _bf16_experts(x, experts, weights, *dense)
        assert _rel(got, want) <= 2e-3


def _bf16_experts(x, experts, weights, wg, wu, wd):
    """The experts from bfloat16 tokens and float32 weights: float32 sums, h rounded to
    bfloat16 between the two matmuls as in the kernels; each token's chosen experts gathered."""

    def dot(a, b):  # [M, k, K] @ [M, k, K, N] in float32
        return jnp.einsum("mjk,mjkn->mjn", a.astype(jnp.float32), b.astype(jnp.float32))

    xs = jnp.broadcast_to(x[:, None], (*experts.shape, x.shape[1]))  # [M, k, D]
    gate, up = dot(xs, wg[experts]), dot(xs, wu[experts])  # [M, k, F]
    h = (gate / (1.0 + jnp.exp(-gate)) * up).astype(jnp.bfloat16)
    return jnp.einsum("mj,mjd->md", weights, dot(h, wd[experts]))


def test_decode_experts_refuse_mixed_formats():
    int8 = quant.QuantizedWeight(jnp.zeros((1, 4, 32, 32), jnp.int8), jnp.ones((1, 4, 1, 32)), 8)
    int4 = quant.QuantizedWeight(jnp.zeros((1, 4, 16, 32), jnp.uint8), jnp.ones((1, 4, 2, 32)), 4)
    one = (jnp.zeros((1, 32)), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="w_gate and w_up in one format"):
        expert_decode.decode_experts(*one, int8, int4, int8, interpret=True)
    with pytest.raises(ValueError, match="takes one token, got 2"):
        two = (jnp.zeros((2, 32)), jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2)))
        expert_decode.decode_experts(*two, int8, int8, int8, vector=True, interpret=True)
    with pytest.raises(ValueError, match="group_size=8 does not allow it"):
        small = quant.QuantizedWeight(
            jnp.zeros((1, 4, 32, 32), jnp.int8), jnp.ones((1, 4, 4, 32)), 8
        )
        expert_decode.decode_experts(*one, small, small, small, interpret=True)
    with pytest.raises(ValueError, match="needs int8 codes, got uint8"):
        bad = quant.QuantizedWeight(int4.codes, int4.scale, 8)
        expert_decode.decode_experts(*one, bad, bad, bad, interpret=True)


@pytest.mark.parametrize(
    "m,formats,dtype,tol",
    [
        (1, ((8, None), (4, 32), (4, 32)), jnp.float32, 1e-5),  # q int8; k, v int4, 3 groups
        (7, ((4, 32), (8, 32)), jnp.bfloat16, 2e-3),
        (70, ((8, None), (4, 32)), jnp.float32, 1e-5),  # two row tiles (64 + 6)
    ],
)
def test_stacked_projection_equals_the_oracle(m, formats, dtype, tol):
    k_width, widths = 96, (64, 32, 32)[: len(formats)]
    keys = jax.random.split(jax.random.key(m), len(formats) + 1)
    x = jax.random.normal(keys[0], (m, k_width), dtype)
    scale_dtype = jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32
    stacks = [
        quant.quantize(jax.random.normal(key, (3, k_width, n)), bits, group, scale_dtype)
        for key, n, (bits, group) in zip(keys[1:], widths, formats)
    ]
    run = jax.jit(
        lambda x, *s, vector=False: decode_matmul.project_stacked(
            x, s, 1, vector=vector, interpret=True
        ),
        static_argnames="vector",
    )
    for vector in (False, True) if m == 1 else (False,):  # one token: the vector path too
        for out, stack in zip(run(x, *stacks, vector=vector), stacks):
            want = (x.astype(jnp.float32) @ stack[1].dequantize()).astype(dtype)
            assert out.shape == (m, stack.shape[-1]) and out.dtype == dtype
            assert _rel(out, want) <= tol


@pytest.mark.parametrize(
    "rows,k,n,sizes,bits,group,dtype",
    [
        (50, 96, 48, [3, 0, 0, 30, 10], 8, 32, jnp.float32),  # empty groups, 7 rows past the end
        (40, 96, 32, [7, 0, 20, 13], 4, 32, jnp.float32),  # 3 groups of K
        (48, 64, 48, [16, 1, 31], 4, 64, jnp.bfloat16),
    ],
)
def test_gmm_equals_ragged_dot_on_the_dequantized_weight(rows, k, n, sizes, bits, group, dtype):
    keys = jax.random.split(jax.random.key(rows + bits), 2)
    lhs = jax.random.normal(keys[0], (rows, k), dtype)
    rhs = quant.quantize(jax.random.normal(keys[1], (len(sizes), k, n)), bits, group)
    gs = jnp.asarray(sizes, jnp.int32)
    got = jax.jit(lambda x, w: gmm_quant.gmm(x, w, gs, True))(lhs, rhs)
    want = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.dequantize(), gs).astype(dtype)
    assert got.shape == (rows, n) and got.dtype == dtype
    assert _rel(got, want) <= (1e-5 if dtype == jnp.float32 else 2e-3)
    assert np.all(np.asarray(got)[sum(sizes) :] == 0)


def test_gmm_of_many_rows_dequantizes_for_the_float_kernel(monkeypatch):
    """From DEQUANTIZE_ROWS rows: the bf16 kernel on the dequantized weight, same function."""
    monkeypatch.setattr(gmm_quant, "DEQUANTIZE_ROWS", 32)
    keys = jax.random.split(jax.random.key(5), 2)
    lhs = jax.random.normal(keys[0], (40, 64))
    stack = quant.quantize(jax.random.normal(keys[1], (2, 3, 64, 32)), 4, 32)
    gs = jnp.asarray([10, 0, 25], jnp.int32)
    got = jax.jit(lambda x, w: gmm_quant.gmm_stacked(x, w, gs, 1, interpret=True))(lhs, stack)
    want = jax.lax.ragged_dot(lhs, stack[1].dequantize(), gs)
    assert _rel(got, want) <= 1e-5 and np.all(np.asarray(got)[35:] == 0)


def test_gmm_lhs_gradient_and_the_stacked_kernel():
    """d lhs through the dequantized transpose equals ragged_dot's; nothing flows to the scale;
    gmm_stacked reads the chosen layer of a quantized stack [L, E, K, N] in place."""
    keys = jax.random.split(jax.random.key(11), 3)
    lhs = jax.random.normal(keys[0], (20, 64))
    stack = quant.quantize(jax.random.normal(keys[1], (3, 4, 64, 32)), 4, 32)
    gs = jnp.asarray([5, 0, 9, 6], jnp.int32)
    dy = jax.random.normal(keys[2], (20, 32))

    def loss(x, scale):
        w = quant.QuantizedWeight(stack.codes[1], scale, 4)
        return jnp.sum(gmm_quant.gmm(x, w, gs, True) * dy)

    d_lhs, d_scale = jax.jit(jax.grad(loss, (0, 1)))(lhs, stack.scale[1])
    want = jax.grad(lambda x: jnp.sum(jax.lax.ragged_dot(x, stack[1].dequantize(), gs) * dy))(lhs)
    assert _rel(d_lhs, want) <= 1e-5
    assert np.all(np.asarray(d_scale) == 0)
    run = jax.jit(lambda x, w, i: gmm_quant.gmm_stacked(x, w, gs, i, interpret=True))
    np.testing.assert_allclose(
        run(lhs, stack, 2), jax.lax.ragged_dot(lhs, stack[2].dequantize(), gs), rtol=1e-5, atol=1e-5
    )


def test_formats_the_kernels_read():
    assert weight_tiles.supports_format(4, 128, 4096) and weight_tiles.supports_format(
        8, 14336, 14336
    )
    assert not weight_tiles.supports_format(4, 8, 64)  # a step of 16 rows spans two groups
    assert weight_tiles.supports_format(4, 32, 96) and not weight_tiles.supports_format(4, 32, 80)
    w = quant.QuantizedWeight(jnp.zeros((2, 48, 16), jnp.uint8), jnp.ones((2, 3, 16)), 4)
    assert weight_tiles.stored_rows(w) == 48 and weight_tiles.max_block_k(w) == 16
    narrow = quant.QuantizedWeight(jnp.zeros((2, 96, 24), jnp.int8), jnp.ones((2, 1, 24)), 8)
    with pytest.raises(ValueError, match="N=24"):
        gmm_quant.gmm(jnp.ones((4, 96)), narrow, jnp.ones(2))


@pytest.mark.parametrize("bits", [8, 4])
def test_tiles_hold_the_codes_exactly(bits):
    """Inside a kernel (interpreted), for bfloat16 compute: the tiles `load` gives hold the codes
    exactly, at the rows of K they name, and `product` turns them into x @ the dequantized
    weight's rows (<= 1e-5)."""
    k, n, bk, group = 64, 32, 16, 16  # int4: 32 stored byte rows in 2 steps; 4 scale groups
    keys = jax.random.split(jax.random.key(bits), 2)
    w = quant.quantize(jax.random.normal(keys[0], (1, k, n)), bits, group, jnp.bfloat16)
    x = jax.random.normal(keys[1], (16, k), jnp.bfloat16)

    def kernel(x_ref, w_ref, values_ref, out_ref):
        acc = jnp.zeros((16, n), jnp.float32)
        for r0 in range(0, weight_tiles.stored_rows(w), bk):
            tiles = weight_tiles.load(w_ref, (0,), r0, 0, bk, n, jnp.bfloat16)
            for tile in tiles:
                values_ref[pl.ds(tile.row0, bk), :] = tile.values.astype(jnp.float32)
                acc = acc + weight_tiles.product(
                    x_ref[:, pl.ds(tile.row0, bk)], tile, jax.lax.Precision.HIGHEST
                )
        out_ref[...] = acc

    values, out = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((k, n), jnp.float32),
            jax.ShapeDtypeStruct((16, n), jnp.float32),
        ),
        interpret=True,
    )(x, w)
    codes = np.asarray(quant.codes_of(w)[0], np.float32)  # [K, N]
    np.testing.assert_array_equal(values, codes)
    want = x.astype(jnp.float32) @ w[0].dequantize()
    assert _rel(out, want) <= 1e-5
