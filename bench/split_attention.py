"""A prefill chunk's attention over the cache: the masked cuDNN call against the split form
(model/chunk_attention.py: prefix keys unmasked + the chunk's own keys causal, merged by their
log-sum-exp), for speed and error. Mixtral widths: N=32 query heads, K=8 kv heads, H=128, bf16.

  PYTHONPATH=. python bench/split_attention.py            # H200: T=4096 over S=32768
  PYTHONPATH=. JAX_PLATFORMS=cpu python bench/split_attention.py --tiny   # einsum stand-ins

Both forms read layer 1 of a 2-layer cache stack [L, B, S, K, H] by a traced index, as
`Attention.cached` does (the masked call's slice and the split's gather are each one copy).
Timing, one row per prefix length P (a chunk of T queries at cache slots [P, P + T), batch 1):
  masked_ms   `cached_flash_attention` with the explicit mask and key_limit = P + T (today);
  split_ms    `split_attention`, the layout passed in (no cond);
  cond_ms     the split under `jax.lax.cond` on the layout's `exact`, as the layer runs it;
  prefix_ms, causal_ms  each cuDNN part alone, on the slices as they are (no gather, rotation
              or combine): what the split would cost with its bookkeeping free;
  *_tflops    useful FLOPs 4 N H T (P + (T + 1) / 2) per millisecond.
Error, on a smaller case (S=4096, T=1024, batch 2, row 1 left-padded by 100 tokens), per P:
  max |out - reference| over real queries of the masked call and of the split, against the
  einsum attention in float32 on the same bf16 inputs; lse_err: max |lse - reference| of each
  cuDNN part (checks the residual's layout, natural log and scale). Writes
$OUT/split_attention.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, timed, write_json
from mixtral_jax.config import AttentionImpl
from mixtral_jax.kernels import cudnn_attention
from mixtral_jax.model import chunk_attention
from mixtral_jax.model.attention import (
    cached_attention_mask,
    cached_flash_attention,
    dot_product_attention,
)


def problem(b, s, t, prefix, pad, n, kv, h, dtype, seed=0):
    """Layer 1 of a 2-layer stack holding a chunk at [prefix, prefix + t); rows after the first
    left-padded by `pad`. Returns (q, k_stack, v_stack, k_new, v_new, mask, layout, real)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    k_new = jax.random.normal(keys[1], (b, t, kv, h), dtype)
    v_new = jax.random.normal(keys[2], (b, t, kv, h), dtype)
    k_stack = jax.random.normal(keys[3], (2, b, s, kv, h), dtype)
    v_stack = jax.random.normal(keys[4], (2, b, s, kv, h), dtype)
    k_stack = k_stack.at[1, :, prefix : prefix + t].set(k_new)
    v_stack = v_stack.at[1, :, prefix : prefix + t].set(v_new)
    end = prefix + t
    index = jnp.where(jnp.arange(s) < end, jnp.arange(s), -1)
    pads = jnp.asarray([0] + [pad] * (b - 1))
    valid = (index >= 0)[None] & (jnp.arange(s)[None] >= pads[:, None])
    mask = cached_attention_mask(jnp.arange(prefix, end), index, valid, None)
    layout = chunk_attention.chunk_layout(jnp.int32(prefix), t, index, valid)
    real = np.asarray(valid[:, prefix:end])
    return q, k_stack, v_stack, k_new, v_new, mask, layout, real


def forms(impl: AttentionImpl):
    """The jitted forms: (masked, split, cond), each (q, k_stack, v_stack, k_new, v_new, mask,
    layout, layer) -> out."""
    name = "cudnn" if impl == AttentionImpl.CUDNN else "xla"

    def layer_of(k_stack, v_stack, layer):
        return (jax.lax.dynamic_index_in_dim(x, layer, keepdims=False) for x in (k_stack, v_stack))

    def masked(q, k_stack, v_stack, k_new, v_new, mask, layout, layer):
        k, v = layer_of(k_stack, v_stack, layer)
        limit = layout.prefix + q.shape[1]
        return cached_flash_attention(q, k, v, mask, name, key_limit=limit)

    def split(q, k_stack, v_stack, k_new, v_new, mask, layout, layer):
        k, v = layer_of(k_stack, v_stack, layer)
        return chunk_attention.split_attention(q, k, v, k_new, v_new, layout, impl)

    def cond(*args):
        layout = args[6]
        return jax.lax.cond(layout.exact, lambda: split(*args), lambda: masked(*args))

    return jax.jit(masked), jax.jit(split), jax.jit(cond)


