"""The experts of a few tokens (decode) as two Pallas-Triton kernels that read only used experts.

At decode sizes the MoE is a pure weight-streaming problem: one token reads 2 of 8 expert
matrices per layer (705 MB at 8x7B widths) and does almost no arithmetic. What costs time is
everything that is not streaming those bytes: the sort and gathers of the dropless path (a dozen
tiny launches per layer) and too few programs in flight for the down projection (its [F, D]
matrices give only D / block_n output tiles per expert). So this path has no sort at all:

  slots      the used experts, listed first in expert order (at most min(E, M*k) of them);
  gate_up    h[s] = silu(x @ W_gate[e_s]) * (x @ W_up[e_s]) for every token, one program per
             (slot, column tile of F); both matrices streamed in the same loop;
  down       part[j, s] = (h[s] @ W_down[e_s])[rows of split j of F] * combine[s], one program
             per (slot, column tile of D, split of F): split-K gives the short, wide down
             projection as many programs as the gate/up one;
  reduce     out = sum over splits and slots (float32, deterministic: no atomics).

Quantized experts (`quant.QuantizedWeight` stacks, int8 or int4, all three the same bits) run
the same kernels: each step's code tiles become integer codes in x's dtype in registers and the
float32 partial products are scaled per group (`weight_tiles.load`), so only the codes and
scales cross memory (1/2 or 1/4 of bf16's bytes). One token can instead run on the vector units
(`vector=True`, `weight_tiles.vector_step`): no matrix-unit dot of 16 padded rows.

Every slot computes all M tokens; tokens that did not choose its expert get combine weight 0.
That wastes arithmetic (M rows instead of the ~M*k/E that chose the expert), which is free while
the kernel is bound by memory: the path is for M <= MAX_TOKENS. Above it the same two kernels
(`expert_kernels`) run over slots of their own rows instead, each a chunk of one expert's
tokens (`expert_decode_grouped.py`).

Letters: M tokens, k choices per token, E experts, S slots (= min(E, M*k)), D embed width, F expert
hidden width, J splits of F in the down projection, L layers of a weight stack. Weights are
stacks [L, E, D, F] / [L, E, F, D] read at `layer` in place (inside the layer scan; a single
layer is a stack of one). Inference only: no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixtral_jax.kernels import weight_tiles
from mixtral_jax.kernels.common import (
    MAX_TOKENS,
    DecodeTiles,
    matmul_precision,
    pow2_at_least,
)
from mixtral_jax.kernels.quant import QuantizedWeight

# From bench/expert_decode_tiles.py on one H200 (bfloat16, 8x7B widths, 1/8/64 tokens; all
# stream the weights at 4.1-4.6 TB/s): see BENCHMARKS.md. Splitting F barely matters at one
# token (54.7 us with 4 splits, 56.1 with none) and costs 5% at 64 tokens (bm = 64).
GATE_UP = DecodeTiles(block_n=128, block_k=64, num_warps=4, num_stages=4)
DOWN = DecodeTiles(block_n=128, block_k=64, splits=4, num_warps=4, num_stages=5)
DOWN_WIDE = DecodeTiles(block_n=64, block_k=128, splits=1, num_warps=4, num_stages=4)  # bm >= 64
# Quantized stacks take the same tiles (block_k in stored rows). H200, 8x7B widths, measured on
# the scale-before-dot form of these kernels: best of those tried at 1 token (int8 gate_up 103.5
# us against 110 for block_k 128 / 8 warps, down 45.3 against 50.3; int4 likewise) and at 64
# tokens for int4 and the down kernels; int8 gate_up at 64 tokens was 11% faster with block_k
# 128 and 8 warps. bench/quant_decode_tiles.py sweeps the current kernels. The one-token vector
# path (`vector=True`), by reasoning until measured: [bk, bn] float32 accumulators per weight
# stream (2 x 32 x 128 over 128 threads: 64 registers each), the dot path's programs in flight.
VECTOR_GATE_UP = DecodeTiles(block_n=128, block_k=32, num_warps=4, num_stages=4)
VECTOR_DOWN = DecodeTiles(block_n=128, block_k=32, splits=4, num_warps=4, num_stages=4)


def _program(num_cols: int, splits: int, chunks: int):
    """This program's (slot, column tile, split of F) from its id.

    pid = ((g * num_cols + col) * splits + split) * chunks + c for slot s = g * chunks + c: the
    `chunks` slots of one group (the row chunks of one expert, `expert_decode_grouped.py`; 1
    here) read the same weight tile side by side, so a tile one chunk brought into L2 is still
    there for the next and the expert's weights cross HBM about once.
    """
    pid = pl.program_id(0)
    chunk, rest = pid % chunks, pid // chunks
    split, rest = rest % splits, rest // splits
    col, group = rest % num_cols, rest // num_cols
    return group * chunks + chunk, col, split


def _gate_up_kernel(
    slot_expert_ref,
    active_ref,
    layer_ref,
    x_ref,
    wg_ref,
    wu_ref,
    h_ref,
    *,
    tiles: DecodeTiles,
    num_cols: int,
    chunks: int,
    rows: int,
    precision,
    vector: bool,
    dequant: str,
):
    """Program (slot s, column tile c): h[s, :, c] = silu(x @ Wg[e_s][:, c]) * (x @ Wu[e_s][:, c]).

    x is [bm, D] (every slot's rows) or [S, bm, D] (each slot its own rows); slots with
    active[s] = 0 write nothing. With `vector` (one token) only row 0 of h is written."""
    bm, bn, bk = x_ref.shape[-2], tiles.block_n, tiles.block_k
    slot, col, _ = _program(num_cols, 1, chunks)
    expert, layer = slot_expert_ref[slot], layer_ref[0]
    col0 = pl.multiple_of(col * bn, bn)
    row_mask = jnp.broadcast_to((jnp.arange(bm) < rows)[:, None], (bm, bn))

    def x_tile(k0):  # [bm, bk] of this slot's rows
        return x_ref[:, pl.ds(k0, bk)] if x_ref.ndim == 2 else x_ref[slot, :, pl.ds(k0, bk)]

    @pl.when(active_ref[slot] != 0)
    def _():
        lead, steps = (layer, expert), weight_tiles.stored_rows(wg_ref) // bk
        if vector:  # one token, on the vector units: accumulators [bk, bn], summed at the end

            def x_of(k0):  # [bk] of the token
                return x_ref[jnp.int32(0), pl.ds(k0, bk)]

            def step(i, acc):
                r0 = pl.multiple_of(i * bk, bk)
                return tuple(
                    weight_tiles.vector_step(a, x_of, w, lead, r0, col0, bk, bn)
                    for a, w in zip(acc, (wg_ref, wu_ref))
                )

            zeros = jnp.zeros((bk, bn), jnp.float32)
            gate, up = (jnp.sum(a, axis=0) for a in jax.lax.fori_loop(0, steps, step, (zeros,) * 2))
            h = gate / (1.0 + jnp.exp(-gate)) * up  # [bn]
            plgpu.store(h_ref.at[slot, jnp.int32(0), pl.ds(col0, bn)], h.astype(h_ref.dtype))
            return

        def step(i, acc):
            gate, up = acc
            r0 = pl.multiple_of(i * bk, bk)  # stored rows (K/2 byte rows for int4)
            gs = weight_tiles.load(wg_ref, lead, r0, col0, bk, bn, x_ref.dtype, dequant)
            us = weight_tiles.load(wu_ref, lead, r0, col0, bk, bn, x_ref.dtype, dequant)
            for g, u in zip(gs, us):  # Tiles [bk, bn] of the same rows of K
                a = x_tile(g.row0)  # [bm, bk]
                gate = gate + weight_tiles.product(a, g, precision)
                up = up + weight_tiles.product(a, u, precision)
            return gate, up

        zeros = jnp.zeros((bm, bn), jnp.float32)
        gate, up = jax.lax.fori_loop(0, steps, step, (zeros, zeros))
        h = gate / (1.0 + jnp.exp(-gate)) * up  # silu(gate) * up, in float32
        plgpu.store(h_ref.at[slot, :, pl.ds(col0, bn)], h.astype(h_ref.dtype), mask=row_mask)


def _down_kernel(
    slot_expert_ref,
    active_ref,
    layer_ref,
    h_ref,
    combine_ref,
    wd_ref,
    out_ref,
    *,
    tiles: DecodeTiles,
    num_cols: int,
    chunks: int,
    steps: int,
    rows: int,
    precision,
    vector: bool,
    zero_inactive: bool,
    dequant: str,
):
    """Program (slot s, column tile c, split j): part[j, s, :, c] = combine[s] * h[s, :, split j]
    @ Wd[e_s][split j, c]; inactive slots (active[s] = 0) store zeros if `zero_inactive`, else
    nothing. With `vector` (one token) only row 0 of used slots is written."""
    bm, bn, bk, splits = h_ref.shape[1], tiles.block_n, tiles.block_k, tiles.splits
    slot, col, split = _program(num_cols, splits, chunks)
    expert, layer = slot_expert_ref[slot], layer_ref[0]
    col0 = pl.multiple_of(col * bn, bn)
    valid = jnp.arange(bm) < rows
    row_mask = jnp.broadcast_to(valid[:, None], (bm, bn))
    out_block = out_ref.at[split, slot, :, pl.ds(col0, bn)]

    @pl.when(active_ref[slot] != 0)
    def _():
        lead = (layer, expert)
        if vector:  # one token (row 0), on the vector units

            def h_of(k0):  # [bk] of the token
                return h_ref[slot, jnp.int32(0), pl.ds(k0, bk)]

            def vector_step(i, acc):
                r0 = pl.multiple_of((split * steps + i) * bk, bk)
                return weight_tiles.vector_step(acc, h_of, wd_ref, lead, r0, col0, bk, bn)

            acc = jax.lax.fori_loop(0, steps, vector_step, jnp.zeros((bk, bn), jnp.float32))
            out = jnp.sum(acc, axis=0) * combine_ref[slot, jnp.int32(0)]  # [bn]
            plgpu.store(out_ref.at[split, slot, jnp.int32(0), pl.ds(col0, bn)], out)
            return

        def step(i, acc):
            r0 = pl.multiple_of((split * steps + i) * bk, bk)  # stored rows of split j
            for tile in weight_tiles.load(wd_ref, lead, r0, col0, bk, bn, h_ref.dtype, dequant):
                a = plgpu.load(
                    h_ref.at[slot, :, pl.ds(tile.row0, bk)],
                    mask=jnp.broadcast_to(valid[:, None], (bm, bk)),
                    other=0,
                )  # [bm, bk]
                acc = acc + weight_tiles.product(a, tile, precision)  # tile: [bk, bn]
            return acc

        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
        weight = combine_ref[slot, :]  # [bm] float32
        plgpu.store(out_block, acc * weight[:, None], mask=row_mask)

    if zero_inactive:

        @pl.when(active_ref[slot] == 0)
        def _():
            plgpu.store(out_block, jnp.zeros((bm, bn), jnp.float32), mask=row_mask)


def _slots(experts: jax.Array, weights: jax.Array, num_experts: int):
    """experts, weights [M, k] -> (slot_expert [S] int32, num_used [1] int32, combine [S, M] f32).

    Slot s < num_used holds the s-th used expert (ascending; for one token, its k experts in
    routing order); combine[s, m] is token m's routing weight for that expert, 0 if m did not
    choose it.
    """
    m, topk = experts.shape
    if m == 1:  # batch-1 decode: its k experts are distinct, so they are the slots (no sort)
        return (
            experts[0].astype(jnp.int32),
            jnp.full((1,), topk, jnp.int32),
            weights.astype(jnp.float32).T,
        )
    num_slots = min(num_experts, m * topk)
    dense = (
        jnp.zeros((m, num_experts), jnp.float32)
        .at[jnp.arange(m)[:, None], experts]
        .add(weights.astype(jnp.float32))
    )  # [M, E]
    used = jnp.zeros((num_experts,), bool).at[experts.reshape(-1)].set(True)
    slot_expert = jnp.argsort(~used, stable=True)[:num_slots].astype(jnp.int32)
    num_used = jnp.sum(used, dtype=jnp.int32).reshape(1)
    return slot_expert, num_used, dense[:, slot_expert].T


def decode_experts(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array | QuantizedWeight,
    w_up: jax.Array | QuantizedWeight,
    w_down: jax.Array | QuantizedWeight,
    layer: jax.Array | int = 0,
    *,
    gate_up_tiles: DecodeTiles | None = None,
    down_tiles: DecodeTiles | None = None,
    vector: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """The routed SwiGLU experts of a few tokens, reading only the experts they chose.

    Args:
      x: [M, D] tokens in the compute dtype (M <= MAX_TOKENS).
      experts: [M, k] int32 chosen experts; weights: [M, k] their routing weights.
      w_gate, w_up: [L, E, D, F]; w_down: [L, E, F, D] stacks in x's dtype, read at `layer`; or
        all three `QuantizedWeight` stacks of the same bits (w_gate and w_up also of one
        group size: they share tiles).
      layer: int32 scalar.
      gate_up_tiles, down_tiles: tiles (default: the module's), fitted to the problem.
      vector: one token (M = 1) on the vector units (`weight_tiles.vector_step`) instead of
        matrix-unit dots of 16 padded rows: the same function, float32 throughout.
    Returns:
      [M, D] float32 = sum_j weights[:, j] * SwiGLU expert experts[:, j] of x (no gradient).
    """
    m, _ = x.shape
    num_experts = w_gate.shape[1]
    if m > MAX_TOKENS:
        raise ValueError(f"decode_experts takes at most {MAX_TOKENS} tokens, got {m}")
    if vector and m != 1:
        raise ValueError(f"decode_experts(vector=True) takes one token, got {m}")
    bm = pow2_at_least(m)
    slot_expert, num_used, combine = _slots(experts, weights, num_experts)
    active = (jnp.arange(slot_expert.shape[0]) < num_used[0]).astype(jnp.int32)  # [S]
    part = expert_kernels(
        jnp.pad(x, ((0, bm - m), (0, 0))),  # [bm, D]
        slot_expert,
        active,
        jnp.pad(combine, ((0, 0), (0, bm - m))),  # [S, bm]
        (w_gate, w_up, w_down),
        layer,
        rows=m,
        gate_up_tiles=gate_up_tiles or (VECTOR_GATE_UP if vector else GATE_UP),
        down_tiles=down_tiles or (VECTOR_DOWN if vector else DOWN if bm < 64 else DOWN_WIDE),
        vector=vector,
        interpret=interpret,
    )
    return jax.lax.stop_gradient(jnp.sum(part[:, :, :m], axis=(0, 1)))


def expert_kernels(
    x: jax.Array,
    slot_expert: jax.Array,
    active: jax.Array,
    combine: jax.Array,
    stacks: tuple,
    layer: jax.Array | int,
    *,
    rows: int,
    gate_up_tiles: DecodeTiles,
    down_tiles: DecodeTiles,
    chunks: int = 1,
    vector: bool = False,
    zero_inactive: bool = True,
    interpret: bool = False,
) -> jax.Array:
    """The two kernels over S slots: part[j, s] = combine[s] * SwiGLU expert e_s of s's rows.

    Args:
      x: [bm, D] rows every slot computes, or [S, bm, D] each slot's own rows.
      zero_inactive: inactive slots' parts are zeros (callers that sum over slots); False
        leaves them unwritten (callers that read only active slots' rows).
      slot_expert: [S] int32 expert of each slot; active: [S] int32, 0 for a slot that is
        skipped (its part is zeros, its h is not written).
      combine: [S, bm] float32 weight of each slot's row (0 for rows that did not choose it).
      stacks: (w_gate, w_up, w_down) as `decode_experts` takes them.
      rows: rows of x that are real (h rows past it are not stored).
      gate_up_tiles, down_tiles: tiles, fitted to the problem here.
      chunks: consecutive slots that share an expert (`_program`'s order), 1 for none.
    Returns:
      [J, S, bm, D] float32 partial outputs, J the down kernel's splits of F.
    """
    w_gate, w_up, w_down = stacks
    check_weights(w_gate, w_up, w_down)
    bm, d, f, num_slots = x.shape[-2], x.shape[-1], w_gate.shape[-1], slot_expert.shape[0]
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    precision, itemsize = matmul_precision(x.dtype), x.dtype.itemsize
    dequant = weight_tiles.dequant_for(interpret)

    t1 = weight_tiles.fit(gate_up_tiles, bm, w_gate, f, 2, itemsize)
    h = pl.pallas_call(
        functools.partial(
            _gate_up_kernel,
            tiles=t1,
            num_cols=f // t1.block_n,
            chunks=chunks,
            rows=rows,
            precision=precision,
            vector=vector,
            dequant=dequant,
        ),
        out_shape=jax.ShapeDtypeStruct((num_slots, bm, f), x.dtype),
        grid=(num_slots * (f // t1.block_n),),
        compiler_params=plgpu.CompilerParams(num_warps=t1.num_warps, num_stages=t1.num_stages),
        interpret=interpret,
        name="expert_gate_up",
    )(slot_expert, active, layer, x, w_gate, w_up)

    t2 = weight_tiles.fit(down_tiles, bm, w_down, d, 1, itemsize)
    steps = weight_tiles.stored_rows(w_down) // (t2.splits * t2.block_k)
    return pl.pallas_call(
        functools.partial(
            _down_kernel,
            tiles=t2,
            num_cols=d // t2.block_n,
            chunks=chunks,
            steps=steps,
            rows=rows,
            precision=precision,
            vector=vector,
            zero_inactive=zero_inactive,
            dequant=dequant,
        ),
        out_shape=jax.ShapeDtypeStruct((t2.splits, num_slots, bm, d), jnp.float32),
        grid=(num_slots * (d // t2.block_n) * t2.splits,),
        compiler_params=plgpu.CompilerParams(num_warps=t2.num_warps, num_stages=t2.num_stages),
        interpret=interpret,
        name="expert_down",
    )(slot_expert, active, layer, h, combine, w_down)


def check_weights(w_gate, w_up, w_down) -> None:
    """ValueError unless the three stacks share one format the kernels read."""
    gate, up, down = (weight_tiles.format_of(w) for w in (w_gate, w_up, w_down))
    if gate != up or (gate is None) != (down is None) or (gate and gate[0] != down[0]):
        raise ValueError(
            f"decode_experts needs w_gate and w_up in one format and w_down in the same bits; "
            f"got (bits, group size) {gate}, {up}, {down}"
        )
    for w in (w_gate, w_up, w_down):
        if isinstance(w, QuantizedWeight):
            weight_tiles.check_codes(w)
