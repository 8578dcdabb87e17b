"""Which kernel every part of one compiled call runs: decided once, here, and passed down.

A `KernelPlan` is resolved at the top of each traced model call (`Mixtral.__call__`,
`Mixtral.extend`) from four inputs and nothing else:

  the compute config   `ComputeConfig.attention_impl / cached_attention_impl / gmm_impl /
                       decode_expert_impl / decode_projection_impl / decode_attention_impl /
                       expert_exchange / moe_impl` (`auto` or a choice);
  the platform         `platform()`: NVIDIA GPU, or not (CPU, TPU, other GPUs);
  the active mesh      `sharding.active_mesh()`: expert-parallel dispatch when its expert axis
                       is > 1; else a Pallas / megablox dropless dispatch per device over its
                       batch axes (`token_mesh`); decode kernels only on one device (they
                       read unsharded stacks);
  the token count      B*T of the call, and whether it reads a KV cache (decode kernels apply
                       to cached calls of at most `MAX_DECODE_TOKENS` tokens, the decode
                       experts and projections to `MAX_GROUPED_TOKENS`); T, the new tokens
                       per row of a cached call (flash attention over the cache for chunks of
                       at least `MIN_FLASH_QUERIES`).

Layers only read the plan's fields: none infers a kernel from a weight's rank, dtype or path.
`auto` picks, by platform (H200 measurements in BENCHMARKS.md):

  attention           cudnn flash attention on NVIDIA GPUs in bf16/fp16 with head_dim <= 128
  cached_attention    the same, for cached calls of T >= MIN_FLASH_QUERIES new tokens per row
                      (prefill chunks); decode steps keep the XLA einsum (faster there) unless
  decode_attention    pallas (decode_attention.py: flash decoding reading the cache in place) on
                      NVIDIA GPUs for cached calls of one new token per row on one device
  split_chunk_attention  on where cached_attention is cudnn and this jax's cuDNN call returns
                      the log-sum-exp (`kernels/cudnn_attention.py`): a chunk attends as prefix
                      keys unmasked + its own keys causal (`model/chunk_attention.py`), where
                      the cache is in that shape (else the masked call)
  grouped_matmul      our Pallas-Triton gmm on NVIDIA GPUs; JAX's megablox on TPU (float32 and
                      bfloat16); jax.lax.ragged_dot elsewhere
  fused_swiglu        on (gmm_swiglu.py: gate and up as one grouped matmul, SwiGLU in its
                      epilogue) where the local dropless path's grouped matmul is pallas and
                      its experts are float weights (not read as codes), for full-sequence
                      calls (training, eval); cached calls keep the stacked unfused path
  decode_experts      pallas on NVIDIA GPUs: expert_decode.py up to MAX_DECODE_TOKENS, its
                      grouped-rows form (expert_decode_grouped.py) up to MAX_GROUPED_TOKENS
                      (`decode_expert_rows`; int4 experts from INT4_GROUPED_ABOVE); `gather` for a single token where the grouped
                      matmul is ragged_dot (which would read every expert)
  decode_projections  pallas (decode_matmul.py, reading layer l of the stacks in place) on
                      NVIDIA GPUs for cached calls up to MAX_GROUPED_TOKENS
  paged_attention     pallas (kernels/paged_attention.py: the serving engine's decode steps
                      follow the block table through the pool in place) on NVIDIA GPUs for one
                      new token per row on one device; elsewhere the XLA gather of each row's
                      blocks
  exchange            ragged_all_to_all where the backend compiles it and nothing may drop
  quantized_experts   with int8/int4 experts (`ModelConfig.expert_bits`): pallas (the kernels
                      read codes and scales in place) where decode_experts is pallas, or
                      off with the local dropless grouped matmul pallas (prefill), and the
                      kernels read `kernels/quant.py`'s format
                      (`quantized_tile_reader`: kernels/weight_tiles.py and its
                      supports_format); else dequantize: one layer's weights are
                      dequantized to the compute dtype inside the layer scan and the plan's
                      float kernels run (the CPU path, the oracle)
  quantized_projections  the same for int8/int4 attention (`attention_bits`) and
                      decode_projections; decode_projections stays off for quantized attention
                      unless its kernel reads codes

An explicit choice that cannot run here is a one-line `ConfigError` naming the reason.

LoRA adapters (`model/lora.py`) do not change the plan: attention projections and the router add
their low-rank term after whichever kernel ran; the experts' term rides the dropless path's
grouped matmul, and every other expert path (the pallas decode-expert kernel included, which
fuses the SwiGLU) falls back to running on that layer's weights merged for the call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixtral_jax.config import (
    AttentionImpl,
    ChunkAttentionImpl,
    ConfigError,
    DecodeAttentionImpl,
    DecodeExpertImpl,
    DecodeProjectionImpl,
    Exchange,
    FusedSwiglu,
    GmmImpl,
    ModelConfig,
    MoEImpl,
    QuantizedImpl,
)
from mixtral_jax.kernels import cudnn_attention, expert_decode_grouped, weight_tiles
from mixtral_jax.kernels.common import MAX_GROUPED_TOKENS, MAX_TOKENS, supports
from mixtral_jax.kernels.gmm_megablox import DTYPES as MEGABLOX_DTYPES
from mixtral_jax.parallel import sharding

MAX_DECODE_TOKENS = MAX_TOKENS  # the decode kernels' limit (kernels/common.py)
# int4 experts above this many tokens (to MAX_DECODE_TOKENS) run the grouped slots of 16 rows:
# one layer of 8x7B at 64 tokens on the H200 (bench/quant_decode_tiles.py, kernel time,
# BENCHMARKS.md third session of 2026-12-03) 697 us against 902 with every slot computing all
# tokens (PTX tiles; float32 tiles 803 against 1,120); 32 rows 790. int8 and bf16 do not gain
# (grouped 873 / 680 us against 733 / 651). Below 33 tokens not measured.
INT4_GROUPED_ABOVE = 32
# Layers unrolled per iteration of a cached call's layer scan on NVIDIA GPUs. H200, full 8x7B,
# batch-1 decode: 1 -> 81.9 tokens/s, 4 -> 93.8, 32 -> 96.4 but a much longer compile. Elsewhere
# 1: on CPU each unrolled layer keeps its sliced expert weights alive (4 layers of a 2 GB
# float32 model: 0.85 GB of temporaries in infer.py's prefill).
GPU_EXTEND_UNROLL = 4
# Queries per row from which `auto` runs a cached call's attention through cuDNN flash attention:
# a prefill chunk (H200: 2,048 queries over a 32,768-key cache in 3.2 ms against 10.7 ms for the
# einsum); decode steps (T = 1) and short calls keep the einsum, measured faster there.
MIN_FLASH_QUERIES = 16
(EXPERT_AXIS,) = sharding.LOGICAL_RULES["experts"]

NVIDIA_GPU = "nvidia_gpu"


def platform() -> str:
    """`NVIDIA_GPU` when computations run on an NVIDIA GPU (the default backend), else the
    backend's name (cpu, tpu, gpu for other vendors)."""
    backend = jax.default_backend()
    if backend == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower():
        return NVIDIA_GPU
    return backend


