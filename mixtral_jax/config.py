"""Model configuration: one frozen dataclass, its presets, and validation.

Field names are the project's one vocabulary (see `model/transformer.py` for the dimension letters):

  vocab_size (V), embed_dim (D), hidden_dim (F, the expert FFN width), num_layers (L),
  num_heads (N), num_kv_heads (K), head_dim (H), num_experts (E), num_experts_per_tok (k).

Two classes, kept apart: `ModelConfig` is the architecture, what a checkpoint's `config.json`
describes (sizes, RoPE, window, token ids); `ComputeConfig` (its `compute` field) is how this run
computes it (dtypes, remat, MoE dispatch, kernels, capacity, router jitter). A checkpoint fixes
the first; a run (`train.py`, `infer.py`) chooses the second with the same dotted overrides
(`--model.dtype=bfloat16`). Hugging Face's names are mapped in exactly one place, `hf_config.py`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value breaks a rule. The message is one line naming field, value and rule."""


class MoEImpl(str, enum.Enum):
    """How tokens reach their experts. All three compute the same function (`moe/`)."""

    DENSE = "dense"  # every expert on every token, masked: the slow, obvious oracle
    DROPLESS = "dropless"  # sort by expert, grouped matmul over ragged groups
    CAPACITY = "capacity"  # sort, scatter into [E, C, D] buffers, batched matmul; may drop


class Remat(str, enum.Enum):
    """What the layer scan keeps for the backward pass."""

    NONE = "none"  # keep every activation
    FULL = "full"  # keep only the layer input; recompute the layer in the backward pass
    SAVE_DOTS = "save_dots"  # keep matmul outputs, recompute the cheap elementwise work


class LayerLoop(str, enum.Enum):
    """How the full-sequence forward (training, evaluation) runs its L layers. Both compute
    the same function; cached calls (prefill, decode) always scan."""

    SCAN = "scan"  # one jax.lax.scan: one layer compiled, gradients stacked by the loop
    UNROLLED = "unrolled"  # L calls on slices of the stacks: L layers compiled, no loop


class AttentionImpl(str, enum.Enum):
    """Which attention kernel the full-sequence forward (`attention_impl`) or a cached call
    (`cached_attention_impl`) uses (`attention.py`)."""

    AUTO = "auto"  # cudnn on NVIDIA GPUs in bf16/fp16 (cached: chunks, not decode), xla elsewhere
    XLA = "xla"  # einsum + softmax: any platform, the oracle
    CUDNN = "cudnn"  # cuDNN flash attention through jax.nn.dot_product_attention


class ChunkAttentionImpl(str, enum.Enum):
    """How a prefill chunk attends over the KV cache (`model/chunk_attention.py`)."""

    AUTO = "auto"  # split where the cached attention is cudnn and cuDNN returns the log-sum-exp
    MASKED = "masked"  # one call over the cache with the explicit mask (cuDNN reads it as a bias)
    SPLIT = "split"  # prefix keys unmasked + the chunk's own keys causal, merged by log-sum-exp


class GmmImpl(str, enum.Enum):
    """Which grouped matmul the dropless MoE uses (`grouped_matmul.py`)."""

    AUTO = "auto"  # pallas on NVIDIA GPUs, megablox on TPU, xla elsewhere
    XLA = "xla"  # jax.lax.ragged_dot (runs every expert densely on GPU)
    PALLAS = "pallas"  # our Pallas-Triton kernels (gmm_pallas.py)
    MEGABLOX = "megablox"  # JAX's TPU kernels (gmm_megablox.py); interpreted on CPU


class FusedSwiglu(str, enum.Enum):
    """Whether the dropless MoE runs gate and up as one grouped matmul with SwiGLU in its
    epilogue (`kernels/gmm_swiglu.py`) instead of two grouped matmuls and XLA's SwiGLU."""

    AUTO = "auto"  # off: not faster in the H200 training step (BENCHMARKS.md)
    ON = "on"  # the same, refused where the grouped matmul is not pallas
    OFF = "off"  # two grouped matmuls, then SwiGLU


