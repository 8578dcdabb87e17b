"""Quantized codes to bfloat16 tiles by integer instructions alone (inline PTX), on the GPU.

Why. The quantized kernels read int8 at ~2.3 TB/s and int4 at ~1.2 TB/s of codes on the H200:
the same ~9 weights per clock per SM for both, so bytes are not what bounds them (BENCHMARKS.md,
"Quantized experts: tile choices"). Type conversions (integer widening or narrowing, int to
float, float32 to bfloat16) issue at 16 per clock per SM on compute capability 9.0 (the CUDA
guide's throughput table), against 64 for integer logic and byte permutes and 128 for float
adds; `weight_tiles`' float path spends one to two of them per weight (the code's sign or zero
extension to 32 bits, the float32 to bfloat16 rounding), which fits. These programs spend none:
they work on 32-bit words of packed codes and leave bfloat16 pairs packed in 32-bit words, the
operands a matrix-unit dot takes.

  int8 (pack 4: one word of 4 codes -> two words of 2 bfloat16)
      XOR 0x80 per byte gives u = c + 128; a byte permute puts each u into the low mantissa of
      2^23 (the float32 2^23 + u, exact); subtracting 2^23 + 128 leaves c in float32 (exact);
      a permute packs the high halves of two such floats into one bfloat16 pair (exact: |c| <=
      127 has at most 7 significant bits, and bfloat16 keeps 8).
  int4 (pack 4: one word of 4 bytes -> two words of 2 bfloat16, one program per nibble)
      two permutes spread bytes 0, 1 and 2, 3 into the 16-bit halves of two words; AND keeps the
      nibble (shifted down first for the high one); XOR with 0x4308 makes the bfloat16 128 + (n
      XOR 8) = 136 + c for the two's complement nibble c (exact: 7 mantissa bits); a bfloat16x2
      fma subtracts 136.

Each program is a list of instructions that `ptx` renders for `pallas.triton`'s
`elementwise_inline_asm` and `emulate` runs in numpy, so the tests check on the CPU, for every
code, the very instructions the GPU runs. The word layout is Triton's: with pack 4 it hands one
instance 4 consecutive elements of a thread, element k in byte k of the input register, and
takes element k of a bfloat16 result from half k % 2 of output register k // 2 (its
ElementwiseInlineAsmOp lowering). What only the GPU can check, ptxas's reading of the text and
that layout in practice, `bench/dequant_check.py` does: the kernels must give the same bits with
these tiles as with the float32 ones; it did on the H200 (18 of 18 calls bit-identical).
Interpret mode cannot run inline assembly: `weight_tiles` uses these on the GPU where they were
measured faster (int4 by default; `weight_tiles.DEQUANT`, `weight_tiles.AUTO`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

MAGIC_F32 = 0x4B000000  # float32 2^23: an integer u < 2^23 ORed into its mantissa is 2^23 + u
INT8_OFFSET_F32 = 0x4B000080  # float32 2^23 + 128
BF16_128_PLUS_8 = 0x43084308  # bfloat16 pair 0x4300 (128), XOR 8 folded in (the nibble's bias)
BF16_ONE = 0x3F803F80  # bfloat16 pair (1, 1)
BF16_MINUS_136 = 0xC308C308  # bfloat16 pair (-136, -136)


class Program(NamedTuple):
    """Instructions over 32-bit registers: "$0".."$k-1" the outputs, "$k" the input word,
    temporaries by name. Each is (op, dst, *sources); a source is a register or an int."""

    outputs: int
    temps: tuple[str, ...]
    instructions: tuple[tuple, ...]


INT8_TO_BF16 = Program(
    outputs=2,
    temps=("q_u", "q_m", "q_f0", "q_f1", "q_f2", "q_f3"),
    instructions=(
        ("xor", "q_u", "$2", 0x80808080),
        ("mov", "q_m", MAGIC_F32),
        ("prmt", "q_f0", "q_u", "q_m", 0x7440),  # bytes (u0, 0, 0, 0x4B): float32 2^23 + u0
        ("prmt", "q_f1", "q_u", "q_m", 0x7441),
        ("prmt", "q_f2", "q_u", "q_m", 0x7442),
        ("prmt", "q_f3", "q_u", "q_m", 0x7443),
        ("sub.f32", "q_f0", "q_f0", INT8_OFFSET_F32),
        ("sub.f32", "q_f1", "q_f1", INT8_OFFSET_F32),
        ("sub.f32", "q_f2", "q_f2", INT8_OFFSET_F32),
        ("sub.f32", "q_f3", "q_f3", INT8_OFFSET_F32),
        ("prmt", "$0", "q_f0", "q_f1", 0x7632),  # high halves: the bfloat16 pair (c0, c1)
        ("prmt", "$1", "q_f2", "q_f3", 0x7632),
    ),
)


def _nibble_program(high: bool) -> Program:
    shift = (("shr", "q_t0", "q_t0", 4), ("shr", "q_t1", "q_t1", 4)) if high else ()
    return Program(
        outputs=2,
        temps=("q_t0", "q_t1", "q_one", "q_off"),
        instructions=(
            ("prmt", "q_t0", "$2", "$2", 0x0100),  # bytes (b0, b0, b1, b0): b0, b1 in the halves
            ("prmt", "q_t1", "$2", "$2", 0x0302),  # (b2, b0, b3, b0)
            *shift,
            ("and", "q_t0", "q_t0", 0x000F000F),
            ("and", "q_t1", "q_t1", 0x000F000F),
            ("xor", "q_t0", "q_t0", BF16_128_PLUS_8),  # bfloat16 136 + c per half
            ("xor", "q_t1", "q_t1", BF16_128_PLUS_8),
            ("mov", "q_one", BF16_ONE),
            ("mov", "q_off", BF16_MINUS_136),
            ("fma.bf16x2", "$0", "q_t0", "q_one", "q_off"),  # c, exact
            ("fma.bf16x2", "$1", "q_t1", "q_one", "q_off"),
        ),
    )


LOW_NIBBLE_TO_BF16 = _nibble_program(high=False)
HIGH_NIBBLE_TO_BF16 = _nibble_program(high=True)

_PTX_OPS = {
    "xor": "xor.b32",
    "and": "and.b32",
    "shr": "shr.u32",
    "mov": "mov.b32",
    "prmt": "prmt.b32",
    "sub.f32": "sub.f32",
    "fma.bf16x2": "fma.rn.bf16x2",
}


def _operand(op: str, value) -> str:
    if isinstance(value, str):
        return value
    return f"0f{value:08X}" if op == "sub.f32" else f"0x{value:08X}"


def ptx(program: Program) -> str:
    """The program as one inline-assembly string (a scope of its own temporaries)."""
    lines = [f".reg .b32 {', '.join(program.temps)};"]
    for op, dst, *srcs in program.instructions:
        lines.append(f"{_PTX_OPS[op]} {', '.join([dst, *(_operand(op, s) for s in srcs)])};")
    return "{\n" + "\n".join(lines) + "\n}"


def constraints(program: Program) -> str:
    return ",".join(["=r"] * program.outputs + ["r"])


def _prmt(a: np.ndarray, b: np.ndarray, selector: int) -> np.ndarray:
    """PTX prmt.b32 (default mode): byte i of the result is byte s_i of the pair (b:a)."""
    pair = a.astype(np.uint64) | (b.astype(np.uint64) << np.uint64(32))
    out = np.zeros_like(a, dtype=np.uint32)
    for i in range(4):
        s = (selector >> (4 * i)) & 0xF
        assert s < 8, "sign-replicating selectors are not emulated"
        byte = (pair >> np.uint64(8 * s)) & np.uint64(0xFF)
        out |= byte.astype(np.uint32) << np.uint32(8 * i)
    return out


def _bf16_halves(word: np.ndarray) -> np.ndarray:
    """[..., 2] float32 values of a word's two bfloat16 halves (low first)."""
    halves = np.stack([word & 0xFFFF, word >> 16], axis=-1).astype(np.uint32) << np.uint32(16)
    return halves.view(np.float32)


