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
