"""The inline-PTX dequantization programs (`dequant_ptx.py`), run instruction by instruction in
numpy on every code, and their lowering into the quantized kernels for the GPU (cross-lowered on
the CPU: the PTX itself is compiled and checked against the oracle on the GPU,
bench/quant_decode_tiles.py --dequant ptx)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import (
    decode_matmul,
    dequant_ptx,
    expert_decode,
    gmm_quant,
    quant,
    weight_tiles,
)


def _words(byte_values: np.ndarray) -> np.ndarray:
    """uint32 words of 4 bytes each (byte 0 lowest, as a register holds 4 packed int8)."""
    return np.ascontiguousarray(byte_values.astype(np.uint8)).view("<u4")


def _pairs(words: list[np.ndarray]) -> np.ndarray:
    """Output words (two bfloat16 each, low half first) -> float32 values in element order."""
    halves = [np.stack([w & 0xFFFF, w >> 16], axis=-1) for w in words]  # [n, 2] per word
    bits = np.concatenate(halves, axis=-1).astype(np.uint32) << np.uint32(16)  # [n, 4]
    return bits.view(np.float32).reshape(-1)


def test_int8_program_gives_every_code_exactly_in_element_order():
    codes = np.arange(-128, 128, dtype=np.int8)
    rng = np.random.default_rng(0)
    for order in (codes, rng.permutation(codes)):  # positions matter, not only values
        got = _pairs(dequant_ptx.emulate(dequant_ptx.INT8_TO_BF16, _words(order.view(np.uint8))))
        np.testing.assert_array_equal(got, order.astype(np.float32))


@pytest.mark.parametrize("high", [False, True])
def test_nibble_programs_give_every_code_of_every_byte(high):
    """Each byte of `quant.pack_int4` holds two int4 codes; the program for its low or high
    nibble gives that code, for all 256 bytes, in element order."""
    program = dequant_ptx.HIGH_NIBBLE_TO_BF16 if high else dequant_ptx.LOW_NIBBLE_TO_BF16
    data = np.random.default_rng(1).permutation(256).astype(np.uint8)
    got = _pairs(dequant_ptx.emulate(program, _words(data)))
    nibble = (data >> 4) if high else (data & 0xF)
    want = np.where(nibble >= 8, nibble.astype(np.int32) - 16, nibble).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_nibble_programs_read_the_packed_layout():
    """The int4 tiles of `weight_tiles.load` are rows r and K/2 + r of one byte row: the two
    programs over `quant.pack_int4`'s bytes give back the codes it packed."""
    codes = np.random.default_rng(2).integers(-8, 8, (8, 64)).astype(np.int8)  # [K, N]
    packed = np.asarray(quant.pack_int4(jnp.asarray(codes)))  # [K/2, N] uint8
    assert packed.shape == (4, 64)
    low, high = (
        _pairs(dequant_ptx.emulate(p, _words(packed.reshape(-1)))).reshape(4, 64)
        for p in (dequant_ptx.LOW_NIBBLE_TO_BF16, dequant_ptx.HIGH_NIBBLE_TO_BF16)
    )
    np.testing.assert_array_equal(np.concatenate([low, high]), codes.astype(np.float32))


def test_ptx_text_renders_each_instruction_once_with_its_operands():
    for program in (
        dequant_ptx.INT8_TO_BF16,
        dequant_ptx.LOW_NIBBLE_TO_BF16,
        dequant_ptx.HIGH_NIBBLE_TO_BF16,
    ):
        text = dequant_ptx.ptx(program)
        lines = text.splitlines()
        assert lines[0] == "{" and lines[-1] == "}"
        assert lines[1] == f".reg .b32 {', '.join(program.temps)};"
        body = lines[2:-1]
        assert len(body) == len(program.instructions)
        for line, (_, dst, *srcs) in zip(body, program.instructions):
            op, operands = re.fullmatch(r"(\S+) (.*);", line).groups()
            assert op in dequant_ptx._PTX_OPS.values()
            assert operands.split(", ")[0] == dst and len(operands.split(", ")) == 1 + len(srcs)
        used = set(re.findall(r"\$\d+", text))
        assert used == {f"${i}" for i in range(program.outputs + 1)}  # outputs and the input
        assert dequant_ptx.constraints(program) == ",".join(["=r"] * program.outputs + ["r"])
    assert "sub.f32 q_f0, q_f0, 0f4B000080;" in dequant_ptx.ptx(dequant_ptx.INT8_TO_BF16)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_decode_expert_kernels_lower_for_the_gpu_with_the_ptx_tiles(bits, monkeypatch):
    """With DEQUANT = "ptx" the quantized decode experts lower for CUDA (on this CPU machine):
    the programs fit the kernels' tile shapes, dtypes and packing of 4."""
    monkeypatch.setattr(weight_tiles, "DEQUANT", "ptx")
    e, d, f = 4, 256, 512
    w = [
        quant.quantize(jnp.ones((1, e) + s, jnp.float32), bits, 128, jnp.bfloat16)
        for s in ((d, f), (d, f), (f, d))
    ]
    x = jnp.ones((1, d), jnp.bfloat16)
    experts, weights = jnp.array([[0, 2]], jnp.int32), jnp.full((1, 2), 0.5, jnp.float32)
    run = jax.jit(lambda x, ex, wt, *w: expert_decode.decode_experts(x, ex, wt, *w))
    lowered = run.trace(x, experts, weights, *w).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # gate/up and down kernels
    program = dequant_ptx.INT8_TO_BF16 if bits == 8 else dequant_ptx.LOW_NIBBLE_TO_BF16
    assert text.count(program.instructions[-1][0].replace("fma.", "fma.rn.")) >= 2  # the PTX


