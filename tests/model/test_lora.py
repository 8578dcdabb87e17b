"""LoRA adapters: zero-initialised B computes the base bit for bit; the adapted model equals the
merged one (base + A B * alpha / r) on every dispatch path, full-sequence and cached."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.config import ConfigError
from mixtral_jax.model import lora
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.params import from_params, get_params, init

ALL = tuple(lora.TARGETS)


def _adapted(cfg, params, lcfg, adapters):
    model = from_params(cfg, params)
    lora.attach(model, lcfg, adapters)
    return model


def _random_adapters(cfg, lcfg, seed=3):
    """Adapters with B drawn too (a trained adapter), large enough to move the routing."""
    fresh = lora.init_adapters(cfg, lcfg, seed)
    leaves, tree = jax.tree.flatten(fresh)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    drawn = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(tree, drawn)


@pytest.fixture(scope="module")
def base():
    cfg = mj.ModelConfig.tiny(num_layers=2)
    params = get_params(init(cfg, seed=0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    return cfg, params, tokens


def test_zero_initialised_adapters_give_the_base_logits_bit_for_bit(base):
    cfg, params, tokens = base
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL)
    adapters = lora.init_adapters(cfg, lcfg, seed=0)
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(adapters)[::2])  # A drawn
    want = from_params(cfg, params)(tokens).logits
    got = _adapted(cfg, params, lcfg, adapters)(tokens).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_adapted_model_equals_the_merged_model(base, impl):
    cfg, params, tokens = base
    cfg = cfg.replace(moe_impl=impl, capacity_factor=8.0)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL)
    adapters = _random_adapters(cfg, lcfg)
    got = _adapted(cfg, params, lcfg, adapters)(tokens).logits
    merged = from_params(cfg, lora.merge(params, adapters, lcfg))
    want = merged(tokens).logits
    base_logits = from_params(cfg, params)(tokens).logits
    assert float(jnp.max(jnp.abs(want - base_logits))) > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merge_is_base_plus_product_within_1e6(base):
    cfg, params, _ = base
    lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("w_down", "o_proj"))
    adapters = _random_adapters(cfg, lcfg)
    merged = lora.merge(params, adapters, lcfg)
    a = np.asarray(adapters["layers"]["moe"]["lora_w_down_a"], np.float64)  # [L, E, F, r]
    b = np.asarray(adapters["layers"]["moe"]["lora_w_down_b"], np.float64)  # [L, E, r, D]
    want = np.asarray(params["layers"]["moe"]["w_down"]) + 2.0 * np.einsum("LEFr,LErD->LEFD", a, b)
    np.testing.assert_allclose(merged["layers"]["moe"]["w_down"], want, rtol=0, atol=1e-6)
    a = np.asarray(adapters["layers"]["attn"]["lora_o_proj_a"], np.float64)  # [L, N, H, r]
    b = np.asarray(adapters["layers"]["attn"]["lora_o_proj_b"], np.float64)  # [L, r, D]
    want = np.asarray(params["layers"]["attn"]["o_proj"]) + 2.0 * np.einsum("LNHr,LrD->LNHD", a, b)
    np.testing.assert_allclose(merged["layers"]["attn"]["o_proj"], want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(merged["layers"]["moe"]["w_up"], params["layers"]["moe"]["w_up"])


def test_cached_decode_with_adapters_equals_the_merged_model(base):
    cfg, params, tokens = base
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL)
    adapters = _random_adapters(cfg, lcfg)
    outs = []
    for model in (
        _adapted(cfg, params, lcfg, adapters),
        from_params(cfg, lora.merge(params, adapters, lcfg)),
    ):
        b, t = tokens.shape
        cache = KVCache.create(cfg, b, 16, jnp.float32)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        out, cache = model.extend(tokens, cache, positions=pos, valid=jnp.ones((b, t), bool))
        step, _ = model.extend(
            tokens[:, :1], cache, positions=pos[:, :1] + t, valid=jnp.ones((b, 1), bool)
        )
        outs.append((out.logits, step.logits))
    for got, want in zip(*outs):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank": 0}, "train.lora_rank=0: must be an integer >= 1"),
        ({"rank": 4, "targets": ("q_proj", "mlp")}, "'mlp' is no LoRA target"),
        ({"rank": 4, "targets": ()}, "train.lora_targets=[]"),
        ({"rank": 4, "alpha": -1.0}, "train.lora_alpha=-1.0"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=None) as e:
        lora.LoraConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rank_beyond_a_targets_width_is_a_one_line_error(base):
    cfg = base[0]
    with pytest.raises(ConfigError) as e:
        lora.adapter_shapes(cfg, lora.LoraConfig(rank=5, targets=("router",)))
    assert "train.lora_rank=5: exceeds router's smaller side 4" in str(e.value)
