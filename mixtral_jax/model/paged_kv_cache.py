"""A paged KV cache: one pool of fixed-size blocks shared by every row, and a block table per row.

Unlike `KVCache` (one contiguous buffer per row, one shared length), each row here has its own
length and owns only the blocks its tokens fill, so a row's KV memory grows with its length and a
finished row's blocks go straight back to the pool (`serve/blocks.py` hands them out). Token i of
row b lives in block `block_table[b, i // Z]` at offset `i % Z`.

Letters as in `transformer.py`, plus P blocks in the pool, Z tokens per block (block_size) and
R = S / Z table entries per row (max_blocks_per_row), so a row can hold S = R * Z tokens.

Block 0 is the sink: never handed to a row, it receives the writes of padding tokens and of
inactive rows (whose table entries are all 0), so every compiled call writes unconditionally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mixtral_jax.config import ModelConfig

SINK_BLOCK = 0


@struct.dataclass
class PagedKVCache:
    """Keys and values of every layer in a block pool, with each row's block table and length.

    Attributes:
      k, v: [L, P, Z, K, H] the block pool.
      block_table: [B, R] int32 pool block of each of a row's R table entries (0: none yet).
      lengths: [B] int32 tokens already in the cache per row (the next token's absolute index).
    """

    k: jax.Array
    v: jax.Array
    block_table: jax.Array
    lengths: jax.Array

    @classmethod
    def create(
        cls, cfg: ModelConfig, batch: int, num_blocks: int, block_size: int, blocks_per_row: int
    ) -> PagedKVCache:
        """An empty pool of `num_blocks` blocks (block 0 the sink) and `batch` empty rows."""
        pool = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(cfg.compute.dtype)
        return cls(
            k=jnp.zeros(pool, dtype),
            v=jnp.zeros(pool, dtype),
            block_table=jnp.zeros((batch, blocks_per_row), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def row_capacity(self) -> int:
        """S = R * Z, the tokens one row's table can address."""
        return self.block_table.shape[1] * self.block_size


def write_locations(
    cache: PagedKVCache, new_tokens: int, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Pool (block, offset) of each of T new tokens per row, the sink for padding.

    New token t of row b has absolute index lengths[b] + t. Args: new_tokens: T; valid: [B, T]
    bool. Returns (blocks, offsets), each [B, T] int32. A valid token past the row's capacity is
    the caller's error (the engine refuses such requests before they run).
    """
    z = cache.block_size
    index = cache.lengths[:, None] + jnp.arange(new_tokens, dtype=jnp.int32)  # [B, T]
    entry = jnp.minimum(index // z, cache.block_table.shape[1] - 1)
    blocks = jnp.take_along_axis(cache.block_table, entry, axis=1)  # [B, T]
    blocks = jnp.where(valid, blocks, SINK_BLOCK)
    offsets = jnp.where(valid, index % z, 0)
    return blocks.astype(jnp.int32), offsets.astype(jnp.int32)


def write_paged(
    pool: jax.Array, new: jax.Array, layer: jax.Array, blocks: jax.Array, offsets: jax.Array
) -> jax.Array:
    """Writes new [B, T, K, H] into layer `layer` of pool [L, P, Z, K, H] at (blocks, offsets)
    [B, T]: a scatter of B*T token slots, in place on the layer scan's carry. Distinct valid
    tokens own distinct slots; padding all lands in the sink, where any of them may win."""
    return pool.at[layer, blocks, offsets].set(new.astype(pool.dtype), mode="promise_in_bounds")


def gather_rows(pool: jax.Array, layer: jax.Array, block_table: jax.Array) -> jax.Array:
    """Layer `layer` of pool [L, P, Z, K, H] laid out per row: [B, S] tokens in index order.

    block_table: [B, R] -> [B, S = R * Z, K, H] (entries past a row's length hold stale or sink
    data: the mask hides them). The XLA oracle of paged attention: a copy of every row's blocks.
    """
    layer_pool = jax.lax.dynamic_index_in_dim(pool, layer, keepdims=False)  # [P, Z, K, H]
    rows = layer_pool[block_table]  # [B, R, Z, K, H]
    b, r, z, kv, h = rows.shape
    return rows.reshape(b, r * z, kv, h)  # [B, S, K, H]


def paged_attention_mask(
    lengths: jax.Array, new_tokens: int, valid: jax.Array, row_capacity: int, window: int | None
) -> jax.Array:
    """Which of a row's S = row_capacity cached tokens each of its T new queries may see.

    Query t of row b sits at absolute index q = lengths[b] + t and has already been written; it
    sees key index j iff j <= q (causal, which also hides everything past the row's end) and,
    with a sliding window W, j > q - W. Padding queries see nothing useful (their output is
    ignored). lengths: [B]; valid: [B, T] -> [B, T, S] bool.
    """
    q_index = lengths[:, None] + jnp.arange(new_tokens, dtype=jnp.int32)  # [B, T]
    k_index = jnp.arange(row_capacity, dtype=jnp.int32)  # [S]
    allowed = k_index[None, None, :] <= q_index[:, :, None]  # [B, T, S]
    if window is not None:
        allowed &= k_index[None, None, :] > q_index[:, :, None] - window
    return allowed & valid[:, :, None]
