"""LoRA over a quantized base (QLoRA) in the model: zero-initialised adapters compute the
quantized base bit for bit; the adapters' gradient equals the one over the dequantized float
base; no backward residual holds the dequantized weights of every layer; the decode path that
reads quantized stacks in place runs the adapters on that layer's dequantized, merged weights."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import mixtral_jax as mj
from mixtral_jax.config import DecodeExpertImpl, GmmImpl, QuantizedImpl
from mixtral_jax.kernels import gmm_pallas, gmm_quant, grouped_matmul, quant
from mixtral_jax.kernels.plan import KernelPlan, resolve
from mixtral_jax.model import lora, moe, quantized
from mixtral_jax.model.params import from_params, get_params
from mixtral_jax.moe.ops import route

FORMATS = {
    "int8-experts-int4-attention": {"expert_bits": 8, "attention_bits": 4, "quant_group_size": 32},
    "int4-g32-experts-int4-attention": {
        "expert_bits": 4,
        "attention_bits": 4,
        "quant_group_size": 32,
        "quant_scale_dtype": "bfloat16",
    },
}
ALL = tuple(lora.TARGETS)
SOME = ("q_proj", "o_proj", "w_gate", "w_down")  # v_proj, w_up: the base alone


def _drawn(cfg, lcfg, seed=3, size=0.3):
    """Adapters with B drawn too (trained ones), so every factor has a gradient."""
    leaves, tree = jax.tree.flatten(lora.init_adapters(cfg, lcfg, seed))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [size * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


@functools.cache
def _quantized_and_float(fmt, remat="none"):
    """(quantized config, its params, the float config, the dequantized params); built once
    per format (a quantized init takes seconds on a busy CPU)."""
    cfg = mj.ModelConfig.tiny(**FORMATS[fmt], remat=remat)
    params = jax.jit(lambda: get_params(mj.init(cfg, 0)))()
    fcfg = quantized.float_config(cfg)
    return cfg, params, fcfg, quantized.dequantize_params(params, cfg)


def _loss_of_adapters(cfg, params, lcfg, tokens, weights, plan=None):
    graphdef, _ = nnx.split(_adapted(cfg, params, lcfg, lora.init_adapters(cfg, lcfg, 0)))

    def loss(adapters):
        model = nnx.merge(graphdef, lora.join(params, adapters))
        return jnp.sum(model(tokens, plan=plan).logits * weights)

    return loss


def _adapted(cfg, params, lcfg, adapters):
    model = from_params(cfg, params)
    lora.attach(model, lcfg, adapters)
    return model


def test_zero_initialised_adapters_compute_the_quantized_base_bit_for_bit():
    cfg, params, _, _ = _quantized_and_float("int4-g32-experts-int4-attention")
    lcfg = lora.LoraConfig(rank=4, targets=ALL)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    adapted = _adapted(cfg, params, lcfg, lora.init_adapters(cfg, lcfg, 1))
    base = from_params(cfg, params)
    logits = jax.jit(lambda m, t: m(t).logits)
    np.testing.assert_array_equal(logits(adapted, tokens), logits(base, tokens))


def test_adapter_gradient_over_an_int8_base_equals_the_dequantized_float_bases():
    cfg, params, fcfg, fparams = _quantized_and_float("int8-experts-int4-attention")
    lcfg = lora.LoraConfig(rank=4, targets=SOME)
    adapters = _drawn(cfg, lcfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    weights = jax.random.normal(jax.random.key(2), (2, 9, cfg.vocab_size))
    got = jax.jit(jax.grad(_loss_of_adapters(cfg, params, lcfg, tokens, weights)))(adapters)
    want = jax.jit(jax.grad(_loss_of_adapters(fcfg, fparams, lcfg, tokens, weights)))(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.max(jnp.abs(w))) > 0  # every factor has a gradient
        assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) <= 1e-5


def test_the_gpu_route_quantized_kernels_give_the_float_bases_gradient(monkeypatch):
    """An H200's plan (pallas grouped matmul reading codes, `kernels/gmm_quant.py`, whose VJP
    dequantizes for d x), run in Pallas' interpreter: the adapters' gradient equals the one
    over the dequantized float base through ragged_dot."""
    seen = []

    def interpreted(kernel, **interpret):
        def run(lhs, rhs, sizes):
            seen.append(type(rhs).__name__)
            return kernel(lhs, rhs, sizes, **interpret)

        return types.SimpleNamespace(gmm=run)

    monkeypatch.setattr(grouped_matmul, "gmm_quant", interpreted(gmm_quant.gmm, interpret=True))
    monkeypatch.setattr(grouped_matmul, "gmm_pallas", interpreted(gmm_pallas.gmm, interpret=True))
    cfg, params, fcfg, fparams = _quantized_and_float("int4-g32-experts-int4-attention")
    plan = dataclasses.replace(
        resolve(cfg, 18, cached=False, where="cpu"),
        grouped_matmul=GmmImpl.PALLAS,
        quantized_experts=QuantizedImpl.PALLAS,
    )
    lcfg = lora.LoraConfig(rank=16, targets=("q_proj", "w_gate", "w_down"))
    adapters = _drawn(cfg, lcfg, size=0.1)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    weights = jax.random.normal(jax.random.key(2), (2, 9, cfg.vocab_size))
    got = jax.jit(jax.grad(_loss_of_adapters(cfg, params, lcfg, tokens, weights, plan)))(adapters)
    want = jax.jit(jax.grad(_loss_of_adapters(fcfg, fparams, lcfg, tokens, weights)))(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) <= 1e-5
    # the base through the codes kernel, the adapters' factors through the float one
    assert seen.count("QuantizedWeight") >= 3 and len(set(seen)) == 2, seen


def _stacked_float_shapes(cfg) -> set:
    """[L, ...] shapes a float copy of a quantized weight stack would have (float layout and
    the stored matrix layout)."""
    out = set()
    for _, name in quantized.quantized_leaves(cfg):
        shape = quantized.float_shape(cfg, name, (cfg.num_layers,))
        out |= {shape, quantized.to_matrix(name, jnp.zeros(shape)).shape}
    return out


def test_no_backward_residual_holds_every_layers_dequantized_weights(capsys):
    cfg, params, _, _ = _quantized_and_float("int8-experts-int4-attention", remat="none")
    lcfg = lora.LoraConfig(rank=4, targets=SOME)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    loss = _loss_of_adapters(cfg, params, lcfg, tokens, jnp.ones((2, 9, cfg.vocab_size)))
    print_saved_residuals(loss, _drawn(cfg, lcfg))
    lines = capsys.readouterr().out.splitlines()
    # "i8[2,4,64,96] from ...": short dtype names (long ones in some jax versions)
    short = {"int8": "i8", "float32": "f32"}
    saved = set()
    for line in lines:
        dtype, _, rest = line.split(" ")[0].partition("[")
        saved.add(f"{short.get(dtype, dtype)}[{rest}")
    assert any(s.startswith("i8[") for s in saved)  # the codes are what the backward reads
    floats = {f"f32[{','.join(map(str, s))}]" for s in _stacked_float_shapes(cfg)}
    assert not saved & floats, sorted(saved & floats)


def _decode_case():
    """(cfg, layer, int4 stacks, their dequantized float stacks, adapter module, x, routing)
    of one decode call's experts: 3 tokens, layer 1 of the stacks."""
    cfg = mj.ModelConfig.tiny(**FORMATS["int4-g32-experts-int4-attention"])
    (l, e, d, f), layer = (cfg.num_layers, cfg.num_experts, cfg.embed_dim, cfg.hidden_dim), 1
    keys = jax.random.split(jax.random.key(0), 4)
    floats = [
        0.1 * jax.random.normal(k, s) for k, s in zip(keys, [(l, e, d, f)] * 2 + [(l, e, f, d)])
    ]
    stacks = tuple(quant.quantize(w, 4, 32) for w in floats)
    dense = tuple(w.dequantize(jnp.float32) for w in stacks)
    lcfg = lora.LoraConfig(rank=16, targets=("w_gate", "w_down"))
    factors = jax.tree.map(lambda x: x[layer], _drawn(cfg, lcfg, size=0.1)["layers"]["moe"])
    module = types.SimpleNamespace(**factors, **{lora.SCALE_ATTR: lcfg.scale})
    x = jax.random.normal(keys[3], (3, d))
    routing = route(x, jax.random.normal(keys[0], (d, e)), cfg.num_experts_per_tok)
    return cfg, layer, stacks, dense, module, x, routing


