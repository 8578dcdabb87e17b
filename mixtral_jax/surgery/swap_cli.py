"""The `swap` and `merge-lora` commands of `python -m mixtral_jax.surgery` (see `cli.py`)."""

from __future__ import annotations

import os

import jax
import numpy as np

from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.adapters import load_adapters
from mixtral_jax.config import ConfigError
from mixtral_jax.fileio import read_json
from mixtral_jax.model import lora
from mixtral_jax.surgery import swap


def swapped_or_merged(args, cfg, params: dict) -> dict:
    """The new parameter tree of a `swap` or `merge-lora` command (same config)."""
    if args.command == "merge-lora":
        lcfg, adapters = load_adapters(args.adapters)
        expected = jax.tree.map(tuple, lora.adapter_shapes(cfg, lcfg), is_leaf=_is_shape)
        got = jax.tree.map(lambda x: tuple(x.shape), adapters)
        if got != expected:
            raise ConfigError(f"{args.adapters}: adapter shapes do not fit {args.checkpoint}")
        merged = lora.merge(params, adapters, lcfg)
        return jax.tree.map(np.asarray, merged)
    layer = None if args.layer == "all" else _layer(args.layer)
    donor_expert = args.expert if args.donor_expert is None else args.donor_expert
    donor, dims = _donor(args.donor, donor_expert)
    return swap.swap_expert(params, cfg, donor, dims, layer, args.expert)


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def _layer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--layer {text!r}: a layer index or 'all'") from None


def _donor(path: str, expert: int):
    if checkpoint.is_model_checkpoint(path):
        donor_cfg, donor_params = checkpoint.load_model(path)
        return swap.donor_from_model(checkpoint.to_numpy(donor_params), donor_cfg, expert)
    from mixtral_jax.convert.files import open_weights

    dense_config = read_json(os.path.join(path, "config.json"), "config.json")
    if "num_local_experts" in dense_config:
        raise ConfigError(
            f"--donor {path} is a Hugging Face MoE: convert it first "
            "(python -m mixtral_jax.convert to-orbax)"
        )
    problems: list[str] = []
    weights = open_weights(path, problems)
    if problems or weights is None:
        raise ConfigError(f"{path}: " + "; ".join(problems or ["no weights"]))
    return swap.donor_from_dense(weights.read, dense_config)
