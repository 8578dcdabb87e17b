"""Batched generation: one prefill over the left-padded prompts, then a compiled decode loop.

- Prompts of different lengths are left-padded to a bucket (a power of two), so new lengths do
  not recompile; positions follow each row's real tokens (HF's cumsum(mask) - 1), padding is
  never attended to.
- The KV cache is an explicit pytree threaded through the layer scan (`model.KVCache`); with a
  sliding window it is a rolling buffer of W slots.
- Decoding runs `chunk` tokens per compiled call (a `lax.scan`), then hands them to the host for
  streaming, stop strings and EOS bookkeeping.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.config import ConfigError
from mixtral_jax.generate.sampling import SamplingParams, sample
from mixtral_jax.model import KVCache, Mixtral


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


class Generator:
    """Compiled prefill and decode for one model; reuse it across calls to reuse compilations."""

    def __init__(self, model: Mixtral, chunk: int = 8):
        self.cfg = model.cfg
        self.chunk = chunk
        self.graphdef, self.state = nnx.split(model)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_size",))
        self._decode = jax.jit(self._decode_fn, static_argnames=("sampling", "steps"),
                               donate_argnums=(1,))

    # ---- compiled pieces ------------------------------------------------------------------
    def _prefill_fn(self, state, tokens, valid, cache_size):
        model = nnx.merge(self.graphdef, state)
        cache = KVCache.create(self.cfg, tokens.shape[0], cache_size)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        out, cache = model.extend(tokens, cache, positions=positions, valid=valid)
        return out.logits[:, -1], cache, positions[:, -1] + 1, out.aux.layers.tokens_per_expert

    def _decode_fn(self, state, cache, last, next_pos, done, key, eos_id, sampling, steps):
        model = nnx.merge(self.graphdef, state)

        def one(carry, step_key):
            cache, last, next_pos, done = carry
            # Finished rows keep stepping (fixed shapes) but are masked out of the statistics.
            out, cache = model.extend(last[:, None], cache, positions=next_pos[:, None],
                                      valid=~done[:, None])
            token = sample(out.logits[:, 0], step_key, sampling)
            token = jnp.where(done, eos_id, token)
            new_done = done | (token == eos_id)
            return (cache, token, next_pos + 1, new_done), (token, out.aux.layers.tokens_per_expert)

        keys = jax.random.split(key, steps)
        (cache, last, next_pos, done), (tokens, load) = jax.lax.scan(
            one, (cache, last, next_pos, done), keys)
        return cache, last, next_pos, done, tokens.T, jnp.sum(load, axis=0)  # tokens [B, steps]

    # ---- the loop -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0, eos_id: int | None,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 should_stop: Callable[[int, list[int]], bool] | None = None) -> GenerationResult:
        """Generates up to `max_new_tokens` per prompt.

        Args:
          prompts: token ids per prompt (BOS included by the caller), each non-empty.
          eos_id: stop a row at this token (None: only the length stops it).
          on_tokens: called as on_tokens(row, new_ids) as tokens arrive (streaming).
          should_stop: called as should_stop(row, all_new_ids); True ends the row ('stop').
        Raises:
          ConfigError: an empty prompt, or prompt + max_new_tokens beyond the model's context.
        """
        cfg = self.cfg
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("empty prompt: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > cfg.max_seq_len:
            raise ConfigError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
                              f"{longest + max_new_tokens} exceeds the model's context of "
                              f"{cfg.max_seq_len} tokens")
        padded = bucket(longest)
        batch = len(prompts)
        tokens = np.zeros((batch, padded), np.int32)
        valid = np.zeros((batch, padded), bool)
        for row, prompt in enumerate(prompts):
            tokens[row, padded - len(prompt):] = prompt
            valid[row, padded - len(prompt):] = True
        steps = -(-max_new_tokens // self.chunk) * self.chunk
        cache_size = padded + steps
        if cfg.sliding_window is not None:
            cache_size = min(cache_size, cfg.sliding_window)  # rolling buffer
        eos = -1 if eos_id is None else eos_id

        start = time.perf_counter()
        logits, cache, next_pos, load = self._prefill(self.state, jnp.asarray(tokens),
                                                      jnp.asarray(valid), cache_size=cache_size)
        key = jax.random.key(seed)
        key, first_key = jax.random.split(key)
        last = sample(logits, first_key, sampling)
        first = np.asarray(last)
        ttft = time.perf_counter() - start
        load = np.asarray(load)

        out: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * batch
        done = np.zeros(batch, bool)

        def take(row: int, new: list[int]) -> None:
            if done[row]:
                return
            for i, token in enumerate(new):
                if token == eos:
                    done[row], finish[row] = True, "eos"
                    new = new[:i]
                    break
            room = max_new_tokens - len(out[row])
            new = new[:room]
            out[row].extend(new)
            if new and on_tokens is not None:
                on_tokens(row, new)
            if not done[row] and should_stop is not None and should_stop(row, out[row]):
                done[row], finish[row] = True, "stop"
            if len(out[row]) >= max_new_tokens:
                done[row] = True

        for row in range(batch):
            take(row, [int(first[row])])
        decode_start, produced, chunks = time.perf_counter(), 0, 0
        decode_first = decode_start
        while not done.all():
            key, chunk_key = jax.random.split(key)
            cache, last, next_pos, _, new, chunk_load = self._decode(
                self.state, cache, last, next_pos, jnp.asarray(done), chunk_key, eos,
                sampling=sampling, steps=self.chunk)
            new = np.asarray(new)
            load = load + np.asarray(chunk_load)
            chunks += 1
            if chunks == 1:  # the first call compiles: time from its end
                decode_start = time.perf_counter()
            else:
                produced += int((~done).sum()) * self.chunk
            for row in range(batch):
                take(row, new[row].tolist())
        decode_s = time.perf_counter() - decode_start
        if produced == 0:  # everything fit in the first (compiling) call: count that call
            produced = sum(len(t) for t in out) - sum(1 for t in out if t)
            decode_s = time.perf_counter() - decode_first
        return GenerationResult(tokens=out, finish=finish, prompt_bucket=padded,
                                time_to_first_token_s=ttft, decode_s=decode_s,
                                decode_tokens=produced, tokens_per_expert=load)
