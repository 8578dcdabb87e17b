"""Run configs: TOML files in `configs/`, dotted command-line overrides, strict typing.

A run config is a tree of frozen dataclasses. `load_run_config(path, overrides)` reads the TOML,
applies overrides like `--model.num_layers=4`, and builds the tree. Unknown keys and values of the
wrong type are errors (one line naming the key), never silently ignored.

The `[model]` table takes `preset = "tiny" | "mixtral-8x7b" | "mixtral-8x22b"` plus any
`ModelConfig` (architecture) or `ComputeConfig` field to change; `hf_config =
"path/to/config.json"` starts from a Hugging Face config instead of a preset. `infer.py` takes
the same `--model.<compute field>=value` overrides (`compute_overrides`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
import types
import typing
from typing import Any

import numpy as np

from mixtral_jax.config import COMPUTE_FIELDS, ComputeConfig, ConfigError, ModelConfig, preset
from mixtral_jax.hf.config import load_hf_config
from mixtral_jax.model import lora
from mixtral_jax.parallel.sharding import MeshConfig


def _check(section: str, name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{name}={value!r}: {rule}")


FLOAT32_MAX = float(np.finfo(np.float32).max)
SEED_MAX = 2**63 - 2  # jax.random.key takes an int64; the run also draws from seed + 1


def as_float32(value: float) -> float:
    """`value` as the device sees it: rounded to float32 (1e39 -> inf, 1e-50 -> 0)."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(value))


def _check_float32(section: str, name: str, value: float, low: str) -> None:
    """ConfigError unless `value` is finite and > 0 (low "> 0") or >= 0 (low ">= 0") once
    rounded to float32, the dtype the train step computes with."""
    v = as_float32(value)
    ok = math.isfinite(v) and (v > 0 if low == "> 0" else v >= 0)
    _check(section, name, value, ok, f"must be {low} and finite in float32 (max {FLOAT32_MAX:.3g})")


