"""Attention of one new token per row over a long KV cache (decode), reading layer l in place.

Inside `Mixtral.extend`'s layer scan the cache is every layer's stack [L, B, S, K, H]. The XLA
path slices layer l out and lays it out for a batched matmul: two copies of the layer's keys
and values per layer and token (H200, 8x7B, a 32k cache: about 84 us per layer beside 43 us for
the two matmuls). This kernel reads the keys and values where they lie, split over S so that
even batch 1 has enough programs in flight (flash decoding):

  program (b, kv head, split j): the G query heads of that kv head (padded to the matrix unit's
  16 rows) against split j of the blocks that hold a key row b sees, online softmax in float32;
  it writes its partial output and its running max and sum;
  combine (XLA): out = sum_j exp(m_j - m) o_j / sum_j exp(m_j - m) l_j.
With one split (J = 1: B * K programs are enough, e.g. 64 rows of 8 kv heads) the combine is
o / l, so each program divides and writes its output in q's dtype itself, with the same values
(the combine would multiply by exp(0) = 1 and sum one term): no float32 partials, m and l, and
no combine pass. Where also N >= Gp (8x7B: 32 query heads, Gp = 16) q is read in place from
[B, N, H] (`Queries`): program h loads the Gp rows from min(h * G, N - Gp), its G among them,
and stores those G rows of its output into [B, N, H] with a masked store, so there is no padded
copy of q, no padded output and no slice of it (the other rows it computes are neighbouring
heads' queries against this head's keys, thrown away). The paged kernel shares all of this.

Only the blocks from the first to the last that hold a seen key are read (`seen_span`, from the
mask): a cache sized for the longest request, or a row early in its generation, costs the keys
it has, not the slots it could hold. A skipped block would have counted for nothing (every key
masked), so skipping changes no result; the J splits share each row's own span.

Letters: B rows, S cache slots, K kv heads, G = N / K query heads per kv head, H head_dim,
L layers, J splits of S. Inference only: no gradient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixtral_jax.kernels.common import matmul_precision, pow2_at_least

_NEG = -1e30  # finite: a block with every key masked must not make exp(-inf - -inf) = nan
TARGET_PROGRAMS = 256  # enough to fill an H200's 132 SMs about twice


class AttentionTiles(NamedTuple):
    """How a flash-decoding kernel walks its keys.

    Attributes:
      blocks_per_step: blocks one loop step loads (their loads in flight together).
      programs: about how many programs (B * K * J) the splits J aim for.
      max_block: the largest block of S (contiguous cache; the paged one's is its pool's Z).
      num_warps, num_stages: Triton's.
    """

    blocks_per_step: int = 1
    programs: int = TARGET_PROGRAMS
    max_block: int = 128
    num_warps: int = 4
    num_stages: int = 2


DECODE_TILES = AttentionTiles()


def _blocks(
    size: int, rows_kv: int, max_block: int = 128, programs: int = TARGET_PROGRAMS
) -> tuple[int, int]:
    """(block of S, splits J): the block the largest power of two <= max_block that divides S
    (no padding of the cache, which would copy it), about `programs` programs over B*K."""
    block = max_block
    while size % block:
        block //= 2
    return block, num_splits(size // block, rows_kv, programs)


def num_splits(blocks: int, rows_kv: int, programs: int = TARGET_PROGRAMS) -> int:
    """Splits J of each row's blocks: about `programs` programs over B*K, at most one per
    block."""
    return max(1, min(blocks, programs // max(rows_kv, 1)))


def seen_span(mask: jax.Array, block: int) -> jax.Array:
    """mask [B, S] bool -> [B, 2] int32: (first, end) of the blocks of `block` keys that hold a
    key the row sees ([first, end) may hold blocks with none, between windows); (0, 0) for a row
    that sees none."""
    b, size = mask.shape
    seen = jnp.any(mask.reshape(b, size // block, block), axis=2)  # [B, S / block]
    first = jnp.argmax(seen, axis=1)
    end = seen.shape[1] - jnp.argmax(seen[:, ::-1], axis=1)
    some = jnp.any(seen, axis=1)
    return jnp.stack([jnp.where(some, first, 0), jnp.where(some, end, 0)], 1).astype(jnp.int32)


def split_range(span_ref, b, j, splits: int):
    """Inside a kernel: blocks [start, stop) of row b that split j reads, its share of the
    row's span (`seen_span`) in J contiguous pieces; empty for splits past the span."""
    first, end = span_ref[b, 0], span_ref[b, 1]
    per = jax.lax.div(end - first + (splits - 1), splits)
    start = jnp.minimum(first + j * per, end)
    return start, jnp.minimum(start + per, end)


