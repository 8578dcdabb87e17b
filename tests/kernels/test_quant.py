"""The quantized weight format: exact pack/unpack, the dequantize oracle, the error bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.config import ConfigError
from mixtral_jax.kernels import quant


def test_int4_pack_unpack_round_trips_every_code():
    codes = jnp.asarray(np.arange(-8, 8, dtype=np.int8).reshape(16, 1).repeat(3, axis=1))
    codes = jnp.concatenate([codes, codes[::-1]], axis=0)  # [32, 3]: both nibbles see all codes
    packed = quant.pack_int4(codes)
    assert packed.shape == (16, 3) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(quant.unpack_int4(packed), codes)
    # the layout: byte row i holds rows i (low nibble) and i + K/2 (high nibble)
    assert int(packed[0, 0]) == (-8 & 0xF) | ((7 & 0xF) << 4)


@pytest.mark.parametrize("bits, group", [(8, None), (8, 16), (4, 16), (4, 48)])
def test_quantize_error_is_within_half_a_step_and_peaks_are_exact(bits, group):
    w = jax.random.normal(jax.random.key(0), (2, 96, 24), jnp.float32)
    q = quant.quantize(w, bits, group)
    g = 96 if group is None else group
    assert q.shape == w.shape and q.group_size == g
    assert q.scale.shape == (2, 96 // g, 24)
    back = q.dequantize()
    step = np.repeat(np.asarray(q.scale), g, axis=1)  # [2, 96, 24] scale of each weight
    assert np.all(np.abs(np.asarray(back - w)) <= step / 2 + 1e-7)
    # the largest |w| of each group is represented exactly (up to float32 rounding)
    grouped = np.abs(np.asarray(w)).reshape(2, 96 // g, g, 24)
    err = np.abs(np.asarray(back - w)).reshape(2, 96 // g, g, 24)
    at_peak = np.take_along_axis(err, grouped.argmax(axis=2)[:, :, None], axis=2)
    assert np.all(at_peak <= 1e-6 * grouped.max())


def test_zero_group_and_indexing_of_stacks():
    w = jnp.zeros((3, 2, 8, 4)).at[1, 0, :, 2].set(1.0)
    q = quant.quantize(w, 4, 4)
    np.testing.assert_array_equal(q.dequantize(), w)  # zero groups stay zero, no NaN
    layer = q[1]
    assert layer.shape == (2, 8, 4) and layer.bits == 4
    np.testing.assert_array_equal(layer.dequantize(), w[1])
    assert quant.stored_bytes(q) == 3 * 2 * 4 * 4 + 3 * 2 * 2 * 4 * 4


@pytest.mark.parametrize(
    "bits, group, k, message",
    [
        (3, None, 8, "bits=3 is not supported"),
        (8, 5, 8, "group_size=5 does not divide the contraction width 8"),
        (4, 0, 8, "group_size=0 must be a positive integer"),
        (4, 7, 7, "must be even"),
    ],
)
def test_bad_formats_are_one_line_errors(bits, group, k, message):
    with pytest.raises(ConfigError, match=message):
        quant.quantize(jnp.ones((k, 4)), bits, group)