def on_nvidia_gpu() -> bool:
    return platform() == NVIDIA_GPU


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """The resolved kernels of one compiled call (hashable: usable as a static argument).

    Attributes:
      attention: XLA or CUDNN, the full-sequence attention.
      cached_attention: XLA or CUDNN, the attention of a cached call over the KV cache.
      split_chunk_attention: whether a cached call of several new tokens per row attends as
        (prefix keys, unmasked) + (its own keys, causal) merged by log-sum-exp, each part
        through `cached_attention` (`model/chunk_attention.py`; `Mixtral.extend` says where a
        cache is in that shape), instead of one masked call over the cache.
      grouped_matmul: XLA (ragged_dot), PALLAS or MEGABLOX, the expert matmuls of dropless
        dispatch (cached calls included) and of the ragged expert-parallel exchange.
      fused_swiglu: whether the local dropless path of a full-sequence call runs gate and up
        as one grouped matmul with SwiGLU fused (`gmm_swiglu.py`).
      decode_experts: OFF, GATHER or PALLAS, the experts of a few-token call.
      decode_expert_rows: with decode_experts PALLAS, 0 for expert_decode.py (every slot
        computes all tokens), else R, the rows per chunk of expert_decode_grouped.py.
      decode_projections: OFF or PALLAS, q/k/v, o and the router of a few-token cached call,
        reading layer l of the weight stacks in place.
      decode_attention: OFF or PALLAS, one new token per row attending over layer l of the
        cache stack in place (flash decoding); OFF: `cached_attention` over the sliced layer.
      paged_attention: OFF or PALLAS, the same over a paged pool (`Mixtral.extend_paged`):
        PALLAS follows the block table in place; OFF: `cached_attention` over gathered blocks.
      extend_unroll: layers unrolled per iteration of `Mixtral.extend`'s layer scan.
      moe: the dispatch (`MoEImpl`).
      expert_mesh: the mesh whose expert axis splits the experts, or None (one device).
      exchange: the expert-parallel all-to-all (resolved; unused without `expert_mesh`).
      token_mesh: the mesh over whose batch axes the local dropless dispatch runs per device
        (`moe/data_parallel.py`), or None (traced on the global tokens): set where the grouped
        matmul is PALLAS or MEGABLOX, a Pallas call XLA cannot partition, on a mesh with a batch
        axis > 1 and no expert axis (ragged_dot XLA partitions itself).
      quantized_experts: DEQUANTIZE or PALLAS, how quantized experts are read (PALLAS only
        with decode_experts PALLAS, or OFF with local dropless dispatch and grouped_matmul
        PALLAS: the kernels take `QuantizedWeight` stacks).
      quantized_projections: DEQUANTIZE or PALLAS, the same for quantized attention
        projections under decode_projections PALLAS.
    """

    attention: AttentionImpl = AttentionImpl.XLA
    cached_attention: AttentionImpl = AttentionImpl.XLA
    split_chunk_attention: bool = False
    grouped_matmul: GmmImpl = GmmImpl.XLA
    fused_swiglu: bool = False
    decode_experts: DecodeExpertImpl = DecodeExpertImpl.OFF
    decode_expert_rows: int = 0
    decode_projections: DecodeProjectionImpl = DecodeProjectionImpl.OFF
    decode_attention: DecodeAttentionImpl = DecodeAttentionImpl.OFF
    paged_attention: DecodeAttentionImpl = DecodeAttentionImpl.OFF
    extend_unroll: int = 1
    moe: MoEImpl = MoEImpl.DROPLESS
    expert_mesh: Mesh | None = None
    exchange: Exchange = Exchange.CAPACITY
    token_mesh: Mesh | None = None
    quantized_experts: QuantizedImpl = QuantizedImpl.DEQUANTIZE
    quantized_projections: QuantizedImpl = QuantizedImpl.DEQUANTIZE

    @property
    def stacked_weights(self) -> tuple[tuple[str, str], ...]:
        """(module, weight) of the decoder block that a cached call reads as whole [L, ...]
        stacks at its layer, in place, instead of as the scan's per-layer slices: the experts
        always (a slice feeding a custom kernel would be copied, 2.8 GB per 8x7B layer), the
        projections and the router where their decode kernel runs."""
        experts = (("moe", "w_gate"), ("moe", "w_up"), ("moe", "w_down"))
        if self.decode_projections != DecodeProjectionImpl.PALLAS:
            return experts
        return experts + (
            ("attn", "q_proj"),
            ("attn", "k_proj"),
            ("attn", "v_proj"),
            ("attn", "o_proj"),
            ("moe", "router"),
        )


