"""Loading a model for inference from our checkpoint or a Hugging Face directory.

Hugging Face directories are read with safetensors (single file or sharded with
`model.safetensors.index.json`), in the per-expert layout that transformers writes by default
or the transformers v5 fused layout (`mlp.experts.gate_up_proj` [E, 2F, D], gate half first;
`mlp.experts.down_proj` [E, D, F]; router at `mlp.gate.weight`), and converted in memory.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from mixtral_jax import checkpoint
from mixtral_jax.config import ConfigError
from mixtral_jax.hf_config import load_hf_config
from mixtral_jax.hf_weights import params_from_hf
from mixtral_jax.tokenizer import Tokenizer

_LEGACY_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_LEGACY_ROUTER = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")


def safetensors_files(directory: str) -> dict[str, str]:
    """Tensor name -> file, from the shard index or the single `model.safetensors`."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        raise ConfigError(f"{directory} has neither model.safetensors nor its shard index")
    from safetensors import safe_open

    with safe_open(single, framework="flax") as f:
        return {k: single for k in f.keys()}


class HFWeights:
    """Reads HF tensors lazily by their legacy (per-expert) names, whatever the stored layout."""

    def __init__(self, directory: str):
        self.files = safetensors_files(directory)
        self.fused = any(k.endswith("mlp.experts.gate_up_proj") for k in self.files)
        self._open: dict = {}

    def _read(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        if name not in self.files:
            raise ConfigError(f"tensor {name} is missing from the checkpoint")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="flax")
        return np.asarray(self._open[path].get_tensor(name))

    def __getitem__(self, key: str) -> np.ndarray:
        if self.fused:
            expert = _LEGACY_EXPERT.match(key)
            if expert:
                layer, e, name = expert.groups()
                prefix = f"model.layers.{layer}.mlp.experts."
                if name == "w2":
                    return self._read(prefix + "down_proj")[int(e)]
                gate_up = self._read(prefix + "gate_up_proj")[int(e)]  # [2F, D], gate first
                half = gate_up.shape[0] // 2
                return gate_up[:half] if name == "w1" else gate_up[half:]
            router = _LEGACY_ROUTER.match(key)
            if router:
                return self._read(f"model.layers.{router.group(1)}.mlp.gate.weight")
        return self._read(key)


def load_hf_directory(directory: str, **config_changes):
    """(config, params) of a Hugging Face Mixtral directory, converted in memory."""
    cfg = load_hf_config(directory, **config_changes)
    return cfg, params_from_hf(HFWeights(directory), cfg)


def load_for_inference(path: str, tokenizer_path: str | None = None, *, dtype: str | None = None):
    """(model, tokenizer) from a model checkpoint or a Hugging Face directory."""
    from mixtral_jax.model import init, set_params

    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    changes = {} if dtype is None else {"dtype": dtype}
    if checkpoint.is_model_checkpoint(path):
        cfg, params = checkpoint.load_model(path, **changes)
    elif os.path.isfile(os.path.join(path, "config.json")):
        cfg, params = load_hf_directory(path, **changes)
    else:
        raise ConfigError(f"{path} is neither a model checkpoint nor a Hugging Face directory")
    tokenizer_path = tokenizer_path or os.path.join(path, checkpoint.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise ConfigError(f"no tokenizer at {tokenizer_path}: pass --tokenizer")
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only "
                          f"{cfg.vocab_size}")
    model = init(cfg, 0)
    try:
        set_params(model, params)
    except ValueError as e:
        raise ConfigError(f"{path}: weights do not match config.json: {e}") from None
    return model, tokenizer
