"""Routing statistics: which experts the router picks, how evenly, together with whom, and how
stickily from one token to the next.

Everything here is plain numpy over a `RoutingTrace`; the trace comes from the model's router
logits (`trace_from_logits`), so the report describes exactly the choices the forward pass made.

Letters: L layers, B sequences, T tokens per sequence, E experts, k choices per token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.moe.ops import route_logits


@dataclasses.dataclass(frozen=True)
class RoutingTrace:
    """Router decisions over a batch of token sequences.

    Attributes:
      experts: [L, B, T, k] int chosen experts per token, most probable first.
      probs: [L, B, T, E] float router softmax over all experts.
      mask: [B, T] bool, True for real tokens (padding is left out of every statistic).
    """

    experts: np.ndarray
    probs: np.ndarray
    mask: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def topk(self) -> int:
        return self.experts.shape[-1]


def trace_from_logits(router_logits, topk: int, mask=None) -> RoutingTrace:
    """A trace from router logits [L, B, T, E], choosing as the model does (the one routing
    rule, `moe/ops.route_logits`: ties to the lower index)."""
    logits = jnp.asarray(router_logits, jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    experts = route_logits(logits, topk).experts  # [L, B, T, k]
    shape = router_logits.shape[1:3]
    mask = np.ones(shape, bool) if mask is None else np.asarray(mask).astype(bool)
    return RoutingTrace(experts=np.asarray(experts), probs=np.asarray(probs), mask=mask)


def expert_counts(trace: RoutingTrace) -> np.ndarray:
    """[L, E] assignments of real tokens to each expert (all k choices counted)."""
    chosen = np.eye(trace.num_experts, dtype=np.int64)[trace.experts]  # [L, B, T, k, E]
    return np.einsum("LBTkE,BT->LE", chosen, trace.mask.astype(np.int64))


def coactivation(trace: RoutingTrace) -> np.ndarray:
    """[L, E, E] share of real tokens that chose both expert i and expert j (diagonal: chose i)."""
    chosen = np.eye(trace.num_experts, dtype=np.int64)[trace.experts].sum(axis=3)  # [L,B,T,E]
    chosen = chosen * trace.mask[None, :, :, None]
    pairs = np.einsum("LBTi,LBTj->Lij", chosen, chosen)
    return pairs / max(int(trace.mask.sum()), 1)


def consecutive_agreement(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """How often token t+1 keeps token t's experts, over pairs of adjacent real tokens.

    Returns:
      same_first: [L] share of pairs whose first choices are equal.
      shared_any: [L] share of pairs whose top-k sets share at least one expert.
    """
    both = trace.mask[:, :-1] & trace.mask[:, 1:]  # [B, T-1]
    pairs = max(int(both.sum()), 1)
    first = trace.experts[..., 0]  # [L, B, T]
    same_first = ((first[:, :, :-1] == first[:, :, 1:]) & both).sum(axis=(1, 2)) / pairs
    now, nxt = trace.experts[:, :, :-1, :, None], trace.experts[:, :, 1:, None, :]
    overlap = (now == nxt).any(axis=(-1, -2))  # [L, B, T-1]
    shared_any = (overlap & both).sum(axis=(1, 2)) / pairs
    return same_first, shared_any


def routing_entropy(trace: RoutingTrace) -> np.ndarray:
    """[L] mean over real tokens of the router distribution's entropy, in nats."""
    p = trace.probs
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)  # [L,B,T]
    return (ent * trace.mask).sum(axis=(1, 2)) / max(int(trace.mask.sum()), 1)


def routing_report(
    trace: RoutingTrace, *, dead_below: float = 0.25, overloaded_above: float = 2.0
) -> dict:
    """The full report as JSON-ready values.

    An expert is flagged dead when its load share is under `dead_below / E`, overloaded when
    over `overloaded_above / E` (shares of a layer's assignments; uniform is 1/E).
    """
    counts = expert_counts(trace)  # [L, E]
    load_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    num_tokens = int(trace.mask.sum())
    same_first, shared_any = consecutive_agreement(trace)
    entropy = routing_entropy(trace)
    e = trace.num_experts
    load_entropy = -np.sum(
        np.where(
            load_share > 0, load_share * np.log(np.where(load_share > 0, load_share, 1.0)), 0.0
        ),
        axis=1,
    )
    layers = []
    for layer in range(trace.num_layers):
        share = load_share[layer]
        layers.append(
            {
                "layer": layer,
                "tokens_per_expert": counts[layer].tolist(),
                "load_share": share.tolist(),
                "token_share": (counts[layer] / max(num_tokens, 1)).tolist(),
                "router_entropy": float(entropy[layer]),
                "load_entropy": float(load_entropy[layer]),
                "same_first_choice_next_token": float(same_first[layer]),
                "shared_expert_next_token": float(shared_any[layer]),
                "dead_experts": [int(i) for i in np.flatnonzero(share < dead_below / e)],
                "overloaded_experts": [
                    int(i) for i in np.flatnonzero(share > overloaded_above / e)
                ],
            }
        )
    return {
        "num_layers": trace.num_layers,
        "num_experts": e,
        "topk": trace.topk,
        "num_tokens": num_tokens,
        "uniform_share": 1.0 / e,
        "max_router_entropy": float(np.log(e)),
        "thresholds": {
            "dead_below_share": dead_below / e,
            "overloaded_above_share": overloaded_above / e,
        },
        "layers": layers,
        "coactivation": coactivation(trace).tolist(),
    }