def resolve(
    cfg: ModelConfig,
    tokens: int,
    *,
    cached: bool,
    queries: int | None = None,
    mesh: Mesh | None = None,
    where: str | None = None,
) -> KernelPlan:
    """The plan of a call over `tokens` (B*T) tokens, reading a KV cache if `cached`.

    Args:
      cfg: the model (widths) and its compute config (the choices).
      tokens: B*T of the call.
      cached: an `extend` call (KV cache; weights may be read as stacks).
      queries: T, the new tokens per row of a cached call (default `tokens`).
      mesh: the active mesh (default `sharding.active_mesh()`).
      where: the platform (default `platform()`).
    Raises:
      ConfigError: an explicit choice that cannot run on this platform.
    """
    c = cfg.compute
    mesh = sharding.active_mesh() if mesh is None else mesh
    where = platform() if where is None else where
    expert_mesh = mesh if mesh is not None and mesh.shape[EXPERT_AXIS] > 1 else None
    one_device = mesh is None or mesh.size == 1
    gmm = resolve_gmm(c.gmm_impl, where, c.dtype)
    factor = None if c.moe_impl == MoEImpl.DROPLESS else c.capacity_factor
    decode_experts = _decode_experts(cfg, tokens, cached, gmm, expert_mesh is None, where)
    projections = _decode_projections(cfg, tokens, cached, one_device, where)
    # the kernels that read quantized experts: the decode ones, and the local dropless path's
    # grouped matmul (prefill, full forward) where no decode kernel runs
    dropless_gmm = c.moe_impl == MoEImpl.DROPLESS and expert_mesh is None and gmm == GmmImpl.PALLAS
    experts_run = decode_experts == DecodeExpertImpl.PALLAS or (
        decode_experts == DecodeExpertImpl.OFF and dropless_gmm
    )
    quantized_experts = _quantized(
        cfg, cfg.expert_bits, (cfg.embed_dim, cfg.hidden_dim), experts_run, where
    )
    projections_run = projections == DecodeProjectionImpl.PALLAS
    widths = (cfg.embed_dim, cfg.num_heads * cfg.head_dim)
    quantized_projections = _quantized(cfg, cfg.attention_bits, widths, projections_run, where)
    if cfg.attention_bits < 16 and quantized_projections != QuantizedImpl.PALLAS:
        projections = DecodeProjectionImpl.OFF  # the float kernel would need a whole float stack
    queries = tokens if queries is None else queries
    cached_attention = resolve_cached_attention(
        c.cached_attention_impl, c.dtype, cfg.head_dim, queries, where
    )
    return KernelPlan(
        attention=resolve_attention(c.attention_impl, c.dtype, cfg.head_dim, where),
        cached_attention=cached_attention,
        split_chunk_attention=resolve_split_chunk_attention(
            c.chunk_attention_impl, cached_attention, cached, queries
        ),
        grouped_matmul=gmm,
        fused_swiglu=resolve_fused_swiglu(
            c.fused_swiglu,
            gmm,
            local_gmm=dropless_gmm and not cached and decode_experts == DecodeExpertImpl.OFF,
            float_experts=quantized_experts != QuantizedImpl.PALLAS,
        ),
        decode_experts=decode_experts,
        decode_expert_rows=_decode_expert_rows(cfg, tokens, decode_experts),
        decode_projections=projections,
        decode_attention=_one_query_attention(
            "decode_attention_impl", cfg, cached, queries, one_device, where
        ),
        paged_attention=_one_query_attention(
            "paged_attention_impl", cfg, cached, queries, one_device, where
        ),
        extend_unroll=GPU_EXTEND_UNROLL if where == NVIDIA_GPU else 1,
        moe=c.moe_impl,
        expert_mesh=expert_mesh,
        exchange=(
            resolve_exchange(c.expert_exchange, expert_mesh, factor)
            if expert_mesh is not None
            else Exchange.CAPACITY
        ),
        token_mesh=_token_mesh(c.moe_impl, gmm, mesh),
        quantized_experts=quantized_experts,
        quantized_projections=quantized_projections,
    )


