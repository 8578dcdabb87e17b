"""Routing analytics on a model whose router is set by hand: token id decides the experts."""

import html.parser
import itertools
import json
import os
import shutil
import subprocess

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.routing import analyse
from mixtral_jax.routing.html import first_choice_counts
from mixtral_jax.routing.stats import routing_report

E = 4


def _choices(layer: int, token: int) -> tuple[int, int]:
    """Hand-set rule: layer l routes token t to experts (t + 2l) % E, then (t + 1 + 2l) % E."""
    return (token + 2 * layer) % E, (token + 1 + 2 * layer) % E


def _hand_routed_model():
    cfg = mj.ModelConfig.tiny(num_experts=E, num_experts_per_tok=2, num_layers=2, moe_impl="dense")
    model = mj.init(cfg, 0)
    p = jax_zeros_like_tree(mj.get_params(model))
    p["layers"]["attn_norm"]["scale"] = np.ones_like(p["layers"]["attn_norm"]["scale"])
    p["layers"]["moe_norm"]["scale"] = np.ones_like(p["layers"]["moe_norm"]["scale"])
    p["final_norm"]["scale"] = np.ones_like(p["final_norm"]["scale"])
    # Attention output and expert outputs are zero: every layer sees the raw embedding.
    # Token t's embedding has a 1 at dim (t % E) and at dim E + (t + 1) % E.
    emb = np.zeros_like(p["embed"]["embedding"])
    for t in range(cfg.vocab_size):
        emb[t, t % E] = 1.0
        emb[t, E + (t + 1) % E] = 1.0
    p["embed"]["embedding"] = emb
    router = np.zeros_like(p["layers"]["moe"]["router"])  # [L, D, E]
    for layer in range(cfg.num_layers):
        for e in range(E):
            router[layer, e, (e + 2 * layer) % E] = 10.0  # first choice
            router[layer, E + e, (e + 2 * layer) % E] = 5.0  # second choice
    p["layers"]["moe"]["router"] = router
    mj.set_params(model, p)
    return model


def jax_zeros_like_tree(tree):
    return {
        k: jax_zeros_like_tree(v) if isinstance(v, dict) else np.zeros(v.shape, np.float32)
        for k, v in tree.items()
    }


def _expected(sequences):
    """Hand computation of loads, co-activation and next-token agreement."""
    num_tokens = sum(len(s) for s in sequences)
    out = []
    for layer in range(2):
        counts = np.zeros(E, int)
        both = np.zeros((E, E))
        for seq in sequences:
            for t in seq:
                a, b = _choices(layer, t)
                counts[a] += 1
                counts[b] += 1
                for i, j in itertools.product((a, b), repeat=2):
                    both[i, j] += 1
        pairs = [(x, y) for seq in sequences for x, y in itertools.pairwise(seq)]
        same = sum(_choices(layer, x)[0] == _choices(layer, y)[0] for x, y in pairs) / len(pairs)
        shared = sum(bool(set(_choices(layer, x)) & set(_choices(layer, y))) for x, y in pairs)
        out.append((counts, both / num_tokens, same, shared / len(pairs)))
    return out


def test_report_equals_hand_computed_values(tmp_path):
    model = _hand_routed_model()
    sequences = [[3, 3, 7, 0, 1, 1, 1, 9, 14, 6, 2], [5, 4, 4, 8]]  # second row is shorter
    tokens, mask = analyse.chunk_tokens(sequences[0], 11, pad_id=0)
    row2, mask2 = analyse.chunk_tokens(sequences[1], 11, pad_id=0)
    tokens, mask = np.concatenate([tokens, row2]), np.concatenate([mask, mask2])
    trace = analyse.collect_trace(model, tokens, mask, batch_size=3)
    pieces = [[f"<t{t}>" for t in row] for row in tokens]
    report = analyse.write_report(str(tmp_path), trace, pieces, title="hand-set router")

    assert report["num_tokens"] == 15
    for layer, (counts, both, same, shared) in enumerate(_expected(sequences)):
        got = report["layers"][layer]
        np.testing.assert_array_equal(got["tokens_per_expert"], counts)
        np.testing.assert_allclose(got["load_share"], counts / counts.sum())
        np.testing.assert_allclose(report["coactivation"][layer], both)
        assert got["same_first_choice_next_token"] == pytest.approx(same)
        assert got["shared_expert_next_token"] == pytest.approx(shared)

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["layers"][1]["tokens_per_expert"] == report["layers"][1]["tokens_per_expert"]
    for name in ("load_heatmap.png", "coactivation.png"):
        image = matplotlib.image.imread(str(tmp_path / name))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    page = (tmp_path / "tokens.html").read_text()
    _check_html(page, trace, sequences)


