"""Quantized weights in the model: equal to a float model built from the dequantized weights (the
oracle), through the full forward, prefill and decode; shapes and one-line config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.config import ConfigError
from mixtral_jax.generate import Generator
from mixtral_jax.kernels import quant
from mixtral_jax.model import quantized
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.params import from_params, get_params

FORMATS = {
    "int8-experts": {"expert_bits": 8},
    "int4-g32-experts-int8-attention": {
        "expert_bits": 4,
        "attention_bits": 8,
        "quant_group_size": 32,
        "quant_scale_dtype": "bfloat16",
    },
}


def _pair(fmt, **compute):
    """(quantized model, float model from its dequantized weights, quantized config)."""
    cfg = mj.ModelConfig.tiny(**FORMATS[fmt], **compute)
    model = mj.init(cfg, 0)
    dense = quantized.dequantize_params(get_params(model), cfg)
    return model, from_params(quantized.float_config(cfg), dense), cfg


def _rel(got, want) -> float:
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def test_full_forward_equals_the_dequantized_float_model():
    # (the int4 / int8-attention format's full forward: the grouped-matmul route test below)
    model, oracle, cfg = _pair("int8-experts")
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)))
    got, want = model(tokens), oracle(tokens)
    assert _rel(got.logits, want.logits) <= 1e-5
    np.testing.assert_array_equal(
        got.aux.layers.tokens_per_expert, want.aux.layers.tokens_per_expert
    )


def test_stored_leaves_have_the_format_of_kernels_quant():
    cfg = mj.ModelConfig.tiny(**FORMATS["int4-g32-experts-int8-attention"])
    shapes = mj.param_shapes(cfg)["layers"]
    (l, e, d, f), kv = (2, 4, 64, 96), cfg.num_kv_heads * cfg.head_dim
    assert (shapes["moe"]["w_gate"].shape, shapes["moe"]["w_gate"].dtype) == (
        (l, e, d // 2, f),
        jnp.uint8,
    )
    assert shapes["moe"]["w_down_scale"].shape == (l, e, f // 32, d)
    assert shapes["moe"]["w_down_scale"].dtype == jnp.bfloat16
    assert (shapes["attn"]["k_proj"].shape, shapes["attn"]["k_proj"].dtype) == (
        (l, d, kv),
        jnp.int8,
    )
    assert shapes["attn"]["o_proj_scale"].shape == (l, 64 // 32, d)


def test_quantize_params_is_the_inverse_of_dequantize_on_representable_weights():
    cfg = mj.ModelConfig.tiny(**FORMATS["int4-g32-experts-int8-attention"])
    params = get_params(mj.init(cfg, 1))
    dense = quantized.dequantize_params(params, cfg)
    again = quantized.quantize_params(dense, cfg)  # dequantized weights quantize to themselves
    for module, name in quantized.quantized_leaves(cfg):
        for leaf in (name, name + "_scale"):
            np.testing.assert_array_equal(
                again["layers"][module][leaf], params["layers"][module][leaf]
            )


def test_prefill_and_decode_equal_the_dequantized_float_model():
    model, oracle, cfg = _pair("int4-g32-experts-int8-attention")
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 9)))
    valid = jnp.ones((2, 9), bool)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    outs = []
    for m in (model, oracle):
        graphdef, state = nnx.split(m)
        extend = jax.jit(
            lambda s, t, c, p, v, g=graphdef: nnx.merge(g, s).extend(t, c, positions=p, valid=v)
        )
        cache = KVCache.create(m.cfg, 2, 16)
        prefill, cache = extend(state, tokens[:, :7], cache, positions[:, :7], valid[:, :7])
        step, cache = extend(state, tokens[:, 7:8], cache, positions[:, 7:8], valid[:, 7:8])
        outs.append(jnp.concatenate([prefill.logits, step.logits], axis=1))
    assert _rel(*outs) <= 1e-5
    prompts = [[1, 5, 9, 30, 7], [1, 44]]
    got = Generator(model).generate(prompts, max_new_tokens=6, eos_id=None)
    want = Generator(oracle).generate(prompts, max_new_tokens=6, eos_id=None)
    assert got.tokens == want.tokens


def test_a_bfloat16_compute_dequantizes_one_layer_into_bfloat16():
    model, oracle, _cfg = _pair("int8-experts", dtype="bfloat16")
    tokens = jnp.asarray([[1, 7, 300, 12, 99]])
    assert _rel(model(tokens).logits, oracle(tokens).logits) <= 2e-3


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"expert_bits": 3}, "expert_bits=3: must be one of 16, 8, 4"),
        ({"attention_bits": 2}, "attention_bits=2: must be one of 16, 8, 4"),
        (
            {"expert_bits": 4, "quant_group_size": 40},
            "quant_group_size=40: must divide the contraction width embed_dim=64",
        ),
        (
            {"attention_bits": 8, "quant_group_size": 48},
            "quant_group_size=48: must divide the contraction width embed_dim=64",
        ),
        ({"expert_bits": 8, "quant_scale_dtype": "float16"}, "quant_scale_dtype='float16'"),
        ({"expert_bits": 4, "hidden_dim": 97}, "hidden_dim=97: int4 packs two rows per byte"),
        ({"expert_bits": 8, "quant_group_size": 0}, "quant_group_size=0: must be a positive"),
    ],
)
def test_bad_formats_are_one_line_errors(changes, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")) as err:
        mj.ModelConfig.tiny(**changes)
    assert "\n" not in str(err.value)


def test_as_compute_takes_one_layer_out_of_a_stack_only_when_work_is_needed():
    w = jnp.ones((3, 4, 8, 6), jnp.float32)
    q = quant.quantize(w, 8)
    (same,), layer = quantized.as_compute((w,), jnp.float32, jnp.int32(2))
    assert same.shape == (3, 4, 8, 6) and int(layer) == 2  # read in place, no copy
    (one,), layer = quantized.as_compute((q,), jnp.bfloat16, jnp.int32(2))
    assert one.shape == (1, 4, 8, 6) and one.dtype == jnp.bfloat16 and layer == 0


def _fake_decode_experts(seen):
    """expert_decode.decode_experts as the quantized kernel will be called: every layer's stacks
    (QuantizedWeight) and the layer index; computed here by the dense oracle."""

    def fake(x, experts, weights, w_gate, w_up, w_down, layer):
        seen.append(type(w_gate))
        g, u, d = (w[layer].dequantize(jnp.float32) for w in (w_gate, w_up, w_down))
        x = x.astype(jnp.float32)
        h = jax.nn.silu(jnp.einsum("MD,EDF->MEF", x, g)) * jnp.einsum("MD,EDF->MEF", x, u)
        y = jnp.einsum("MEF,EFD->MED", h, d)
        share = jnp.sum(jax.nn.one_hot(experts, g.shape[0]) * weights[..., None], axis=1)
        return jnp.einsum("ME,MED->MD", share, y)  # [M, D] float32

    return fake


def _fake_project_stacked(seen):
    """decode_matmul.project_stacked: x [M, K] times layer `layer` of each [L, K, N] stack."""

    def fake(x, stacks, layer, out_dtype=None):
        outs = []
        for w in stacks:
            seen.append(type(w))
            w = w[layer]
            w = w.dequantize(jnp.float32) if isinstance(w, quant.QuantizedWeight) else w
            y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
            outs.append(y.astype(out_dtype or x.dtype))
        return tuple(outs)

    return fake


def test_the_quantized_kernel_route_passes_quantized_stacks_and_equals_the_oracle(monkeypatch):
    """Where the plan says pallas, the MoE and the projections hand `QuantizedWeight` stacks
    and the layer to the kernels' entry points (faked here by dequantizing oracles)."""
    import dataclasses

    from mixtral_jax.config import DecodeExpertImpl, DecodeProjectionImpl, QuantizedImpl
    from mixtral_jax.kernels import decode_matmul, expert_decode
    from mixtral_jax.kernels.plan import resolve

    model, oracle, cfg = _pair("int4-g32-experts-int8-attention")
    seen_experts, seen_proj = [], []
    monkeypatch.setattr(expert_decode, "decode_experts", _fake_decode_experts(seen_experts))
    monkeypatch.setattr(decode_matmul, "project_stacked", _fake_project_stacked(seen_proj))
    plan = dataclasses.replace(
        resolve(cfg, 2, cached=True, where="cpu"),
        decode_experts=DecodeExpertImpl.PALLAS,
        decode_projections=DecodeProjectionImpl.PALLAS,
        quantized_experts=QuantizedImpl.PALLAS,
        quantized_projections=QuantizedImpl.PALLAS,
    )
    tokens = jnp.asarray([[5, 9, 40], [7, 7, 300]])
    positions, valid = jnp.broadcast_to(jnp.arange(3), (2, 3)), jnp.ones((2, 3), bool)
    got, _ = model.extend(
        tokens, KVCache.create(cfg, 2, 8), positions=positions, valid=valid, plan=plan
    )
    want, _ = oracle.extend(tokens, KVCache.create(cfg, 2, 8), positions=positions, valid=valid)
    assert seen_experts and set(seen_experts) == {quant.QuantizedWeight}
    assert quant.QuantizedWeight in seen_proj  # q/k/v/o; the router stays a float stack
    assert _rel(got.logits, want.logits) <= 1e-5


