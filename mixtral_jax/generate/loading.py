"""Loading a model for inference from our checkpoint or a Hugging Face / Mistral directory.

Foreign directories go through the converter's checked reader (`mixtral_jax.convert`): every
layout it knows (HF per-expert or v5 fused, sharded or not; Mistral's formats), every problem
reported at once, converted in memory.
"""

from __future__ import annotations

import os

from mixtral_jax import checkpoint
from mixtral_jax.config import ConfigError
from mixtral_jax.tokenizer import Tokenizer


def load_foreign_directory(directory: str, **config_changes):
    """(config, params) of a Hugging Face or Mistral Mixtral directory, converted in memory."""
    from mixtral_jax.convert import build_params, open_source

    source = open_source(directory)
    params = build_params(source, progress=False)
    return source.cfg.replace(**config_changes), params


def load_for_inference(
    path: str,
    tokenizer_path: str | None = None,
    *,
    dtype: str | None = None,
    compute: dict | None = None,
):
    """(model, tokenizer) from a model checkpoint or a Hugging Face / Mistral directory.

    `compute`: ComputeConfig changes (how to compute; the architecture is the checkpoint's);
    `dtype` is short for compute={"dtype": dtype}."""
    from mixtral_jax.model.params import from_params

    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    changes = dict(compute or {})
    if dtype is not None:
        changes["dtype"] = dtype
    if checkpoint.is_model_checkpoint(path):
        cfg, params = checkpoint.load_model(path, **changes)
    else:
        cfg, params = load_foreign_directory(path, **changes)
    tokenizer_path = tokenizer_path or os.path.join(path, checkpoint.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise ConfigError(f"no tokenizer at {tokenizer_path}: pass --tokenizer")
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}"
        )
    try:
        model = from_params(cfg, params)
    except ValueError as e:
        raise ConfigError(f"{path}: weights do not match config.json: {e}") from None
    return model, tokenizer