def _token_mesh(moe: MoEImpl, gmm: GmmImpl, mesh: Mesh | None) -> Mesh | None:
    """`mesh` where the local dropless dispatch's Pallas grouped matmul must run per device
    (a batch axis > 1, expert axis 1: `moe/data_parallel.py`), else None."""
    kernel = gmm in (GmmImpl.PALLAS, GmmImpl.MEGABLOX)
    if moe != MoEImpl.DROPLESS or not kernel or not sharding.data_parallel_axes(mesh):
        return None
    return mesh


def quantized_tile_reader():
    """`kernels/weight_tiles.py`, through which the decode kernels read `quant.QuantizedWeight`
    stacks (dequantizing tiles in registers); its `supports_format(bits, group_size, k)` says
    which formats they tile. (A seam: tests replace it, None meaning no kernel reads codes.)"""
    return weight_tiles


def _quantized(cfg: ModelConfig, bits: int, widths: tuple[int, ...], kernel_runs: bool, where: str):
    """PALLAS where weights of `bits` < 16 meet a decode kernel (`kernel_runs`) that reads
    their format for every contraction width in `widths`; DEQUANTIZE otherwise (and for float
    weights, where it is unused)."""
    impl = cfg.compute.quantized_impl
    if impl == QuantizedImpl.PALLAS:
        _needs_nvidia("quantized_impl", impl.value, where)
    if bits == 16 or impl == QuantizedImpl.DEQUANTIZE or where != NVIDIA_GPU or not kernel_runs:
        return QuantizedImpl.DEQUANTIZE
    reader = quantized_tile_reader()
    group = cfg.quant_group_size
    if reader is None or not all(reader.supports_format(bits, group or k, k) for k in widths):
        return QuantizedImpl.DEQUANTIZE
    return QuantizedImpl.PALLAS


