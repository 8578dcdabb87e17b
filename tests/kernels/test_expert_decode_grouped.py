"""The grouped-rows decode experts (expert_decode_grouped.py, 65-512 tokens), run through Pallas'
interpreter on CPU against the oracles: `moe_local.moe_dense` in float32; for bfloat16 and
quantized stacks the same products of bfloat16 tokens and the float32 (dequantized) weights,
summed in float32 with h rounded to bfloat16 where the kernels round it. Balanced, unbalanced
(all rows on one or two experts, chunks overflowing R) and k = 1 routing; the plan's choice of
kernel by token count; the model's cached call through the kernel against the full forward.
The GPU run of the same kernels is bench/expert_decode_grouped.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.config import DecodeExpertImpl, QuantizedImpl
from mixtral_jax.kernels import decode_matmul, quant
from mixtral_jax.kernels import expert_decode_grouped as grouped
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.kernels.common import group_positions
from mixtral_jax.kernels.plan import NVIDIA_GPU, resolve
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops

D, F = 32, 64


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _stacks(key, layers, e, dtype, bits=16, group=None):
    """[L, E, D, F] x2 and [L, E, F, D] stacks in `dtype`, or quantized to `bits`."""
    keys = jax.random.split(key, 3)
    ws = [
        0.3 * jax.random.normal(k, (layers, e) + s) for k, s in zip(keys, ((D, F),) * 2 + ((F, D),))
    ]
    if bits == 16:
        return [w.astype(dtype) for w in ws]
    scale_dtype = jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32
    return [quant.quantize(w, bits, group, scale_dtype) for w in ws]


def _routing(key, m, e, topk, only=None):
    """Random top-k routing; `only`: every token chooses among those experts (the rest unused)."""
    logits = jax.random.normal(key, (m, e))
    if only is not None:
        logits = jnp.where(jnp.isin(jnp.arange(e), jnp.asarray(only)), logits + 50.0, logits)
    return moe_ops.route_logits(logits, topk)


def _oracle(x, routing, stacks, layer):
    """Float32 tokens: moe_dense over the (dequantized) float32 layer. bfloat16 tokens: each
    token's chosen experts in float32 from bfloat16 x, h rounded to bfloat16 as the kernels do."""
    w = [
        s[layer].dequantize() if isinstance(s, quant.QuantizedWeight) else s[layer] for s in stacks
    ]
    w = [a.astype(jnp.float32) for a in w]
    if x.dtype == jnp.float32:
        return moe_local.moe_dense(x, routing, *w)[0]
    experts = routing.experts

    def dot(a, b):  # [M, k, K] @ [M, k, K, N] in float32
        return jnp.einsum("mjk,mjkn->mjn", a.astype(jnp.float32), b)

    xs = jnp.broadcast_to(x[:, None], (*experts.shape, x.shape[1]))  # [M, k, D]
    gate, up = dot(xs, w[0][experts]), dot(xs, w[1][experts])  # [M, k, F]
    h = (gate / (1.0 + jnp.exp(-gate)) * up).astype(jnp.bfloat16)
    return jnp.einsum("mj,mjd->md", routing.weights, dot(h, w[2][experts]))


_run = jax.jit(
    lambda x, ex, wt, *w, rows=None: grouped.decode_experts_grouped(
        x, ex, wt, *w, layer=1, rows=rows, interpret=True
    ),
    static_argnames="rows",
)


@pytest.mark.parametrize(
    "m,e,topk,dtype,only,rows",
    [
        (65, 8, 2, jnp.float32, None, None),  # just past the all-rows kernel: R = 32, C = 3
        (100, 4, 2, jnp.float32, None, None),  # every expert ~50 rows: R = 64, some overflow
        (128, 8, 1, jnp.float32, None, None),  # k = 1
        (256, 8, 2, jnp.bfloat16, None, None),  # the batch-256 step's shape: R = 128, C = 2
        (256, 8, 1, jnp.float32, (3,), None),  # every token on expert 3: 2 full chunks of 128
        (100, 8, 2, jnp.bfloat16, (2, 6), None),  # two experts of 100 rows, six unused
        (100, 4, 2, jnp.float32, (0,), 16),  # R = 16: expert 0 in 7 chunks, the others spread
    ],
)
def test_grouped_kernels_equal_the_oracle(m, e, topk, dtype, only, rows):
    keys = jax.random.split(jax.random.key(m + e + topk), 3)
    x = jax.random.normal(keys[0], (m, D), dtype)
    routing = _routing(keys[1], m, e, topk, only)
    stacks = _stacks(keys[2], 2, e, dtype)
    got = _run(x, routing.experts, routing.weights, *stacks, rows=rows)
    assert got.shape == (m, D) and got.dtype == jnp.float32
    assert _rel(got, _oracle(x, routing, stacks, 1)) <= (1e-5 if dtype == jnp.float32 else 2e-3)


