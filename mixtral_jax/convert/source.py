"""A source checkpoint directory, fully checked before a single tensor is converted.

`open_source` finds the weight files, detects the layout, reads the config and compares the
two: missing and unexpected tensors, shapes against the config, dtypes. Every problem found goes
into one `ConversionError`, so a user fixes them all in one round.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.convert import files, layouts
from mixtral_jax.convert.safetensors_io import DTYPES
from mixtral_jax.hf.config import read_hf_extras

WEIGHT_DTYPES = {DTYPES["F32"]: "float32", DTYPES["BF16"]: "bfloat16", DTYPES["F16"]: "float16"}
MAX_LISTED = 40  # problems shown; the rest are counted


class ConversionError(ConfigError):
    """Every problem of a conversion, one per line after a summary line."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(shown)
        lines = [f"{what}: {len(self.problems)} problem(s), nothing was written"]
        lines += [f"  - {p}" for p in shown] + ([f"  ... and {more} more"] if more else [])
        super().__init__("\n".join(lines))


@dataclasses.dataclass
class Source:
    """A checked source: its layout, config (param_dtype = the stored dtype) and tensors."""

    directory: str
    layout: str
    cfg: ModelConfig
    weights: files.WeightFiles
    plan: layouts.Plan
    extra: dict = dataclasses.field(default_factory=dict)  # config.json fields we do not read

    @property
    def total_bytes(self) -> int:
        return sum(self.weights.nbytes(k) for k in self.plan.expected)

    def getter(self):
        """legacy key -> numpy tensor, re-reading a stored tensor only when the key changes."""
        cache: dict = {}

        def get(key: str) -> np.ndarray:
            name, slicer = self.plan.sources[key]
            if cache.get("name") != name:
                cache.clear()  # one stored tensor (one expert stack at most) held at a time
                cache["name"], cache["value"] = name, self.weights.read(name)
            return slicer(cache["value"])

        return get

    def mapped_getter(self):
        """legacy key -> the tensor cut from its memory-mapped stored tensor (thread-safe; only
        the pages a slice touches are read, and released with the slice)."""

        def get(key: str) -> np.ndarray:
            name, slicer = self.plan.sources[key]
            return slicer(self.weights.map(name))

        return get


def open_source(directory: str, *, allow_pickle: bool = False, dtype: str | None = None) -> Source:
    """The checked source at `directory`.

    Args:
      directory: a Hugging Face or Mistral checkpoint directory.
      allow_pickle: accept pickle weights (torch >= 2.6, weights_only=True).
      dtype: cast to this parameter dtype; None keeps the stored dtype (which must be uniform).
    Raises:
      ConversionError: every problem found.
    """
    problems: list[str] = []
    if not os.path.isdir(directory):
        raise ConversionError(directory, [f"source directory {directory} does not exist"])
    weights = files.open_weights(directory, problems, allow_pickle=allow_pickle)
    layout = layouts.detect(weights.keys()) if weights is not None else None
    if weights is not None and layout is None and (weights.keys() or not problems):
        problems.append(
            f"{directory}: tensor names match no known Mixtral layout "
            f"(e.g. {sorted(weights.keys())[:3]})"
        )
    cfg = None
    if layout is not None:
        try:
            cfg = layouts.source_config(directory, layout)
        except ConfigError as e:
            problems.append(str(e))
    if cfg is None or weights is None:
        raise ConversionError(directory, problems or ["no usable weights or config"])
    plan = layouts.plan(layout, cfg)
    problems += compare(weights, plan)
    stored = {WEIGHT_DTYPES.get(weights.dtype(k)) for k in plan.expected if k in weights}
    if dtype is None and len(stored) > 1:
        problems.append(f"tensors mix dtypes {sorted(str(s) for s in stored)}: pass --dtype")
    if problems:
        raise ConversionError(directory, problems)
    cfg = cfg.replace(param_dtype=dtype or stored.pop())
    extra = {}
    if os.path.isfile(os.path.join(directory, "config.json")) and not (
        layout.startswith("mistral") and os.path.isfile(os.path.join(directory, "params.json"))
    ):
        extra = read_hf_extras(directory)
    return Source(directory, layout, cfg, weights, plan, extra)


def compare(weights: files.WeightFiles, plan: layouts.Plan) -> list[str]:
    """Missing / unexpected tensors, shape mismatches, unsupported dtypes."""
    problems = [
        f"missing tensor {k} (shape {list(s)})"
        for k, s in plan.expected.items()
        if k not in weights
    ]
    problems += [
        f"unexpected tensor {k} (shape {list(weights.shape(k))})"
        for k in sorted(set(weights.keys()) - set(plan.expected))
    ]
    for key, shape in plan.expected.items():
        if key not in weights:
            continue
        if tuple(weights.shape(key)) != tuple(shape):
            problems.append(
                f"size mismatch for {key}: checkpoint {list(weights.shape(key))}, "
                f"config {list(shape)}"
            )
        if weights.dtype(key) not in WEIGHT_DTYPES:
            problems.append(
                f"{key} has dtype {weights.dtype(key)}: weights must be float32, "
                "bfloat16 or float16"
            )
    return problems
