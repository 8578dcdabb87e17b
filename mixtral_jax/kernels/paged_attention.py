"""Attention of one new token per row over a paged KV cache (decode), reading the pool in place.

The paged cache (`model/paged_kv_cache.py`) is every layer's block pool [L, P, Z, K, H]; row b's
token i lives in block table[b, i // Z] at offset i % Z. The XLA oracle gathers each row's
blocks of the layer into [B, S, K, H] (a copy of every row's keys and values per layer and
step) before the einsums. This kernel follows the block table instead, flash decoding as in
`decode_attention.py`:

  program (b, kv head, split j): the G query heads of that kv head (padded to the matrix unit's
  16 rows) against split j of the table entries whose blocks hold keys row b sees,
  `blocks_per_step` blocks of Z keys a loop step, online softmax in float32; it writes its
  partial output and its running max and sum;
  combine (XLA): out = sum_j exp(m_j - m) o_j / sum_j exp(m_j - m) l_j.
With one split (J = 1, e.g. 256 rows) each program writes its normalized output itself, no
combine pass, and with N >= Gp reads q [B, N, H] in place and stores only its heads' rows
(`decode_attention.Queries`, shared with the contiguous kernel).

Only a row's entries from the first to the last with a seen key are followed
(`decode_attention.seen_span`): the engine's tables are as wide as its compiled shape (say 128
entries for 2,048 tokens) while a row holds the blocks of its own length, and the entries past
it all name the sink block. Those entries would have counted for nothing, so skipping them
changes no result.

Letters: B rows, R table entries per row, Z tokens per block (a multiple of 16), P pool blocks,
K kv heads, G = N / K, H head_dim, L layers, J splits. JAX's own Pallas paged attention
(`jax.experimental.pallas.ops.gpu.paged_attention`) wants one layer's pages as [K, P, Z, H],
which a layer scan over [L, ...] could only hand it by copying the layer out, and has no
sliding window (here the mask carries it). Inference only: no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixtral_jax.kernels.common import matmul_precision
from mixtral_jax.kernels.decode_attention import (
    AttentionTiles,
    finish,
    load_queries,
    num_splits,
    online_softmax_step,
    output_shapes,
    queries_for,
    seen_span,
    softmax_start,
    split_range,
    write_outputs,
)

MIN_BLOCK = 16  # the matrix unit's smallest tile: Z must be a multiple
# bench/attention_span.py --sweep on one H200 (256 rows of 128-640 tokens in 2,048-token tables,
# 8x7B heads, bf16): 246 us against 321 for one entry a step with 4 warps; 32- or 64-token pool
# blocks were no faster (298-311 us).
PAGED_TILES = AttentionTiles(blocks_per_step=4, num_warps=2, num_stages=2)


def _kernel(
    layer_ref,
    span_ref,
    table_ref,
    q_ref,
    mask_ref,
    k_ref,
    v_ref,
    *out_refs,
    block,
    per_step,
    pages,
    scale,
    precision,
    layout,
):
    """Program (b, kv head h, split j): online softmax of q [Gp, H] over its blocks, `per_step`
    table entries a loop step (their loads in flight together), written by `write_outputs`."""
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    q = load_queries(q_ref, layout, b, h)  # [Gp, H]
    start, stop = split_range(span_ref, b, j, layout.splits)

    def load(index):  # entry `index` of the split, or (past its end) its last one, unseen
        entry = jnp.minimum(index, stop - 1)
        # clamped like XLA's gather (the oracle): no table value can send a read off the pool
        page = jnp.clip(table_ref[b, entry], 0, pages - 1)
        k = k_ref[layer, page, :, h, :]  # [Z, H]
        v = v_ref[layer, page, :, h, :]
        s0 = pl.multiple_of(entry * block, block)
        seen = (mask_ref[b, pl.ds(s0, block)] > 0) & (index < stop)  # [Z]
        return k, v, seen

    def step(i, carry):
        first = start + i * per_step
        blocks = [load(first + t) for t in range(per_step)]
        return online_softmax_step(carry, q, blocks, scale, precision)

    steps = jax.lax.div(stop - start + (per_step - 1), per_step)
    m, l, acc = jax.lax.fori_loop(0, steps, step, softmax_start(q))
    write_outputs(out_refs, layout, b, h, j, m, l, acc)


def paged_decode_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    block_table: jax.Array,
    mask: jax.Array,
    *,
    tiles: AttentionTiles = PAGED_TILES,
    interpret: bool = False,
) -> jax.Array:
    """Softmax attention of one query per row over its blocks of layer `layer`, read in place.

    Args:
      q: [B, N, H] the new tokens' rotated queries (compute dtype).
      k_pool, v_pool: [L, P, Z, K, H] every layer's pool (the new token already written).
      layer: [] int32.
      block_table: [B, R] int32 each row's blocks.
      mask: [B, S = R * Z] bool, the keys each row's query sees (`paged_attention_mask`, T = 1).
      tiles: table entries a loop step (`blocks_per_step`), programs, warps and stages.
    Returns:
      [B, N, H] in q's dtype; the same function as the gather + `dot_product_attention` oracle.
    """
    b, _, h = q.shape
    _, _, block, kv_heads, _ = k_pool.shape
    if block % MIN_BLOCK:
        raise ValueError(f"block_size={block} must be a multiple of {MIN_BLOCK} for this kernel")
    entries = block_table.shape[1]
    splits = num_splits(entries, b * kv_heads, tiles.programs)
    layout, q_in = queries_for(q, kv_heads, splits, k_pool.dtype)
    kernel = functools.partial(
        _kernel,
        block=block,
        per_step=tiles.blocks_per_step,
        pages=k_pool.shape[1],
        scale=h**-0.5,
        precision=matmul_precision(k_pool.dtype),
        layout=layout,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=output_shapes(layout, b, kv_heads, h, q.dtype),
        grid=(b, kv_heads, splits),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages
        ),
        interpret=interpret,
        name="paged_decode_attention",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        seen_span(mask, block),
        block_table.astype(jnp.int32),
        q_in,
        mask.astype(jnp.int8),
        k_pool,
        v_pool,
    )
    return finish(outs, layout, q)
