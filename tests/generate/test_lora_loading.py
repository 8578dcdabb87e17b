"""infer.py's loading of a base plus LoRA adapters: merged on the devices (the default) or kept
as factors, both equal the base with the adapters attached; an adapter directory given as the
checkpoint is a one-line error."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.adapters import save_adapters
from mixtral_jax.generate.loading import load_for_inference
from mixtral_jax.model import lora
from mixtral_jax.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = ["Mixture of experts routes tokens.", "Low-rank adapters train on one GPU."] * 20
TARGETS = ("q_proj", "o_proj", "router", "w_gate", "w_down")


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_loading")
    tokenizer = train_tokenizer(TEXT, str(root / "tok.model"), 64)
    cfg = mj.ModelConfig.tiny(vocab_size=tokenizer.vocab_size, num_layers=2)
    params = jax.device_get(mj.get_params(mj.init(cfg, 0)))
    checkpoint.save_model(str(root / "base"), params, cfg, str(root / "tok.model"))
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    leaves, tree = jax.tree.flatten(lora.init_adapters(cfg, lcfg, 1))
    keys = jax.random.split(jax.random.key(5), len(leaves))
    factors = jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    factors = jax.device_get(factors)
    save_adapters(str(root / "adapters"), factors, lcfg)
    reference = mj.from_params(cfg, params)
    lora.attach(reference, lcfg, factors)
    return root, cfg, reference


@pytest.mark.parametrize("merge", [True, False])
def test_base_plus_adapters_equals_the_adapted_model(base_and_adapters, merge):
    root, cfg, reference = base_and_adapters
    model, _ = load_for_inference(
        str(root / "base"), adapters=str(root / "adapters"), merge_adapters=merge
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    np.testing.assert_allclose(model(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)
    assert bool(lora.get_adapters(model)) != merge  # merged: plain weights, no factors left
    base, _ = load_for_inference(str(root / "base"))
    assert float(jnp.max(jnp.abs(base(tokens).logits - model(tokens).logits))) > 1e-3


def test_adapters_given_as_the_checkpoint_are_a_one_line_error(base_and_adapters, capsys):
    root = base_and_adapters[0]
    sys.path.insert(0, ROOT)
    try:
        import infer
    finally:
        sys.path.remove(ROOT)
    code = infer.main(["--checkpoint", str(root / "adapters"), "--prompt", "a", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "holds LoRA adapters, not a model" in err and err.count("\n") == 1
