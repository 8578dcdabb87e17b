"""Cached generation: equals the full forward, equals transformers' greedy generate, sampling."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import make_hf_model, ours_from_hf, torch

import mixtral_jax as mj
from mixtral_jax.config import ConfigError
from mixtral_jax.generate import Generator, SamplingParams, sample
from mixtral_jax.generate.sampler import left_pad, prompt_width
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.model.kv_cache import KVCache


@pytest.mark.parametrize(
    "window,cache_size",
    [(None, 24), (4, 4), (6, 24)],
    ids=["full", "rolling-window", "window-big-cache"],
)
def test_cached_decoding_equals_full_forward_at_every_step(window, cache_size):
    cfg = mj.ModelConfig.tiny(sliding_window=window)
    model = mj.init(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 16)))
    # Row 1 is left-padded by 3: positions follow its real tokens, padding is never attended.
    valid = jnp.ones((2, 16), bool).at[1, :3].set(False)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    full = model(tokens, valid.astype(jnp.int32), positions=positions).logits
    graphdef, state = nnx.split(model)
    extend = jax.jit(
        lambda s, t, c, p, v: nnx.merge(graphdef, s).extend(t, c, positions=p, valid=v)
    )
    cache = KVCache.create(cfg, 2, cache_size)
    out, cache = extend(state, tokens[:, :7], cache, positions[:, :7], valid[:, :7])
    steps = [out.logits[:, 3:]]  # row 1's padded queries carry no meaning: compare from 3 on
    reference = [full[:, 3:7]]
    for t in range(7, 16):
        out, cache = extend(
            state, tokens[:, t : t + 1], cache, positions[:, t : t + 1], valid[:, t : t + 1]
        )
        steps.append(out.logits)
        reference.append(full[:, t : t + 1])
    got, want = jnp.concatenate(steps, axis=1), jnp.concatenate(reference, axis=1)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) <= 1e-5


def test_chunks_of_several_tokens_on_a_wrapped_rolling_buffer_equal_the_full_forward():
    """Window 4, buffer 4: a chunk of 3 or 5 new tokens on a wrapped buffer would evict keys its
    first queries still see if it were written before attending (S < W + T - 1)."""
    cfg = mj.ModelConfig.tiny(sliding_window=4)
    model = mj.init(cfg, 2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, (1, 16)))
    positions = jnp.arange(16)[None]
    full = model(tokens, jnp.ones((1, 16), jnp.int32), positions=positions).logits
    graphdef, state = nnx.split(model)
    extend = jax.jit(
        lambda s, t, c, p: nnx.merge(graphdef, s).extend(
            t, c, positions=p, valid=jnp.ones(t.shape, bool)
        )
    )
    cache, got = KVCache.create(cfg, 1, 4), []
    for start, end in ((0, 7), (7, 10), (10, 11), (11, 16)):  # T = 7 (> S), 3, 1, 5
        out, cache = extend(state, tokens[:, start:end], cache, positions[:, start:end])
        got.append(out.logits)
    got = jnp.concatenate(got, axis=1)
    assert float(jnp.max(jnp.abs(got - full)) / jnp.max(jnp.abs(full))) <= 1e-5


@pytest.mark.parametrize("window", [None, 6], ids=["no-window", "window"])
def test_greedy_generation_equals_transformers_generate(window):
    cfg = mj.ModelConfig.tiny(sliding_window=window, max_seq_len=128)
    hf = make_hf_model(cfg, seed=3, std=0.2)
    ours = ours_from_hf(hf, cfg)
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(3, cfg.vocab_size, n))) for n in (5, 11, 3)]
    result = Generator(ours).generate(prompts, max_new_tokens=32, eos_id=cfg.eos_token_id)

    width = max(map(len, prompts))
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for row, prompt in enumerate(prompts):  # left padding, as transformers expects
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    with torch.no_grad():
        generated = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
        )
    expected = []
    for row in generated[:, width:].numpy().tolist():
        expected.append(row[: row.index(cfg.eos_token_id)] if cfg.eos_token_id in row else row)
    assert result.tokens == expected
    assert sum(map(len, expected)) > 40  # a real comparison, not three early EOS


def _generate(model, sampling, seed, prompts=([1, 7, 9], [1, 4])):
    return (
        Generator(model)
        .generate(list(prompts), max_new_tokens=12, sampling=sampling, seed=seed, eos_id=None)
        .tokens
    )


def test_sampling_is_reproducible_and_filters_reduce_to_greedy():
    model = mj.init(mj.ModelConfig.tiny(), 0)
    greedy = _generate(model, SamplingParams(), 0)
    hot = SamplingParams(temperature=1.5)
    assert _generate(model, hot, 5) == _generate(model, hot, 5)
    assert _generate(model, hot, 5) != _generate(model, hot, 6)
    assert _generate(model, SamplingParams(temperature=1.0, top_p=1e-6), 3) == greedy
    assert _generate(model, SamplingParams(temperature=1.0, top_k=1), 4) == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda p: np.asarray(jax.vmap(lambda k: sample(logits, k, p)[0])(keys))
    assert set(draw(SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.75))) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.85))) == {0, 1, 2}


def _expected_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The exact next-token distribution the settings define: softmax(logits / T), cut to the
    top_k most probable, then to the smallest most-probable set holding top_p of the mass (a
    token is kept while the mass before it is < top_p), renormalised."""
    z = logits / params.temperature
    if params.top_k:
        z = np.where(z < np.sort(z)[-params.top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, bool)
        keep[order] = before < params.top_p
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=2.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.8, top_k=4, top_p=0.9),
    ],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}",
)
def test_sampling_frequencies_match_the_exact_distribution(params):
    """40,000 draws (fixed seed) over 6 tokens: each token's frequency within 5 standard errors
    (sqrt(p(1-p)/n)) of its exact probability, and a filtered-out token is never drawn. Ignoring
    the temperature, or sampling uniformly over the kept tokens, misses by 10+ errors."""
    logits = np.array([2.0, 1.2, 0.9, 0.1, -0.5, -1.4], np.float32)
    n = 40_000
    keys = jax.random.split(jax.random.key(1), n)
    draws = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(logits)[None], k, params)[0]))(keys)
    freq = np.bincount(np.asarray(draws), minlength=len(logits)) / n
    want = _expected_probs(logits.astype(np.float64), params)
    tolerance = 5 * np.sqrt(want * (1 - want) / n)
    np.testing.assert_array_less(np.abs(freq - want), tolerance + 1e-12)
    assert np.all(freq[want == 0] == 0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -0.1}, "temperature=-0.1 must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature=inf must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature=nan must be a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k=-1 must be an integer >= 0"),
    ],
)
def test_bad_sampling_values_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


