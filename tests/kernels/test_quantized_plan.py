"""The kernel plan for quantized weights: dequantize on CPU and wherever no kernel reads codes;
pallas only where the decode kernels run and say they read `kernels/quant.py`'s format."""

import pytest

import mixtral_jax as mj
from mixtral_jax.config import ConfigError, DecodeExpertImpl, DecodeProjectionImpl, QuantizedImpl
from mixtral_jax.kernels import decode_matmul, expert_decode
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


def test_gpu_dequantizes_until_the_kernels_read_codes(monkeypatch):
    cfg = mj.ModelConfig.tiny(**INT4, attention_bits=8)
    plan = resolve(cfg, 1, cached=True, where=NVIDIA_GPU)
    assert not kernel_plan.kernels_read_quantized(expert_decode)  # this tree: not yet
    assert plan.decode_experts == DecodeExpertImpl.PALLAS and _both(plan) == (DQ, DQ)
    # quantized attention with a float-only projection kernel: the projections are einsums
    # over the dequantized layer (the float kernel would need a whole float stack)
    assert plan.decode_projections == DecodeProjectionImpl.OFF
    monkeypatch.setattr(expert_decode, "READS_QUANTIZED", True, raising=False)
    monkeypatch.setattr(decode_matmul, "READS_QUANTIZED", True, raising=False)
    plan = resolve(cfg, 1, cached=True, where=NVIDIA_GPU)
    assert _both(plan) == (PALLAS, PALLAS)
    assert plan.decode_projections == DecodeProjectionImpl.PALLAS
    # prefill (many tokens, no decode kernel) and an explicit choice dequantize
    assert _both(resolve(cfg, 4096, cached=True, where=NVIDIA_GPU)) == (DQ, DQ)
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
