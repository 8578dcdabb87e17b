"""The kernel plan: one decision per compiled call from config, platform, mesh and token count,
and the user's choices reach every path (the expert-parallel one included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.config import (
    AttentionImpl,
    ConfigError,
    DecodeAttentionImpl,
    DecodeExpertImpl,
    DecodeProjectionImpl,
    Exchange,
    GmmImpl,
)
from mixtral_jax.kernels import cudnn_attention
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.kernels.plan import NVIDIA_GPU, resolve
from mixtral_jax.model import moe as moe_block
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.moe import expert_parallel as moe_parallel
from mixtral_jax.parallel import sharding as sh

GPU_BF16 = mj.ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")


def test_auto_resolves_by_platform():
    cpu = resolve(mj.ModelConfig.tiny(), 1, cached=True, where="cpu")
    assert (cpu.attention, cpu.grouped_matmul, cpu.decode_experts, cpu.decode_projections) == (
        AttentionImpl.XLA,
        GmmImpl.XLA,
        DecodeExpertImpl.GATHER,
        DecodeProjectionImpl.OFF,
    )
    assert (
        resolve(mj.ModelConfig.tiny(), 2, cached=True, where="cpu").decode_experts
        == DecodeExpertImpl.OFF
    )  # gathering only pays for one token
    gpu = resolve(GPU_BF16, 8, cached=True, where=NVIDIA_GPU)
    assert (gpu.attention, gpu.grouped_matmul, gpu.decode_experts, gpu.decode_projections) == (
        AttentionImpl.CUDNN,
        GmmImpl.PALLAS,
        DecodeExpertImpl.PALLAS,
        DecodeProjectionImpl.PALLAS,
    )
    assert gpu.stacked_weights[-1] == ("moe", "router")
    assert (gpu.extend_unroll, cpu.extend_unroll) == (4, 1)  # CPU: one layer's slices at a time
    assert hash(gpu) == hash(resolve(GPU_BF16, 8, cached=True, where=NVIDIA_GPU))  # static


def test_token_count_cache_dtype_and_mesh_switch_the_decode_kernels_off():
    prefill = resolve(GPU_BF16, 65, cached=True, where=NVIDIA_GPU)
    assert (prefill.decode_experts, prefill.decode_projections) == (
        DecodeExpertImpl.PALLAS,  # the grouped-rows experts, up to 512 tokens
        DecodeProjectionImpl.PALLAS,  # the projections in row tiles, up to 512 tokens
    )
    longer = resolve(GPU_BF16, 513, cached=True, where=NVIDIA_GPU)
    assert (longer.decode_experts, longer.decode_projections) == (
        DecodeExpertImpl.OFF,
        DecodeProjectionImpl.OFF,
    )
    uncached = resolve(GPU_BF16, 8, cached=False, where=NVIDIA_GPU)
    assert (uncached.decode_experts, uncached.decode_projections) == (
        DecodeExpertImpl.OFF,
        DecodeProjectionImpl.OFF,
    )
    mixed = resolve(GPU_BF16.replace(param_dtype="float32"), 1, cached=True, where=NVIDIA_GPU)
    assert mixed.decode_projections == DecodeProjectionImpl.OFF  # a cast would copy the stacks
    assert mixed.decode_experts == DecodeExpertImpl.PALLAS
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=2,data=4"))
    sharded = resolve(GPU_BF16, 8, cached=True, mesh=mesh, where=NVIDIA_GPU)
    assert sharded.expert_mesh is mesh
    assert (sharded.decode_experts, sharded.decode_projections) == (
        DecodeExpertImpl.OFF,
        DecodeProjectionImpl.OFF,
    )
    assert resolve(GPU_BF16, 8, cached=True, where="cpu").expert_mesh is None


def test_cached_attention_is_cudnn_for_prefill_chunks_on_nvidia_and_the_einsum_for_decode():
    def cached(cfg, tokens, queries, where=NVIDIA_GPU):
        return resolve(cfg, tokens, cached=True, queries=queries, where=where).cached_attention

    assert cached(GPU_BF16, 2048, 2048) == AttentionImpl.CUDNN  # a prefill chunk
    assert cached(GPU_BF16, 16, 16) == AttentionImpl.CUDNN
    assert cached(GPU_BF16, 15, 15) == AttentionImpl.XLA  # a few tokens
    assert cached(GPU_BF16, 1, 1) == AttentionImpl.XLA  # decode, batch 1
    assert cached(GPU_BF16, 64, 1) == AttentionImpl.XLA  # decode, batch 64: T decides
    assert cached(GPU_BF16, 2048, 2048, where="cpu") == AttentionImpl.XLA
    assert cached(mj.ModelConfig.tiny(), 2048, 2048) == AttentionImpl.XLA  # float32
    assert cached(GPU_BF16.replace(head_dim=256), 2048, 2048) == AttentionImpl.XLA
    assert cached(GPU_BF16.replace(cached_attention_impl="xla"), 2048, 2048) == AttentionImpl.XLA
    explicit = GPU_BF16.replace(cached_attention_impl="cudnn")
    assert cached(explicit, 1, 1) == AttentionImpl.CUDNN  # the user's choice, decode included
    split = GPU_BF16.replace(attention_impl="xla")  # its own field: the full forward's is apart
    plan = resolve(split, 2048, cached=True, queries=2048, where=NVIDIA_GPU)
    assert (plan.attention, plan.cached_attention) == (AttentionImpl.XLA, AttentionImpl.CUDNN)
    with pytest.raises(ConfigError, match="cached_attention_impl='cudnn' needs an NVIDIA GPU"):
        cached(mj.ModelConfig.tiny(cached_attention_impl="cudnn"), 64, 64, where="cpu")


def test_extend_resolves_its_plan_with_the_new_tokens_per_row(monkeypatch):
    """Mixtral.extend asks for T (queries) beside B*T: batch-64 decode is not a prefill chunk."""
    seen = []

    def recording(cfg, tokens, *, cached, queries=None, **kwargs):
        seen.append((tokens, cached, queries))
        return resolve(cfg, tokens, cached=cached, queries=queries, **kwargs)

    monkeypatch.setattr(kernel_plan, "resolve", recording)
    cfg = mj.ModelConfig.tiny()
    graphdef, state = nnx.split(mj.abstract(cfg))

    def extend(state, tokens):
        cache = KVCache.create(cfg, 4, 24)
        valid = jnp.ones(tokens.shape, bool)
        return nnx.merge(graphdef, state).extend(tokens, cache, positions=tokens, valid=valid)

    for t in (1, 20):
        jax.eval_shape(extend, state, jax.ShapeDtypeStruct((4, t), jnp.int32))
    assert seen == [(4, True, 1), (80, True, 20)]


def test_each_choice_has_its_own_field():
    off = GPU_BF16.replace(decode_expert_impl="off", decode_projection_impl="off")
    plan = resolve(off, 1, cached=True, where=NVIDIA_GPU)
    assert (plan.grouped_matmul, plan.decode_experts, plan.decode_projections) == (
        GmmImpl.PALLAS,
        DecodeExpertImpl.OFF,
        DecodeProjectionImpl.OFF,
    )
    xla = resolve(GPU_BF16.replace(gmm_impl="xla"), 1, cached=True, where=NVIDIA_GPU)
    assert (xla.grouped_matmul, xla.decode_experts, xla.decode_projections) == (
        GmmImpl.XLA,
        DecodeExpertImpl.PALLAS,
        DecodeProjectionImpl.PALLAS,
    )
    gather = resolve(
        GPU_BF16.replace(decode_expert_impl="gather"), 7, cached=True, where=NVIDIA_GPU
    )
    assert gather.decode_experts == DecodeExpertImpl.GATHER
    dense = resolve(GPU_BF16.replace(moe_impl="dense"), 1, cached=True, where=NVIDIA_GPU)
    assert dense.decode_experts == DecodeExpertImpl.OFF  # the oracle stays the oracle


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"gmm_impl": "pallas"},
            "gmm_impl='pallas' needs an NVIDIA GPU, but the platform is 'cpu'",
        ),
        ({"decode_expert_impl": "pallas"}, "decode_expert_impl='pallas' needs an NVIDIA GPU"),
        (
            {"decode_projection_impl": "pallas"},
            "decode_projection_impl='pallas' needs an NVIDIA GPU",
        ),
        ({"attention_impl": "cudnn"}, "attention_impl='cudnn' needs an NVIDIA GPU"),
        ({"fused_swiglu": "on"}, "fused_swiglu='on' needs gmm_impl 'pallas'.*is 'xla'"),
        (
            {"cached_attention_impl": "cudnn"},
            "cached_attention_impl='cudnn' needs an NVIDIA GPU",
        ),
    ],
)
def test_an_explicit_choice_that_cannot_run_is_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        resolve(mj.ModelConfig.tiny(**change), 1, cached=True, where="cpu")
    assert "\n" not in str(e.value)


def test_user_gmm_impl_reaches_the_expert_parallel_path(monkeypatch):
    """The MoE block on an expert=4 mesh with the ragged exchange: the grouped matmul inside
    the expert-parallel dispatch gets the user's kernel (before, it silently got 'auto')."""
    monkeypatch.setattr(kernel_plan, "platform", lambda: NVIDIA_GPU)
    seen = []

    def recording_gmm(lhs, rhs, group_sizes, impl):
        seen.append(impl)
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)  # Pallas needs a GPU: same maths

    monkeypatch.setattr(moe_parallel, "grouped_matmul", recording_gmm)
    cfg = mj.ModelConfig.tiny(gmm_impl="pallas", expert_exchange="ragged_emulated")
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 4, cfg.embed_dim))
    graphdef, state = nnx.split(block)
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=4,data=2"))
    with sh.active(mesh):
        plan = resolve(cfg, 16, cached=False)
        out, _ = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    assert plan.expert_mesh is mesh and plan.exchange == Exchange.RAGGED_EMULATED
    assert seen and set(seen) == {GmmImpl.PALLAS}
    dense = moe_block.MoE(cfg.replace(moe_impl="dense", gmm_impl="auto"), rngs=nnx.Rngs(0))
    want, _ = dense(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_plan_passed_in_is_the_one_the_layers_run():
    cfg = mj.ModelConfig.tiny()
    model = mj.init(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 5)))
    auto = model(tokens).logits
    dense_plan = kernel_plan.KernelPlan(moe=mj.MoEImpl.DENSE)
    dense = model(tokens, plan=dense_plan).logits  # the oracle dispatch, same function
    np.testing.assert_allclose(np.asarray(dense), np.asarray(auto), rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_the_cache_in_place_only_for_one_token_per_row():
    decode = resolve(GPU_BF16, 8, cached=True, queries=1, where=NVIDIA_GPU)  # batch 8, T = 1
    assert decode.decode_attention == DecodeAttentionImpl.PALLAS
    chunk = resolve(GPU_BF16, 8, cached=True, queries=8, where=NVIDIA_GPU)  # one row, T = 8
    assert chunk.decode_attention == DecodeAttentionImpl.OFF
    mesh = sh.make_mesh(sh.MeshConfig.parse("data=8"))
    assert (
        resolve(GPU_BF16, 8, cached=True, queries=1, mesh=mesh, where=NVIDIA_GPU).decode_attention
        == DecodeAttentionImpl.OFF
    )  # sharded cache
    assert resolve(mj.ModelConfig.tiny(), 1, cached=True, where="cpu").decode_attention == (
        DecodeAttentionImpl.OFF
    )
    off = GPU_BF16.replace(decode_attention_impl="off")
    assert resolve(off, 1, cached=True, where=NVIDIA_GPU).decode_attention == (
        DecodeAttentionImpl.OFF
    )
    with pytest.raises(ConfigError, match="decode_attention_impl='pallas' needs an NVIDIA GPU"):
        resolve(mj.ModelConfig.tiny(decode_attention_impl="pallas"), 1, cached=True, where="cpu")


def test_paged_attention_on_nvidia_gpus_for_one_token_per_row():
    named = mj.ModelConfig.tiny(paged_attention_impl="pallas")
    assert resolve(named, 8, cached=True, queries=1, where=NVIDIA_GPU).paged_attention == "pallas"
    assert resolve(named, 8, cached=True, queries=4, where=NVIDIA_GPU).paged_attention == "off"
    auto = mj.ModelConfig.tiny()
    assert resolve(auto, 8, cached=True, queries=1, where=NVIDIA_GPU).paged_attention == "pallas"
    assert resolve(auto, 8, cached=True, queries=4, where=NVIDIA_GPU).paged_attention == "off"
    assert resolve(auto, 8, cached=True, queries=1, where="cpu").paged_attention == "off"
    off = mj.ModelConfig.tiny(paged_attention_impl="off")
    assert resolve(off, 8, cached=True, queries=1, where=NVIDIA_GPU).paged_attention == "off"
    with pytest.raises(ConfigError, match="paged_attention_impl='pallas' needs an NVIDIA GPU"):
        resolve(named, 1, cached=True, where="cpu")


def test_fused_swiglu_runs_where_the_local_dropless_grouped_matmul_is_pallas():
    def fused(cfg, cached=False, tokens=4096, where=NVIDIA_GPU, **kw):
        return resolve(cfg, tokens, cached=cached, where=where, **kw).fused_swiglu

    assert not fused(GPU_BF16)  # auto: off until the H200 step is faster with it
    on = GPU_BF16.replace(fused_swiglu="on")
    assert fused(on)  # a training / eval forward on an NVIDIA GPU
    assert not fused(on, cached=True)  # prefill reads the stacks: the unfused path
    assert not fused(GPU_BF16.replace(fused_swiglu="off"))
    assert not fused(on.replace(moe_impl="capacity"))
    with pytest.raises(ConfigError, match="fused_swiglu='on' needs gmm_impl 'pallas'"):
        fused(GPU_BF16.replace(fused_swiglu="on", gmm_impl="xla"))
    mesh = sh.make_mesh(sh.MeshConfig(expert=4), jax.devices()[:4])
    assert not fused(on, mesh=mesh)  # the expert-parallel path keeps its own matmuls


def test_a_prefill_chunk_splits_its_attention_where_cudnn_returns_the_log_sum_exp(monkeypatch):
    def split(cfg, queries, where=NVIDIA_GPU, cached=True):
        return resolve(cfg, queries, cached=cached, queries=queries, where=where)

    assert cudnn_attention.lse_available()  # this jax's cuDNN call takes return_residual
    assert split(GPU_BF16, 2048).split_chunk_attention  # auto: cudnn chunk on an NVIDIA GPU
    assert not split(GPU_BF16, 1).split_chunk_attention  # decode
    assert not split(GPU_BF16, 2048, cached=False).split_chunk_attention
    assert not split(GPU_BF16, 2048, where="cpu").split_chunk_attention
    assert not split(GPU_BF16.replace(cached_attention_impl="xla"), 2048).split_chunk_attention
    assert not split(GPU_BF16.replace(chunk_attention_impl="masked"), 2048).split_chunk_attention
    on = mj.ModelConfig.tiny(chunk_attention_impl="split")
    plan = split(on, 8, where="cpu")  # by name anywhere: the einsum parts
    assert plan.split_chunk_attention and plan.cached_attention == AttentionImpl.XLA
    assert not split(on, 1, where="cpu").split_chunk_attention
    decode = resolve(GPU_BF16, 4, cached=True, queries=1, where=NVIDIA_GPU)
    assert kernel_plan.for_queries(decode, GPU_BF16, 64, where=NVIDIA_GPU).split_chunk_attention
    monkeypatch.setattr(cudnn_attention, "lse_available", lambda: False)  # an older cuDNN API
    assert not split(GPU_BF16, 2048).split_chunk_attention  # auto keeps the masked call
    assert split(on, 8, where="cpu").split_chunk_attention  # einsum parts need no cuDNN
    with pytest.raises(ConfigError, match="chunk_attention_impl='split' with cudnn parts needs"):
        split(GPU_BF16.replace(chunk_attention_impl="split"), 2048)
