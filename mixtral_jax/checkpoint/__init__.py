"""Checkpoints: the only modules that import Orbax.

`model.py` (re-exported here) is the model checkpoint a user loads: weights, config.json and the
tokenizer, written atomically, read lazily. `train.py` is the training run's resumable state
(`TrainCheckpointer`: async saves, keep-N, per-shard checksum manifests, verified fallback).
"""

from mixtral_jax.checkpoint.model import (
    PARAMS_DIR,
    TOKENIZER_FILE,
    LazyParams,
    StreamedLeaf,
    is_model_checkpoint,
    load_model,
    save_model,
    save_model_sharded,
    save_model_streaming,
    to_numpy,
)

__all__ = [
    "PARAMS_DIR",
    "TOKENIZER_FILE",
    "LazyParams",
    "StreamedLeaf",
    "is_model_checkpoint",
    "load_model",
    "save_model",
    "save_model_sharded",
    "save_model_streaming",
    "to_numpy",
]
