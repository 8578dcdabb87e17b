"""The decode attention kernels (contiguous cache and paged pool) at serving sizes: exact against
the einsum oracle compiled on the device, and timed with rows' real lengths against the same
call over every slot (what the kernels read before they followed each row's span of seen blocks).

  PYTHONPATH=. python bench/attention_span.py [--rows 256] [--width 2048] [--lengths 128:640]

8x7B heads (32 query, 8 kv, head_dim 128), one layer of a 2-layer pool. For each kernel:
  check   float32, full-precision matmuls: max |kernel - oracle| / max |oracle| over rows of
          random lengths, with NaN written into every block a row does not see (the oracle runs
          over the clean cache): the kernel must neither read them nor differ (<= 1e-5);
  time    bf16, `--rows` rows of lengths uniform in `--lengths` in a cache / table `--width`
          tokens wide (the engine's 2,048-token compiled shape holds the server bench's 640):
          the real mask, and the mask seeing every slot (the old cost); bytes of the seen keys
          and values / time.
Writes $OUT/attention_span.json.

  PYTHONPATH=. JAX_PLATFORMS=cpu python bench/attention_span.py --tiny   # the code path, interpret
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, timed, write_json
from mixtral_jax.kernels import decode_attention, paged_attention
from mixtral_jax.kernels.decode_attention import AttentionTiles
from mixtral_jax.model.attention import dot_product_attention
from mixtral_jax.model.paged_kv_cache import gather_rows, paged_attention_mask

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def _problem(rows: int, width: int, lengths: np.ndarray, dtype, seed: int = 0, block=BLOCK):
    """Random q, a contiguous cache [2, B, S, K, H] and the same keys as a paged pool with a
    shuffled block table (entry r of row b: a distinct block; unused entries: the sink 0)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    entries = width // block
    q = jax.random.normal(keys[0], (rows, HEADS, HEAD_DIM), dtype)
    cache = [jax.random.normal(k, (2, rows, width, KV_HEADS, HEAD_DIM), dtype) for k in keys[1:]]
    used = (lengths + 1 + block - 1) // block  # the new token sits at index lengths[b]
    order = np.random.default_rng(seed).permutation(np.arange(1, rows * entries + 1))
    table = np.zeros((rows, entries), np.int32)
    flat = np.zeros((rows * entries + 1,), np.int64)  # pool block -> (row, entry) it holds
    for b in range(rows):
        table[b, : used[b]] = order[b * entries : b * entries + used[b]]
        flat[table[b, : used[b]]] = b * entries + np.arange(used[b])
    pools = [
        jnp.concatenate(
            [
                jnp.zeros((2, 1, block, KV_HEADS, HEAD_DIM), dtype),
                c.reshape(2, rows * entries, block, KV_HEADS, HEAD_DIM)[:, flat[1:]],
            ],
            axis=1,
        )
        for c in cache
    ]
    mask = paged_attention_mask(
        jnp.asarray(lengths, jnp.int32), 1, jnp.ones((rows, 1), bool), width, None
    )[:, 0]
    return q, cache, pools, jnp.asarray(table), mask


