"""Batched generation: a prefill over the left-padded prompts, then a compiled decode loop.

- Prompts of different lengths are left-padded to a bucket (a power of two up to the prefill
  chunk, a multiple of it beyond), so new lengths do not recompile; positions follow each row's
  real tokens (HF's cumsum(mask) - 1), padding is never attended to.
- A prompt up to `prefill_chunk` tokens is prefilled in one `extend` call; a longer one in
  chunks of `prefill_chunk` tokens, each an `extend` over the cache (one compiled shape), so
  prefill memory is bounded by the chunk: no score tensor over the whole prompt.
- The KV cache is an explicit pytree threaded through the layer scan (`model.KVCache`); with a
  sliding window it is a rolling buffer of W slots.
- Decoding runs `chunk` tokens per compiled call (a `lax.scan`), then hands them to the host for
  streaming, stop strings and EOS bookkeeping.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.config import ConfigError
from mixtral_jax.generate.sampling import SamplingParams, sample
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.transformer import Mixtral

GREEDY = SamplingParams()  # the default: temperature 0
# Tokens per prefill call of a long prompt. H200, full 8x7B bf16 (bench/long_context.py): a
# 32,640-token prompt's first token in 2.75 s with chunks of 4,096 against 2.87 s with 2,048
# (bigger grouped matmuls; attention skips the cache's empty tail either way), 8,192 tokens in
# 487 ms against 518.
PREFILL_CHUNK = 4096


@dataclasses.dataclass
class GenerationResult:
    """tokens: new token ids per prompt (EOS excluded); finish: 'eos' | 'stop' | 'length'."""

    tokens: list[list[int]]
    finish: list[str]
    prompt_bucket: int
    time_to_first_token_s: float
    decode_s: float  # decode time after the first compiled call (compilation excluded),
    decode_tokens: int  # and tokens decoded in it; all decoding if one call sufficed
    tokens_per_expert: np.ndarray  # [L, E] over prompt and generated tokens


def bucket(length: int, minimum: int = 16) -> int:
    """The padded prompt length: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(length - 1, 0).bit_length())


