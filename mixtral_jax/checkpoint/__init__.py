"""Checkpoints: the only modules that import Orbax.

`model.py` (re-exported here) is the model checkpoint a user loads: weights, config.json and the
tokenizer, written atomically with per-array checksums, read slice by slice straight to the
devices (`placement.py`). `train.py` is the training run's resumable state
(`TrainCheckpointer`: async saves, keep-N, per-shard checksum manifests, verified fallback).
"""

from mixtral_jax.checkpoint.model import (
    CHECKSUMS_FILE,
    PARAMS_DIR,
    TOKENIZER_FILE,
    LazyParams,
    StreamedLeaf,
    checkpoint_readers,
    is_model_checkpoint,
    load_model,
    save_model,
    save_model_sharded,
    save_model_streaming,
    to_numpy,
)

__all__ = [
    "CHECKSUMS_FILE",
    "PARAMS_DIR",
    "TOKENIZER_FILE",
    "LazyParams",
    "StreamedLeaf",
    "checkpoint_readers",
    "is_model_checkpoint",
    "load_model",
    "save_model",
    "save_model_sharded",
    "save_model_streaming",
    "to_numpy",
]