def check(rows: int, width: int, lengths: np.ndarray, interpret: bool) -> dict:
    q, cache, pools, table, mask = _problem(rows, width, lengths, jnp.float32, seed=1)
    # NaN in the kernel's blocks (of S) that hold no seen key: those it must never read
    block = decode_attention._blocks(width, rows * KV_HEADS)[0]
    seen_blocks = jnp.any(mask.reshape(rows, width // block, block), axis=2)
    unseen = jnp.repeat(~seen_blocks, block, axis=1)  # [B, S]
    dirty = [jnp.where(unseen[None, :, :, None, None], jnp.nan, c) for c in cache]
    with jax.default_matmul_precision("highest"):
        want = dot_product_attention(q[:, None], cache[0][1], cache[1][1], mask[:, None])[:, 0]
        got_c = jax.jit(
            lambda q, k, v, m: decode_attention.decode_attention(q, k, v, 1, m, interpret=interpret)
        )(q, *dirty, mask)
        # the paged pool: NaN in the sink, which every unused entry names
        dirty_p = [p.at[:, 0].set(jnp.nan) for p in pools]
        got_p = jax.jit(
            lambda q, k, v, t, m: paged_attention.paged_decode_attention(
                q, k, v, 1, t, m, interpret=interpret
            )
        )(q, *dirty_p, table, mask)
        rows_k = gather_rows(pools[0], jnp.int32(1), table)
        want_p = dot_product_attention(
            q[:, None], rows_k, gather_rows(pools[1], 1, table), mask[:, None]
        )[:, 0]
    scale = float(jnp.max(jnp.abs(want)))
    out = {
        "contiguous_rel_err": float(jnp.max(jnp.abs(got_c - want))) / scale,
        "paged_rel_err": float(jnp.max(jnp.abs(got_p - want_p))) / scale,
        "paged_oracle_vs_contiguous": float(jnp.max(jnp.abs(want_p - want))) / scale,
    }
    out["ok"] = out["contiguous_rel_err"] <= 1e-5 and out["paged_rel_err"] <= 1e-5
    return out


# (pool block Z, tiles) of the paged kernel and tiles of the contiguous one, timed by --sweep
PAGED_SWEEP = [
    (16, AttentionTiles(blocks_per_step=1)),
    (16, AttentionTiles(blocks_per_step=2)),
    (16, AttentionTiles(blocks_per_step=4)),
    (16, AttentionTiles(blocks_per_step=8)),
    (16, AttentionTiles(blocks_per_step=4, num_stages=3)),
    (16, AttentionTiles(blocks_per_step=4, num_warps=2)),
    (16, AttentionTiles(blocks_per_step=4, programs=8192)),
    (32, AttentionTiles(blocks_per_step=1)),
    (32, AttentionTiles(blocks_per_step=2)),
    (32, AttentionTiles(blocks_per_step=4)),
    (64, AttentionTiles(blocks_per_step=1)),
    (64, AttentionTiles(blocks_per_step=2)),
    (64, AttentionTiles(blocks_per_step=1, programs=8192)),
]
CONTIGUOUS_SWEEP = [
    AttentionTiles(),
    AttentionTiles(num_stages=1),
    AttentionTiles(num_stages=3),
    AttentionTiles(max_block=64),
    AttentionTiles(max_block=64, num_stages=3),
    AttentionTiles(max_block=32),
    AttentionTiles(programs=8192),
    AttentionTiles(max_block=64, programs=8192),
    AttentionTiles(num_warps=8),
]


def _row(tiles: AttentionTiles, real: float, kv_bytes: int, **extra) -> dict:
    return {
        **extra,
        **tiles._asdict(),
        "us": round(real * 1e6, 2),
        "seen_kv_tbs": round(kv_bytes / real / 1e12, 3),
    }


def time_kernels(rows: int, width: int, lengths: np.ndarray, interpret: bool, sweep: bool) -> dict:
    q, cache, pools, table, mask = _problem(rows, width, lengths, jnp.bfloat16)
    full = jnp.ones_like(mask)
    seen_tokens = int(np.sum(lengths + 1))
    kv_bytes = seen_tokens * KV_HEADS * HEAD_DIM * 2 * 2  # k and v, bf16
    out = {"seen_tokens": seen_tokens, "kv_bytes_seen": kv_bytes}
    reps = 2 if interpret else 50

    def contiguous(tiles):
        return jax.jit(
            lambda q, k, v, m: decode_attention.decode_attention(
                q, k, v, 1, m, tiles=tiles, interpret=interpret
            )
        )

    def paged(tiles):
        return jax.jit(
            lambda q, k, v, t, m: paged_attention.paged_decode_attention(
                q, k, v, 1, t, m, tiles=tiles, interpret=interpret
            )
        )

    # the defaults with the real mask, and over every slot (the cost before spans)
    for name, fn, args in (
        ("contiguous", contiguous(decode_attention.DECODE_TILES), (q, cache[0], cache[1])),
        ("paged", paged(paged_attention.PAGED_TILES), (q, pools[0], pools[1], table)),
    ):
        real = timed(fn, *args, mask, repeats=reps)
        every = timed(fn, *args, full, repeats=reps)
        out[name] = {
            "real_mask_us": real * 1e6,
            "every_slot_us": every * 1e6,
            "seen_kv_tbs": kv_bytes / real / 1e12,
            "every_slot_kv_tbs": rows * width * KV_HEADS * HEAD_DIM * 4 / every / 1e12,
        }
        print(name, {k: round(v, 2) for k, v in out[name].items()}, flush=True)
    if not sweep:
        return out
    out["contiguous_sweep"] = []
    for tiles in CONTIGUOUS_SWEEP:
        real = timed(contiguous(tiles), q, cache[0], cache[1], mask, repeats=reps)
        out["contiguous_sweep"].append(_row(tiles, real, kv_bytes))
        print("contiguous", out["contiguous_sweep"][-1], flush=True)
    out["paged_sweep"] = []
    del pools, table
    for block in sorted({z for z, _ in PAGED_SWEEP}):
        _, _, pools, table, mask_z = _problem(rows, width, lengths, jnp.bfloat16, block=block)
        for z, tiles in PAGED_SWEEP:
            if z != block:
                continue
            fn = paged(tiles)
            real = timed(fn, q, pools[0], pools[1], table, mask_z, repeats=reps)
            out["paged_sweep"].append(_row(tiles, real, kv_bytes, block_size=z))
            print("paged", out["paged_sweep"][-1], flush=True)
        del pools
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--lengths", default="128:640", help="low:high tokens cached per row")
    p.add_argument("--tiny", action="store_true", help="CPU interpret mode, small sizes")
    p.add_argument("--sweep", action="store_true", help="also time the tiles of *_SWEEP")
    args = p.parse_args()
    low, high = (int(v) for v in args.lengths.split(":"))
    rows, width = (4, 256) if args.tiny else (args.rows, args.width)
    if args.tiny:
        low, high = 10, 200
    rng = np.random.default_rng(0)
    result = {"env": environment(), "config": vars(args)}
    check_lengths = rng.integers(0, min(width - 1, 2 * high), size=min(rows, 32))
    result["check"] = check(len(check_lengths), width, check_lengths, args.tiny)
    print("check", result["check"], flush=True)
    lengths = rng.integers(low, high + 1, size=rows)
    result["time"] = time_kernels(rows, width, lengths, args.tiny, args.sweep)
    write_json("attention_span.json", result)
    if not result["check"]["ok"]:
        raise SystemExit("a kernel differs from the oracle: see check")


if __name__ == "__main__":
    main()