@pytest.mark.parametrize(
    "m,bits,group,dtype",
    [
        (100, 8, None, jnp.float32),  # one scale per output channel
        (256, 4, 16, jnp.bfloat16),  # int4, 2 groups over D, 4 over F; bf16 codes and scales
        (65, 8, 16, jnp.bfloat16),
        (48, 4, 16, jnp.bfloat16),  # the plan's int4 choice at 33-64 tokens: R = 16, C = 3
    ],
)
def test_quantized_stacks_equal_the_dequantize_then_matmul_oracle(m, bits, group, dtype):
    keys = jax.random.split(jax.random.key(m * bits), 3)
    x = jax.random.normal(keys[0], (m, D), dtype)
    routing = _routing(keys[1], m, 8, 2, only=(1, 4, 5) if bits == 4 else None)
    stacks = _stacks(keys[2], 2, 8, dtype, bits, group)
    rows = grouped.MIN_ROWS if m <= kernel_plan.MAX_DECODE_TOKENS else None
    got = _run(x, routing.experts, routing.weights, *stacks, rows=rows)
    assert _rel(got, _oracle(x, routing, stacks, 1)) <= (1e-5 if dtype == jnp.float32 else 2e-3)


def test_slots_hold_each_experts_rows_in_chunks_in_token_order():
    """5 tokens, k = 2, 3 experts, R = 2 (C = 3): expert 0 is chosen by tokens 0, 2, 3 (2
    chunks), expert 1 by 0, 1, 4 (2 chunks), expert 2 by 1, 2, 3, 4 (2 chunks)."""
    experts = jnp.asarray([[0, 1], [2, 1], [0, 2], [2, 0], [1, 2]], jnp.int32)
    weights = jnp.arange(10, dtype=jnp.float32).reshape(5, 2) / 10
    slot_expert, active, token, combine, where = grouped.grouped_slots(experts, weights, 3, 2)
    assert slot_expert.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert active.tolist() == [1, 1, 0, 1, 1, 0, 1, 1, 0]
    pad = 5
    assert token.tolist() == [[0, 2], [3, pad], [pad, pad], [0, 1], [4, pad], [pad, pad],
                              [1, 2], [3, 4], [pad, pad]]  # fmt: skip
    np.testing.assert_allclose(combine[:2], [[0.0, 0.4], [0.7, 0.0]])
    flat_token = token.reshape(-1)[where]  # each assignment's slot row holds its token
    np.testing.assert_array_equal(flat_token, np.broadcast_to(np.arange(5)[:, None], (5, 2)))
    np.testing.assert_allclose(combine.reshape(-1)[where], weights)


def test_rows_follow_the_mean_rows_per_expert_and_bad_input_is_one_line():
    assert [grouped.chunk_rows(m, 2, 8) for m in (65, 128, 200, 256, 512)] == [32, 64, 64, 128, 128]
    assert grouped.chunk_rows(256, 1, 8) == 64 and grouped.chunk_rows(100, 2, 2) == 128
    assert grouped.chunk_rows(20, 2, 2) == 32  # no more than the tokens need
    gate_up, down = grouped.default_tiles(128)
    assert (gate_up.block_n, gate_up.num_warps, down.block_n) == (128, 8, 128)  # the H200 best
    for rows, tiles, streams in (
        (128, gate_up, 2),
        (128, down, 1),
        (32, grouped.default_tiles(32)[0], 2),
    ):
        regs = rows * tiles.block_n * streams / (32 * tiles.num_warps)
        assert regs <= grouped.ACCUMULATOR_REGISTERS
    stacks = _stacks(jax.random.key(0), 1, 4, jnp.float32)
    with pytest.raises(ValueError, match="at most 512 tokens, got 513"):
        grouped.decode_experts_grouped(
            jnp.zeros((513, D)), jnp.zeros((513, 2), jnp.int32), jnp.zeros((513, 2)), *stacks
        )
    with pytest.raises(ValueError, match=r"rows=48 must be a power of two in \[16, 128\]"):
        grouped.decode_experts_grouped(
            jnp.zeros((80, D)), jnp.zeros((80, 2), jnp.int32), jnp.zeros((80, 2)), *stacks, rows=48
        )