@pytest.mark.parametrize("bits", [8, 4])
def test_the_projection_and_grouped_matmul_lower_for_the_gpu_with_the_ptx_tiles(bits, monkeypatch):
    monkeypatch.setattr(weight_tiles, "DEQUANT", "ptx")
    program = dequant_ptx.INT8_TO_BF16 if bits == 8 else dequant_ptx.LOW_NIBBLE_TO_BF16
    marker = program.instructions[-1][0].replace("fma.", "fma.rn.")
    stack = quant.quantize(jnp.ones((2, 256, 512), jnp.float32), bits, 128, jnp.bfloat16)
    x = jnp.ones((3, 256), jnp.bfloat16)
    project = jax.jit(lambda x, s: decode_matmul.project_stacked(x, (s,), 1))
    experts = quant.quantize(jnp.ones((4, 256, 512), jnp.float32), bits, 128, jnp.bfloat16)
    sizes = jnp.array([100, 0, 28, 0], jnp.int32)
    grouped = jax.jit(lambda x, w: gmm_quant.gmm(x, w, sizes, False))
    for run, args in (
        (project, (x, stack)),
        (grouped, (jnp.ones((128, 256), jnp.bfloat16), experts)),
    ):
        text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text and marker in text


@pytest.mark.parametrize("bits", [8, 4])
def test_the_default_tile_maker_takes_the_ptx_tiles_for_int4_only(bits):
    """DEQUANT's default "auto" is the faster tile maker per format as measured on the H200:
    the PTX for int4 and the float32 tiles for int8 (`weight_tiles.AUTO`)."""
    assert weight_tiles.DEQUANT == "auto" and weight_tiles.AUTO == {8: "float32", 4: "ptx"}
    stack = quant.quantize(jnp.ones((2, 256, 512), jnp.float32), bits, 128, jnp.bfloat16)
    project = jax.jit(lambda x, s: decode_matmul.project_stacked(x, (s,), 1))
    text = project.trace(jnp.ones((3, 256), jnp.bfloat16), stack).lower(
        lowering_platforms=("cuda",)
    )
    text = text.as_text()
    assert "__gpu$xla.gpu.triton" in text
    assert ("fma.rn.bf16x2" in text) == (bits == 4)  # int4's PTX
    assert "0f4B000080" not in text  # int8's PTX (its subtraction of 2^23 + 128) never


def test_interpreted_kernels_keep_the_float_tiles_when_the_gpu_takes_ptx(monkeypatch):
    """DEQUANT = "ptx" is the GPU's choice; interpret mode (which cannot run inline assembly)
    still takes the float32 tiles, so the same bfloat16 int4 call runs and gives the same result."""
    e, d, f = 4, 64, 128
    w = [
        quant.quantize(jax.random.normal(jax.random.key(i), (1, e) + s), 4, 32, jnp.bfloat16)
        for i, s in enumerate(((d, f), (d, f), (f, d)))
    ]
    x = jax.random.normal(jax.random.key(9), (3, d), jnp.bfloat16)
    experts = jnp.array([[0, 2], [1, 2], [3, 0]], jnp.int32)
    weights = jnp.full((3, 2), 0.5, jnp.float32)

    def run():
        return expert_decode.decode_experts(x, experts, weights, *w, interpret=True)

    want = run()
    monkeypatch.setattr(weight_tiles, "DEQUANT", "ptx")
    assert weight_tiles.dequant_for(True) == "float32" and weight_tiles.dequant_for(False) == "ptx"
    np.testing.assert_array_equal(run(), want)


def test_an_unknown_tile_maker_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(weight_tiles, "DEQUANT", "fast")
    with pytest.raises(ValueError, match=r"weight_tiles.DEQUANT='fast': must be one of"):
        weight_tiles.dequant_for(False)