def test_empty_prompt_and_too_long_requests_are_refused():
    model = mj.init(mj.ModelConfig.tiny(max_seq_len=32), 0)
    generator = Generator(model)
    with pytest.raises(ConfigError, match="empty prompt"):
        generator.generate([[1, 2], []], max_new_tokens=4, eos_id=2)
    with pytest.raises(
        ConfigError,
        match="prompt of 20 tokens \\+ max_new_tokens=13 = 33 "
        "exceeds the model's context of 32 tokens",
    ):
        generator.generate([[1] * 20], max_new_tokens=13, eos_id=2)


def test_prompt_lengths_share_a_bucket_and_do_not_recompile():
    generator = Generator(mj.init(mj.ModelConfig.tiny(), 0))
    first = generator.generate([[1, 5, 6]], max_new_tokens=8, eos_id=None)
    compiled = generator._prefill._cache_size(), generator._decode._cache_size()
    for prompt in ([1] * 9, [1, 2] * 8, [3] * 14):  # 9, 16, 14 tokens: all in the 16 bucket
        result = generator.generate([prompt], max_new_tokens=8, eos_id=None)
        assert result.prompt_bucket == first.prompt_bucket == 16
    assert (generator._prefill._cache_size(), generator._decode._cache_size()) == compiled
    assert generator.generate([[1] * 17], max_new_tokens=8, eos_id=None).prompt_bucket == 32