def softmax_start(q: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The online softmax's state before any key: running max m [Gp], sum l [Gp], acc [Gp, H]."""
    rows = q.shape[0]
    return (
        jnp.full((rows,), _NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )


def online_softmax_step(carry, q, blocks, scale: float, precision):
    """Blocks of keys into the state (m, l, acc): q [Gp, H]; blocks [(k [Z, H], v [Z, H], seen
    [Z] bool)], one or several (their loads in flight together; masked keys count for nothing).
    Shared by this kernel and the paged one."""
    m, l, acc = carry
    scores = []
    for k, _, seen in blocks:
        s = (
            jax.lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            * scale
        )  # [Gp, Z]
        scores.append(jnp.where(seen[None, :], s, _NEG))
    m_new = functools.reduce(jnp.maximum, [jnp.max(s, axis=1) for s in scores], m)
    alpha = jnp.exp(m - m_new)
    l, acc = l * alpha, acc * alpha[:, None]
    for s, (_, v, seen) in zip(scores, blocks):
        p = jnp.where(seen[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        pv = jax.lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        l, acc = l + jnp.sum(p, axis=1), acc + pv
    return m_new, l, acc


class Queries(NamedTuple):
    """How a flash-decoding call lays out its queries and output (`queries_for`).

    Attributes:
      packed: q and the output are [B, N, H] (one split, N >= Gp); else q is [B, K, Gp, H]
        (padded) and the outputs float32 partials or the one-split [B, K, Gp, H].
      groups, n, rows: G, N and Gp.
      splits: J, splits of the key span (1: each program writes its normalized output).
    """

    packed: bool
    groups: int
    n: int
    rows: int
    splits: int


def queries_for(q: jax.Array, kv_heads: int, splits: int, dtype) -> tuple[Queries, jax.Array]:
    """(layout, the kernel's q in `dtype`) for q [B, N, H]."""
    b, n, h = q.shape
    groups = n // kv_heads
    rows = pow2_at_least(groups)
    layout = Queries(splits == 1 and n >= rows, groups, n, rows, splits)
    if layout.packed:
        return layout, q.astype(dtype)
    q_bkgh = q.reshape(b, kv_heads, groups, h)  # [B, K, G, H]
    pad = ((0, 0), (0, 0), (0, rows - groups), (0, 0))
    return layout, jnp.pad(q_bkgh, pad).astype(dtype)


def output_shapes(layout: Queries, b: int, kv_heads: int, h: int, dtype) -> tuple:
    """out_shape of a flash-decoding call: [B, N, H] in `dtype` (packed); per (row, kv head,
    split) acc [Gp, H], m and l [Gp] (float32 partials); or, with one split, the normalized
    output [B, K, Gp, H] in `dtype`."""
    if layout.packed:
        return (jax.ShapeDtypeStruct((b, layout.n, h), dtype),)
    splits, rows = layout.splits, layout.rows
    if splits == 1:
        return (jax.ShapeDtypeStruct((b, kv_heads, rows, h), dtype),)
    return (
        jax.ShapeDtypeStruct((b, kv_heads, splits, rows, h), jnp.float32),
        jax.ShapeDtypeStruct((b, kv_heads, splits, rows), jnp.float32),
        jax.ShapeDtypeStruct((b, kv_heads, splits, rows), jnp.float32),
    )


def load_queries(q_ref, layout: Queries, b, h) -> jax.Array:
    """Inside a kernel: program (b, h)'s q [Gp, H]."""
    if not layout.packed:
        return q_ref[b, h]
    return q_ref[b, pl.ds(_first_row(layout, h), layout.rows), :]


def _first_row(layout: Queries, h):
    """The first of the Gp rows packed program h loads: min(h * G, N - Gp), never past N."""
    return jnp.minimum(h * layout.groups, layout.n - layout.rows)


def write_outputs(out_refs, layout: Queries, b, h, j, m, l, acc) -> None:
    """Inside a kernel: program (b, h, j)'s result into `output_shapes`' refs: its partials,
    or with one split acc / l (`combine_splits`' division: a row seeing no key gets 0), packed:
    only its own G rows (a masked store)."""
    if layout.splits > 1:
        o_ref, m_ref, l_ref = out_refs
        o_ref[b, h, j] = acc
        m_ref[b, h, j] = m
        l_ref[b, h, j] = l
        return
    (o_ref,) = out_refs
    out = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)
    if not layout.packed:
        o_ref[b, h] = out
        return
    first = _first_row(layout, h)
    row = first + jax.lax.broadcasted_iota(jnp.int32, out.shape, 0)
    mine = (row >= h * layout.groups) & (row < (h + 1) * layout.groups)
    plgpu.store(o_ref.at[b, pl.ds(first, layout.rows), :], out, mask=mine)


def finish(outs: tuple, layout: Queries, q: jax.Array) -> jax.Array:
    """[B, N, H] in q's dtype from `output_shapes`' arrays: the packed output, the one-split
    output's real rows, or the splits combined."""
    if layout.splits > 1:
        return combine_splits(*outs, q)
    if layout.packed:
        return jax.lax.stop_gradient(outs[0])
    b, n, h = q.shape
    return jax.lax.stop_gradient(outs[0][:, :, : layout.groups].reshape(b, n, h))


def combine_splits(o, m, l, q: jax.Array) -> jax.Array:
    """The splits' partial softmaxes (o [B, K, J, Gp, H], m and l [B, K, J, Gp]) merged into
    [B, N, H] in q's dtype (q [B, N, H]: the query the kernel ran for; padding rows dropped)."""
    b, n, h = q.shape
    groups = n // o.shape[1]
    top = jnp.max(m, axis=2, keepdims=True)  # [B, K, 1, Gp]
    weight = jnp.exp(m - top)  # [B, K, J, Gp]
    total = jnp.sum(weight * l, axis=2)  # [B, K, Gp]
    out = jnp.sum(weight[..., None] * o, axis=2) / jnp.maximum(total, 1e-30)[..., None]
    out = out[:, :, :groups].reshape(b, n, h)  # [B, N, H]
    return jax.lax.stop_gradient(out.astype(q.dtype))


def _kernel(
    layer_ref,
    span_ref,
    q_ref,
    mask_ref,
    k_ref,
    v_ref,
    *out_refs,
    block,
    scale,
    precision,
    layout,
):
    """Program (b, kv head h, split j): online softmax of q [Gp, H] over its split's blocks,
    written by `write_outputs`."""
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    q = load_queries(q_ref, layout, b, h)  # [Gp, H]

    def step(index, carry):
        s0 = pl.multiple_of(index * block, block)
        k = k_ref[layer, b, pl.ds(s0, block), h, :]  # [block, H]
        v = v_ref[layer, b, pl.ds(s0, block), h, :]
        seen = mask_ref[b, pl.ds(s0, block)] > 0  # [block]
        return online_softmax_step(carry, q, [(k, v, seen)], scale, precision)

    start, stop = split_range(span_ref, b, j, layout.splits)
    m, l, acc = jax.lax.fori_loop(start, stop, step, softmax_start(q))
    write_outputs(out_refs, layout, b, h, j, m, l, acc)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    mask: jax.Array,
    *,
    tiles: AttentionTiles = DECODE_TILES,
    interpret: bool = False,
) -> jax.Array:
    """Softmax attention of one query per row over layer `layer` of the cache, read in place.

    Args:
      q: [B, N, H] the new tokens' rotated queries (compute dtype).
      k_cache, v_cache: [L, B, S, K, H] every layer's cache (the new token already written).
      layer: [] int32.
      mask: [B, S] bool, the keys each row's query sees (`cached_attention_mask` at T = 1).
      tiles: the largest block, programs, warps and stages (`blocks_per_step` is the paged
        kernel's: here one block a step).
    Returns:
      [B, N, H] in q's dtype; the same function as `attention.dot_product_attention`.
    """
    b, _, h = q.shape
    _, _, size, kv_heads, _ = k_cache.shape
    block, splits = _blocks(size, b * kv_heads, tiles.max_block, tiles.programs)
    layout, q_in = queries_for(q, kv_heads, splits, k_cache.dtype)
    kernel = functools.partial(
        _kernel,
        block=block,
        scale=h**-0.5,
        precision=matmul_precision(k_cache.dtype),
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
        name="decode_attention",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        seen_span(mask, block),
        q_in,
        mask.astype(jnp.int8),
        k_cache,
        v_cache,
    )
    return finish(outs, layout, q)
