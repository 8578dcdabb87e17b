"""mixtral_jax: Mixtral-style sparse Mixture-of-Experts decoders in JAX / Flax NNX."""

from mixtral_jax.config import ComputeConfig, ConfigError, ModelConfig, MoEImpl, Remat, preset
from mixtral_jax.hf.config import from_hf_dict, load_hf_config, save_hf_config, to_hf_dict
from mixtral_jax.model.moe import MoEAux
from mixtral_jax.model.params import (
    abstract,
    from_params,
    get_params,
    init,
    init_params,
    param_shapes,
    set_params,
)
from mixtral_jax.model.transformer import Mixtral, ModelAux, ModelOutput

__all__ = [
    "ComputeConfig",
    "ConfigError",
    "Mixtral",
    "MoEAux",
    "MoEImpl",
    "ModelAux",
    "ModelConfig",
    "ModelOutput",
    "Remat",
    "abstract",
    "from_hf_dict",
    "from_params",
    "get_params",
    "init",
    "init_params",
    "load_hf_config",
    "param_shapes",
    "preset",
    "save_hf_config",
    "set_params",
    "to_hf_dict",
]