def _instructions(hlo: str) -> dict[str, tuple[str, str, list[str]]]:
    """Every instruction of an HLO module's text: name -> (result shape, opcode, operands)."""
    found = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? ([\w-]+)\((.*?)\)", line)
        if match:
            name, shape, opcode, operands = match.groups()
            found[name] = (shape, opcode, re.findall(r"%([\w.-]+)", operands))
    return found


def test_decode_writes_the_donated_cache_in_place():
    """The compiled decode call (cache donated) writes each layer's new slot into the cache
    buffers: the only instructions with the whole cache's shape [L, B, S, K, H] are the
    parameters and dynamic-update-slices of one slot per row (and fusions around those); no
    copy, concatenation or per-layer stacking of the cache, and the cache aliases the output."""
    cfg = mj.ModelConfig.tiny(vocab_size=64, embed_dim=32, hidden_dim=32)
    generator = Generator(mj.abstract(cfg), chunk=2)  # compiled only: shapes suffice
    batch, size = 2, 24
    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, size))
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    done = jax.ShapeDtypeStruct((batch,), bool)
    hlo = (
        generator._decode.lower(
            generator.state,
            cache,
            rows,
            rows,
            done,
            jax.random.key(0),
            0,
            sampling=SamplingParams(),
            steps=2,
        )
        .compile()
        .as_text()
    )
    ops = _instructions(hlo)
    whole = f"f32[{cfg.num_layers},{batch},{size},{cfg.num_kv_heads},{cfg.head_dim}]"
    one_slot = f"f32[1,{batch},1,{cfg.num_kv_heads},{cfg.head_dim}]"
    cache_ops = {name: op for name, op in ops.items() if op[0] == whole}
    assert sorted({opcode for _, opcode, _ in cache_ops.values()}) == [
        "dynamic-update-slice",
        "fusion",
        "get-tuple-element",
        "parameter",
    ]
    updates = [
        ops[operands[1]][0]
        for _, opcode, operands in cache_ops.values()
        if opcode == "dynamic-update-slice"
    ]
    # k and v, once per layer the compiled scan body holds (the plan's unroll: 1 on CPU)
    unrolled = min(
        kernel_plan.resolve(cfg, batch, cached=True, queries=1).extend_unroll, cfg.num_layers
    )
    assert len(updates) == 2 * unrolled and set(updates) == {one_slot}
    parameters = re.findall(r"parameter\((\d+)\), metadata=\{op_name=\"cache\.[kv]\"", hlo)
    aliased = re.search(r"input_output_alias=\{(.*?) \}, entry_computation_layout", hlo).group(1)
    assert len(parameters) == 2 and all(f"({p}, {{}}, may-alias)" in aliased for p in parameters)


def _long_prompts(cfg, lengths, seed=4):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(3, cfg.vocab_size, n))) for n in lengths]


@pytest.mark.parametrize(
    "window,cache_size",
    [(None, 336), (40, 336), (100, 336), (100, 100), (40, 40)],
    ids=["no-window", "window-inside-chunk", "window-across-chunks", "rolling", "rolling-lt-chunk"],
)
def test_chunked_prefill_equals_one_shot_prefill_and_the_full_forward(window, cache_size):
    """Prompts of 300 and 230 tokens (left-padded to 320) in chunks of 64: logits at every real
    position equal the one-shot prefill and the full forward, and greedy generation continues
    with the same tokens. Windows of 40 (< the chunk: a query's window crosses into the previous
    chunk) and 100 (spanning chunks), on a big cache and on rolling buffers of W slots (read
    first: W < W + C - 1)."""
    cfg = mj.ModelConfig.tiny(sliding_window=window, max_seq_len=512)
    model = mj.init(cfg, 5)
    prompts = _long_prompts(cfg, (300, 230))
    chunked, one_shot = Generator(model, prefill_chunk=64), Generator(model, prefill_chunk=512)
    tokens, valid = left_pad(prompts, prompt_width(300, 64))
    assert tokens.shape[1] == 320  # 5 chunks
    got, _, got_pos, _ = chunked.prefill(tokens, valid, cache_size, all_logits=True)
    want, _, want_pos, _ = one_shot.prefill(tokens, valid, cache_size, all_logits=True)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    full = model(jnp.asarray(tokens), jnp.asarray(valid, jnp.int32), positions=positions).logits
    real = np.asarray(valid)
    got, want, full = (np.asarray(x)[real] for x in (got, want, full))
    scale = np.abs(full).max()
    assert np.abs(got - full).max() / scale <= 1e-5
    assert np.abs(got - want).max() / scale <= 1e-5
    np.testing.assert_array_equal(np.asarray(got_pos), np.asarray(want_pos))
    new = [g.generate(prompts, max_new_tokens=12, eos_id=None).tokens for g in (chunked, one_shot)]
    assert new[0] == new[1]
    assert chunked._prefill._cache_size() == 0 and chunked._prefill_chunk._cache_size() == 2


