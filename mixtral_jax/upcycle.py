"""Dense-to-MoE upcycling: a Mixtral checkpoint from a dense Mistral-style checkpoint.

Every expert starts as a copy of the dense SwiGLU MLP (Mistral's gate_proj / up_proj / down_proj
are Mixtral's w1 / w3 / w2); the router starts small, N(0, router_std^2). With no expert noise the
upcycled model computes exactly the dense model's function at step 0: all experts are equal and
the renormalised top-k weights sum to 1. `expert_noise` (relative to each weight's std) breaks the
symmetry for training, at the price of that equality.

The attention, norms, embedding and head keys are shared by Mistral and Mixtral, so the weight
table of `hf_weights` does the layout work; only the MoE keys are translated here.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.hf_config import from_hf_dict
from mixtral_jax.hf_weights import params_from_hf

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
_DENSE_NAME = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def upcycled_config(dense_hf_config: dict[str, Any], num_experts: int, topk: int,
                    **changes: Any) -> ModelConfig:
    """Our config for the upcycled model, from the dense model's HF `config.json` contents."""
    model_type = dense_hf_config.get("model_type", "mistral")
    if model_type not in ("mistral", "llama"):
        raise ConfigError(f"dense config model_type={model_type!r}: expected 'mistral' or 'llama'")
    hf = dict(dense_hf_config, model_type="mixtral", num_local_experts=num_experts,
              num_experts_per_tok=topk)
    return from_hf_dict(hf, **changes)


def upcycle_params(get_dense: Callable[[str], np.ndarray], cfg: ModelConfig, *,
                   router_std: float = 0.02, expert_noise: float = 0.0, seed: int = 0) -> dict:
    """Our parameter tree for `cfg`, reading the dense weights through `get_dense(hf_key)`.

    Args:
      get_dense: returns a dense HF (Mistral/Llama layout) tensor by key, as float32 numpy.
      cfg: the upcycled config (`upcycled_config`).
      router_std: std of the random router init; 0 gives an all-zero (uniform) router.
      expert_noise: multiplicative noise scale added to each expert copy (0 = exact copies).
      seed: seeds the router and the noise.
    """
    if router_std < 0 or expert_noise < 0:
        raise ConfigError(f"router_std={router_std} and expert_noise={expert_noise} must be >= 0")
    rng = np.random.default_rng(seed)

    def get(key: str) -> np.ndarray:
        expert = _EXPERT_KEY.match(key)
        if expert:
            layer, _, name = expert.groups()
            w = np.asarray(get_dense(f"model.layers.{layer}.mlp.{_DENSE_NAME[name]}.weight"),
                           np.float32)
            if expert_noise:
                w = w + expert_noise * float(w.std()) * rng.standard_normal(w.shape, np.float32)
            return w
        if _ROUTER_KEY.match(key):
            return (router_std * rng.standard_normal((cfg.num_experts, cfg.embed_dim))).astype(
                np.float32)
        return get_dense(key)

    return params_from_hf(_Getter(get), cfg)


class _Getter:
    """A mapping view over a key function (params_from_hf indexes its state dict)."""

    def __init__(self, get: Callable[[str], np.ndarray]):
        self._get = get

    def __getitem__(self, key: str) -> np.ndarray:
        return self._get(key)
