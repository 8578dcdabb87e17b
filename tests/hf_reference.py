"""Hugging Face transformers as the oracle: build a tiny random MixtralForCausalLM, copy it into ours.

Test-only: torch and transformers are never imported by the package.
"""

from __future__ import annotations

import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.hf import weights as hf_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def make_hf_model(cfg: mj.ModelConfig, seed: int = 0, std: float | None = None):
    """A float32, eager-attention `MixtralForCausalLM` with random weights, in eval mode.

    Its config comes from our `to_hf_dict(cfg)`, so building it also tests our config writer.
    `std` re-draws every weight (norm scales too) from N(0, std^2)-ish so routing is decisive and
    no term is negligible; None keeps transformers' own init.
    """
    hf_cfg = transformers.MixtralConfig(**mj.to_hf_dict(cfg))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(hf_cfg).float().eval()
    if std is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def legacy_state_dict(model) -> dict[str, np.ndarray]:
    """The model's weights under the on-disk (legacy, per-expert) key names, as float32 numpy.

    transformers v5 holds experts fused in memory (`mlp.experts.gate_up_proj` [E, 2F, D], gate
    half first; `mlp.experts.down_proj` [E, D, F]) and the router at `mlp.gate.weight`.
    """
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().float().numpy()
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            half = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = value[e, :half]
                out[f"{prefix}{e}.w3.weight"] = value[e, half:]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = value[e]
        elif key.endswith("mlp.gate.weight"):
            out[key.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = value
        else:
            out[key] = value
    return out


def ours_from_hf(model, cfg: mj.ModelConfig) -> mj.Mixtral:
    """Our model (config `cfg`) carrying the HF model's weights."""
    return mj.from_params(cfg, hf_weights.params_from_hf(legacy_state_dict(model), cfg))