def resolve_attention(
    impl: AttentionImpl | str,
    dtype,
    head_dim: int,
    where: str | None = None,
    field: str = "attention_impl",
) -> AttentionImpl:
    """`auto` -> cudnn where it runs (NVIDIA GPU, bf16/fp16, head_dim <= 128), else xla."""
    impl, where = AttentionImpl(impl), platform() if where is None else where
    fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128
    if impl == AttentionImpl.AUTO:
        return AttentionImpl.CUDNN if fits and where == NVIDIA_GPU else AttentionImpl.XLA
    if impl == AttentionImpl.CUDNN and not (fits and where == NVIDIA_GPU):
        raise ConfigError(
            f"{field}='cudnn' needs an NVIDIA GPU, dtype bfloat16/float16 and head_dim <= "
            f"128; got platform {where!r}, dtype {jnp.dtype(dtype).name}, head_dim {head_dim}; "
            "use 'auto' or 'xla'"
        )
    return impl


def resolve_cached_attention(
    impl: AttentionImpl | str, dtype, head_dim: int, queries: int, where: str | None = None
) -> AttentionImpl:
    """The attention over the KV cache of a cached call with `queries` (T) new tokens per row:
    `auto` -> cudnn where it runs and T >= MIN_FLASH_QUERIES (a prefill chunk), else xla (decode
    steps); an explicit `cudnn` applies to every cached call and is refused where it cannot run."""
    impl = AttentionImpl(impl)
    resolved = resolve_attention(impl, dtype, head_dim, where, "cached_attention_impl")
    if impl == AttentionImpl.AUTO and queries < MIN_FLASH_QUERIES:
        return AttentionImpl.XLA
    return resolved


def resolve_split_chunk_attention(
    impl: ChunkAttentionImpl | str, cached_attention: AttentionImpl, cached: bool, queries: int
) -> bool:
    """Whether a cached call of `queries` (T) new tokens per row splits its attention.

    `auto` -> on where `cached_attention` is cudnn (NVIDIA GPUs, prefill chunks) and cuDNN
    returns the log-sum-exp here (`cudnn_attention.lse_available`), else off (the masked call);
    `split` -> on for every cached call of T > 1 (its parts through `cached_attention`: the
    einsums elsewhere, which is how CPU tests run it), a ConfigError where the parts are cudnn
    and the log-sum-exp is not available; `masked` -> off. Decode steps (T = 1) never split.
    """
    impl = ChunkAttentionImpl(impl)
    if impl == ChunkAttentionImpl.MASKED or not cached or queries < 2:
        return False
    cudnn = cached_attention == AttentionImpl.CUDNN
    if impl == ChunkAttentionImpl.AUTO:
        return cudnn and queries >= MIN_FLASH_QUERIES and cudnn_attention.lse_available()
    if cudnn and not cudnn_attention.lse_available():
        raise ConfigError(
            f"chunk_attention_impl='split' with cudnn parts needs the log-sum-exp of cuDNN "
            f"attention (return_residual), which jax {jax.__version__} does not offer; use "
            "'auto' or 'masked'"
        )
    return True


