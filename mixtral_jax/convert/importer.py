"""Hugging Face / Mistral / pickle checkpoint -> our model checkpoint (Orbax + config.json).

Order of work, so that a failure leaves nothing behind:
  1. `open_source` checks files, layout, config, names, shapes and dtypes (no tensor data read);
  2. each of our leaves is filled slice by slice from one stored tensor at a time (an expert
     stack at most), with a progress bar in bytes; `--check-finite` scans each slice;
  3. `checkpoint.save_model` writes into a staging directory and renames it into place.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from tqdm import tqdm

from mixtral_jax import checkpoint
from mixtral_jax.convert.source import ConversionError, Source, open_source
from mixtral_jax.hf_weights import TABLE, slice_keys

TOKENIZER_CANDIDATES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1")


def find_tokenizer(directory: str) -> str | None:
    """The sentencepiece model shipped in `directory`, if any."""
    for name in TOKENIZER_CANDIDATES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    found = sorted(glob.glob(os.path.join(directory, "tokenizer.model*")))
    return found[0] if found else None


def build_params(src: Source, *, check_finite: bool = False, progress: bool = True,
                 problems: list[str] | None = None) -> dict:
    """Our nested parameter dict (numpy, `src.cfg.param_dtype`), one stored tensor at a time.

    Non-finite slices are appended to `problems` (named, with their count) when `check_finite`.
    """
    cfg, get = src.cfg, src.getter()
    dtype = np.dtype(_np_dtype(cfg.param_dtype))
    params: dict = {}
    with tqdm(total=src.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
              desc="convert", disable=not progress) as bar:
        for m in TABLE:
            keys = slice_keys(m, cfg)
            leaf = None
            for index, key in keys:
                hf = get(key)
                if check_finite and problems is not None:
                    bad = int(np.size(hf) - np.count_nonzero(np.isfinite(hf)))
                    if bad:
                        problems.append(f"{key} has {bad} non-finite value(s)")
                ours = m.to_ours(hf, cfg)
                if leaf is None:
                    leading = (cfg.num_layers,) * m.per_layer + (cfg.num_experts,) * m.per_expert
                    leaf = np.empty(leading + ours.shape, dtype)
                leaf[index] = ours  # casts only when --dtype asked for it
                bar.update(hf.nbytes)
            node = params
            for name in m.path[:-1]:
                node = node.setdefault(name, {})
            node[m.path[-1]] = leaf
    return params


def _np_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else name


def to_orbax(source_dir: str, out_dir: str, *, allow_pickle: bool = False,
             dtype: str | None = None, check_finite: bool = False,
             tokenizer: str | None = None, progress: bool = True) -> Source:
    """Converts `source_dir` into a new model checkpoint at `out_dir`.

    Raises:
      ConversionError: every problem with the source, the target or the tokenizer; nothing is
        written (and nothing is left half-written) when it is raised.
    """
    pre: list[str] = []
    if os.path.exists(out_dir):
        pre.append(f"output {out_dir} already exists: choose a new directory")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        pre.append(f"tokenizer {tokenizer} does not exist")
    try:
        src = open_source(source_dir, allow_pickle=allow_pickle, dtype=dtype)
    except ConversionError as e:
        raise ConversionError(source_dir, pre + e.problems) from None
    if pre:
        raise ConversionError(source_dir, pre)
    problems: list[str] = []
    params = build_params(src, check_finite=check_finite, progress=progress, problems=problems)
    if problems:
        raise ConversionError(source_dir, problems)
    checkpoint.save_model(out_dir, params, src.cfg, tokenizer or find_tokenizer(source_dir))
    return src
