"""Dense-to-MoE upcycling: a Mixtral checkpoint from a dense Mistral-style checkpoint.

Every expert starts as a copy of the dense SwiGLU MLP (Mistral's gate_proj / up_proj / down_proj
are Mixtral's w1 / w3 / w2); the router starts small, N(0, router_std^2). With no expert noise the
upcycled model computes exactly the dense model's function at step 0: all experts are equal and
the renormalised top-k weights sum to 1. `expert_noise` (relative to each weight's std) breaks the
symmetry for training, at the price of that equality.

The attention, norms, embedding and head keys are shared by Mistral and Mixtral, so the weight
table of `hf/weights.py` does the layout work; only the MoE keys are translated here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.hf.config import from_hf_dict
from mixtral_jax.hf.weights import params_from_hf

_EXPERT_KEY = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$"
)
_ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
_DENSE_NAME = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def upcycled_config(
    dense_hf_config: dict[str, Any], num_experts: int, topk: int, **changes: Any
) -> ModelConfig:
    """Our config for the upcycled model, from the dense model's HF `config.json` contents."""
    model_type = dense_hf_config.get("model_type", "mistral")
    if model_type not in ("mistral", "llama"):
        raise ConfigError(f"dense config model_type={model_type!r}: expected 'mistral' or 'llama'")
    hf = dict(
        dense_hf_config,
        model_type="mixtral",
        num_local_experts=num_experts,
        num_experts_per_tok=topk,
    )
    return from_hf_dict(hf, **changes)


def upcycle_params(
    get_dense: Callable[[str], np.ndarray],
    cfg: ModelConfig,
    *,
    router_std: float = 0.02,
    expert_noise: float = 0.0,
    seed: int = 0,
) -> dict:
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
            w = np.asarray(
                get_dense(f"model.layers.{layer}.mlp.{_DENSE_NAME[name]}.weight"), np.float32
            )
            if expert_noise:
                w = w + expert_noise * float(w.std()) * rng.standard_normal(w.shape, np.float32)
            return w
        if _ROUTER_KEY.match(key):
            return (router_std * rng.standard_normal((cfg.num_experts, cfg.embed_dim))).astype(
                np.float32
            )
        return get_dense(key)

    return params_from_hf(_Getter(get), cfg)


class _Getter:
    """A mapping view over a key function (params_from_hf indexes its state dict)."""

    def __init__(self, get: Callable[[str], np.ndarray]):
        self._get = get

    def __getitem__(self, key: str) -> np.ndarray:
        return self._get(key)


def main(argv=None) -> int:
    """`python -m mixtral_jax.upcycle --dense DIR --out CKPT [--experts 8 --topk 2 ...]`."""
    import argparse
    import os
    import sys

    from mixtral_jax import checkpoint
    from mixtral_jax.convert.files import open_weights
    from mixtral_jax.fileio import read_json

    p = argparse.ArgumentParser(
        prog="python -m mixtral_jax.upcycle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dense", required=True, help="Hugging Face Mistral/Llama directory")
    p.add_argument("--out", required=True, help="new model checkpoint directory")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--expert-noise", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if os.path.exists(args.out):
            raise ConfigError(f"--out {args.out} already exists: choose a new directory")
        dense_config = read_json(os.path.join(args.dense, "config.json"), "config.json")
        cfg = upcycled_config(dense_config, args.experts, args.topk)
        problems: list[str] = []
        weights = open_weights(args.dense, problems)
        if problems or weights is None:
            raise ConfigError(f"{args.dense}: " + "; ".join(problems or ["no weights"]))
        params = upcycle_params(
            weights.read,
            cfg,
            router_std=args.router_std,
            expert_noise=args.expert_noise,
            seed=args.seed,
        )
        tokenizer = os.path.join(args.dense, checkpoint.TOKENIZER_FILE)
        checkpoint.save_model(
            args.out, params, cfg, tokenizer if os.path.isfile(tokenizer) else None
        )
    except (ConfigError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}) from "
        f"{args.dense}; {cfg.param_count:,} parameters"
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
