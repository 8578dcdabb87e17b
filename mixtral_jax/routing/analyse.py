"""Run a model over token sequences and collect its routing; write the report files.

Outputs of `write_report(out_dir, ...)`:
  report.json        per layer and expert: loads, entropy, co-activation, next-token stickiness,
                     dead / overloaded experts (`stats.routing_report`)
  load_heatmap.png   layer x expert load shares
  coactivation.png   one co-activation matrix per layer
  tokens.html        the text with every token coloured by its first-choice expert, per layer
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.routing import html as page
from mixtral_jax.routing import plots
from mixtral_jax.routing.stats import RoutingTrace, routing_report, trace_from_logits


def chunk_tokens(ids: list[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits one token stream into rows of `seq_len`: ([B, T] ids, [B, T] bool real-token mask)."""
    if not ids:
        raise ValueError("no tokens to analyse: the text is empty")
    rows = -(-len(ids) // seq_len)
    tokens = np.full((rows, seq_len), pad_id, np.int32)
    mask = np.zeros((rows, seq_len), bool)
    for r in range(rows):
        piece = ids[r * seq_len : (r + 1) * seq_len]
        tokens[r, : len(piece)] = piece
        mask[r, : len(piece)] = True
    return tokens, mask


def collect_trace(
    model: Mixtral, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 8
) -> RoutingTrace:
    """Router decisions of `model` on [B, T] tokens (padding masked), batch by batch."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def router_logits(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, mask).aux.layers.router_logits  # [L, b, T, E]

    parts = []
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        batch, batch_mask = tokens[rows], mask[rows]
        short = batch_size - batch.shape[0]  # pad the last batch: one compiled shape
        if short:
            batch = np.concatenate([batch, np.zeros((short, batch.shape[1]), batch.dtype)])
            batch_mask = np.concatenate([batch_mask, np.zeros((short, batch.shape[1]), bool)])
        logits = router_logits(state, jnp.asarray(batch), jnp.asarray(batch_mask, jnp.int32))
        parts.append(np.asarray(logits)[:, : batch_size - short])
    return trace_from_logits(np.concatenate(parts, axis=1), model.cfg.num_experts_per_tok, mask)


def write_report(
    out_dir: str,
    trace: RoutingTrace,
    pieces: list[list[str]],
    *,
    title: str = "Routing report",
    dead_below: float = 0.25,
    overloaded_above: float = 2.0,
) -> dict:
    """Writes the four report files into `out_dir` (created) and returns the report dict."""
    os.makedirs(out_dir, exist_ok=True)
    report = routing_report(trace, dead_below=dead_below, overloaded_above=overloaded_above)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    plots.plot_load_heatmap(report, os.path.join(out_dir, "load_heatmap.png"))
    plots.plot_coactivation(report, os.path.join(out_dir, "coactivation.png"))
    with open(os.path.join(out_dir, "tokens.html"), "w", encoding="utf-8") as f:
        f.write(page.render_token_page(trace, pieces, title))
    return report
