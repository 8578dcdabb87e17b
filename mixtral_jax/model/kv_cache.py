"""The KV cache of incremental decoding: an explicit pytree with a leading [L] layer axis.

`Mixtral.extend` threads it through the layer scan's carry and writes one slot per layer and new
token in place. Letters as in `transformer.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mixtral_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding, an explicit pytree.

    Slot s of the buffers holds the token at absolute index `index[s]` (-1: empty). With a
    sliding window the buffer can be a rolling one of W slots: index i lives in slot i % S.

    Attributes:
      k, v: [L, B, S, K, H].
      index: [S] int32 absolute token index held by each slot, -1 when empty.
      valid: [B, S] bool, False for empty slots and padding.
      length: [] int32 tokens written so far (the next token's absolute index).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array
    valid: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, size: int, dtype=None) -> KVCache:
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(dtype or cfg.compute.dtype)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            index=jnp.full((size,), -1, jnp.int32),
            valid=jnp.zeros((batch, size), bool),
            length=jnp.zeros((), jnp.int32),
        )
