"""Does this JAX's cuDNN attention return the log-sum-exp, in which layout, with fewer kv heads?

  python3 bench/cudnn_lse_probe.py      # on an NVIDIA GPU; prints one JSON line per case

For q [B, T, N, H], k and v [B, S, K, H] (K < N: grouped), bf16: cuDNN through
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(..., return_residual=True)`
against a float32 einsum reference, for no mask with `kv_seqlen` (keys past it skipped) and for
the causal mask (top-left aligned, T == S). Prints the residual's shape and its largest
difference from the reference's natural-log log-sum-exp in the layouts BNT and BTN.
"""

from __future__ import annotations

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np


def reference(q, k, v, allowed):
    """float32 out [B, T, N, H] and lse [B, N, T] (natural log, logits scaled by H**-0.5)."""
    _, _, n, h = q.shape
    g = n // k.shape[2]
    kk = jnp.repeat(k, g, axis=2).astype(jnp.float32)
    vv = jnp.repeat(v, g, axis=2).astype(jnp.float32)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), kk) * h**-0.5
    logits = jnp.where(allowed[:, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), vv)
    return out, lse


def main():
    from jax._src.cudnn import fused_attention_stablehlo as fa

    print(
        json.dumps(
            {"jax": jax.__version__, "signature": str(inspect.signature(fa.dot_product_attention))}
        )
    )
    rng = np.random.default_rng(0)
    b, t, s, n, kh, h = 2, 256, 1024, 8, 2, 128
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.bfloat16)
    cases = []
    limit = 700
    allowed = jnp.broadcast_to(jnp.arange(s)[None, None, :] < limit, (b, t, s))
    cases.append(("no_mask_kv_seqlen", q, k, v, allowed, fa.MaskType.PADDING, limit))
    allowed_c = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))
    cases.append(("causal", q, k[:, :t], v[:, :t], allowed_c, fa.MaskType.CAUSAL, None))
    for name, q_, k_, v_, allowed_, mask_type, kv_len in cases:
        lengths = {}
        if kv_len is not None:
            lengths["q_seqlen"] = jnp.full((b,), q_.shape[1], jnp.int32)
            lengths["kv_seqlen"] = jnp.full((b,), kv_len, jnp.int32)

        def attend(q_, k_, v_, lengths, mask_type=mask_type):
            return fa.dot_product_attention(
                q_,
                k_,
                v_,
                **lengths,
                scale=h**-0.5,
                mask_type=mask_type,
                qkv_layout="BTNH",
                return_residual=True,
            )

        try:
            out, lse = jax.jit(attend)(q_, k_, v_, lengths)
        except Exception as err:  # noqa: BLE001 - the probe reports whatever fails
            print(json.dumps({"case": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}))
            continue
        ref_out, ref_lse = reference(q_, k_, v_, allowed_)
        row = {"case": name, "lse_shape": list(lse.shape), "lse_dtype": str(lse.dtype)}
        row["out_err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out)))
        lse = lse.astype(jnp.float32)
        if lse.shape == ref_lse.shape:
            row["lse_err_BNT"] = float(jnp.max(jnp.abs(lse - ref_lse)))
            row["lse_err_BNT_log2"] = float(jnp.max(jnp.abs(lse - ref_lse / np.log(2))))
        if lse.shape == (b, t, n):
            row["lse_err_BTN"] = float(jnp.max(jnp.abs(lse - ref_lse.transpose(0, 2, 1))))
        row["lse_sample"] = [float(lse.reshape(-1)[0]), float(ref_lse.reshape(-1)[0])]
        print(json.dumps(row))


if __name__ == "__main__":
    main()
