"""A float model checkpoint -> a quantized one, slice by slice; and what a checkpoint stores.

`quantize_checkpoint` reads the source through its checksummed readers one slice at a time (one
expert of one layer, or one layer of a projection), quantizes it (`model/quantized.py`, the
format of `kernels/quant.py`) and hands it to the streaming writer, which stores and checksums
it: about two slices are in memory, never the model. Weights that stay float (embedding, norms,
router, LM head; attention without --attention) are copied slice by slice as they are stored.
The result is an ordinary model checkpoint (config.json with its quantization_config,
checksums.json, the tokenizer) that `infer.py` loads like any other.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.model import stack_axes
from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.hf.config import load_hf_config, read_hf_extras
from mixtral_jax.model import quantized
from mixtral_jax.model.params import param_shapes
from mixtral_jax.parallel.sharding import SCALE_SUFFIX

BITS = (8, 4)


def quantized_config(
    cfg: ModelConfig, bits: int, group_size: int | None, attention: bool, scale_dtype: str
) -> ModelConfig:
    """`cfg` with int8 / int4 experts (and attention): one-line ConfigError for a bad choice."""
    if bits not in BITS:
        raise ConfigError(f"--bits {bits}: choose one of {', '.join(map(str, BITS))}")
    if group_size is not None and group_size < 1:
        raise ConfigError(f"--group-size {group_size}: must be a positive integer")
    return cfg.replace(
        expert_bits=bits,
        attention_bits=bits if attention else 16,
        quant_group_size=group_size,
        quant_scale_dtype=scale_dtype,
    )


def open_float_checkpoint(path: str) -> ModelConfig:
    """The config of the model checkpoint `path`, which must exist and hold float weights."""
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    if not checkpoint.is_model_checkpoint(path):
        raise ConfigError(f"{path} is not a model checkpoint (needs config.json and params/)")
    cfg = load_hf_config(path)
    if cfg.quantized:
        raise ConfigError(
            f"{path} is already quantized (expert_bits={cfg.expert_bits}, attention_bits="
            f"{cfg.attention_bits}): quantize the float checkpoint it was made from"
        )
    return cfg


def quantize_checkpoint(
    source: str,
    out: str,
    *,
    bits: int,
    group_size: int | None = None,
    attention: bool = False,
    scale_dtype: str = "float32",
) -> ModelConfig:
    """Writes the quantized model checkpoint `out` of the float checkpoint `source`.

    Args:
      bits: 8 (int8 codes) or 4 (int4, two per byte).
      group_size: rows of the contraction per scale; None: one scale per output channel.
      attention: quantize the attention projections too (else they stay float).
      scale_dtype: "float32" or "bfloat16" scales.
    Returns:
      the quantized config.
    Raises:
      ConfigError: `out` exists, `source` is missing, not a checkpoint or already quantized,
        a bad format (bits, a group size that does not divide a width), a corrupt slice.
    """
    if os.path.exists(out):
        raise ConfigError(f"--out {out} already exists: choose a new directory")
    cfg = open_float_checkpoint(source)
    qcfg = quantized_config(cfg, bits, group_size, attention, scale_dtype)
    readers = checkpoint.checkpoint_readers(source, param_shapes(cfg))
    leaves = _stored_leaves(qcfg, readers)
    tokenizer = os.path.join(source, checkpoint.TOKENIZER_FILE)
    checkpoint.save_model_streaming(
        out,
        leaves,
        qcfg,
        tokenizer if os.path.isfile(tokenizer) else None,
        extra_config=read_hf_extras(source),
    )
    return qcfg


def _stored_leaves(qcfg: ModelConfig, readers: dict):
    """(path, StreamedLeaf) for every leaf of the quantized model, from the float readers."""
    targets = quantized.quantized_leaves(qcfg)
    memo: dict = {}  # scales computed with their codes, until the scale leaf takes them
    for path, shape in _flat(param_shapes(qcfg)):
        base = (*path[:-1], path[-1].removesuffix(SCALE_SUFFIX))
        lead = stack_axes(path) if len(shape.shape) > stack_axes(path) else 0
        source = _SliceSource(readers[base])
        if len(base) == 3 and base[1:] in targets:
            fill = _quantized_fill(qcfg, base, source, targets[base[1:]], path != base, memo)
        else:
            fill = functools.partial(_cast, source.read, np.dtype(shape.dtype))
        yield path, checkpoint.StreamedLeaf(tuple(shape.shape), np.dtype(shape.dtype), lead, fill)


def _flat(tree, prefix=()):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, prefix + (name,))
        else:
            yield prefix + (name,), value


def _cast(read, dtype, index):
    return np.asarray(read(index)).astype(dtype, copy=False)


class _SliceSource:
    """slice `index` of a float leaf from its LeafReader, whatever slices it was stored in (a
    leaf stored whole or per layer is read once per stored slice, not once per index)."""

    def __init__(self, reader):
        self.reader = reader
        self.last: tuple | None = None

    def read(self, index: tuple[int, ...]) -> np.ndarray:
        stored = index[: self.reader.lead]
        if self.last is None or self.last[0] != stored:
            self.last = (stored, np.asarray(self.reader.read(stored)))
        return self.last[1][index[len(stored) :]]


def _quantized_fill(qcfg, base, source: _SliceSource, bits: int, is_scale: bool, memo: dict):
    """fill(index) of the codes (or, `is_scale`, the scales) of weight `base`: the source slice
    quantized. The codes' pass keeps each slice's scales for the scale leaf when that leaf
    has not been written yet (the writer stores one leaf after the other)."""
    name = base[-1]
    started = memo.setdefault(("started",) + base, [False])

    def fill(index):
        if is_scale:
            started[0] = True
            kept = memo.pop(base + index, None)
            if kept is not None:
                return kept
        codes, scale = _quantize_slice(qcfg, name, bits, source.read(index))
        if is_scale:
            return scale
        if not started[0]:
            memo[base + index] = scale
        return codes

    return fill


def _quantize_slice(qcfg, name: str, bits: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, scale = _quantize_fn(qcfg, name, bits)(jnp.asarray(w))
    return np.asarray(codes), np.asarray(scale)


@functools.cache
def _quantize_fn(qcfg, name: str, bits: int):
    return jax.jit(lambda w: quantized.quantize_weight(qcfg, name, w, bits))


# ---- inspect ---------------------------------------------------------------------------------
GROUPS = ("experts", "attention", "other")


def _group(path: tuple[str, ...]) -> str:
    if path[:2] == ("layers", "moe") and path[2].removesuffix(SCALE_SUFFIX) in quantized.EXPERTS:
        return "experts"
    if path[:2] == ("layers", "attn"):
        return "attention"
    return "other"


def stored_sizes(path: str) -> tuple[ModelConfig, dict[str, dict[str, int]]]:
    """(config, {group: {"bytes": stored bytes, "bf16_bytes": the same weights in bfloat16}})
    of a model checkpoint, from its stored shapes and dtypes (no weight is read)."""
    if not checkpoint.is_model_checkpoint(path):
        raise ConfigError(f"{path} is not a model checkpoint (needs config.json and params/)")
    cfg, lazy = checkpoint.LazyParams.open(path)
    sizes = {g: {"bytes": 0, "bf16_bytes": 0} for g in GROUPS}
    for leaf_path, leaf in _flat(lazy):
        entry = sizes[_group(leaf_path)]
        count = int(np.prod(leaf.shape, dtype=np.int64))
        entry["bytes"] += count * leaf.dtype.itemsize
    float_cfg = quantized.float_config(cfg)
    for leaf_path, shape in _flat(param_shapes(float_cfg)):
        sizes[_group(leaf_path)]["bf16_bytes"] += 2 * int(np.prod(shape.shape, dtype=np.int64))
    return cfg, sizes


def describe(cfg: ModelConfig) -> dict[str, str]:
    """group -> its stored format in words ("int4, group 128, float32 scales", "float32")."""
    group = (
        "per output channel" if cfg.quant_group_size is None else f"group {cfg.quant_group_size}"
    )

    def fmt(bits):
        if bits == 16:
            return cfg.compute.param_dtype
        return f"int{bits}, {group}, {cfg.quant_scale_dtype} scales"

    return {
        "experts": fmt(cfg.expert_bits),
        "attention": fmt(cfg.attention_bits),
        "other": cfg.compute.param_dtype,
    }


def inspect_lines(path: str) -> list[str]:
    """The table `python -m mixtral_jax.quantize inspect DIR` prints."""
    cfg, sizes = stored_sizes(path)
    formats = describe(cfg)
    lines = [f"{path}: {cfg.param_count:,} parameters"]
    lines.append(f"{'weights':<10} {'format':<40} {'stored':>10} {'as bf16':>10} {'ratio':>6}")
    total, total_bf16 = 0, 0
    for g in GROUPS:
        b, bf = sizes[g]["bytes"], sizes[g]["bf16_bytes"]
        total, total_bf16 = total + b, total_bf16 + bf
        lines.append(f"{g:<10} {formats[g]:<40} {_size(b)} {_size(bf)} {b / max(bf, 1):6.3f}")
    ratio = total / total_bf16
    lines.append(f"{'total':<10} {'':<40} {_size(total)} {_size(total_bf16)} {ratio:6.3f}")
    return lines


def _size(n: int) -> str:
    """Bytes in decimal units, 10 characters wide ("   1.234 GB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:7.3f} {unit}"
    return f"{n:8d} B"
