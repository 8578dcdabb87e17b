"""Loading a model for inference from our checkpoint or a Hugging Face / Mistral directory.

Both go straight to the devices (`checkpoint.placement.place_params`): from the abstract model's
shapes, each array is read slice by slice (one layer / expert: memory-mapped safetensors, or our
Orbax checkpoint's stored chunks, checked against its checksums), transformed, and written into
its preallocated place in its final sharding. No random draw, no whole-model host copy.
Foreign directories go through the converter's checked reader (`mixtral_jax.convert.open_source`:
every layout it knows, every problem reported at once) before a tensor is read.
"""

from __future__ import annotations

import dataclasses
import functools
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
    adapters: str | None = None,
    merge_adapters: bool = True,
):
    """(model, tokenizer) from a model checkpoint or a Hugging Face / Mistral directory.

    `adapters`: a LoRA adapter directory (a LoRA run's final model) applied on top of the base
    at `path`. `merge_adapters` (default) folds them into the weights on the devices, one layer
    at a time (W + A B * alpha / r: decoding then costs what the base costs), except into
    quantized weights (QLoRA), whose adapters stay factors; False keeps them all
    as separate factors (`model/lora.py`: attention and router add their low-rank term after
    the kernels, the experts are merged per call on every path but the dropless one).

    `compute`: ComputeConfig changes (how to compute; the architecture is the checkpoint's);
    `dtype` is short for compute={"dtype": dtype}; without either the compute dtype is the
    checkpoint's parameter dtype. `mesh`: place by the rules table (default: the first device).
    `progress`: a loading progress bar (bytes, GB/s) on stderr."""
    from mixtral_jax.model.params import from_params

    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    if os.path.isfile(os.path.join(path, "adapters.json")):
        raise ConfigError(
            f"{path} holds LoRA adapters, not a model: pass --checkpoint BASE --adapters {path}"
        )
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
    lcfg = factors = None
    if adapters is not None:
        lcfg, factors = _read_adapters(adapters, cfg, path)
        if merge_adapters:  # a quantized target keeps its factors: codes take no merge
            (merged_cfg, merged), (lcfg, factors) = split_quantized(cfg, lcfg, factors)
            if merged_cfg is not None:
                params = merge_on_device(params, merged, merged_cfg)
    try:
        model = from_params(cfg, params)
    except ValueError as e:
        raise ConfigError(f"{path}: weights do not match config.json: {e}") from None
    if factors is not None:
        from mixtral_jax.model import lora

        lora.attach(model, lcfg, factors)
    return model, tokenizer


def _read_adapters(directory: str, cfg, base: str):
    """(LoraConfig, adapters) of `directory`, checked against the base's shapes."""
    import jax

    from mixtral_jax.checkpoint.adapters import load_adapters
    from mixtral_jax.model import lora

    lcfg, factors = load_adapters(directory)
    expected = lora.adapter_shapes(cfg, lcfg)
    got = jax.tree.map(lambda x: tuple(x.shape), factors)
    if got != jax.tree.map(tuple, expected, is_leaf=lambda x: isinstance(x, tuple)):
        raise ConfigError(f"adapters {directory} do not fit the model at {base} (shapes differ)")
    return lcfg, factors


def split_quantized(cfg, lcfg, factors: dict):
    """((LoraConfig, factors) of the targets whose base weight is float, (the same) of those
    stored quantized); (None, None) for a side without targets."""
    from mixtral_jax.model import lora
    from mixtral_jax.model.quantized import quantized_leaves

    frozen = quantized_leaves(cfg)
    sides = ([], [])
    for target in lcfg.targets:
        sides[(lora.TARGETS[target][0], target) in frozen].append(target)
    out = []
    for targets in sides:
        if not targets:
            out.append((None, None))
            continue
        part: dict = {"layers": {}}
        for target in targets:
            module = lora.TARGETS[target][0]
            for name in lora.factor_names(target):
                part["layers"].setdefault(module, {})[name] = factors["layers"][module][name]
        out.append((dataclasses.replace(lcfg, targets=tuple(targets)), part))
    return tuple(out)


def merge_on_device(params: dict, factors: dict, lcfg) -> dict:
    """`params` with the adapters folded in, layer by layer in place on the devices (the
    float32 temporary is one layer of one target, not the whole stack)."""
    import jax

    from mixtral_jax.model import lora

    out = jax.tree.map(lambda x: x, params)
    for target in lcfg.targets:
        module, batch, _ = lora.TARGETS[target]
        a_name, b_name = lora.factor_names(target)
        w = out["layers"][module][target]
        a, b = factors["layers"][module][a_name], factors["layers"][module][b_name]
        for i in range(w.shape[0]):
            w = _folder(lcfg.scale, batch)(w, a[i], b[i], i)
        out["layers"][module][target] = w
    return out


@functools.cache
def _folder(scale: float, batch: int):
    """Compiled: w [L, ...], A, B of one layer, i -> w with layer i = W + A B * scale (w's
    buffer donated, so the stack is updated in place)."""
    import jax

    from mixtral_jax.model import lora

    def fold(w, a, b, i):
        layer = jax.lax.dynamic_index_in_dim(w, i, keepdims=False)
        merged = lora.merged_weight(layer, a, b, scale, batch)
        return jax.lax.dynamic_update_index_in_dim(w, merged, i, 0)

    return jax.jit(fold, donate_argnums=(0,))
