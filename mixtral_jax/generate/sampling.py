"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus); one setting
for a whole batch (`sample`) or each row its own (`sample_rows`, the serving engine's step)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mixtral_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.

    Raises:
      ConfigError: temperature < 0 or not finite, top_k < 0, top_p outside (0, 1].
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0
        ):
            raise ConfigError(
                f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be an integer >= 0 (0 = off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """logits: [B, V] float32 -> [B] int32 next tokens."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params.temperature
    if params.top_k:
        kth = jax.lax.top_k(logits, min(params.top_k, logits.shape[-1]))[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)  # most probable first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more probable tokens
        keep_sorted = before < params.top_p  # the most probable token is always kept
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@struct.dataclass
class RowSampling:
    """Per-row sampling settings of one batched step, as arrays (one compiled step serves every
    mix of settings: nothing here is static).

    Attributes:
      temperature: [B] float32, 0 = greedy.
      top_k: [B] int32, 0 = off.
      top_p: [B] float32, 1 = off.
      seed: [B] uint32 the row's request seed.
      counter: [B] int32 the index of the token being drawn among the row's new tokens.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    counter: jax.Array

    def keys(self) -> jax.Array:
        """[B] PRNG keys, fold_in(key(seed), counter): a row's draws depend on its own seed and
        token index only, never on which other rows share the batch."""
        return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
            self.seed, self.counter
        )


def sample_rows(logits: jax.Array, rows: RowSampling, *, filters: bool = True) -> jax.Array:
    """`sample` with each row's own settings and key: logits [B, V] float32 -> [B] int32.

    Row b's token equals `sample(logits[b:b+1], rows.keys()[b], SamplingParams(...row b...))`.
    With `filters` (static) top-k and top-p run for every row: a sort over the vocabulary per row
    ([256, 32000]: ~1.1 ms of an H200 decode step, `bench/engine.py --profile`). Without, they are
    skipped: the same tokens for rows whose top_k is 0 and top_p 1 (the caller's promise; the
    serving engine picks the variant on the host, `serve/steps.py`). Nothing depends on the
    values through control flow: no `lax.cond` on whether any row samples. On a GPU a
    conditional copies its predicate to the host and waits for it, so the host could not
    dispatch the next step before this one's whole forward had run (H200, the engine's batch-1
    8x7B step: 6.7 of its 9.2 ms of host time were spent inside that cond,
    `bench/host_trace.py`).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = rows.temperature > 0
    scaled = logits / jnp.where(hot, rows.temperature, 1.0)[:, None]
    if filters:
        scaled = _top_k_top_p(scaled, rows)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(
        rows.keys(), scaled
    )
    return jnp.where(hot, drawn.astype(jnp.int32), greedy)


def needs_filters(rows: RowSampling) -> bool:
    """Whether any sampled row (temperature > 0) of host arrays asks for top-k or top-p."""
    hot = np.asarray(rows.temperature) > 0
    filtered = (np.asarray(rows.top_k) > 0) | (np.asarray(rows.top_p) < 1)
    return bool(np.any(hot & filtered))


def _top_k_top_p(scaled: jax.Array, rows: RowSampling) -> jax.Array:
    """scaled [B, V] -> the same with -inf past each row's top-k and outside its nucleus (the
    most probable tokens whose mass before them is < top_p), ranked by a stable sort as in
    `sample`."""
    vocab = scaled.shape[-1]
    order = jnp.argsort(-scaled, axis=-1)  # most probable first, stable as in `sample`
    ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V]
    k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, vocab), vocab)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)  # [B, 1]
    ranked = jnp.where(ranked < kth, -jnp.inf, ranked)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more probable tokens
    keep_ranked = (before < rows.top_p[:, None]) | (rows.top_p[:, None] >= 1)
    keep_ranked &= ranked > -jnp.inf
    keep = (
        jnp.zeros_like(keep_ranked).at[jnp.arange(scaled.shape[0])[:, None], order].set(keep_ranked)
    )
    return jnp.where(keep, scaled, -jnp.inf)
