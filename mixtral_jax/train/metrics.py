"""Run visibility: FLOP counting for MFU, and a writer for JSONL logs and TensorBoard events."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from mixtral_jax.config import ModelConfig

# Dense bf16 peak per chip (vendor datasheets), for MFU when the run does not name its own.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v6": 918.0,
    "TPU v4": 275.0,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, MoE-aware: 6 x active matmul parameters + causal attention.

    Active matmul parameters leave out the embedding gather and the norm scales and count only
    the k chosen experts; attention scores and values add 6 * L * T * N * H (causal: half of the
    12 a full T x T attention would cost). Remat recomputation is not counted (that is HFU).
    """
    norms = (2 * cfg.num_layers + 1) * cfg.embed_dim
    matmul_params = cfg.active_param_count - cfg.vocab_size * cfg.embed_dim - norms
    attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 6.0 * matmul_params + attention


def device_peak_tflops() -> float | None:
    """The bf16 peak of the first device, when its kind is known; None otherwise (e.g. CPU)."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


class MetricsWriter:
    """Scalars to `metrics.jsonl` (one JSON object per line) and TensorBoard event files."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (the run's log; close())
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, scalars: dict, arrays: dict | None = None) -> None:
        """`scalars`: name -> number; `arrays`: name -> [L] or [L, E] arrays (per layer/expert)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        for name, value in (arrays or {}).items():
            record[name] = np.asarray(value).tolist()
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), step)
        for name, value in (arrays or {}).items():
            value = np.asarray(value)
            for index in np.ndindex(value.shape):
                tag = name + "/" + "/".join(f"{d}{i}" for d, i in zip(("layer", "expert"), index))
                self._tb.add_scalar(tag, float(value[index]), step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
