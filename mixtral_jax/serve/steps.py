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
Both pick each row's greedy token (argmax) and return the logits it came from, with the routing
of that position: [L, rows, k] experts and gate weights, from the router logits the MoE computed
(`route_logits` again: the same function of the same logits). Where any row of a call samples
(temperature > 0), the host dispatches `sample` on those logits right after it: each row's own
settings and key (`sample_rows`), its token written over the greedy one in `last` before the next
step reads it (the device runs calls in order: no wait). `sample` is compiled per row count and
per whether any row asks for top-k / top-p (`needs_filters`): their sort over the vocabulary
costs a 256-row 8x7B step ~1.1 ms on an H200, and a batch of greedy or unfiltered rows skips it.
`traces` counts how often any of them was traced: after `Engine.warmup`, a steady state that
compiles nothing more leaves it at 1 + len(chunk_rows) per (batch, width), plus 2 per distinct
row count of the decode batches and prefill groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mixtral_jax.generate.sampling import RowSampling, needs_filters, sample_rows
from mixtral_jax.model.paged_kv_cache import PagedGroup, PagedKVCache
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.moe.ops import route_logits


@struct.dataclass
class StepOutput:
    """tokens: [rows] int32 next tokens (greedy from a step, sampled after `Steps.sample`);
    experts: [L, rows, k] int32 and weights: [L, rows, k] float32, the routing of the position
    each token was chosen at; logits: [rows, V] float32 of that position."""

    tokens: jax.Array
    experts: jax.Array
    weights: jax.Array
    logits: jax.Array


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
        self._sample = jax.jit(self._sample_fn, donate_argnums=(0,), static_argnames="filters")

    def _routing(self, router_logits: jax.Array, logits: jax.Array) -> StepOutput:
        """router_logits: [L, rows, E], logits [rows, V] -> StepOutput with the greedy tokens
        and the routing of those positions."""
        routing = route_logits(router_logits, self.cfg.num_experts_per_tok)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return StepOutput(tokens, routing.experts, routing.weights, logits)

    def _sample_fn(self, last, slots, logits, sampling, *, filters: bool):
        """logits [rows, V] -> (last [max_batch] with each slots [rows] row's sampled token
        written over the greedy one (slot max_batch: dropped), the [rows] tokens)."""
        self.traces += 1
        tokens = sample_rows(logits, sampling, filters=filters)
        return last.at[slots].set(tokens, mode="drop"), tokens

    def _decode_fn(self, state, pool, last, slots, block_table, lengths, active):
        """last [max_batch]: each engine row's last sampled token; slots [B]: the row each
        batch row decodes (max_batch: idle), its token fed at lengths [B] for active [B] rows
        -> (pool, last with the new tokens of those rows, StepOutput)."""
        self.traces += 1
        model = nnx.merge(self.graphdef, state)
        tokens = last.at[slots].get(mode="fill", fill_value=0)  # [B]
        cache = PagedKVCache(k=pool[0], v=pool[1], block_table=block_table, lengths=lengths)
        out, cache = model.extend_paged(tokens[:, None], cache, valid=active[:, None])
        routing = self._routing(out.aux.layers.router_logits[:, :, 0], out.logits[:, 0])
        last = last.at[slots].set(routing.tokens, mode="drop")
        return (cache.k, cache.v), last, routing

    def _fused_fn(self, state, pool, last, decode, chunk):
        """decode: (slots [B], block_table, lengths, active) as `_decode_fn`; chunk: (tokens
        [Q, C] of which the first counts [Q] are real, block_table [Q, R], lengths [Q], counts,
        slots [Q]: the row a final chunk's token is the last token of, else max_batch) ->
        (pool, last, decode StepOutput, chunk StepOutput at each row's last real token:
        meaningful for a row's final chunk)."""
        self.traces += 1
        model = nnx.merge(self.graphdef, state)
        slots, table, lengths, active = decode
        chunk_tokens, chunk_table, chunk_lengths, counts, chunk_slots = chunk
        tokens = last.at[slots].get(mode="fill", fill_value=0)  # [B]
        valid = jnp.arange(chunk_tokens.shape[1], dtype=jnp.int32)[None, :] < counts[:, None]
        groups = (
            PagedGroup(tokens[:, None], table, lengths, active[:, None]),
            PagedGroup(chunk_tokens, chunk_table, chunk_lengths, valid),  # [Q, C]
        )
        (d, c), pool, _ = model.extend_paged_groups(groups, pool[0], pool[1])
        decoded = self._routing(d.aux.layers.router_logits[:, :, 0], d.logits[:, 0])
        end = jnp.maximum(counts - 1, 0)  # [Q]
        logits = jnp.take_along_axis(c.logits, end[:, None, None], axis=1)[:, 0]  # [Q, V]
        router = c.aux.layers.router_logits  # [L, Q, C, E]
        router = jnp.take_along_axis(router, end[None, :, None, None], axis=2)[:, :, 0]
        first = self._routing(router, logits)
        last = last.at[slots].set(decoded.tokens, mode="drop")
        return pool, last.at[chunk_slots].set(first.tokens, mode="drop"), decoded, first

    def decode(self, pool, last, slots, block_table, lengths, active, sampling):
        """Runs the decode step on host arrays (pool and last on the device, donated), then
        `sample` where a row samples; returns (pool, last, StepOutput of device arrays)."""
        pool, last, out = self._decode(self.state, pool, last, slots, block_table, lengths, active)
        last, out = self.sample(last, slots, out, sampling)
        return pool, last, out

    def decode_with_chunk(self, pool, last, decode: tuple, chunk: tuple):
        """Runs the decode step and a prefill chunk in one call (see `_fused_fn`), then `sample`
        for each where a row samples; returns (pool, last, decode StepOutput, chunk StepOutput)
        of device arrays."""
        *decode_args, decode_sampling = decode
        *chunk_args, chunk_sampling, chunk_slots = chunk
        pool, last, decoded, first = self._fused(
            self.state, pool, last, tuple(decode_args), (*chunk_args, chunk_slots)
        )
        last, decoded = self.sample(last, decode[0], decoded, decode_sampling)
        last, first = self.sample(last, chunk_slots, first, chunk_sampling)
        return pool, last, decoded, first

    def sample(self, last, slots, out: StepOutput, sampling: RowSampling, *, force=None):
        """The tokens of rows that sample (temperature > 0, host arrays `sampling`), drawn from
        out.logits and written to `last` at `slots`: (last, out with them); (last, out) as given
        when every row is greedy. force: compile and run the variant filters=force regardless
        (`Engine.warmup`)."""
        if force is None:
            if not np.any(np.asarray(sampling.temperature) > 0):
                return last, out
            force = needs_filters(sampling)
        last, tokens = self._sample(last, slots, out.logits, sampling, filters=force)
        return last, out.replace(tokens=tokens)
