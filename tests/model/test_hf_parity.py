"""Our model against transformers' MixtralForCausalLM on the same random weights (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import make_hf_model, ours_from_hf, torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import mixtral_jax as mj

CONFIGS = {
    "gqa-top2": mj.ModelConfig.tiny(),
    "window-top2": mj.ModelConfig.tiny(sliding_window=5, num_layers=3),
    "mha-top1": mj.ModelConfig.tiny(num_kv_heads=4, num_experts_per_tok=1, num_experts=3),
    "odd-top3": mj.ModelConfig(
        vocab_size=97,
        embed_dim=40,
        hidden_dim=56,
        num_layers=3,
        num_heads=6,
        num_kv_heads=2,
        head_dim=12,
        num_experts=5,
        num_experts_per_tok=3,
        rope_theta=1e6,
        max_seq_len=64,
    ),
    "window1-mqa": mj.ModelConfig.tiny(sliding_window=1, num_kv_heads=1, num_experts=6),
}


def _rel_err(ref, got):
    return float(np.max(np.abs(ref - got)) / np.max(np.abs(ref)))


def _left_padding(batch, length):
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch):
        mask[row, : 3 * row + 1] = 0
    return mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_logits_router_logits_and_balance_loss_match_transformers(name, padded):
    cfg = CONFIGS[name]
    hf = make_hf_model(cfg, seed=len(name), std=0.2)
    ours = ours_from_hf(hf, cfg)
    batch, length = 3, 17
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length))
    mask = _left_padding(batch, length) if padded else None
    with torch.no_grad():
        ref = hf(
            torch.tensor(tokens),
            attention_mask=None if mask is None else torch.tensor(mask),
            output_router_logits=True,
        )
    out = ours(jnp.asarray(tokens), None if mask is None else jnp.asarray(mask))

    real = np.ones((batch, length), bool) if mask is None else mask.astype(bool)
    assert _rel_err(ref.logits.numpy()[real], np.asarray(out.logits)[real]) <= 1e-5
    ref_router = np.stack([r.numpy() for r in ref.router_logits])
    ref_router = ref_router.reshape(cfg.num_layers, batch, length, cfg.num_experts)
    got_router = np.asarray(out.aux.layers.router_logits)
    assert _rel_err(ref_router[:, real], got_router[:, real]) <= 1e-5

    ref_lb = load_balancing_loss_func(
        ref.router_logits,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        None if mask is None else torch.tensor(mask),
    )
    np.testing.assert_allclose(float(out.aux.load_balance_loss), float(ref_lb), rtol=1e-5)


def test_padding_changes_balance_loss_like_transformers():
    """Padding-awareness is real: the masked loss differs from the unmasked one, on both sides."""
    cfg = CONFIGS["gqa-top2"]
    hf = make_hf_model(cfg, seed=7, std=0.2)
    ours = ours_from_hf(hf, cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 17))
    mask = _left_padding(3, 17)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), output_router_logits=True)
    unmasked = float(load_balancing_loss_func(ref.router_logits, cfg.num_experts, 2))
    masked = float(
        load_balancing_loss_func(ref.router_logits, cfg.num_experts, 2, torch.tensor(mask))
    )
    assert abs(unmasked - masked) > 1e-4
    ours_masked = ours(jnp.asarray(tokens), jnp.asarray(mask)).aux.load_balance_loss
    np.testing.assert_allclose(float(ours_masked), masked, rtol=1e-5)


def test_our_hf_config_round_trips_through_transformers(tmp_path):
    cfg = CONFIGS["odd-top3"].replace(sliding_window=7, router_aux_loss_coef=0.01)
    for rope_format in ("v4", "v5"):
        mj.save_hf_config(cfg, str(tmp_path), rope_format=rope_format)
        hf_cfg = pytest.importorskip("transformers").AutoConfig.from_pretrained(str(tmp_path))
        assert hf_cfg.num_local_experts == cfg.num_experts
        assert hf_cfg.head_dim == cfg.head_dim
        assert hf_cfg.sliding_window == 7
        assert hf_cfg.rope_parameters["rope_theta"] == cfg.rope_theta
        # transformers' own serialisation (v5 form) reads back to the same config.
        hf_cfg.save_pretrained(str(tmp_path / rope_format))
        assert mj.load_hf_config(str(tmp_path / rope_format)) == cfg
