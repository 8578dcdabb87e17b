"""bench/quant_decode.py's logic at a tiny size on CPU: the weights it draws on the device are the
same float values in every format (quantized as drawn), its floor counts stored bytes, and a
run writes its JSON."""

import json

import jax
import numpy as np

import mixtral_jax as mj
from bench import quant_decode
from mixtral_jax.model import quantized

TINY = mj.ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")


def test_every_format_draws_the_same_float_weights_quantized_as_drawn():
    q4 = quant_decode.format_config(TINY, "int4", 32)
    assert (q4.expert_bits, q4.quant_group_size) == (4, 32)
    floats = quant_decode.random_params(TINY)
    q = quant_decode.random_params(q4)
    want = quantized.quantize_params(floats, q4)  # the whole-leaf quantization of those values
    assert jax.tree.structure(q) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(np.asarray(floats["layers"]["attn_norm"]["scale"]).min()) == 1.0


def test_the_floor_counts_codes_and_scales():
    cfg = mj.preset("mixtral-8x7b", dtype="bfloat16", param_dtype="bfloat16")
    bf16, int8 = (
        quant_decode.step_bytes(cfg, 1),
        quant_decode.step_bytes(quant_decode.format_config(cfg, "int8", 128), 1),
    )
    int4 = quant_decode.step_bytes(quant_decode.format_config(cfg, "int4", 128), 1)
    experts = 32 * 2 * 3 * 4096 * 14336  # two experts per layer at batch 1
    assert np.isclose(bf16 - int8, experts * (1 - 2 * (2 * 14336 + 4096) / (3 * 4096 * 14336) * 2))
    assert np.isclose(bf16 - int4, experts * (2 - 0.5 - 4 / 128))


def test_a_tiny_run_writes_its_json(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = ["--tiny", "--formats", "", "--new", "2", "--group-size", "32", "--profile"]  # 8x22B
    payload = quant_decode.main(args)
    stored = json.loads((tmp_path / "quant_decode.json").read_text())
    assert stored["runs"] == [] and stored["mixtral_8x22b_int4"] == payload["mixtral_8x22b_int4"]
    big = payload["mixtral_8x22b_int4"]
    assert big["format"] == "int4 g32" and big["decode"][0]["decode_tokens_per_s"] > 0
    profile = big["decode"][0]["profile"]  # no GPU kernels on the CPU: the summary's shape only
    assert profile["batch"] == 1 and profile["layers"] == 3 and "by_name" in profile
    shapes = mj.param_shapes(quant_decode.format_config(TINY.replace(num_layers=3), "int4", 32))
    assert big["weight_bytes"] == sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(shapes))
