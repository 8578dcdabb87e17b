"""Checkpoint conversion: Hugging Face / Mistral / PyTorch weights <-> our Orbax checkpoints.

  python -m mixtral_jax.convert to-orbax SRC DST   (also installed as `mixtral-convert`)
  python -m mixtral_jax.convert to-hf CKPT DST
  python -m mixtral_jax.convert inspect DIR

Modules: `safetensors_io` (checked headers, streamed reads and writes), `files` (a directory's
weight files, shard index, pickles), `layouts` (HF legacy / v5 fused / Mistral layouts and the
RoPE row permutation), `source` (one validation pass, all problems in one error), `importer`
(to Orbax), `exporter` (to HF), `cli`.
"""

from mixtral_jax.convert.exporter import to_hf, write_hf
from mixtral_jax.convert.importer import build_params, to_orbax
from mixtral_jax.convert.source import ConversionError, Source, open_source

__all__ = [
    "ConversionError",
    "Source",
    "build_params",
    "open_source",
    "to_hf",
    "to_orbax",
    "write_hf",
]
