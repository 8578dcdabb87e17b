"""Hugging Face `config.json` <-> `ModelConfig`: the one place HF's config names appear.

Reads both transformers v4 (`rope_theta` at top level) and v5 (`rope_parameters`) forms; writes
either (`rope_format="v4"` is read by every transformers version, `"v5"` is what v5 writes).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from mixtral_jax.config import COMPUTE_FIELDS, ComputeConfig, ConfigError, ModelConfig
from mixtral_jax.fileio import read_json

# Our field <- HF field, for the fields that map one to one.
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "embed_dim": "hidden_size",
    "hidden_dim": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "num_experts": "num_local_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "rms_norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "sliding_window": "sliding_window",
    "router_aux_loss_coef": "router_aux_loss_coef",
    "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}

# Our ComputeConfig field <- HF field: a config.json also carries how its weights are stored and
# the training-time router jitter.
_HF_COMPUTE_NAMES = {"router_jitter_noise": "router_jitter_noise"}

_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

# Every config.json field `from_hf_dict` reads; the others (attention_dropout,
# output_router_logits, use_cache, transformers_version, ...) are passed through unchanged
# (`hf_extras`), so a round trip HF -> ours -> HF keeps what transformers reads.
_READ_KEYS = frozenset(_HF_NAMES.values()) | frozenset(_HF_COMPUTE_NAMES.values())
_READ_KEYS |= {
    "head_dim",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "dtype",
    "torch_dtype",
    "model_type",
    "hidden_act",
    "tie_word_embeddings",
    "quantization_config",
}

# Our quantization fields <- the keys of config.json's `quantization_config` (written only for a
# quantized model; `quant_method` names our format, so no other tool's is mistaken for it).
QUANT_METHOD = "mixtral_jax"
_QUANT_NAMES = {
    "expert_bits": "expert_bits",
    "attention_bits": "attention_bits",
    "quant_group_size": "group_size",
    "quant_scale_dtype": "scale_dtype",
}


def hf_extras(hf: dict[str, Any]) -> dict[str, Any]:
    """The fields of a parsed config.json that we do not read, to pass through unchanged."""
    return {k: v for k, v in hf.items() if k not in _READ_KEYS}


def read_hf_extras(path: str) -> dict[str, Any]:
    """`hf_extras` of `path` (a config.json or a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    data = read_json(path, "config.json")
    return hf_extras(data) if isinstance(data, dict) else {}


def from_hf_dict(hf: dict[str, Any], **changes: Any) -> ModelConfig:
    """A `ModelConfig` from a parsed HF Mixtral `config.json`.

    Raises:
      ConfigError: the config is not a plain Mixtral (wrong model type, activation, rope type, tied
        embeddings) or a required field is missing.
    """
    model_type = hf.get("model_type", "mixtral")
    if model_type != "mixtral":
        raise ConfigError(f"config.json model_type={model_type!r}: only 'mixtral' is supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json hidden_act={act!r}: Mixtral experts use 'silu'")
    if hf.get("tie_word_embeddings", False):
        raise ConfigError("config.json tie_word_embeddings=true: Mixtral's LM head is untied")

    fields: dict[str, Any] = {}
    for ours, theirs in {**_HF_NAMES, **_HF_COMPUTE_NAMES}.items():
        if theirs in hf:
            fields[ours] = hf[theirs]
    for required in ("vocab_size", "embed_dim", "hidden_dim", "num_layers", "num_heads"):
        if required not in fields:
            raise ConfigError(f"config.json lacks {_HF_NAMES[required]!r}")
    fields.setdefault("num_kv_heads", fields["num_heads"])
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = fields["eos_token_id"][0]
    fields["head_dim"] = hf.get("head_dim") or fields["embed_dim"] // fields["num_heads"]
    fields["rope_theta"] = _read_rope_theta(hf)
    fields.update(_read_quantization(hf.get("quantization_config")))
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    if dtype in _HF_DTYPES:
        fields["param_dtype"] = _HF_DTYPES[dtype]
    fields.update(changes)
    compute = {k: fields.pop(k) for k in list(fields) if k in COMPUTE_FIELDS}
    return ModelConfig(**fields, compute=ComputeConfig(**compute))


def _read_quantization(q: Any) -> dict[str, Any]:
    """Our quantization fields from config.json's `quantization_config` (none: float weights)."""
    if q is None:
        return {}
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != QUANT_METHOD:
        raise ConfigError(
            f"config.json quantization_config quant_method={method!r}: only {QUANT_METHOD!r} "
            "weights (python -m mixtral_jax.quantize) are supported"
        )
    return {ours: q[theirs] for ours, theirs in _QUANT_NAMES.items() if theirs in q}


def _read_rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"config.json rope_type={rope_type!r}: only 'default' RoPE is supported"
            )
        if "rope_theta" in rope:
            return float(rope["rope_theta"])
    return float(hf.get("rope_theta", 1e6))


def to_hf_dict(cfg: ModelConfig, *, rope_format: str = "v4") -> dict[str, Any]:
    """The HF `config.json` contents for `cfg` (architectures, model_type and all sizes)."""
    if rope_format not in ("v4", "v5"):
        raise ConfigError(f"rope_format={rope_format!r}: must be 'v4' or 'v5'")
    hf: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    for ours, theirs in _HF_NAMES.items():
        hf[theirs] = getattr(cfg, ours)
    for ours, theirs in _HF_COMPUTE_NAMES.items():
        hf[theirs] = getattr(cfg.compute, ours)
    hf.update(
        head_dim=cfg.head_dim,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_dropout=0.0,
        dtype=cfg.compute.param_dtype,
    )
    if cfg.quantized:
        hf["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            **{theirs: getattr(cfg, ours) for ours, theirs in _QUANT_NAMES.items()},
        }
    theta = cfg.rope_theta
    if math.isclose(theta, round(theta)):
        theta = int(theta)  # 1000000, as the published config.json files write it
    if rope_format == "v4":
        hf["rope_theta"] = theta
    else:
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return hf


def load_hf_config(path: str, **changes: Any) -> ModelConfig:
    """Reads `path` (a `config.json` or a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    return from_hf_dict(read_json(path, "config.json"), **changes)


def save_hf_config(
    cfg: ModelConfig, path: str, *, rope_format: str = "v4", extra: dict | None = None
) -> None:
    """Writes `config.json` at `path` (a file path or a directory); `extra`: fields we do not
    read (`hf_extras` of a source config.json), written as they came."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    hf = {**to_hf_dict(cfg, rope_format=rope_format), **hf_extras(extra or {})}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