def prompt_width(length: int, chunk: int) -> int:
    """The padded prompt width: `bucket(length)` while that fits one prefill chunk, else the
    next multiple of `chunk` (prefilled chunk by chunk)."""
    padded = bucket(length)
    return padded if padded <= chunk else -(-length // chunk) * chunk


def left_pad(prompts: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """([B, width] int32 ids, [B, width] bool real-token mask), prompts right-aligned."""
    tokens = np.zeros((len(prompts), width), np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        valid[row, width - len(prompt) :] = True
    return tokens, valid


class _Rows:
    """Host-side bookkeeping of each row: its new tokens, whether and why it finished."""

    def __init__(self, batch, max_new_tokens, eos, on_tokens, should_stop):
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.finish = ["length"] * batch
        self.done = np.zeros(batch, bool)
        self.max_new_tokens, self.eos = max_new_tokens, eos
        self.on_tokens, self.should_stop = on_tokens, should_stop

    def take(self, row: int, new: list[int]) -> None:
        """Appends a row's new tokens up to EOS and the length limit; streams them; checks stops."""
        if self.done[row]:
            return
        if self.eos in new:
            new = new[: new.index(self.eos)]
            self.done[row], self.finish[row] = True, "eos"
        new = new[: self.max_new_tokens - len(self.out[row])]
        self.out[row].extend(new)
        if new and self.on_tokens is not None:
            self.on_tokens(row, new)
        if (
            not self.done[row]
            and self.should_stop is not None
            and self.should_stop(row, self.out[row])
        ):
            self.done[row], self.finish[row] = True, "stop"
        if len(self.out[row]) >= self.max_new_tokens:
            self.done[row] = True


class Generator:
    """Compiled prefill and decode for one model; reuse it across calls to reuse compilations."""

    def __init__(self, model: Mixtral, chunk: int = 8, prefill_chunk: int = PREFILL_CHUNK):
        """chunk: decode steps per compiled call; prefill_chunk: C, prompt tokens per prefill
        call (longer prompts are prefilled in chunks of C)."""
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk={prefill_chunk} must be >= 1")
        self.cfg = model.cfg
        self.chunk, self.prefill_chunk = chunk, prefill_chunk
        self.graphdef, self.state = nnx.split(model)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_size", "all_logits"))
        self._new_cache = jax.jit(
            lambda batch, size: KVCache.create(self.cfg, batch, size), static_argnums=(0, 1)
        )
        self._prefill_chunk = jax.jit(
            self._prefill_chunk_fn, static_argnames=("all_logits",), donate_argnums=(1,)
        )
        self._decode = jax.jit(
            self._decode_fn, static_argnames=("sampling", "steps"), donate_argnums=(1,)
        )

    # ---- compiled pieces ------------------------------------------------------------------
    def _prefill_fn(self, state, tokens, valid, cache_size, all_logits=False):
        """One-shot prefill of tokens, valid [B, T] into a new cache of `cache_size` slots ->
        (logits [B, V] of the last token, or [B, T, V] with `all_logits`; cache; next positions
        [B]; tokens per expert [L, E])."""
        model = nnx.merge(self.graphdef, state)
        cache = KVCache.create(self.cfg, tokens.shape[0], cache_size)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        out, cache = model.extend(tokens, cache, positions=positions, valid=valid)
        logits = out.logits if all_logits else out.logits[:, -1]
        return logits, cache, positions[:, -1] + 1, out.aux.layers.tokens_per_expert

    def _prefill_chunk_fn(self, state, cache, tokens, valid, positions, all_logits=False):
        """One prefill chunk: tokens, valid, positions [B, C] extend the (donated) cache ->
        (logits [B, V] of the chunk's last token, or [B, C, V]; cache; tokens per expert)."""
        model = nnx.merge(self.graphdef, state)
        out, cache = model.extend(tokens, cache, positions=positions, valid=valid)
        logits = out.logits if all_logits else out.logits[:, -1]
        return logits, cache, out.aux.layers.tokens_per_expert

    def prefill(self, tokens, valid, cache_size: int, all_logits: bool = False):
        """Prefills left-padded prompts tokens, valid [B, W] (numpy) into a new cache of
        `cache_size` slots: one call when W <= prefill_chunk, else W / C chunk calls (W a
        multiple of C, see `prompt_width`).

        Returns:
          (logits [B, V] of the last token, or [B, W, V] with `all_logits`; cache; next
          positions [B]; tokens per expert [L, E]).
        """
        width, c = tokens.shape[1], self.prefill_chunk
        if width <= c:
            return self._prefill(
                self.state,
                jnp.asarray(tokens),
                jnp.asarray(valid),
                cache_size=cache_size,
                all_logits=all_logits,
            )
        if width % c:
            raise ValueError(f"prompt width {width} is not a multiple of prefill_chunk={c}")
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)  # [B, W]
        cache, logits, load = self._new_cache(tokens.shape[0], cache_size), [], 0
        for start in range(0, width, c):
            piece = slice(start, start + c)
            last, cache, chunk_load = self._prefill_chunk(
                self.state,
                cache,
                jnp.asarray(tokens[:, piece]),
                jnp.asarray(valid[:, piece]),
                jnp.asarray(positions[:, piece]),
                all_logits=all_logits,
            )
            logits.append(last)
            load = load + chunk_load
        logits = jnp.concatenate(logits, axis=1) if all_logits else logits[-1]
        return logits, cache, jnp.asarray(positions[:, -1] + 1), load

    def _decode_fn(self, state, cache, last, next_pos, done, key, eos_id, sampling, steps):
        model = nnx.merge(self.graphdef, state)

        def one(carry, step_key):
            cache, last, next_pos, done = carry
            # Finished rows keep stepping (fixed shapes) but are masked out of the statistics.
            out, cache = model.extend(
                last[:, None], cache, positions=next_pos[:, None], valid=~done[:, None]
            )
            token = sample(out.logits[:, 0], step_key, sampling)
            token = jnp.where(done, eos_id, token)
            new_done = done | (token == eos_id)
            return (cache, token, next_pos + 1, new_done), (token, out.aux.layers.tokens_per_expert)

        keys = jax.random.split(key, steps)
        (cache, last, next_pos, done), (tokens, load) = jax.lax.scan(
            one, (cache, last, next_pos, done), keys
        )
        return cache, last, next_pos, done, tokens.T, jnp.sum(load, axis=0)  # tokens [B, steps]

    def validate(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """ConfigError (one line) for an empty prompt, max_new_tokens < 1, or prompt +
        max_new_tokens beyond the model's context; `generate` calls it first, and a caller may
        call it before it prints anything."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("empty prompt: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.cfg.max_seq_len:
            raise ConfigError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
                f"{longest + max_new_tokens} exceeds the model's context of "
                f"{self.cfg.max_seq_len} tokens"
            )

    # ---- the loop -------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        eos_id: int | None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
        should_stop: Callable[[int, list[int]], bool] | None = None,
    ) -> GenerationResult:
        """Generates up to `max_new_tokens` per prompt.

        Args:
          prompts: token ids per prompt (BOS included by the caller), each non-empty.
          eos_id: stop a row at this token (None: only the length stops it).
          on_tokens: called as on_tokens(row, new_ids) as tokens arrive (streaming).
          should_stop: called as should_stop(row, all_new_ids); True ends the row ('stop').
        Raises:
          ConfigError: an empty prompt, or prompt + max_new_tokens beyond the model's context.
        """
        self.validate(prompts, max_new_tokens)
        padded = prompt_width(max(len(p) for p in prompts), self.prefill_chunk)
        tokens, valid = left_pad(prompts, padded)
        cache_size = padded + -(-max_new_tokens // self.chunk) * self.chunk
        if self.cfg.sliding_window is not None:
            cache_size = min(cache_size, self.cfg.sliding_window)  # rolling buffer
        eos = -1 if eos_id is None else eos_id
        rows = _Rows(len(prompts), max_new_tokens, eos, on_tokens, should_stop)

        start = time.perf_counter()
        logits, cache, next_pos, load = self.prefill(tokens, valid, cache_size)
        key, first_key = jax.random.split(jax.random.key(seed))
        last = sample(logits, first_key, sampling)
        first = np.asarray(last)
        ttft = time.perf_counter() - start
        load = np.asarray(load)
        for row in range(len(prompts)):
            rows.take(row, [int(first[row])])

        decode_first = decode_start = time.perf_counter()
        produced = chunks = 0
        while not rows.done.all():
            key, chunk_key = jax.random.split(key)
            cache, last, next_pos, _, new, chunk_load = self._decode(
                self.state,
                cache,
                last,
                next_pos,
                jnp.asarray(rows.done),
                chunk_key,
                eos,
                sampling=sampling,
                steps=self.chunk,
            )
            new, load = np.asarray(new), load + np.asarray(chunk_load)
            chunks += 1
            if chunks == 1:  # the first call compiles: time from its end
                decode_start = time.perf_counter()
            else:
                produced += int((~rows.done).sum()) * self.chunk
            for row in range(len(prompts)):
                rows.take(row, new[row].tolist())
        decode_s = time.perf_counter() - decode_start
        if produced == 0:  # everything fit in the first (compiling) call: count that call
            produced = sum(max(len(t) - 1, 0) for t in rows.out)
            decode_s = time.perf_counter() - decode_first
        out, finish = rows.out, rows.finish
        return GenerationResult(
            tokens=out,
            finish=finish,
            prompt_bucket=padded,
            time_to_first_token_s=ttft,
            decode_s=decode_s,
            decode_tokens=produced,
            tokens_per_expert=load,
        )