def resolve_gmm(impl: GmmImpl | str, where: str | None = None, dtype=None) -> GmmImpl:
    """`auto` -> pallas on NVIDIA GPUs, megablox on TPU (in a dtype it takes), xla elsewhere.

    Refused: `pallas` off an NVIDIA GPU; `megablox` on a GPU (it is a TPU kernel; on CPU it
    runs in Pallas' interpreter: slow, but the same kernel, which is how CI tests it) or in a
    compute `dtype` other than float32 / bfloat16 (None: not checked).
    """
    impl, where = GmmImpl(impl), platform() if where is None else where
    dtype_fits = dtype is None or jnp.dtype(dtype).name in MEGABLOX_DTYPES
    if impl == GmmImpl.AUTO:
        if where == "tpu" and dtype_fits:
            return GmmImpl.MEGABLOX
        return GmmImpl.PALLAS if where == NVIDIA_GPU else GmmImpl.XLA
    if impl == GmmImpl.MEGABLOX and where not in ("tpu", "cpu"):
        raise ConfigError(
            f"gmm_impl='megablox' needs a TPU (or the CPU, interpreted), but the platform is "
            f"{where!r}; use 'auto' or 'xla'"
        )
    if impl == GmmImpl.MEGABLOX and not dtype_fits:
        raise ConfigError(
            f"gmm_impl='megablox' computes in {' or '.join(MEGABLOX_DTYPES)}, but dtype is "
            f"{jnp.dtype(dtype).name}; use 'auto' or 'xla'"
        )
    if impl == GmmImpl.PALLAS and where != NVIDIA_GPU:
        raise ConfigError(
            f"gmm_impl='pallas' needs an NVIDIA GPU, but the platform is "
            f"{where!r}; use 'auto' or 'xla'"
        )
    return impl


def resolve_fused_swiglu(
    impl: FusedSwiglu | str, gmm: GmmImpl, *, local_gmm: bool = True, float_experts: bool = True
) -> bool:
    """`on` -> True where the call's experts run through the local dropless path's Pallas
    grouped matmul (`local_gmm`) on float weights; `on` with a grouped matmul other than pallas
    is a ConfigError (elsewhere, e.g. expert-parallel or decode calls, it is off). `auto` is off
    for now: on the H200 the 2-layer 8x7B step ran 275.7 ms with it and 273.7 without
    (BENCHMARKS.md), though the kernel alone is correct there and runs 540 TFLOP/s."""
    impl = FusedSwiglu(impl)
    if impl == FusedSwiglu.ON and gmm != GmmImpl.PALLAS:
        raise ConfigError(
            f"fused_swiglu='on' needs gmm_impl 'pallas' (an NVIDIA GPU), but the grouped "
            f"matmul is {gmm.value!r}; use 'auto' or 'off'"
        )
    return impl == FusedSwiglu.ON and gmm == GmmImpl.PALLAS and local_gmm and float_experts


def _needs_nvidia(field: str, value: str, where: str) -> None:
    if where != NVIDIA_GPU:
        raise ConfigError(
            f"{field}='{value}' needs an NVIDIA GPU, but the platform is "
            f"{where!r}; use 'auto' or 'off'"
        )