def parts(impl: AttentionImpl):
    """Each part alone on the slices as they lie (prefix keys from slot 0, the chunk unrotated)."""
    if impl == AttentionImpl.CUDNN:

        def prefix(q, k, v, lengths):
            return cudnn_attention.attention_with_lse(q, k, v, kv_lengths=lengths, causal=False)

        def causal(q, k, v):
            return cudnn_attention.attention_with_lse(q, k, v, kv_lengths=None, causal=True)

        return jax.jit(prefix), jax.jit(causal)
    return jax.jit(chunk_attention.prefix_attention_xla), jax.jit(
        chunk_attention.causal_attention_xla
    )


def time_row(impl, s, t, prefix, n, kv, h, dtype) -> dict:
    q, k_stack, v_stack, k_new, v_new, mask, layout, _ = problem(
        1, s, t, prefix, 0, n, kv, h, dtype
    )
    layer = jnp.int32(1)
    args = (q, k_stack, v_stack, k_new, v_new, mask, layout, layer)
    flops = 4 * n * h * t * (prefix + (t + 1) / 2)
    row = {"prefix": prefix}
    for label, fn in zip(("masked", "split", "cond"), forms(impl)):
        row[label + "_ms"] = 1e3 * timed(fn, *args)
        row[label + "_tflops"] = flops / row[label + "_ms"] / 1e9
    prefix_part, causal_part = parts(impl)
    k1, v1 = k_stack[1], v_stack[1]
    if prefix > 0:
        lengths = jnp.full((1,), prefix, jnp.int32)
        row["prefix_ms"] = 1e3 * timed(prefix_part, q, k1, v1, lengths)
    row["causal_ms"] = 1e3 * timed(causal_part, q, k_new, v_new)
    return row


def error_row(impl, s, t, prefix, pad, n, kv, h, dtype) -> dict:
    q, k_stack, v_stack, k_new, v_new, mask, layout, real = problem(
        2, s, t, prefix, pad, n, kv, h, dtype, seed=1
    )
    f32 = [x.astype(jnp.float32) for x in (q, k_stack[1], v_stack[1])]
    want = np.asarray(dot_product_attention(*f32, mask))[real]
    masked, split, _ = forms(impl)
    args = (q, k_stack, v_stack, k_new, v_new, mask, layout, jnp.int32(1))
    row = {"prefix": prefix, "exact": bool(layout.exact)}
    for label, fn in (("masked", masked), ("split", split)):
        got = np.asarray(fn(*args), np.float32)[real]
        row[label + "_max_abs_err"] = float(np.max(np.abs(got - want)))
    # each part's log-sum-exp against the einsum's, on row 0 (no padding: slots as they lie)
    prefix_part, causal_part = parts(impl)
    q0, k0, v0 = q[:1], k_stack[1, :1], v_stack[1, :1]
    checks = [
        ("causal", causal_part, (q0, k_new[:1], v_new[:1]), chunk_attention.causal_attention_xla)
    ]
    if prefix > 0:
        lengths = jnp.full((1,), prefix, jnp.int32)
        prefix_args = (q0, k0, v0, lengths)
        checks.append(("prefix", prefix_part, prefix_args, chunk_attention.prefix_attention_xla))
    for label, fn, part_args, reference in checks:
        _, lse = fn(*part_args)
        ref_args = [x.astype(jnp.float32) if x.dtype != jnp.int32 else x for x in part_args]
        _, want_lse = reference(*ref_args)
        row[label + "_lse_err"] = float(jnp.max(jnp.abs(lse - want_lse)))
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="CPU: einsum stand-ins, small sizes")
    args = p.parse_args()
    if args.tiny:
        impl, dtype, (n, kv, h) = AttentionImpl.XLA, jnp.float32, (4, 2, 16)
        timing, errors = (256, 64, (0, 64, 192)), (128, 32, (0, 64, 96), 10)
    else:
        impl, dtype, (n, kv, h) = AttentionImpl.CUDNN, jnp.bfloat16, (32, 8, 128)
        timing, errors = (32768, 4096, (0, 8192, 28672)), (4096, 1024, (0, 2048, 3072), 100)
    print(
        f"{jax.devices()[0].device_kind} impl={impl.value} lse_available="
        f"{cudnn_attention.lse_available()}",
        flush=True,
    )
    s, t, prefixes = timing
    rows = []
    for prefix in prefixes:
        rows.append(time_row(impl, s, t, prefix, n, kv, h, dtype))
        print("time", {k: round(v, 3) for k, v in rows[-1].items()}, flush=True)
    s, t, prefixes, pad = errors
    errs = []
    for prefix in prefixes:
        errs.append(error_row(impl, s, t, prefix, pad, n, kv, h, dtype))
        print("error", errs[-1], flush=True)
    write_json(
        "split_attention.json",
        {"env": environment(), "impl": impl.value, "timing": rows, "errors": errs},
    )


if __name__ == "__main__":
    main()
