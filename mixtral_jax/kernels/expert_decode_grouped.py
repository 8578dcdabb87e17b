"""The experts of a large decode batch (65-512 tokens; int4 from 33): decode kernels over row chunks.

At batch 256 a decode step's MoE is still a weight-streaming problem (each expert's three
matrices read once per layer: 2.8 GB at 8x7B widths, 0.66 ms at 4.3 TB/s; the real rows' FLOPs
take ~0.28 ms at 650 TFLOP/s), but now every expert is used by ~M*k/E = 64 tokens. The slots of
`expert_decode.py`, each computing all M tokens, would multiply every weight by 256 rows (E/k =
4x the real arithmetic), and the sorted grouped matmul with training tiles streams at 37% of the
floor. Here each slot computes only its own rows:

  chunks   the A = M*k token-expert rows, by expert (token order within one), cut into chunks of
           R rows: slot s = e * C + c holds chunk c of expert e, C = ceil(M / R) (an expert is
           chosen by at most M tokens), S = E * C slots, all shapes static; slot s is active iff
           c * R < count[e]: a balanced batch has E active slots, all tokens on one expert C;
  gather   x_slots [S, R, D]: row r of slot s is its token's x, zeros past the expert's count
           (a small copy: S*R*D elements, ~1% of the weight bytes at 256 tokens);
  kernels  `expert_decode.expert_kernels` over the S slots, each its own rows and expert:
           gate/up then down (split-K), inactive slots skipped (nothing stored: never read);
           the C chunks of one expert run side by side on the same weight tile (the program
           order of `expert_decode._program`), so an expert whose rows overflow one chunk still
           reads its weights from HBM about once (the second chunk finds the tile in L2);
  combine  out[m] = sum over m's k rows and the J splits of part[j, slot, row] (the down kernel
           already weighted each row by its routing weight): a gather at known positions, then
           fixed-order sums; deterministic (no atomics, no scatter-add).

R (`chunk_rows`) is the power of two at or above 1.25 x the mean rows per expert, so that a
balanced batch fits each expert in one chunk: at most ~2x the real rows' arithmetic (R = 128 at
256 tokens for ~64 rows), which the step affords while the weights stream once. Quantized stacks
(`QuantizedWeight`) go through the same kernels (`weight_tiles.load` dequantizes tiles).

Letters: M tokens, k choices per token, E experts, A = M*k rows, R rows per chunk, C chunks per
expert, S = E*C slots, D embed width, F expert hidden width, J splits of F in the down
projection, L layers. Weights are stacks [L, E, D, F] / [L, E, F, D] read at `layer` in place
(inside the layer scan). Inference only: no gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mixtral_jax.kernels import expert_decode
from mixtral_jax.kernels.common import (
    MAX_GROUPED_TOKENS,
    DecodeTiles,
    group_positions,
    pow2_at_least,
)
from mixtral_jax.kernels.quant import QuantizedWeight

MIN_ROWS, MAX_ROWS = 16, 128  # the matrix unit's smallest tile; gate/up's accumulators
HEADROOM = 1.25  # R covers 1.25x the mean rows per expert: a balanced batch fits one chunk
# Registers a thread gives the float32 accumulators: R x bn x streams / (32 x num_warps). On the
# H200 at 256 tokens (8x7B widths, R = 128, bench/expert_decode_grouped.py): gate/up with bn 128
# (128 registers) 739.7 us a layer, 88.6% of the weight floor, against 776.8 us (84.4%) with
# bn 64 (64 registers); R = 64: 77.9%, R = 32: 64.4%, the sorted gmm 69.2%.
ACCUMULATOR_REGISTERS = 128


def chunk_rows(tokens: int, topk: int, num_experts: int) -> int:
    """R for M tokens of k choices over E experts: the power of two >= HEADROOM x M*k/E, in
    [MIN_ROWS, MAX_ROWS] and no more than M needs (balanced random routing: R = 64 at 128
    tokens, 128 at 256 and 512; k = 1 halves the mean)."""
    mean = tokens * topk / num_experts
    want = pow2_at_least(math.ceil(HEADROOM * mean), MIN_ROWS)
    return min(MAX_ROWS, want, pow2_at_least(tokens, MIN_ROWS))


def default_tiles(rows: int) -> tuple[DecodeTiles, DecodeTiles]:
    """(gate_up, down) tiles for chunks of `rows` rows: 8 warps from R = 64 (4 below), and the
    widest column tile (<= 128) whose float32 accumulators (two [R, bn] in gate/up, one in down)
    stay within ACCUMULATOR_REGISTERS a thread: 128 / 128 for R <= 128."""
    warps = 8 if rows >= 64 else 4

    def block_n(streams: int) -> int:
        return max(16, min(128, ACCUMULATOR_REGISTERS * 32 * warps // (streams * rows)))

    gate_up = DecodeTiles(block_n=block_n(2), block_k=64, num_warps=warps, num_stages=4)
    down = DecodeTiles(block_n=block_n(1), block_k=64, splits=1, num_warps=warps, num_stages=4)
    return gate_up, down


def grouped_slots(experts: jax.Array, weights: jax.Array, num_experts: int, rows: int):
    """The chunks of the rows of M tokens' k choices (module docstring).

    Args:
      experts: [M, k] int32 chosen experts (distinct within a token); weights: [M, k] routing
        weights.
      rows: R, rows per chunk.
    Returns:
      slot_expert: [S] int32, the expert of each slot (e = s // C).
      active: [S] int32, 1 for a slot holding at least one row.
      token: [S, R] int32, the token of each slot row; M for padding rows.
      combine: [S, R] float32, each slot row's routing weight; 0 for padding rows.
      where: [M, k] int32, the flat slot row (s * R + r) of each assignment.
    """
    m, _ = experts.shape
    chunks = -(-m // rows)
    num_slots = num_experts * chunks
    position = group_positions(experts, num_experts)  # [M, k] rank inside its expert
    where = (experts * chunks + position // rows) * rows + position % rows  # [M, k]
    tokens = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[:, None], experts.shape)
    flat = where.reshape(-1)  # [A], distinct
    token = jnp.full((num_slots * rows,), m, jnp.int32).at[flat].set(tokens.reshape(-1))
    combine = (
        jnp.zeros((num_slots * rows,), jnp.float32)
        .at[flat]
        .set(weights.reshape(-1).astype(jnp.float32))
    )
    counts = jnp.bincount(experts.reshape(-1), length=num_experts)  # [E]
    starts = jnp.arange(chunks) * rows  # [C] first row of each chunk
    active = (starts[None, :] < counts[:, None]).reshape(num_slots).astype(jnp.int32)
    slot_expert = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), chunks)
    return (
        slot_expert,
        active,
        token.reshape(num_slots, rows),
        combine.reshape(num_slots, rows),
        where.astype(jnp.int32),
    )


def decode_experts_grouped(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array | QuantizedWeight,
    w_up: jax.Array | QuantizedWeight,
    w_down: jax.Array | QuantizedWeight,
    layer: jax.Array | int = 0,
    *,
    rows: int | None = None,
    gate_up_tiles: DecodeTiles | None = None,
    down_tiles: DecodeTiles | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The routed SwiGLU experts of up to MAX_GROUPED_TOKENS tokens, each expert's weights
    streamed about once, each row computed once per chunk it lands in.

    Args:
      x: [M, D] tokens in the compute dtype.
      experts: [M, k] int32 chosen experts; weights: [M, k] their routing weights.
      w_gate, w_up, w_down: stacks as `expert_decode.decode_experts` takes them (float in x's
        dtype, or QuantizedWeight), read at `layer`.
      rows: R, rows per chunk: a power of two in [MIN_ROWS, MAX_ROWS] (default `chunk_rows`;
        the kernel plan passes its choice).
      gate_up_tiles, down_tiles: tiles (default `default_tiles(R)`), fitted to the problem.
    Returns:
      [M, D] float32 = sum_j weights[:, j] * SwiGLU expert experts[:, j] of x (no gradient).
    """
    m, d = x.shape
    num_experts, topk = w_gate.shape[1], experts.shape[1]
    if m > MAX_GROUPED_TOKENS:
        raise ValueError(
            f"decode_experts_grouped takes at most {MAX_GROUPED_TOKENS} tokens, got {m}"
        )
    rows = chunk_rows(m, topk, num_experts) if rows is None else rows
    if not MIN_ROWS <= rows <= MAX_ROWS or rows & (rows - 1):
        raise ValueError(
            f"decode_experts_grouped: rows={rows} must be a power of two in "
            f"[{MIN_ROWS}, {MAX_ROWS}]"
        )
    slot_expert, active, token, combine, where = grouped_slots(experts, weights, num_experts, rows)
    # [S, R, D]; padding rows (token M, out of range) read zeros: one gather, no padded copy of
    # x first. (Gathering the rows inside the gate/up kernel instead, as it loads its tiles,
    # made the H200's 256-row step 2.8 ms slower: 29.86 -> 32.68 ms, `engine_b256_in_kernel_
    # gather.json`; Triton does not pipeline those pointer loads as it does the tiles.)
    x_slots = x.at[token].get(mode="fill", fill_value=0)
    default_up, default_down = default_tiles(rows)
    # Inactive slots' parts and padding rows' parts are never read below: left unwritten.
    part = expert_decode.expert_kernels(
        x_slots,
        slot_expert,
        active,
        combine,
        (w_gate, w_up, w_down),
        layer,
        rows=rows,
        gate_up_tiles=gate_up_tiles or default_up,
        down_tiles=down_tiles or default_down,
        chunks=slot_expert.shape[0] // num_experts,
        zero_inactive=False,
        interpret=interpret,
    )  # [J, S, R, D]
    splits = part.shape[0]
    rows_out = part.reshape(splits, -1, d)[:, where.reshape(-1)]  # [J, A, D]
    out = jnp.sum(rows_out, axis=0).reshape(m, topk, d).sum(axis=1)  # [M, D]
    return jax.lax.stop_gradient(out)