def _fma_bf16x2(a, b, c) -> np.ndarray:
    """PTX fma.rn.bf16x2: per half a * b + c, rounded once to bfloat16 (to nearest even)."""
    exact = _bf16_halves(a).astype(np.float64) * _bf16_halves(b) + _bf16_halves(c)
    bits = np.asarray(jnp.asarray(exact.astype(np.float32)).astype(jnp.bfloat16)).view(np.uint16)
    return bits[..., 0].astype(np.uint32) | (bits[..., 1].astype(np.uint32) << np.uint32(16))


def emulate(program: Program, words: np.ndarray) -> list[np.ndarray]:
    """The program run on uint32 input words [...] (numpy): its output words."""
    words = np.asarray(words, np.uint32)
    regs: dict[str, np.ndarray] = {f"${program.outputs}": words}

    def value(src):
        return regs[src] if isinstance(src, str) else np.full_like(words, src, dtype=np.uint32)

    for op, dst, *srcs in program.instructions:
        v = [value(s) for s in srcs]
        if op == "xor":
            out = v[0] ^ v[1]
        elif op == "and":
            out = v[0] & v[1]
        elif op == "shr":
            out = v[0] >> v[1]
        elif op == "mov":
            out = v[0]
        elif op == "prmt":
            out = _prmt(v[0], v[1], srcs[2])
        elif op == "sub.f32":
            out = (v[0].view(np.float32) - v[1].view(np.float32)).view(np.uint32)
        elif op == "fma.bf16x2":
            out = _fma_bf16x2(*v)
        else:
            raise ValueError(f"no emulation of {op}")
        regs[dst] = out.astype(np.uint32)
    return [regs[f"${i}"] for i in range(program.outputs)]


def _run(program: Program, codes: jax.Array) -> jax.Array:
    (out,) = plgpu.elementwise_inline_asm(
        ptx(program),
        args=[codes],
        constraints=constraints(program),
        pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)],
    )
    return out


def int8_tile(codes: jax.Array) -> jax.Array:
    """Inside a GPU kernel: int8 codes [bk, bn] -> the same integers in bfloat16."""
    return _run(INT8_TO_BF16, codes)


def nibble_tiles(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inside a GPU kernel: uint8 bytes [bk, bn] of two int4 codes -> (low, high) nibbles'
    integers in bfloat16."""
    return _run(LOW_NIBBLE_TO_BF16, codes), _run(HIGH_NIBBLE_TO_BF16, codes)