class DecodeExpertImpl(str, enum.Enum):
    """How the MoE of a call with few tokens (decode) reaches its experts (`kernels.plan`)."""

    AUTO = "auto"  # pallas on NVIDIA GPUs, gather for one token where the grouped matmul is xla
    OFF = "off"  # the dispatch of `moe_impl` at every size
    GATHER = "gather"  # gather the chosen experts' weights, no sort (moe/local.py)
    PALLAS = "pallas"  # two Pallas-Triton kernels streaming only used experts (expert_decode.py)


class DecodeProjectionImpl(str, enum.Enum):
    """How a cached call with few tokens runs the attention projections and the router."""

    AUTO = "auto"  # pallas on NVIDIA GPUs, xla elsewhere
    OFF = "off"  # XLA einsums over the scan's layer slice
    PALLAS = "pallas"  # one Pallas launch reading layer l of the stacks in place (decode_matmul)


class DecodeAttentionImpl(str, enum.Enum):
    """How a cached call with one new token per row attends over the KV cache."""

    AUTO = "auto"  # pallas on NVIDIA GPUs, xla elsewhere
    OFF = "off"  # the plan's cached attention (XLA einsum) over the layer sliced from the cache
    PALLAS = "pallas"  # flash decoding reading layer l of the cache in place (decode_attention)


class QuantizedImpl(str, enum.Enum):
    """How quantized weights (`expert_bits` / `attention_bits` < 16) are computed with."""

    AUTO = "auto"  # pallas where the plan's kernels read codes in registers, else dequantize
    DEQUANTIZE = "dequantize"  # one layer dequantized to the compute dtype, then today's code
    PALLAS = "pallas"  # the decode kernels read codes and scales (NVIDIA GPUs)


class Exchange(str, enum.Enum):
    """How assignments reach the devices of their experts under expert parallelism
    (`moe/expert_parallel.py`)."""

    AUTO = "auto"  # ragged where the backend has it and nothing may drop, else capacity
    CAPACITY = "capacity"
    RAGGED = "ragged"
    RAGGED_EMULATED = "ragged_emulated"  # ragged path, collective emulated (checks, CPU)


DTYPES = ("float32", "bfloat16", "float16")


