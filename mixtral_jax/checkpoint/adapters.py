"""LoRA adapter directories: the adapters alone (small), beside no copy of the base.

  DIR/adapters.json   {"format", "rank", "alpha", "targets", "base", "arrays": {name: shape,
                      dtype, crc32}}
  DIR/adapters.npz    one array per factor, named like `layers.attn.lora_q_proj_a`
                      (numpy's zip format, read with allow_pickle=False)

A training run writes one as its final model when it trains adapters; `infer.py --adapters DIR`
(`generate/loading.py`) and `surgery merge-lora` read it. A changed array is refused naming it.
"""

from __future__ import annotations

import json
import os
import zlib

import jax
import numpy as np

from mixtral_jax.config import ConfigError
from mixtral_jax.fileio import atomic_directory, atomic_write_text, read_json
from mixtral_jax.model import lora

ADAPTERS_FILE = "adapters.json"
ARRAYS_FILE = "adapters.npz"
FORMAT = "mixtral_jax.lora.v1"


def is_adapters_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ADAPTERS_FILE))


def _flat(tree: dict) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x) for p, x in leaves}


def save_adapters(
    directory: str, adapters: dict, lcfg: lora.LoraConfig, base: str = "", overwrite=False
) -> None:
    """Writes host `adapters` (a nested dict of arrays) and their settings to `directory`,
    whole or not at all. `base`: the base checkpoint they were trained on (informative)."""
    flat = _flat(adapters)
    meta = {
        "format": FORMAT,
        "rank": lcfg.rank,
        "alpha": lcfg.alpha,
        "targets": list(lcfg.targets),
        "base": base,
        "arrays": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "crc32": zlib.crc32(v.tobytes())}
            for k, v in flat.items()
        },
    }
    with atomic_directory(directory, overwrite=overwrite) as staging:
        with open(os.path.join(staging, ARRAYS_FILE), "wb") as f:
            np.savez(f, **flat)
        atomic_write_text(os.path.join(staging, ADAPTERS_FILE), json.dumps(meta, indent=1))


def load_adapters(directory: str) -> tuple[lora.LoraConfig, dict]:
    """(LoraConfig, nested dict of numpy arrays) from an adapter directory.

    Raises:
      ConfigError: not an adapter directory, or an array missing or changed (named, one line).
    """
    if not is_adapters_dir(directory):
        raise ConfigError(f"{directory} is no LoRA adapter directory (no {ADAPTERS_FILE})")
    meta = read_json(os.path.join(directory, ADAPTERS_FILE), ADAPTERS_FILE)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{directory}: adapter format {meta.get('format')!r}, expected {FORMAT}")
    lcfg = lora.LoraConfig(rank=meta["rank"], alpha=meta["alpha"], targets=tuple(meta["targets"]))
    out: dict = {}
    with np.load(os.path.join(directory, ARRAYS_FILE), allow_pickle=False) as stored:
        for name, entry in meta["arrays"].items():
            if name not in stored.files:
                raise ConfigError(f"{directory}: adapter array {name} is missing")
            x = stored[name]
            if list(x.shape) != entry["shape"] or zlib.crc32(x.tobytes()) != entry["crc32"]:
                raise ConfigError(f"{directory}: adapter array {name} does not match its checksum")
            node = out
            *parents, leaf = name.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = x
    return lcfg, out