def _decode_experts(
    cfg: ModelConfig, tokens: int, cached: bool, gmm: GmmImpl, local: bool, where: str
) -> DecodeExpertImpl:
    """The decode-expert choice: only for dropless dispatch on one expert shard, few tokens
    (pallas up to MAX_GROUPED_TOKENS, gather up to MAX_DECODE_TOKENS: it copies M*k matrices)."""
    impl = cfg.compute.decode_expert_impl
    if impl == DecodeExpertImpl.PALLAS:
        _needs_nvidia("decode_expert_impl", impl.value, where)
    applies = cfg.compute.moe_impl == MoEImpl.DROPLESS and local and tokens <= MAX_GROUPED_TOKENS
    if impl == DecodeExpertImpl.OFF or not applies:
        return DecodeExpertImpl.OFF
    pallas_fits = cached and supports(cfg.embed_dim, cfg.hidden_dim)
    if impl == DecodeExpertImpl.PALLAS or (impl == DecodeExpertImpl.AUTO and where == NVIDIA_GPU):
        return DecodeExpertImpl.PALLAS if pallas_fits else DecodeExpertImpl.OFF
    if tokens > MAX_DECODE_TOKENS:
        return DecodeExpertImpl.OFF
    if impl == DecodeExpertImpl.AUTO:
        single = tokens == 1 and cfg.num_experts_per_tok < cfg.num_experts
        return DecodeExpertImpl.GATHER if single and gmm == GmmImpl.XLA else DecodeExpertImpl.OFF
    return impl  # GATHER


def _decode_expert_rows(cfg: ModelConfig, tokens: int, decode_experts: DecodeExpertImpl) -> int:
    """Which pallas decode-expert kernels run. The rule: up to MAX_DECODE_TOKENS (64) tokens
    every slot computes all M tokens (expert_decode.py, 0 here): no sort, and the wasted rows
    are free while the weights stream; above, up to MAX_GROUPED_TOKENS, slots of R rows of one
    expert each (expert_decode_grouped.py), R from the mean rows per expert M*k/E
    (`chunk_rows`): all M rows in every slot would be E/k times the real arithmetic. int4
    experts take the grouped slots from INT4_GROUPED_ABOVE tokens on, in chunks of 16 rows:
    their kernels are bound by per-weight work, which every slot computing all M rows
    multiplies."""
    if decode_experts != DecodeExpertImpl.PALLAS:
        return 0
    if cfg.expert_bits == 4 and INT4_GROUPED_ABOVE < tokens <= MAX_DECODE_TOKENS:
        return expert_decode_grouped.MIN_ROWS
    if tokens <= MAX_DECODE_TOKENS:
        return 0
    return expert_decode_grouped.chunk_rows(tokens, cfg.num_experts_per_tok, cfg.num_experts)


