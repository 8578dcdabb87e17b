"""Expert swapping: one expert's three matrices (w_gate, w_up, w_down) copied from a donor.

The donor is another of our checkpoints of the same widths (its expert E2, default E), or a
dense Mistral/Llama-style Hugging Face directory whose SwiGLU MLP becomes the expert (as
upcycling copies it into every expert). Everything else, the router included, stays as it was:
a swapped-in expert starts where the donor left it, and needs training to fit the router
(`train.trainable = ["layers.*.moe.experts[E]"]`).

Letters: L layers, E experts, D embed width, F expert width.
"""

from __future__ import annotations

import numpy as np

from mixtral_jax.config import ConfigError, ModelConfig

_EXPERT_LEAVES = ("w_gate", "w_up", "w_down")
_DENSE_NAME = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}


def donor_from_model(params: dict, cfg: ModelConfig, expert: int) -> tuple[dict, tuple]:
    """({name: [L, in, out]} expert `expert` of every layer, (L, D, F)) of our checkpoint."""
    if not 0 <= expert < cfg.num_experts:
        raise ConfigError(
            f"--donor-expert {expert}: out of range [0, {cfg.num_experts}) of the donor"
        )
    moe = params["layers"]["moe"]
    weights = {n: np.asarray(moe[n])[:, expert] for n in _EXPERT_LEAVES}
    return weights, (cfg.num_layers, cfg.embed_dim, cfg.hidden_dim)


def donor_from_dense(read, dense_config: dict) -> tuple[dict, tuple]:
    """The dense MLP of every layer of a Hugging Face Mistral/Llama model, in our layout
    (HF stores [out, in]: transposed), read by `read(hf_key)`; and its (L, D, F)."""
    num_layers = int(dense_config["num_hidden_layers"])
    weights = {
        n: np.stack(
            [
                np.asarray(read(f"model.layers.{i}.mlp.{_DENSE_NAME[n]}.weight"), np.float32).T
                for i in range(num_layers)
            ]
        )
        for n in _EXPERT_LEAVES
    }
    dims = (num_layers, int(dense_config["hidden_size"]), int(dense_config["intermediate_size"]))
    return weights, dims


def swap_expert(
    params: dict, cfg: ModelConfig, donor: dict, donor_dims: tuple, layer: int | None, expert: int
) -> dict:
    """`params` with expert `expert` of layer `layer` (None: every layer) replaced by the
    donor's matrices of the same layer, cast to the checkpoint's dtypes. Nothing else changes.

    Raises:
      ConfigError: widths differ, the expert or layer is out of range, or the donor has too
        few layers (one line, naming both sides).
    """
    num_layers, d, f = donor_dims
    if (d, f) != (cfg.embed_dim, cfg.hidden_dim):
        raise ConfigError(
            f"donor widths embed_dim={d}, hidden_dim={f} differ from the checkpoint's "
            f"embed_dim={cfg.embed_dim}, hidden_dim={cfg.hidden_dim}: an expert moves only "
            "between models of the same widths"
        )
    if not 0 <= expert < cfg.num_experts:
        raise ConfigError(f"--expert {expert}: out of range [0, {cfg.num_experts})")
    layers = range(cfg.num_layers) if layer is None else [layer]
    if layer is not None and not 0 <= layer < cfg.num_layers:
        raise ConfigError(f"--layer {layer}: out of range [0, {cfg.num_layers})")
    if max(layers) >= num_layers:
        raise ConfigError(
            f"the donor has {num_layers} layers, the checkpoint {cfg.num_layers}: "
            f"no donor layer {max(layers)} (choose --layer)"
        )
    moe = dict(params["layers"]["moe"])
    for name in _EXPERT_LEAVES:
        w = np.array(moe[name])  # a copy: [L, E, in, out]
        for i in layers:
            w[i, expert] = donor[name][i].astype(w.dtype)
        moe[name] = w
    return dict(params, layers=dict(params["layers"], moe=moe))