@pytest.mark.parametrize("window", [None, 400], ids=["no-window", "window-over-the-cache"])
def test_chunked_prefill_with_split_chunk_attention_equals_the_full_forward(window):
    """The split chunk attention (prefix unmasked + chunk causal; einsum parts on CPU) through
    `Generator`: prompts of 300 and 230 tokens left-padded to 320 (row 1's padding fills the
    first chunk and reaches into the second), chunks of 64, a cache of 336 slots (inside a
    window of 400: the window hides nothing). Logits at every real position equal the full
    forward; greedy continuations equal the masked form's."""
    cfg = mj.ModelConfig.tiny(sliding_window=window, max_seq_len=512)
    model = mj.init(cfg, 5)
    split = Generator(
        mj.from_params(cfg.replace(chunk_attention_impl="split"), mj.get_params(model)),
        prefill_chunk=64,
    )
    masked = Generator(model, prefill_chunk=64)
    prompts = _long_prompts(cfg, (300, 230))
    tokens, valid = left_pad(prompts, prompt_width(300, 64))
    got, _, _, _ = split.prefill(tokens, valid, 336, all_logits=True)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    full = model(jnp.asarray(tokens), jnp.asarray(valid, jnp.int32), positions=positions).logits
    got, full = (np.asarray(x)[valid] for x in (got, full))
    assert np.abs(got - full).max() / np.abs(full).max() <= 1e-5
    new = [g.generate(prompts, max_new_tokens=12, eos_id=None).tokens for g in (split, masked)]
    assert new[0] == new[1]


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every value a jaxpr computes, sub-jaxprs (scan, cond, pjit) included."""
    found = set()
    for eqn in jaxpr.eqns:
        found.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found |= _shapes(inner)
    return found


def test_a_prefill_chunk_never_builds_scores_over_the_whole_prompt():
    """One compiled chunk call computes scores [B, K, G, C, S] over the cache, nothing with the
    prompt's width; the one-shot prefill of the same prompt does build [B, K, G, W, S] (so the
    check can fail). Prompt lengths within one chunk-multiple bucket share the compilation."""
    cfg = mj.ModelConfig.tiny(max_seq_len=512)
    generator = Generator(mj.init(cfg, 0), prefill_chunk=64)
    batch, width, size, c = 1, 320, 336, 64
    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, size))
    piece = jax.ShapeDtypeStruct((batch, c), jnp.int32)
    chunk = jax.make_jaxpr(generator._prefill_chunk_fn)(
        generator.state, cache, piece, piece.update(dtype=bool), piece
    )
    k, g = cfg.num_kv_heads, cfg.num_groups
    shapes = _shapes(chunk.jaxpr)
    assert (batch, k, g, c, size) in shapes
    assert not any(width in s for s in shapes)
    whole = jax.ShapeDtypeStruct((batch, width), jnp.int32)
    one_shot = jax.make_jaxpr(lambda s, t, v: generator._prefill_fn(s, t, v, size))(
        generator.state, whole, whole.update(dtype=bool)
    )
    assert (batch, k, g, width, size) in _shapes(one_shot.jaxpr)

    for n in (260, 300, 319):  # all in the 320 bucket
        result = generator.generate(_long_prompts(cfg, (n,)), max_new_tokens=4, eos_id=None)
        assert result.prompt_bucket == width
    assert generator._prefill_chunk._cache_size() == 1