_ENUM_FIELDS = {
    "moe_impl": MoEImpl,
    "remat": Remat,
    "layer_loop": LayerLoop,
    "attention_impl": AttentionImpl,
    "cached_attention_impl": AttentionImpl,
    "chunk_attention_impl": ChunkAttentionImpl,
    "gmm_impl": GmmImpl,
    "fused_swiglu": FusedSwiglu,
    "decode_expert_impl": DecodeExpertImpl,
    "decode_projection_impl": DecodeProjectionImpl,
    "decode_attention_impl": DecodeAttentionImpl,
    "paged_attention_impl": DecodeAttentionImpl,
    "expert_exchange": Exchange,
    "quantized_impl": QuantizedImpl,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeConfig:
    """How a run computes a model: nothing here changes which function the model is.

    Attributes:
      param_dtype: storage dtype of parameters.
      dtype: compute dtype of activations and matmuls (router, norms, softmax stay float32).
      remat: rematerialisation policy of each layer, see `Remat`.
      layer_loop: the full-sequence forward's layers as a scan or unrolled, see `LayerLoop`.
        Unrolled, each layer's weight gradient stays its own array that the optimizer reads
        where it is, where the scan's backward writes it into a zeroed [L, ...] stack (one more
        write and read of every gradient, and the zeros); compile time grows with L.
      moe_impl: dispatch implementation, see `MoEImpl`.
      capacity_factor: for `MoEImpl.CAPACITY`, slots per expert = ceil(cf * tokens * k / E).
      router_jitter_noise: in training, inputs to the MoE block are scaled by U(1-j, 1+j).
      attention_impl: full-sequence attention kernel, see `AttentionImpl`.
      cached_attention_impl: attention over the KV cache in `extend` (prefill chunks, decode),
        see `AttentionImpl`.
      chunk_attention_impl: the form of a prefill chunk's attention over the cache (the masked
        call or the split in two unmasked calls), see `ChunkAttentionImpl`.
      gmm_impl: grouped-matmul kernel of the dropless MoE, see `GmmImpl`.
      fused_swiglu: gate and up as one grouped matmul with SwiGLU fused, see `FusedSwiglu`.
      decode_expert_impl: experts of calls with few tokens, see `DecodeExpertImpl`.
      decode_projection_impl: attention projections and router of few-token cached calls, see
        `DecodeProjectionImpl`.
      decode_attention_impl: attention of one new token per row over the cache, see
        `DecodeAttentionImpl`.
      paged_attention_impl: the same over the serving engine's paged cache: pallas follows the
        block table in place (`kernels/paged_attention.py`), off gathers each row's blocks
        (XLA); auto is pallas on NVIDIA GPUs, off elsewhere.
      expert_exchange: the all-to-all of expert parallelism, see `Exchange`.
      quantized_impl: kernels reading quantized weights or the dequantize path, see
        `QuantizedImpl`.
    The kernel choices are resolved once per compiled call into a `kernels.plan.KernelPlan`.
    """

    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: Remat = Remat.NONE
    layer_loop: LayerLoop = LayerLoop.SCAN
    moe_impl: MoEImpl = MoEImpl.DROPLESS
    capacity_factor: float = 1.25
    router_jitter_noise: float = 0.0
    attention_impl: AttentionImpl = AttentionImpl.AUTO
    cached_attention_impl: AttentionImpl = AttentionImpl.AUTO
    chunk_attention_impl: ChunkAttentionImpl = ChunkAttentionImpl.AUTO
    gmm_impl: GmmImpl = GmmImpl.AUTO
    fused_swiglu: FusedSwiglu = FusedSwiglu.AUTO
    decode_expert_impl: DecodeExpertImpl = DecodeExpertImpl.AUTO
    decode_projection_impl: DecodeProjectionImpl = DecodeProjectionImpl.AUTO
    decode_attention_impl: DecodeAttentionImpl = DecodeAttentionImpl.AUTO
    paged_attention_impl: DecodeAttentionImpl = DecodeAttentionImpl.AUTO
    expert_exchange: Exchange = Exchange.AUTO
    quantized_impl: QuantizedImpl = QuantizedImpl.AUTO

    def __post_init__(self):
        for name, enum_type in _ENUM_FIELDS.items():  # strings from TOML, JSON, the CLI
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                try:
                    object.__setattr__(self, name, enum_type(value))
                except ValueError:
                    choices = ", ".join(e.value for e in enum_type)
                    _fail(name, value, f"must be one of {choices}")
        _validate_compute(self)

    def replace(self, **changes: Any) -> ComputeConfig:
        """A copy with `changes` applied (validated like a new config)."""
        unknown = sorted(set(changes) - COMPUTE_FIELDS)
        if unknown:
            raise ConfigError(f"ComputeConfig has no field {unknown[0]!r}")
        return dataclasses.replace(self, **changes)


COMPUTE_FIELDS = frozenset(f.name for f in dataclasses.fields(ComputeConfig))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Mixtral-style sparse-MoE decoder.

    Attributes:
      vocab_size: V, tokens in the vocabulary.
      embed_dim: D, the residual stream width.
      hidden_dim: F, each expert's SwiGLU hidden width.
      num_layers: L, decoder blocks.
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads (grouped-query attention; N % K == 0).
      head_dim: H, width of one head (even: RoPE rotates pairs).
      num_experts: E, experts per MoE block.
      num_experts_per_tok: k, experts each token is routed to.
      rope_theta: RoPE base frequency.
      rms_norm_eps: epsilon inside RMSNorm.
      max_seq_len: longest sequence the model is used with (positions beyond are rejected upstream).
      sliding_window: if set, a query sees at most this many keys (itself included).
      router_aux_loss_coef: load-balancing loss weight (kept here because HF configs carry it).
      initializer_range: standard deviation of the normal init of every matrix.
      bos_token_id, eos_token_id, pad_token_id: special token ids (pad may be None).
      expert_bits: 16 (float weights), 8 or 4: how w_gate / w_up / w_down are stored
        (weight-only quantization, `kernels/quant.py`: integer codes and float scales).
      attention_bits: the same for q_proj / k_proj / v_proj / o_proj.
      quant_group_size: rows of the contraction sharing one scale (None: all of them, one
        scale per output channel); must divide every quantized contraction width.
      quant_scale_dtype: "float32" or "bfloat16", the stored scales.
      compute: how this run computes the model, see `ComputeConfig`. `replace` and the
        presets take its fields by name too: `cfg.replace(dtype="bfloat16")`.
    """

    vocab_size: int
    embed_dim: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 32768
    sliding_window: int | None = None
    router_aux_loss_coef: float = 0.02
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    expert_bits: int = 16
    attention_bits: int = 16
    quant_group_size: int | None = None
    quant_scale_dtype: str = "float32"
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)

    def __post_init__(self):
        if not isinstance(self.compute, ComputeConfig):
            _fail("compute", self.compute, "must be a ComputeConfig")
        _validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Whether any weight is stored as integer codes and scales."""
        return self.expert_bits < 16 or self.attention_bits < 16

    @property
    def num_groups(self) -> int:
        """G = N / K, query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @functools.cached_property
    def param_count(self) -> int:
        """Total parameters (embedding and LM head counted separately: they are untied)."""
        return self._count(self.num_experts)

    @functools.cached_property
    def active_param_count(self) -> int:
        """Parameters touched by one token: all but the unchosen experts."""
        return self._count(self.num_experts_per_tok)

    def _count(self, experts: int) -> int:
        d, h = self.embed_dim, self.head_dim
        attention = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        moe = experts * 3 * d * self.hidden_dim + d * self.num_experts  # experts + router
        per_layer = attention + moe + 2 * d  # two RMSNorm scales
        return self.num_layers * per_layer + 2 * self.vocab_size * d + d

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert in the capacity path for `num_tokens` tokens."""
        slots = (
            self.compute.capacity_factor * num_tokens * self.num_experts_per_tok / self.num_experts
        )
        return max(1, math.ceil(slots))

    @property
    def architecture(self) -> dict[str, Any]:
        """The architecture fields (what `config.json` describes), without `compute`."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compute"
        }

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (validated like a new config). Names of
        `ComputeConfig` fields change `compute`."""
        compute = {k: changes.pop(k) for k in list(changes) if k in COMPUTE_FIELDS}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"ModelConfig has no field {unknown[0]!r}")
        if compute:
            changes["compute"] = changes.get("compute", self.compute).replace(**compute)
        return dataclasses.replace(self, **changes)

    # ---- presets ---------------------------------------------------------------------------
    @classmethod
    def mixtral_8x7b(cls, **changes: Any) -> ModelConfig:
        """mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active."""
        base = cls(
            vocab_size=32000,
            embed_dim=4096,
            hidden_dim=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            num_experts=8,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            max_seq_len=32768,
            sliding_window=None,
            router_aux_loss_coef=0.02,
        )
        return base.replace(**changes)

    @classmethod
    def mixtral_8x22b(cls, **changes: Any) -> ModelConfig:
        """mistralai/Mixtral-8x22B-v0.1: 140.6B parameters (published "141B"), 39.2B active."""
        base = cls(
            vocab_size=32768,
            embed_dim=6144,
            hidden_dim=16384,
            num_layers=56,
            num_heads=48,
            num_kv_heads=8,
            head_dim=128,
            num_experts=8,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            max_seq_len=65536,
            sliding_window=None,
            router_aux_loss_coef=0.001,
        )
        return base.replace(**changes)

    @classmethod
    def tiny(cls, **changes: Any) -> ModelConfig:
        """A CPU-sized model with co-prime-ish sizes, so transposed dimensions cannot hide."""
        base = cls(
            vocab_size=512,
            embed_dim=64,
            hidden_dim=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            rope_theta=10000.0,
            max_seq_len=256,
        )
        return base.replace(**changes)