def _check_html(page, trace, sequences):
    class Spans(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tokens, self.layers = 0, 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tokens += tag == "span" and "data-expert" in attrs
            self.layers += tag == "div" and attrs.get("class") == "layer"

    parser = Spans()
    parser.feed(page)
    num_tokens = sum(len(s) for s in sequences)
    assert parser.layers == 2 and parser.tokens == 2 * num_tokens
    firsts = np.zeros(E, int)
    for layer in range(2):
        for t in itertools.chain(*sequences):
            firsts[_choices(layer, t)[0]] += 1
    np.testing.assert_array_equal(first_choice_counts(page, E), firsts)
    assert "&lt;t3&gt;" in page  # token text is escaped


def test_dead_and_overloaded_experts_are_flagged():
    model = _hand_routed_model()
    ids = [0, 4, 8, 12, 16, 1]  # mostly t % 4 == 0: layer 0 picks experts 0 and 1
    tokens, mask = analyse.chunk_tokens(ids, 8, pad_id=0)
    report = routing_report(analyse.collect_trace(model, tokens, mask), overloaded_above=1.5)
    layer0 = report["layers"][0]  # loads: e0 5, e1 6, e2 1, e3 0 of 12 assignments
    assert layer0["dead_experts"] == [3]  # share 0 < 0.25 / 4
    assert layer0["overloaded_experts"] == [0, 1]  # 5/12 and 6/12 > 1.5 / 4


def test_empty_text_is_refused():
    with pytest.raises(ValueError, match="no tokens to analyse"):
        analyse.chunk_tokens([], 8, pad_id=0)


def test_trace_choices_equal_the_model_routing():
    cfg = mj.ModelConfig.tiny(moe_impl="dense")
    model = mj.init(cfg, 2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    out = model(tokens)
    trace = analyse.collect_trace(model, np.asarray(tokens), np.ones((2, 9), bool))
    counts = trace.experts[..., None] == np.arange(cfg.num_experts)
    np.testing.assert_array_equal(counts.sum(axis=(1, 2, 3)), out.aux.layers.tokens_per_expert)


@pytest.mark.skipif(
    not (shutil.which("chromium") or os.environ.get("REQUIRE_CHROMIUM")),
    reason="headless Chromium not installed (.ci/run installs it and sets REQUIRE_CHROMIUM=1)",
)
def test_page_and_plots_render_in_headless_chromium(tmp_path):
    """Opens tokens.html and both PNGs in headless Chromium and checks the screenshots."""
    model = _hand_routed_model()
    tokens, mask = analyse.chunk_tokens([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 6, pad_id=0)
    trace = analyse.collect_trace(model, tokens, mask)
    analyse.write_report(str(tmp_path), trace, [[f"w{t} " for t in row] for row in tokens])
    for name in ("tokens.html", "load_heatmap.png", "coactivation.png"):
        shot = tmp_path / f"shot-{name}.png"
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--screenshot={shot}",
                "--window-size=900,500",
                (tmp_path / name).as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        image = matplotlib.image.imread(str(shot))
        assert image.shape[:2] == (500, 900)
        assert float(image[..., :3].std()) > 0.05  # something was drawn
