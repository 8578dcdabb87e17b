"""Our model checkpoint -> a Hugging Face directory that `from_pretrained` loads.

Writes sharded safetensors in the legacy per-expert layout (`model-00001-of-0000N.safetensors`
+ `model.safetensors.index.json`; a single `model.safetensors` when one shard suffices),
`config.json` (`hf_config.save_hf_config`) and the tokenizer when the checkpoint has one. Each HF
tensor is cut from our leaves and streamed to its shard as it is produced. Everything goes into
a staging directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from tqdm import tqdm

from mixtral_jax import checkpoint
from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.convert.safetensors_io import StreamWriter
from mixtral_jax.convert.source import ConversionError
from mixtral_jax.fileio import atomic_directory
from mixtral_jax.hf.config import read_hf_extras, save_hf_config
from mixtral_jax.hf.weights import hf_shapes, params_to_hf

DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size


def shard_plan(cfg: ModelConfig, dtype: np.dtype, max_bytes: int) -> list[list[str]]:
    """HF keys grouped into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in hf_shapes(cfg).items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str,
    *,
    tokenizer: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    extra_config: dict | None = None,
) -> None:
    """Writes the HF directory `out_dir` (which must not exist) from our numpy params;
    `extra_config`: config.json fields we do not read (from the source), passed through."""
    if os.path.exists(out_dir):
        raise ConversionError(out_dir, [f"output {out_dir} already exists: choose a new directory"])
    dtype = np.asarray(params["embed"]["embedding"]).dtype
    shapes = hf_shapes(cfg)
    shards = shard_plan(cfg, dtype, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    where = {key: names[i] for i, keys in enumerate(shards) for key in keys}
    with atomic_directory(out_dir) as staging:
        tensors = params_to_hf(params, cfg)
        total = sum(int(np.prod(s)) for s in shapes.values()) * dtype.itemsize
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="export",
            disable=not progress,
        ) as bar:
            for name, keys in zip(names, shards):
                writer = StreamWriter(
                    os.path.join(staging, name), [(k, dtype, shapes[k]) for k in keys]
                )
                try:
                    for _ in keys:
                        key, value = next(tensors)
                        writer.write(key, value)
                        bar.update(value.nbytes)
                finally:
                    writer.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": where}
            with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        save_hf_config(cfg, os.path.join(staging, "config.json"), extra=extra_config)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, os.path.join(staging, checkpoint.TOKENIZER_FILE))


def to_hf(
    checkpoint_dir: str,
    out_dir: str,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> ModelConfig:
    """Exports the model checkpoint `checkpoint_dir` as the HF directory `out_dir`."""
    if os.path.exists(out_dir):
        raise ConversionError(
            checkpoint_dir, [f"output {out_dir} already exists: choose a new directory"]
        )
    if not checkpoint.is_model_checkpoint(checkpoint_dir):
        raise ConversionError(
            checkpoint_dir,
            [f"{checkpoint_dir} is not a model checkpoint (needs config.json and params/)"],
        )
    try:  # slices are read one at a time as the export walks them
        cfg, params = checkpoint.LazyParams.open(checkpoint_dir)
    except ConfigError as e:
        raise ConversionError(checkpoint_dir, [str(e)]) from None
    if cfg.quantized:  # HF Mixtral has no layout for our int8/int4 codes: never write a wrong one
        raise ConfigError(
            f"{checkpoint_dir} is quantized (expert_bits={cfg.expert_bits}, attention_bits="
            f"{cfg.attention_bits}): Hugging Face export needs float weights; export the "
            "checkpoint it was quantized from"
        )
    tokenizer = os.path.join(checkpoint_dir, checkpoint.TOKENIZER_FILE)
    write_hf(
        params,
        cfg,
        out_dir,
        tokenizer=tokenizer if os.path.isfile(tokenizer) else None,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        extra_config=read_hf_extras(checkpoint_dir),
    )
    return cfg