PRESETS = {
    "mixtral-8x7b": ModelConfig.mixtral_8x7b,
    "mixtral-8x22b": ModelConfig.mixtral_8x22b,
    "tiny": ModelConfig.tiny,
}


def preset(name: str, **changes: Any) -> ModelConfig:
    """The named preset (`mixtral-8x7b`, `mixtral-8x22b`, `tiny`) with `changes` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name](**changes)


# ---- validation ----------------------------------------------------------------------------
def _fail(field: str, value: Any, rule: str):
    raise ConfigError(f"ModelConfig.{field}={value!r}: {rule}")


_POSITIVE_INTS = (
    "vocab_size",
    "embed_dim",
    "hidden_dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
    "max_seq_len",
)


def _validate(c: ModelConfig) -> None:
    for name in _POSITIVE_INTS:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(name, value, "must be an integer")
        if value < 1:
            _fail(name, value, "must be >= 1")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(c, name)
        if value is None and name == "pad_token_id":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < c.vocab_size:
            _fail(name, value, f"must be an integer in [0, vocab_size={c.vocab_size})")
    if c.num_heads % c.num_kv_heads:
        _fail("num_heads", c.num_heads, f"must be divisible by num_kv_heads={c.num_kv_heads}")
    if c.num_experts_per_tok > c.num_experts:
        _fail(
            "num_experts_per_tok", c.num_experts_per_tok, f"must be <= num_experts={c.num_experts}"
        )
    if c.head_dim % 2:
        _fail("head_dim", c.head_dim, "must be even (rotary embeddings rotate pairs)")
    for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail(name, value, "must be a number")
        if not math.isfinite(value) or value <= 0:
            _fail(name, value, "must be a finite number > 0")
        if not _FLOAT32_TINY <= value <= _FLOAT32_MAX:  # the model computes in float32
            _fail(name, value, f"must be in [{_FLOAT32_TINY:.3g}, {_FLOAT32_MAX:.3g}] (float32)")
    if not isinstance(c.router_aux_loss_coef, (int, float)) or not c.router_aux_loss_coef >= 0:
        _fail("router_aux_loss_coef", c.router_aux_loss_coef, "must be a number >= 0")
    if c.sliding_window is not None:
        if not isinstance(c.sliding_window, int) or isinstance(c.sliding_window, bool):
            _fail("sliding_window", c.sliding_window, "must be an integer or None")
        if c.sliding_window < 1:
            _fail("sliding_window", c.sliding_window, "must be >= 1 (or None for no window)")
    _validate_quantization(c)


QUANT_BITS = (16, 8, 4)  # 16: float weights, not quantized
SCALE_DTYPES = ("float32", "bfloat16")


def _validate_quantization(c: ModelConfig) -> None:
    """Bits, scale dtype, and a group size dividing every quantized contraction width (int4:
    even widths, two rows per byte)."""
    for name in ("expert_bits", "attention_bits"):
        value = getattr(c, name)
        if value not in QUANT_BITS or isinstance(value, bool):
            _fail(name, value, f"must be one of {', '.join(map(str, QUANT_BITS))}")
    if c.quant_scale_dtype not in SCALE_DTYPES:
        _fail("quant_scale_dtype", c.quant_scale_dtype, f"must be one of {', '.join(SCALE_DTYPES)}")
    g = c.quant_group_size
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
        _fail("quant_group_size", g, "must be a positive integer or None (one group)")
    widths = []  # (name, contraction width, bits)
    if c.expert_bits < 16:
        widths += [("embed_dim", c.embed_dim, c.expert_bits)]
        widths += [("hidden_dim", c.hidden_dim, c.expert_bits)]
    if c.attention_bits < 16:
        widths += [("embed_dim", c.embed_dim, c.attention_bits)]
        widths += [("num_heads*head_dim", c.num_heads * c.head_dim, c.attention_bits)]
    for name, width, bits in widths:
        if g is not None and width % g:
            _fail("quant_group_size", g, f"must divide the contraction width {name}={width}")
        if bits == 4 and width % 2:
            _fail(name, width, "int4 packs two rows per byte: the width must be even")


_FLOAT32_MAX = 3.4028234663852886e38  # largest finite float32
_FLOAT32_TINY = 1.401298464324817e-45  # smallest positive float32 (subnormal)


def _validate_compute(c: ComputeConfig) -> None:
    value = c.capacity_factor
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail("capacity_factor", value, "must be a number")
    if not math.isfinite(value) or value <= 0:
        _fail("capacity_factor", value, "must be a finite number > 0")
    if not isinstance(c.router_jitter_noise, (int, float)) or not 0 <= c.router_jitter_noise < 1:
        _fail("router_jitter_noise", c.router_jitter_noise, "must be in [0, 1)")
    for name in ("param_dtype", "dtype"):
        if getattr(c, name) not in DTYPES:
            _fail(name, getattr(c, name), f"must be one of {', '.join(DTYPES)}")