def _check_lora(tc) -> None:
    """LoRA and `trainable` settings (patterns are checked against the model at the start)."""
    rank = tc.lora_rank
    ok = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0
    _check("train", "lora_rank", rank, ok, "must be an integer >= 0 (0 = no adapters)")
    if rank:
        lora.LoraConfig(rank=rank, alpha=tc.lora_alpha, targets=tuple(tc.lora_targets))
        _check(
            "train",
            "trainable",
            list(tc.trainable),
            not tc.trainable,
            f"cannot go with train.lora_rank={rank}: adapters train, the base is frozen",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation. Loss = CE + aux_loss_coef * load balance + router_z_loss_coef * z-loss.

    Attributes:
      steps: optimisation steps of the run.
      batch_size: sequences per step (split into grad_accum micro-batches).
      seq_len: tokens per sequence (T).
      grad_accum: micro-batches per step; gradients are summed, CE weighs every token equally.
      lr, warmup_steps, min_lr_ratio: linear warmup to lr, cosine decay to lr * min_lr_ratio.
      weight_decay, decay_norms_and_embeddings: AdamW decay (norm scales and the embedding are
        not decayed unless asked).
      b1, b2, eps: AdamW moments.
      clip_norm: global-norm gradient clipping.
      aux_loss_coef: load-balancing loss weight (Mixtral 8x7B's config: 0.02).
      router_z_loss_coef: router z-loss weight (ST-MoE: 1e-3).
      max_bad_steps: consecutive non-finite steps (skipped) after which the run halts.
      eval_every, eval_batches: held-out loss every this many steps, over this many batches.
      log_every: steps between progress/metrics lines.
      peak_tflops: accelerator peak for MFU (0 = from the device kind when known).
      lora_rank, lora_alpha, lora_targets: LoRA adapters of rank r on the targets (q_proj,
        k_proj, v_proj, o_proj, router, w_gate, w_up, w_down), scaled by alpha / r, train over
        a frozen base (`model/lora.py`); 0 = no adapters.
      trainable: patterns of the model's parts that train, the rest frozen (`train/trainable.py`
        has the grammar: `layers.*.moe.experts[3]`, `layers.*.moe.router`, `embed`); empty =
        everything trains.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 1e-3
    max_bad_steps: int = 5
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    peak_tflops: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    trainable: tuple[str, ...] = ()

    def __post_init__(self):
        _check_lora(self)
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "max_bad_steps",
            "eval_every",
            "eval_batches",
            "log_every",
        ):
            value = getattr(self, name)
            _check("train", name, value, isinstance(value, int) and value >= 1, "must be >= 1")
        _check(
            "train",
            "batch_size",
            self.batch_size,
            self.batch_size % self.grad_accum == 0,
            f"must be divisible by grad_accum={self.grad_accum}",
        )
        _check("train", "warmup_steps", self.warmup_steps, 0 <= self.warmup_steps, "must be >= 0")
        for name in ("lr", "clip_norm", "eps"):
            _check_float32("train", name, getattr(self, name), "> 0")
        for name in ("weight_decay", "aux_loss_coef", "router_z_loss_coef", "peak_tflops"):
            _check_float32("train", name, getattr(self, name), ">= 0")
        _check(
            "train",
            "weight_decay",
            self.weight_decay,
            math.isfinite(as_float32(self.lr * self.weight_decay)),
            f"times train.lr={self.lr!r} overflows float32",
        )
        _check("train", "b2", self.b2, 0 < as_float32(self.b2) < 1, "must be in (0, 1) in float32")
        _check(
            "train",
            "min_lr_ratio",
            self.min_lr_ratio,
            0 <= self.min_lr_ratio <= 1,
            "must be in [0, 1]",
        )
        _check("train", "b1", self.b1, 0 <= as_float32(self.b1) < 1, "must be in [0, 1) in float32")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Attributes:
    source: `builtin:pydoc`, a .txt / .jsonl / .npy file, or a directory of them (read into
      memory), or a directory written by `python -m mixtral_jax.data prepare` (memory-mapped
      token shards; their tokenizer is the run's: leave `tokenizer` at auto).
    tokenizer: `auto` (the starting checkpoint's tokenizer if `checkpoint.init_from` has one;
      Mistral's official tokenizer for a 32000- or 32768-token model; else `train`), `train`
      (train a BPE tokenizer on the training documents), `mistral`, or a sentencepiece file.
    vocab_size: vocabulary of a trained tokenizer (the model's vocab_size follows it).
    eval_fraction: share of documents held out for eval loss and perplexity.
    """

    source: str = "builtin:pydoc"
    tokenizer: str = "auto"
    vocab_size: int = 512
    eval_fraction: float = 0.05

    def __post_init__(self):
        _check("data", "vocab_size", self.vocab_size, self.vocab_size >= 16, "must be >= 16")
        _check(
            "data",
            "eval_fraction",
            self.eval_fraction,
            0 <= self.eval_fraction < 1,
            "must be in [0, 1)",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Attributes:
    dir: run directory (checkpoints, logs, tokenizer, final model).
    save_every: steps between checkpoints (the last step is always saved).
    keep: checkpoints kept (older ones are deleted).
    async_save: write checkpoints in the background while training continues.
    init_from: a model checkpoint (converted, upcycled, trained) whose weights start a new run;
      its config.json fixes the model's sizes, the [model] table may still set dtype, param_dtype,
      remat, moe_impl, capacity_factor, router_jitter_noise, attention_impl and gmm_impl.
      Ignored when resuming.
    allow_config_change: resume even though the run config differs from the checkpoint's in a
      setting that changes the result (lr, batch_size, seed, model, data...); without it such
      a resume is refused, naming the setting. train.steps may always change (extending a run).
    """

    dir: str = "runs/tiny"
    init_from: str = ""
    save_every: int = 100
    keep: int = 3
    async_save: bool = True
    allow_config_change: bool = False

    def __post_init__(self):
        _check("checkpoint", "save_every", self.save_every, self.save_every >= 1, "must be >= 1")
        _check("checkpoint", "keep", self.keep, self.keep >= 1, "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one run needs.

    Attributes:
      model: the model.
      seed: seed of parameter initialisation and of every random stream derived from it.
      train, data, checkpoint: see their classes.
      mesh: the device mesh (`sharding.MeshConfig`: data, fsdp, expert, tensor sizes, one may be
        -1). The run uses the first data*fsdp*expert*tensor devices (every device when one axis
        is -1); the all-1 default is a 1x1x1x1 mesh over the first device.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig.tiny)
    seed: int = 0
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        _check_seed(self.seed)


def _check_seed(seed) -> None:
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= SEED_MAX:
        raise ConfigError(
            f"seed={seed}: must be in [0, {SEED_MAX}] (jax.random.key takes an int64, "
            "and the run also uses seed + 1)"
        )


# ---- reading -------------------------------------------------------------------------------
def load_run_config(path: str | None, overrides: list[str] = (), cls: type = RunConfig):
    """Reads `path` (TOML; None = all defaults), applies `overrides` (`a.b=value`), builds `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for item in overrides:
        apply_override(data, item)
    return build(cls, data)


def apply_override(data: dict, item: str) -> None:
    """Sets `a.b.c=value` in the nested dict; the value is parsed as TOML, else kept as a string."""
    item = item.removeprefix("--")
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. model.num_layers=4)")
    key, raw = item.split("=", 1)
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} is malformed")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a table")
    node[parts[-1]] = value


def build(cls: type, data: dict[str, Any], where: str = ""):
    """A `cls` dataclass from a nested dict, checking every key and value type."""
    if cls is ModelConfig:
        return build_model_config(data, where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {where + unknown[0]!r} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**kwargs)


def build_model_config(data: dict[str, Any], where: str = "model.") -> ModelConfig:
    """The `[model]` table: a preset (or an HF config.json) with field changes."""
    data = dict(data)
    name = data.pop("preset", None)
    hf_path = data.pop("hf_config", None)
    if name is not None and hf_path is not None:
        raise ConfigError(f"{where}preset and {where}hf_config are exclusive: pick one")
    hints = {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(ComputeConfig)}
    hints.pop("compute")
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config key {where + unknown[0]!r}")
    changes = {k: _coerce(hints[k], v, where + k) for k, v in data.items()}
    if hf_path is not None:
        return load_hf_config(hf_path, **changes)
    return preset(name or "tiny", **changes)


def compute_overrides(overrides: list[str], where: str = "model.") -> dict[str, Any]:
    """`ComputeConfig` changes from `model.<field>=value` overrides (infer.py, the server): the
    architecture comes from the checkpoint, so any other key is refused, naming it."""
    data: dict[str, Any] = {}
    for item in overrides:
        apply_override(data, item)
    unknown = sorted(set(data) - {where.rstrip(".")})
    if unknown:
        raise ConfigError(f"override {unknown[0]!r}: only {where}<compute setting> is taken here")
    table = data.get(where.rstrip("."), {})
    if not isinstance(table, dict):
        raise ConfigError(f"override {where.rstrip('.')!r} must name a field: {where}dtype=...")
    hints = typing.get_type_hints(ComputeConfig)
    for key in table:
        if key not in COMPUTE_FIELDS:
            rule = (
                "is architecture, fixed by the checkpoint's config.json"
                if key in typing.get_type_hints(ModelConfig)
                else "is no setting"
            )
            raise ConfigError(
                f"{where}{key} {rule}; compute settings: {', '.join(sorted(COMPUTE_FIELDS))}"
            )
    changes = {k: _coerce(hints[k], v, where + k) for k, v in table.items()}
    ComputeConfig(**changes)  # validates the values now, before any weights are read
    return changes


def _coerce(hint: Any, value: Any, where: str):
    """Checks `value` against the annotation `hint`; allows int -> float and str -> enum."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where + ".")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(str(e.value) for e in hint)
            raise ConfigError(f"{where}={value!r}: must be one of {choices}") from None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: must be a list")
        (item,) = set(typing.get_args(hint)) - {Ellipsis} or {Any}
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where}={value!r}: must be of type {hint.__name__}")
    return value


def to_dict(config) -> dict[str, Any]:
    """A dataclass tree as plain TOML/JSON-ready values (enums as their strings)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(config)


# ---- resuming ------------------------------------------------------------------------------
# Settings a resumed run may change: they do not change what the run computes (logging, eval,
# checkpointing, the device layout, kernel choices), or extend it (train.steps).
RESUME_FREE = frozenset(
    {
        "train.steps",
        "train.log_every",
        "train.eval_every",
        "train.eval_batches",
        "train.max_bad_steps",
        "train.peak_tflops",
        *(f"model.compute.{k}" for k in ("remat", "layer_loop", "attention_impl", "gmm_impl")),
        *(f"model.compute.{k}" for k in ("decode_expert_impl", "decode_projection_impl")),
        "model.compute.expert_exchange",
    }
)
RESUME_FREE_SECTIONS = ("checkpoint.", "mesh.")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_changes(saved: dict, cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(setting, saved value, new value) for every result-changing setting of `cfg` that
    differs from `saved` (a checkpoint's `to_dict(config)`); settings it lacks are skipped."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    return [
        (key, old[key], value)
        for key, value in new.items()
        if key in old
        and old[key] != value
        and key not in RESUME_FREE
        and not key.startswith(RESUME_FREE_SECTIONS)
    ]


def check_resume(saved: dict | None, cfg: RunConfig, step: int) -> None:
    """ConfigError naming the first result-changing setting that differs from the checkpoint's
    (`saved`, None for a checkpoint without one), unless checkpoint.allow_config_change."""
    if saved is None or cfg.checkpoint.allow_config_change:
        return
    changes = resume_changes(saved, cfg)
    if changes:
        key, old, new = changes[0]
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise ConfigError(
            f"{key} changed since checkpoint step {step} of {cfg.checkpoint.dir}: {old!r} -> "
            f"{new!r}{more}; resuming would change the run (checkpoint.allow_config_change=true "
            "resumes anyway)"
        )