def test_the_quantized_grouped_matmul_route_equals_the_oracle(monkeypatch):
    """Where the plan's grouped matmul is pallas and quantized_experts pallas (prefill, full
    forward), the dropless MoE hands QuantizedWeight (stacks with the layer, in a cached call)
    to kernels/gmm_quant.py (faked here by dequantizing oracles)."""
    import dataclasses
    from types import SimpleNamespace

    from mixtral_jax.config import DecodeExpertImpl, GmmImpl, QuantizedImpl
    from mixtral_jax.kernels import grouped_matmul
    from mixtral_jax.kernels.plan import resolve

    seen = []

    def gmm(lhs, rhs, group_sizes):
        seen.append(("gmm", type(rhs)))
        return jax.lax.ragged_dot(lhs, rhs.dequantize(lhs.dtype), group_sizes)

    def gmm_stacked(lhs, rhs, group_sizes, layer):
        seen.append(("stacked", type(rhs)))
        return jax.lax.ragged_dot(lhs, rhs[layer].dequantize(lhs.dtype), group_sizes)

    fake = SimpleNamespace(gmm=gmm, gmm_stacked=gmm_stacked)
    monkeypatch.setattr(grouped_matmul, "gmm_quant", fake)
    model, oracle, cfg = _pair("int4-g32-experts-int8-attention")
    tokens = jnp.asarray([[5, 9, 40, 3], [7, 7, 300, 2]])

    def plan(cached):
        return dataclasses.replace(
            resolve(cfg, 8, cached=cached, where="cpu"),
            grouped_matmul=GmmImpl.PALLAS,
            decode_experts=DecodeExpertImpl.OFF,
            quantized_experts=QuantizedImpl.PALLAS,
        )

    assert _rel(model(tokens, plan=plan(False)).logits, oracle(tokens).logits) <= 1e-5
    positions, valid = jnp.broadcast_to(jnp.arange(4), (2, 4)), jnp.ones((2, 4), bool)
    got, _ = model.extend(
        tokens, KVCache.create(cfg, 2, 8), positions=positions, valid=valid, plan=plan(True)
    )
    want, _ = oracle.extend(tokens, KVCache.create(cfg, 2, 8), positions=positions, valid=valid)
    assert _rel(got.logits, want.logits) <= 1e-5
    assert {s[0] for s in seen} == {"gmm", "stacked"}
    assert {s[1] for s in seen} == {quant.QuantizedWeight}