def _experts(cfg, plan, layer, weights, module, x, routing):
    dispatch = lambda *a: moe.dispatch(cfg, plan, *a)
    out, _ = lora.expert_dispatch(plan, x, routing, weights, jnp.int32(layer), module, dispatch)
    return out


GATHER = KernelPlan(decode_experts=DecodeExpertImpl.GATHER, quantized_experts=QuantizedImpl.PALLAS)


def test_decode_over_quantized_stacks_merges_that_layers_dequantized_weights():
    """Quantized stacks on a decode path without a codes-reading grouped matmul: the adapters
    merged into that layer's dequantized weights, equal to the same call on float stacks."""
    cfg, layer, stacks, dense, module, x, routing = _decode_case()
    got = _experts(cfg, GATHER, layer, stacks, module, x, routing)
    np.testing.assert_array_equal(got, _experts(cfg, GATHER, layer, dense, module, x, routing))
    base, _ = moe.dispatch(cfg, GATHER, x, routing, tuple(w[layer] for w in dense))
    assert float(jnp.max(jnp.abs(got - base))) > 1e-3  # the adapters took part


def test_gpu_decode_over_quantized_stacks_reads_codes_in_place_with_the_low_rank_terms(
    monkeypatch,
):
    """An H200's decode plan (decode-expert kernel, pallas grouped matmul) with adapters over
    quantized experts: the grouped matmul reads layer l of the code stacks in place and adds
    the low-rank terms (no per-step dequantize and merge); in Pallas' interpreter it equals the
    merged float oracle."""
    seen = []
    real_stacked, real_float = gmm_quant.gmm_stacked, gmm_pallas.gmm

    def stacked(lhs, rhs, sizes, layer):
        seen.append("codes")
        return real_stacked(lhs, rhs, sizes, layer, interpret=True)

    def float_gmm(lhs, rhs, sizes):
        seen.append("float")
        return real_float(lhs, rhs, sizes, True)

    monkeypatch.setattr(grouped_matmul, "gmm_quant", types.SimpleNamespace(gmm_stacked=stacked))
    monkeypatch.setattr(grouped_matmul, "gmm_pallas", types.SimpleNamespace(gmm=float_gmm))
    cfg, layer, stacks, dense, module, x, routing = _decode_case()
    plan = KernelPlan(
        grouped_matmul=GmmImpl.PALLAS,
        decode_experts=DecodeExpertImpl.PALLAS,
        quantized_experts=QuantizedImpl.PALLAS,
    )
    got = _experts(cfg, plan, layer, stacks, module, x, routing)
    want = _experts(cfg, GATHER, layer, dense, module, x, routing)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) <= 1e-5
    assert seen.count("codes") == 3 and seen.count("float") == 4, seen  # 2 adapted projections
