"""The kernel plan for quantized weights: dequantize on CPU and wherever no kernel reads codes;
pallas only where the decode kernels run and their tile reader (kernels/weight_tiles.py)
supports the format."""

from types import SimpleNamespace

import pytest

import mixtral_jax as mj
from mixtral_jax.config import ConfigError, DecodeExpertImpl, DecodeProjectionImpl, QuantizedImpl
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.kernels.plan import NVIDIA_GPU, resolve

DQ, PALLAS = QuantizedImpl.DEQUANTIZE, QuantizedImpl.PALLAS
INT4 = {"dtype": "bfloat16", "param_dtype": "bfloat16", "expert_bits": 4, "quant_group_size": 32}


def _both(plan):
    return plan.quantized_experts, plan.quantized_projections


def test_cpu_and_float_models_dequantize():
    assert _both(resolve(mj.ModelConfig.tiny(**INT4), 1, cached=True, where="cpu")) == (DQ, DQ)
    float_gpu = resolve(mj.ModelConfig.tiny(dtype="bfloat16"), 1, cached=True, where=NVIDIA_GPU)
    assert _both(float_gpu) == (DQ, DQ)


def test_gpu_dequantizes_unless_the_kernels_read_the_format(monkeypatch):
    cfg = mj.ModelConfig.tiny(**INT4, attention_bits=8)
    reader = kernel_plan.quantized_tile_reader()  # kernels/weight_tiles.py
    assert reader is not None
    monkeypatch.setattr(kernel_plan, "quantized_tile_reader", lambda: None)
    plan = resolve(cfg, 1, cached=True, where=NVIDIA_GPU)
    assert plan.decode_experts == DecodeExpertImpl.PALLAS and _both(plan) == (DQ, DQ)
    # quantized attention with a float-only projection kernel: the projections are einsums
    # over the dequantized layer (the float kernel would need a whole float stack)
    assert plan.decode_projections == DecodeProjectionImpl.OFF
    formats = []

    def supports_format(bits, group_size, k):
        formats.append((bits, group_size, k))
        return reader.supports_format(bits, group_size, k)

    monkeypatch.setattr(
        kernel_plan,
        "quantized_tile_reader",
        lambda: SimpleNamespace(supports_format=supports_format),
    )
    plan = resolve(cfg, 1, cached=True, where=NVIDIA_GPU)
    assert set(formats) == {(4, 32, 64), (4, 32, 96), (8, 32, 64)}  # D, F; D, N*H
    assert _both(plan) == (PALLAS, PALLAS)
    assert plan.decode_projections == DecodeProjectionImpl.PALLAS
    # quantized projections stay on the einsums above 64 tokens (float ones: up to 512)
    assert resolve(cfg, 65, cached=True, where=NVIDIA_GPU).decode_projections == "off"
    floats = cfg.replace(attention_bits=16)
    assert resolve(floats, 65, cached=True, where=NVIDIA_GPU).decode_projections == "pallas"
    # prefill: the grouped matmul reads quantized experts; the projections' einsums dequantize
    assert _both(resolve(cfg, 4096, cached=True, where=NVIDIA_GPU)) == (PALLAS, DQ)
    assert _both(resolve(cfg, 4096, cached=False, where=NVIDIA_GPU)) == (PALLAS, DQ)
    # dispatches that take float weights only, and an explicit choice, dequantize
    capacity = cfg.replace(moe_impl="capacity")
    assert _both(resolve(capacity, 4096, cached=False, where=NVIDIA_GPU)) == (DQ, DQ)
    xla_gmm = cfg.replace(gmm_impl="xla", decode_expert_impl="off")
    assert _both(resolve(xla_gmm, 4096, cached=False, where=NVIDIA_GPU)) == (DQ, DQ)
    chosen = cfg.replace(quantized_impl="dequantize")
    assert _both(resolve(chosen, 1, cached=True, where=NVIDIA_GPU)) == (DQ, DQ)
    # float attention keeps its float projection kernel beside int4 experts
    experts_only = mj.ModelConfig.tiny(**INT4)
    plan = resolve(experts_only, 1, cached=True, where=NVIDIA_GPU)
    assert plan.decode_projections == DecodeProjectionImpl.PALLAS
    assert _both(plan) == (PALLAS, DQ)


def test_an_explicit_pallas_off_an_nvidia_gpu_is_a_one_line_error():
    cfg = mj.ModelConfig.tiny(expert_bits=8, quantized_impl="pallas")
    with pytest.raises(ConfigError, match="quantized_impl='pallas' needs an NVIDIA GPU"):
        resolve(cfg, 1, cached=True, where="cpu")
    with pytest.raises(ConfigError, match="quantized_impl='fast': must be one of auto"):
        mj.ModelConfig.tiny(quantized_impl="fast")


def test_a_format_the_kernels_cannot_tile_dequantizes(monkeypatch):
    reader = SimpleNamespace(supports_format=lambda bits, group_size, k: group_size % 16 == 0)
    monkeypatch.setattr(kernel_plan, "quantized_tile_reader", lambda: reader)
    tiles = mj.ModelConfig.tiny(**INT4)
    assert resolve(tiles, 1, cached=True, where=NVIDIA_GPU).quantized_experts == PALLAS
    odd = tiles.replace(quant_group_size=8)
    assert resolve(odd, 1, cached=True, where=NVIDIA_GPU).quantized_experts == DQ
