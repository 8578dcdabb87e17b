"""The engine's two compiled calls over the paged KV cache, each of fixed shapes.

  decode        [B, 1]: one new token for every row of the batch (idle rows masked: their
                writes go to the sink block), B one of the engine's compiled batch sizes.
  decode+chunk  the same decode step and a prefill group [Q, C]: Q chunks of up to C prompt
                tokens (a short chunk masked), each of one row's block table and lengths
                (several may be one prompt's, in order), in one call
                (`Mixtral.extend_paged_groups`: the experts' weights are read once for both, so
                a prefill costs the running streams its arithmetic, not a second weight read).
The decode step is compiled once per (batch B, table width R) pair (`Engine.batches`,
`Engine.widths`), the decode step with a prefill group once per (B, R, Q) (`Engine.chunk_rows`).

Both donate the pool and `last` [max_batch], each engine row's last sampled token: a decoding
row's input is read from it (`slots` map batch rows to engine rows) and its new token written
back, as is a final prefill chunk's first token, so no token waits for the host between steps.
Both sample each row's next token with its own settings and key (`sample_rows`), and return the
routing of the position that chose it: [L, rows, k] experts and
gate weights, from the router logits the MoE computed (`route_logits` again: the same function
of the same logits). `traces` counts how often they were traced: after `Engine.warmup`, a steady
state that compiles nothing more leaves it at 1 + len(chunk_rows) per (batch, width).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mixtral_jax.generate.sampling import RowSampling, sample_rows
from mixtral_jax.model.paged_kv_cache import PagedGroup, PagedKVCache
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.moe.ops import route_logits


@struct.dataclass
class StepOutput:
    """tokens: [rows] int32 sampled next tokens; experts: [L, rows, k] int32 and weights:
    [L, rows, k] float32, the routing of the position each token was sampled at."""

    tokens: jax.Array
    experts: jax.Array
    weights: jax.Array


def idle_sampling(rows: int) -> RowSampling:
    """Greedy settings for `rows` rows (host numpy arrays, filled in per step)."""
    return RowSampling(
        temperature=np.zeros(rows, np.float32),
        top_k=np.zeros(rows, np.int32),
        top_p=np.ones(rows, np.float32),
        seed=np.zeros(rows, np.uint32),
        counter=np.zeros(rows, np.int32),
    )


class Steps:
    """The compiled decode step and decode step + prefill chunk of one model."""

    def __init__(self, model: Mixtral):
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.traces = 0
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2))
        self._fused = jax.jit(self._fused_fn, donate_argnums=(1, 2))

    def _routing(self, router_logits: jax.Array, tokens: jax.Array) -> StepOutput:
        """router_logits: [L, rows, E] -> StepOutput with the routing of those positions."""
        routing = route_logits(router_logits, self.cfg.num_experts_per_tok)
        return StepOutput(tokens=tokens, experts=routing.experts, weights=routing.weights)

    def _decode_fn(self, state, pool, last, slots, block_table, lengths, active, sampling):
        """last [max_batch]: each engine row's last sampled token; slots [B]: the row each
        batch row decodes (max_batch: idle), its token fed at lengths [B] for active [B] rows
        -> (pool, last with the new tokens of those rows, StepOutput)."""
        self.traces += 1
        model = nnx.merge(self.graphdef, state)
        tokens = last.at[slots].get(mode="fill", fill_value=0)  # [B]
        cache = PagedKVCache(k=pool[0], v=pool[1], block_table=block_table, lengths=lengths)
        out, cache = model.extend_paged(tokens[:, None], cache, valid=active[:, None])
        chosen = sample_rows(out.logits[:, 0], sampling)
        last = last.at[slots].set(chosen, mode="drop")
        routing = self._routing(out.aux.layers.router_logits[:, :, 0], chosen)
        return (cache.k, cache.v), last, routing

    def _fused_fn(self, state, pool, last, decode, chunk):
        """decode: (slots [B], block_table, lengths, active, sampling) as `_decode_fn`; chunk:
        (tokens [Q, C] of which the first counts [Q] are real, block_table [Q, R], lengths [Q],
        counts, sampling, slots [Q]: the row a final chunk's sample is the last token of, else
        max_batch) -> (pool, last, decode StepOutput, chunk StepOutput at each row's last real
        token: meaningful for a row's final chunk)."""
        self.traces += 1
        model = nnx.merge(self.graphdef, state)
        slots, table, lengths, active, decode_sampling = decode
        chunk_tokens, chunk_table, chunk_lengths, counts, chunk_sampling, chunk_slots = chunk
        tokens = last.at[slots].get(mode="fill", fill_value=0)  # [B]
        valid = jnp.arange(chunk_tokens.shape[1], dtype=jnp.int32)[None, :] < counts[:, None]
        groups = (
            PagedGroup(tokens[:, None], table, lengths, active[:, None]),
            PagedGroup(chunk_tokens, chunk_table, chunk_lengths, valid),  # [Q, C]
        )
        (d, c), pool, _ = model.extend_paged_groups(groups, pool[0], pool[1])
        chosen = sample_rows(d.logits[:, 0], decode_sampling)
        decoded = self._routing(d.aux.layers.router_logits[:, :, 0], chosen)
        end = jnp.maximum(counts - 1, 0)  # [Q]
        logits = jnp.take_along_axis(c.logits, end[:, None, None], axis=1)[:, 0]  # [Q, V]
        router = c.aux.layers.router_logits  # [L, Q, C, E]
        router = jnp.take_along_axis(router, end[None, :, None, None], axis=2)[:, :, 0]
        first = sample_rows(logits, chunk_sampling)  # [Q]
        last = last.at[slots].set(chosen, mode="drop").at[chunk_slots].set(first, mode="drop")
        return pool, last, decoded, self._routing(router, first)

    def decode(self, pool, last, slots, block_table, lengths, active, sampling):
        """Runs the decode step on host arrays (pool and last on the device, donated); returns
        (pool, last, StepOutput of device arrays)."""
        return self._decode(self.state, pool, last, slots, block_table, lengths, active, sampling)

    def decode_with_chunk(self, pool, last, decode: tuple, chunk: tuple):
        """Runs the decode step and a prefill chunk in one call (see `_fused_fn`); returns
        (pool, last, decode StepOutput, chunk StepOutput) of device arrays."""
        return self._fused(self.state, pool, last, decode, chunk)
