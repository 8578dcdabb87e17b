"""A random Hugging Face Mixtral directory written piece by piece (numpy / ml_dtypes, no torch):
sharded safetensors with their index, config.json and a small sentencepiece tokenizer, so that
`infer.py --checkpoint DIR` runs on it as on a downloaded model.

Values come from one pool of N(0, 0.02^2) numbers cut at a random offset per tensor (fast: a
full-width layer is 2.8 GB of bf16), norm scales near 1. One tensor in memory at a time. The
tokenizer has fewer pieces than the model's vocabulary: lm_head rows past it are zero, so greedy
decoding (random logits, some positive) never picks an id the tokenizer cannot decode.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from mixtral_jax.convert.exporter import shard_plan
from mixtral_jax.convert.safetensors_io import StreamWriter
from mixtral_jax.hf.config import save_hf_config
from mixtral_jax.hf.weights import hf_shapes

POOL = 1 << 24  # random values drawn once, then cut
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts routes tokens to a few experts.",
    "Sparse models read only the chosen experts.",
    "def main(): return 0",
] * 20


def _values(rng, pool: np.ndarray, shape, dtype) -> np.ndarray:
    """`shape` values cut from `pool` (wrapping) at a random offset."""
    n = int(np.prod(shape))
    start = int(rng.integers(pool.size))
    reps = -(-(start + n) // pool.size)
    flat = np.tile(pool, reps)[start : start + n] if reps > 1 else pool[start : start + n]
    return flat.reshape(shape).astype(dtype)


def write_random_hf(cfg, directory: str, *, shard_bytes: int = 2 * 1024**3, seed: int = 0) -> int:
    """Writes the directory for `cfg` (weights in cfg.compute.param_dtype); returns weight bytes."""
    from mixtral_jax.tokenizer import train_tokenizer

    os.makedirs(directory)
    tokenizer = train_tokenizer(
        TEXT, os.path.join(directory, "tokenizer.model"), min(96, cfg.vocab_size)
    )
    name = cfg.compute.param_dtype
    dtype = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    shapes = hf_shapes(cfg)
    shards = shard_plan(cfg, dtype, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    rng = np.random.default_rng(seed)
    pool = (0.02 * rng.standard_normal(POOL, np.float32)).astype(dtype)
    total = 0
    for file, keys in zip(names, shards):
        writer = StreamWriter(os.path.join(directory, file), [(k, dtype, shapes[k]) for k in keys])
        for key in keys:
            if key.endswith("norm.weight"):
                value = (1 + 0.05 * rng.standard_normal(shapes[key], np.float32)).astype(dtype)
            else:
                value = _values(rng, pool, shapes[key], dtype)
            if key == "lm_head.weight":
                value[tokenizer.vocab_size :] = 0
            writer.write(key, value)
            total += value.nbytes
        writer.close()
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: n for n, keys in zip(names, shards) for k in keys},
    }
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    save_hf_config(cfg, os.path.join(directory, "config.json"))
    return total
