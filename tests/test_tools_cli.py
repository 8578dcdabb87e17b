"""The routing, surgery and upcycling commands end to end (run in-process through main())."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint, upcycle
from mixtral_jax.generate import Generator
from mixtral_jax.routing.__main__ import main as routing_main
from mixtral_jax.surgery import cli as surgery_cli
from mixtral_jax.tokenizer import train_tokenizer

TEXT = [
    "Experts are chosen per token by a router.",
    "The router is a linear layer.",
    "Sparse mixtures read a few experts.",
    "Dense models read every weight.",
] * 25


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    tokenizer = train_tokenizer(TEXT, str(root / "tok.model"), 100)
    cfg = mj.ModelConfig.tiny(vocab_size=tokenizer.vocab_size, num_experts=5)
    checkpoint.save_model(
        str(root / "model"), mj.get_params(mj.init(cfg, 0)), cfg, str(root / "tok.model")
    )
    (root / "heldout.txt").write_text("\n".join(TEXT[:8]))
    return root


def test_routing_command_writes_the_report(ckpt, capsys):
    out = ckpt / "report"
    assert (
        routing_main(
            [
                "--checkpoint",
                str(ckpt / "model"),
                "--text",
                str(ckpt / "heldout.txt"),
                "--out",
                str(out),
                "--seq-len",
                "32",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["num_experts"] == 5 and report["num_tokens"] > 20
    for name in ("load_heatmap.png", "coactivation.png", "tokens.html"):
        assert (out / name).stat().st_size > 1000
    page = (out / "tokens.html").read_text()
    assert page.count("data-expert=") == report["num_layers"] * report["num_tokens"]
    assert (
        routing_main(["--checkpoint", str(ckpt / "model"), "--prompt", "   ", "--out", str(out)])
        == 2
    )
    assert "error: the text to analyse is empty" in capsys.readouterr().err


def test_drop_command_gives_a_checkpoint_that_loads_generates_and_matches(ckpt, capsys):
    out = ckpt / "dropped"
    assert (
        surgery_cli.main(
            ["drop", "--checkpoint", str(ckpt / "model"), "--out", str(out), "--experts", "1,3"]
        )
        == 0
    )
    cfg, params = checkpoint.load_model(str(out))
    assert cfg.num_experts == 3 and (out / "tokenizer.model").is_file()
    # The same weights built directly as a 3-expert model.
    _base_cfg, base = checkpoint.load_model(str(ckpt / "model"))
    direct_params = checkpoint.to_numpy(base)
    for name in ("w_gate", "w_up", "w_down"):
        direct_params["layers"]["moe"][name] = direct_params["layers"]["moe"][name][:, [0, 2, 4]]
    direct_params["layers"]["moe"]["router"] = direct_params["layers"]["moe"]["router"][
        :, :, [0, 2, 4]
    ]
    direct = mj.from_params(cfg, direct_params)
    loaded = mj.from_params(cfg, params)
    # The loaded model holds the direct model's weights bit for bit (same config, same graph), so
    # it generates what the direct model generates; one Generator (one compilation) suffices.
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(mj.get_params(loaded)),
        jax.tree.leaves(mj.get_params(direct)),
        strict=True,
    ):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    prompts = [[1, 5, 9, 13], [1, 7]]
    got = Generator(loaded).generate(prompts, max_new_tokens=10, eos_id=None).tokens
    assert all(len(t) == 10 for t in got)
    tokens = jnp.asarray([[1, 5, 9, 13, 2, 8]])
    np.testing.assert_array_equal(loaded(tokens).logits, direct(tokens).logits)
    assert (
        surgery_cli.main(
            [
                "drop",
                "--checkpoint",
                str(ckpt / "model"),
                "--out",
                str(ckpt / "bad"),
                "--experts",
                "0,1,2,3",
            ]
        )
        == 1
    )
    assert "1 experts left < top-k 2" in capsys.readouterr().err
    assert not (ckpt / "bad").exists()


def test_eval_command_reports_perplexity_before_and_after(ckpt, capsys):
    out = ckpt / "top1"
    assert (
        surgery_cli.main(
            ["topk", "--checkpoint", str(ckpt / "model"), "--out", str(out), "--k", "1"]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        surgery_cli.main(
            [
                "eval",
                "--checkpoint",
                str(ckpt / "model"),
                "--checkpoint",
                str(out),
                "--text",
                str(ckpt / "heldout.txt"),
                "--seq-len",
                "32",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    ppl = [float(line.split()[-1]) for line in lines[1:]]
    assert all(p > 1 for p in ppl) and ppl[0] != ppl[1]


def test_upcycle_command_from_a_transformers_mistral_directory(tmp_path):
    from hf_reference import torch
    from test_upcycle import _dense_mistral

    dense, _, _ = _dense_mistral(None)
    dense.save_pretrained(str(tmp_path / "dense"))
    assert (
        upcycle.main(
            [
                "--dense",
                str(tmp_path / "dense"),
                "--out",
                str(tmp_path / "moe"),
                "--experts",
                "4",
                "--topk",
                "2",
                "--router-std",
                "0.3",
            ]
        )
        == 0
    )
    cfg, params = checkpoint.load_model(str(tmp_path / "moe"))
    model = mj.from_params(cfg, params)
    tokens = np.random.default_rng(0).integers(0, 101, (2, 9))
    with torch.no_grad():
        ref = dense(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens)).logits)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-5
    assert upcycle.main(["--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe")]) == 1
