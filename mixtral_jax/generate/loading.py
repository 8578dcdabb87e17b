"""Loading a model for inference from our checkpoint or a Hugging Face / Mistral directory.

Both go straight to the devices (`checkpoint.placement.place_params`): from the abstract model's
shapes, each array is read slice by slice (one layer / expert: memory-mapped safetensors, or our
Orbax checkpoint's stored chunks, checked against its checksums), transformed, and written into
its preallocated place in its final sharding. No random draw, no whole-model host copy.
Foreign directories go through the converter's checked reader (`mixtral_jax.convert.open_source`:
every layout it knows, every problem reported at once) before a tensor is read.
"""

from __future__ import annotations

import os

from mixtral_jax import checkpoint
from mixtral_jax.config import ConfigError
from mixtral_jax.hf.config import load_hf_config
from mixtral_jax.tokenizer import Tokenizer

# GPU memory for serving: CUDA's stream-ordered allocator, growing as needed. H200, infer.py on a
# 23.7 GB bf16 directory (bench/real_path.py): JAX's default preallocates 75% of the card, and its
# growing BFC allocator reserved 1.52x the weights (nvidia-smi) for a 1.00x peak in use, with
# 3.4 GB of host RSS; cuda_async reserved 1.03x with 2.3 GB of host RSS and the same decode speed
# (459 against 455 tokens/s; the `platform` allocator: 421).
INFERENCE_MEMORY_ENV = {
    "XLA_PYTHON_CLIENT_ALLOCATOR": "cuda_async",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}


def use_inference_memory_defaults() -> None:
    """Sets `INFERENCE_MEMORY_ENV` where the user has not set those variables. Call before the
    first device is used (JAX reads them when it starts its GPU backend); no effect on CPU."""
    for name, value in INFERENCE_MEMORY_ENV.items():
        os.environ.setdefault(name, value)


def load_params(path: str, changes: dict, *, mesh=None, progress: bool = False):
    """(config, params on the devices) of a model checkpoint or a foreign directory.

    The compute dtype follows the stored weights (bfloat16 weights compute in bfloat16) unless
    `changes` sets "dtype"."""
    from mixtral_jax.checkpoint.placement import default_shardings, place_params
    from mixtral_jax.model.params import param_shapes

    if checkpoint.is_model_checkpoint(path):
        cfg = load_hf_config(path)
        cfg = cfg.replace(**_with_dtype(changes, cfg.compute.param_dtype))
        shapes = param_shapes(cfg)
        readers = checkpoint.checkpoint_readers(path, shapes)
    else:
        from mixtral_jax.convert import open_source
        from mixtral_jax.convert.importer import slice_readers

        source = open_source(path)
        cfg = source.cfg.replace(**_with_dtype(changes, source.cfg.compute.param_dtype))
        shapes = param_shapes(cfg)
        readers = slice_readers(source)
    params = place_params(shapes, readers, default_shardings(shapes, mesh), progress=progress)
    return cfg, params


def _with_dtype(changes: dict, stored: str) -> dict:
    """`changes` with the compute dtype defaulting to the stored parameter dtype."""
    return {"dtype": stored, **changes}


def load_for_inference(
    path: str,
    tokenizer_path: str | None = None,
    *,
    dtype: str | None = None,
    compute: dict | None = None,
    mesh=None,
    progress: bool = False,
):
    """(model, tokenizer) from a model checkpoint or a Hugging Face / Mistral directory.

    `compute`: ComputeConfig changes (how to compute; the architecture is the checkpoint's);
    `dtype` is short for compute={"dtype": dtype}; without either the compute dtype is the
    checkpoint's parameter dtype. `mesh`: place by the rules table (default: the first device).
    `progress`: a loading progress bar (bytes, GB/s) on stderr."""
    from mixtral_jax.model.params import from_params

    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    changes = dict(compute or {})
    if dtype is not None:
        changes["dtype"] = dtype
    tokenizer_path = tokenizer_path or os.path.join(path, checkpoint.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise ConfigError(f"no tokenizer at {tokenizer_path}: pass --tokenizer")
    tokenizer = Tokenizer.load(tokenizer_path)
    cfg, params = load_params(path, changes, mesh=mesh, progress=progress)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}"
        )
    try:
        model = from_params(cfg, params)
    except ValueError as e:
        raise ConfigError(f"{path}: weights do not match config.json: {e}") from None
    return model, tokenizer