def _decode_projections(
    cfg: ModelConfig, tokens: int, cached: bool, one_device: bool, where: str
) -> DecodeProjectionImpl:
    """Stacked projections where they apply: a cached call of up to MAX_GROUPED_TOKENS tokens
    on one device (decode steps and a serving step's prefill group: as the scan's per-layer
    slices, XLA copies each layer's projections before its matmul reads them; H200, 8x7B, 256
    rows: 37.65 ms a step against 42.01), weights stored in the compute dtype (a cast would copy
    the whole stack), widths the tiles divide. Quantized projections up to MAX_DECODE_TOKENS
    only: above it each row tile would dequantize the weight tile again (not measured)."""
    c = cfg.compute
    impl = c.decode_projection_impl
    if impl == DecodeProjectionImpl.PALLAS:
        _needs_nvidia("decode_projection_impl", impl.value, where)
    if impl == DecodeProjectionImpl.OFF or where != NVIDIA_GPU:
        return DecodeProjectionImpl.OFF
    applies = (
        cached
        and one_device
        and tokens <= (MAX_GROUPED_TOKENS if cfg.attention_bits == 16 else MAX_DECODE_TOKENS)
        and jnp.dtype(c.param_dtype) == jnp.dtype(c.dtype)
        and supports(cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
    )
    return DecodeProjectionImpl.PALLAS if applies else DecodeProjectionImpl.OFF


def _one_query_attention(
    field: str, cfg: ModelConfig, cached: bool, queries: int, one_device: bool, where: str
) -> DecodeAttentionImpl:
    """The attention kernel of compute field `field` that reads the cache in place, for cached
    calls of one new token per row on one device (the cache unsharded), head widths the matrix
    unit tiles, on NVIDIA GPUs; OFF elsewhere (an explicit pallas there is a ConfigError).

      decode_attention_impl  flash decoding over the contiguous cache (decode_attention.py)
      paged_attention_impl   the paged pool, following each row's block table
                             (paged_attention.py; H200, 8x7B, 256 rows at a 640-token context:
                             a 41.4-41.9 ms decode step against 52.3-53.2 with XLA's gather;
                             greedy tokens equal the gather's in float32, bench/paged_check.py)
    """
    impl = getattr(cfg.compute, field)
    if impl == DecodeAttentionImpl.PALLAS:
        _needs_nvidia(field, impl.value, where)
    if impl == DecodeAttentionImpl.OFF or where != NVIDIA_GPU:
        return DecodeAttentionImpl.OFF
    applies = cached and queries == 1 and one_device and supports(cfg.head_dim)
    return DecodeAttentionImpl.PALLAS if applies else DecodeAttentionImpl.OFF


def for_queries(
    plan: KernelPlan,
    cfg: ModelConfig,
    queries: int,
    mesh: Mesh | None = None,
    where: str | None = None,
) -> KernelPlan:
    """`plan` with its attention over the cache resolved for `queries` new tokens per row: for
    one group of rows in a call that runs groups of different shapes together (a decode step and
    a prefill chunk, `Mixtral.extend_paged_groups`); the weight kernels stay the call's."""
    c = cfg.compute
    mesh = sharding.active_mesh() if mesh is None else mesh
    where = platform() if where is None else where
    one_device = mesh is None or mesh.size == 1
    cached_attention = resolve_cached_attention(
        c.cached_attention_impl, c.dtype, cfg.head_dim, queries, where
    )
    return dataclasses.replace(
        plan,
        cached_attention=cached_attention,
        split_chunk_attention=resolve_split_chunk_attention(
            c.chunk_attention_impl, cached_attention, True, queries
        ),
        decode_attention=_one_query_attention(
            "decode_attention_impl", cfg, True, queries, one_device, where
        ),
        paged_attention=_one_query_attention(
            "paged_attention_impl", cfg, True, queries, one_device, where
        ),
    )


@functools.cache
def ragged_all_to_all_supported(backend: str) -> bool:
    """Whether `backend` compiles jax.lax.ragged_all_to_all (a one-device probe, compiled, not
    run)."""
    device = jax.local_devices(backend=backend)[0]
    mesh = Mesh(np.array([device]), ("probe",))

    def probe(x):
        zero, one = jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32)
        return jax.lax.ragged_all_to_all(
            x, jnp.zeros_like(x), zero, one, zero, one, axis_name="probe"
        )

    fn = jax.jit(jax.shard_map(probe, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    try:
        fn.lower(jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 (XLA raises a runtime error naming the missing opcode)
        return False
    return True


def resolve_exchange(
    exchange: Exchange | str, mesh: Mesh, capacity_factor: float | None
) -> Exchange:
    """The expert-parallel exchange: AUTO resolved; a ragged choice that cannot be honoured is a
    ValueError naming why."""
    exchange = Exchange(exchange)
    backend = mesh.devices.flat[0].platform
    ragged = (Exchange.RAGGED, Exchange.RAGGED_EMULATED)
    if capacity_factor is not None and exchange in ragged:
        raise ValueError(
            f"exchange={exchange.value!r} is dropless and takes no capacity_factor "
            f"(got {capacity_factor})"
        )
    if exchange == Exchange.AUTO:
        if capacity_factor is None and ragged_all_to_all_supported(backend):
            return Exchange.RAGGED
        return Exchange.CAPACITY
    if exchange == Exchange.RAGGED and not ragged_all_to_all_supported(backend):
        raise ValueError(
            f"exchange='ragged' needs ragged_all_to_all, which the {backend} "
            f"backend of jax {jax.__version__} does not compile; use 'auto' or "
            "'capacity'"
        )
    return exchange
