"""Upcycling a dense Mistral into a Mixtral: at step 0 it computes the dense model's logits."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import torch, transformers

import mixtral_jax as mj
from mixtral_jax import upcycle
from mixtral_jax.config import ConfigError


def _dense_mistral(window):
    cfg = transformers.MistralConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        sliding_window=window,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if name.endswith("norm.weight") else 0.2
            p.copy_(
                (1.0 if name.endswith("norm.weight") else 0.0)
                + scale * torch.randn(p.shape, generator=gen)
            )
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, cfg.to_dict(), state


@pytest.mark.parametrize("num_experts,topk,window", [(4, 2, None), (8, 2, 5), (3, 1, None)])
def test_upcycled_model_equals_dense_model_at_step_zero(num_experts, topk, window):
    dense, dense_cfg, state = _dense_mistral(window)
    cfg = upcycle.upcycled_config(dense_cfg, num_experts, topk)
    assert cfg.sliding_window == window and cfg.num_experts == num_experts
    params = upcycle.upcycle_params(state.__getitem__, cfg, router_std=0.5, seed=3)
    w = params["layers"]["moe"]["w_gate"]  # [L, E, D, F]: every expert is the dense MLP
    np.testing.assert_array_equal(w[:, 0], w[:, -1])
    assert float(np.abs(params["layers"]["moe"]["router"]).max()) > 0  # router is random
    model = mj.from_params(cfg, params)
    tokens = np.random.default_rng(0).integers(0, 101, (2, 13))
    with torch.no_grad():
        ref = dense(torch.tensor(tokens)).logits.numpy()
    out = model(jnp.asarray(tokens))
    err = np.max(np.abs(np.asarray(out.logits) - ref)) / np.max(np.abs(ref))
    assert err <= 1e-5
    # The router is live: tokens really are spread over several experts.
    assert int(np.count_nonzero(out.aux.layers.tokens_per_expert[0])) > 1


def test_expert_noise_breaks_symmetry_and_bad_values_are_refused():
    _, dense_cfg, state = _dense_mistral(None)
    cfg = upcycle.upcycled_config(dense_cfg, 4, 2)
    params = upcycle.upcycle_params(state.__getitem__, cfg, expert_noise=0.01)
    w = params["layers"]["moe"]["w_up"]
    assert not np.array_equal(w[:, 0], w[:, 1])
    assert np.abs(w[:, 0] - w[:, 1]).max() < 0.1 * np.abs(w).max()
    with pytest.raises(ConfigError, match="router_std=-1"):
        upcycle.upcycle_params(state.__getitem__, cfg, router_std=-1)
    with pytest.raises(ConfigError, match="num_experts_per_tok=3: must be <= num_experts=2"):
        upcycle.upcycled_config(dense_cfg, 2, 3)
    with pytest.raises(ConfigError, match="model_type='bert'"):
        upcycle.upcycled_config(dict(dense_cfg, model_type="bert"), 4, 2)
