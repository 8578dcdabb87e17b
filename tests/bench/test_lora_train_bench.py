"""bench/lora_train.py's logic at a tiny size on CPU: the step trains the adapters alone (the
base is unchanged, the state holds adapters and their moments only) and the FLOP count is the
frozen base's forward and input-gradient work plus the adapters' full training work."""

import os
import sys

import jax
import pytest

import mixtral_jax as mj

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from bench import lora_train


def test_tiny_lora_bench_step_runs_and_counts():
    cfg = mj.ModelConfig.tiny(num_layers=1, dtype="float32", param_dtype="bfloat16")
    row = lora_train.run_config(  # mj.init: bench/common's on-device draw is slow on CPU
        cfg, seq=8, batch=2, rank=4, steps=1, peak=False, make_base=lambda c: mj.init(c, 0)
    )
    assert row["finite"] and row["tflops"] > 0
    lcfg = mj.model.lora.LoraConfig(rank=4, alpha=8.0, targets=lora_train.TARGETS)
    shapes = mj.model.lora.adapter_shapes(cfg, lcfg)
    every = sum(
        int(jax.numpy.prod(jax.numpy.array(s)))
        for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    )
    assert row["adapter_params"] == every
    assert row["optimizer_bytes"] <= 2 * 4 * every + 64  # mu, nu in float32 + counters
    assert row["base_bytes"] == 2 * sum(
        x.size for x in jax.tree.leaves(mj.param_shapes(cfg))
    )  # bfloat16 base, untouched dtype
    flops = row["flops_per_token"]
    d, f, k, r = cfg.embed_dim, cfg.hidden_dim, cfg.num_experts_per_tok, 4
    attn_adapters = (
        cfg.num_layers
        * r
        * (
            (d + cfg.num_heads * cfg.head_dim)
            + 2 * (d + cfg.num_kv_heads * cfg.head_dim)
            + (cfg.num_heads * cfg.head_dim + d)
        )
    )
    expert_adapters = cfg.num_layers * k * 3 * r * (d + f)
    assert flops["adapter_params_active"] == attn_adapters + expert_adapters
    assert flops["adapters"] == pytest.approx(6.0 * (attn_adapters + expert_adapters))


def test_tiny_qlora_bench_step_runs_over_the_stored_int4_base():
    cfg = lora_train.model_config(1, 8, "full", 4, None, attention=True, tiny=True)
    cfg = cfg.replace(dtype="float32")
    assert (cfg.expert_bits, cfg.attention_bits, cfg.quant_group_size) == (4, 4, 32)
    row = lora_train.run_config(
        cfg, seq=8, batch=2, rank=4, steps=1, peak=False, make_base=lambda c: mj.init(c, 0)
    )
    assert row["finite"] and row["tflops"] > 0 and row["expert_bits"] == 4
    stored = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(mj.param_shapes(cfg)))
    assert row["base_bytes"] == stored  # codes and scales, as stored
    experts = mj.param_shapes(cfg)["layers"]["moe"]
    codes = sum(x.size * x.dtype.itemsize for k, x in experts.items() if k.startswith("w_"))
    e_d_f = cfg.num_layers * cfg.num_experts * cfg.embed_dim * cfg.hidden_dim
    assert codes == 3 * e_d_f * (0.5 + 4 / 32)  # int4 codes + a float32 scale per 32 rows


def test_a_sequence_that_does_not_fit_is_one_line_and_ends_the_sweep(monkeypatch, capsys):
    monkeypatch.setattr(lora_train, "build", lambda *a: (None, lambda: None, None))

    def measure(step, state, base, cfg, lcfg, seq, batch, steps):
        if seq > 16:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes\nmore")
        return {"seq": seq, "step_ms": 1.0}

    monkeypatch.setattr(lora_train, "measure", measure)
    rows = lora_train.sweep(None, None, None, [64, 16, 32], 1, 1)
    assert [r["seq"] for r in rows] == [16, 32] and [r["fits"] for r in rows] == [True, False]
    assert rows[1]["error"] == "out of memory: RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and '"fits": false' in lines[1]