def test_the_plan_picks_the_kernel_by_token_count():
    cfg = mj.ModelConfig.tiny(dtype="bfloat16", param_dtype="bfloat16")  # E = 4, k = 2

    def choice(tokens, cfg=cfg, cached=True):
        plan = resolve(cfg, tokens, cached=cached, where=NVIDIA_GPU)
        return plan.decode_experts, plan.decode_expert_rows

    pallas, off = DecodeExpertImpl.PALLAS, DecodeExpertImpl.OFF
    assert choice(64) == (pallas, 0)  # every slot computes all tokens (expert_decode.py)
    assert choice(65) == (pallas, 64)  # grouped: 65 * 2 / 4 = 32.5 rows per expert, R = 64
    assert choice(256) == (pallas, 128)
    assert choice(512) == (pallas, 128)
    assert choice(513) == (off, 0)  # the sorted grouped matmul
    assert choice(256, cached=False) == (off, 0)
    explicit = cfg.replace(decode_expert_impl="pallas")
    assert choice(256, explicit) == (pallas, 128) and choice(513, explicit) == (off, 0)
    assert choice(65, cfg.replace(decode_expert_impl="gather")) == (off, 0)  # M*k matrices
    assert "decode_expert_rows=128" in repr(resolve(cfg, 256, cached=True, where=NVIDIA_GPU))
    int4 = resolve(
        cfg.replace(expert_bits=4, quant_group_size=32), 256, cached=True, where=NVIDIA_GPU
    )  # the grouped kernels read the codes in place, as the all-rows ones do
    assert (int4.decode_expert_rows, int4.quantized_experts) == (128, QuantizedImpl.PALLAS)
    for bits, group in ((4, 32), (8, None)):  # int4 from 33 tokens in chunks of 16 (measured)
        quantized = cfg.replace(expert_bits=bits, quant_group_size=group)
        want = {32: 0, 33: 16 if bits == 4 else 0, 64: 16 if bits == 4 else 0, 65: 64}
        assert {m: choice(m, quantized)[1] for m in want} == want
    cpu = resolve(mj.ModelConfig.tiny(), 256, cached=True, where="cpu")
    assert (cpu.decode_experts, cpu.decode_expert_rows) == (off, 0)


def test_cached_call_of_many_tokens_through_the_grouped_kernel_equals_the_full_forward(
    monkeypatch,
):
    """extend() with the GPU choice forced (kernels interpreted): a 2 x 40 prefill (80 tokens)
    runs every layer's MoE through decode_experts_grouped on the whole expert stacks at its
    layer, and its projections and router through decode_matmul in row tiles (64 + 16); the
    logits equal the full forward's."""
    calls, projected = [], []
    real, real_projection = grouped.decode_experts_grouped, decode_matmul.project_stacked

    def interpreted(x, experts, weights, w_gate, *rest, **kw):
        calls.append((x.shape[0], w_gate.shape[0], kw["rows"]))
        return real(x, experts, weights, w_gate, *rest, **kw, interpret=True)

    def interpreted_projection(x, stacks, layer, **kw):
        projected.append((x.shape[0], stacks[0].shape[0]))
        return real_projection(x, stacks, layer, **kw, interpret=True)

    cfg = mj.ModelConfig.tiny(moe_impl="dropless")  # float32: attention stays XLA
    model = mj.init(cfg, 2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, (2, 40)))
    valid = jnp.ones((2, 40), bool)
    positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
    full = model(tokens, valid.astype(jnp.int32), positions=positions).logits
    monkeypatch.setattr(kernel_plan, "platform", lambda: NVIDIA_GPU)
    monkeypatch.setattr(grouped, "decode_experts_grouped", interpreted)
    monkeypatch.setattr(decode_matmul, "project_stacked", interpreted_projection)
    graphdef, state = nnx.split(model)
    extend = jax.jit(
        lambda s, t, c, p, v: nnx.merge(graphdef, s).extend(t, c, positions=p, valid=v)
    )
    out, _ = extend(state, tokens, KVCache.create(cfg, 2, 48), positions, valid)
    assert _rel(out.logits, full) <= 1e-5
    assert set(calls) == {(80, cfg.num_layers, 64)}  # whole stacks [L, ...]; R = 64 for E = 4
    assert set(projected) == {(80, cfg.num_layers)}  # q/k/v, o and the router, whole stacks


@pytest.mark.parametrize("m,k,e", [(1, 2, 8), (7, 2, 8), (256, 2, 8), (64, 1, 4), (33, 3, 16)])
def test_group_positions_equal_the_stable_sorts_rank(m, k, e):
    """The running count equals the obvious definition: the stable sort's rank of each
    assignment minus its expert's first sorted row (skewed routing: some experts unused)."""
    scores = jax.random.normal(jax.random.key(m * e), (m, e)) + jnp.arange(e) * 0.4
    experts = jax.lax.top_k(scores, k)[1].astype(jnp.int32)  # distinct within a token
    flat = np.asarray(experts).reshape(-1)
    order = np.argsort(flat, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(flat.size)
    starts = np.cumsum(np.bincount(flat, minlength=e)) - np.bincount(flat, minlength=e)
    want = (rank - starts[flat]).reshape(m, k)
    got = np.asarray(jax.jit(group_positions, static_argnums=1)(experts, e))
    assert got.tolist() == want.tolist()
