"""The training objective: masked next-token cross-entropy plus the two router losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Summed negative log-likelihood of `targets` and the number of counted tokens.

    Args:
      logits: [B, T, V] float32.
      targets: [B, T] int next tokens.
      mask: [B, T] 1 where the prediction counts (same document, not padding).
    Returns:
      (sum of NLL over counted tokens, count), both float32 scalars: summing before dividing
      lets gradient accumulation weigh every token equally.
    """
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def total_loss(ce_mean, load_balance, router_z, *, aux_loss_coef: float, router_z_loss_coef: float):
    """CE + aux_loss_coef * load-balancing loss + router_z_loss_coef * router z-loss: the one
    place of the rule (scalars; ce_mean = 0 gives the router terms alone, which the train step
    spreads over its micro-batches)."""
    return ce_mean + aux_loss_coef * load_balance + router_z_loss_coef * router_z
