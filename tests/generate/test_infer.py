"""infer.py end to end: our checkpoints and Hugging Face directories, output modes, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from hf_reference import make_hf_model, ours_from_hf
from safetensors.numpy import save_file

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.generate import Generator
from mixtral_jax.generate.loading import load_for_inference
from mixtral_jax.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts routes tokens.",
    "Sparse models read only the chosen experts.",
    "def main(): return 0",
] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    tokenizer = train_tokenizer(TEXT, str(root / "tok.model"), 96)
    cfg = mj.ModelConfig.tiny(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    hf = make_hf_model(cfg, seed=0, std=0.2)
    hf.save_pretrained(str(root / "hf"))  # safetensors, transformers' own layout on disk
    (root / "hf" / "tokenizer.model").write_bytes((root / "tok.model").read_bytes())
    # The transformers v5 fused layout: the in-memory state dict written as it is.
    (root / "fused").mkdir()
    save_file(
        {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()},
        str(root / "fused" / "model.safetensors"),
    )
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf.state_dict())
    for name in ("config.json", "tokenizer.model"):
        (root / "fused" / name).write_bytes((root / "hf" / name).read_bytes())
    ours = ours_from_hf(hf, cfg)
    checkpoint.save_model(str(root / "ckpt"), mj.get_params(ours), cfg, str(root / "tok.model"))
    return root, tokenizer, ours


def _infer(*args, stdin=None):
    """infer.py in a subprocess: what a user runs (streaming, stdin, exit codes)."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "infer.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        timeout=300,
    )


def _infer_here(capsys, *args):
    """infer.main in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    sys.path.insert(0, ROOT)
    try:
        import infer
    finally:
        sys.path.remove(ROOT)
    code = infer.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_equals_the_library_and_hf_directory_equals_checkpoint(setup, capsys):
    root, tokenizer, ours = setup
    prompts = ["The quick", "Sparse models"]
    args = [
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--json",
        "--max-new-tokens",
        "10",
        "--show-routing",
    ]
    from_ckpt = _infer("--checkpoint", str(root / "ckpt"), *args)
    assert from_ckpt.returncode == 0, from_ckpt.stderr
    result = json.loads(from_ckpt.stdout)
    expected = Generator(ours).generate(
        [tokenizer.encode(p) for p in prompts], max_new_tokens=10, eos_id=tokenizer.eos_id
    )
    assert [c["ids"] for c in result["completions"]] == expected.tokens
    assert result["completions"][0]["prompt_ids"][0] == tokenizer.bos_id  # BOS first
    assert np.array(result["tokens_per_expert"]).shape == (2, 4)
    assert result["timing"]["time_to_first_token_s"] > 0
    for layout in ("hf", "fused"):  # in this process: the subprocess above covers the CLI
        code, out, err = _infer_here(capsys, "--checkpoint", str(root / layout), *args)
        assert code == 0, err
        assert json.loads(out)["completions"] == result["completions"]


def test_streaming_chat_and_stdin(setup, capsys):
    root, tokenizer, _ = setup
    streamed = _infer(
        "--checkpoint",
        str(root / "ckpt"),
        "--chat",
        "--max-new-tokens",
        "6",
        stdin="Hello experts\n",
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.startswith("Hello experts")
    assert "time to first token" in streamed.stderr and "tokens/s" in streamed.stderr
    code, out, err = _infer_here(
        capsys,
        "--checkpoint",
        str(root / "ckpt"),
        "--chat",
        "--json",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "4",
    )
    assert code == 0, err
    ids = json.loads(out)["completions"][0]["prompt_ids"]
    assert ids == tokenizer.encode("[INST] Hi [/INST]")


def test_stop_strings_cut_the_text(setup, capsys):
    root, _, _ = setup
    plain = json.loads(
        _infer_here(
            capsys,
            "--checkpoint",
            str(root / "ckpt"),
            "--json",
            "--prompt",
            "The",
            "--max-new-tokens",
            "24",
        )[1]
    )["completions"][0]
    text = plain["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    cut = json.loads(
        _infer_here(
            capsys,
            "--checkpoint",
            str(root / "ckpt"),
            "--json",
            "--prompt",
            "The",
            "--max-new-tokens",
            "24",
            "--stop",
            stop,
        )[1]
    )["completions"][0]
    assert cut["finish"] == "stop" and cut["text"] == text[: text.index(stop)]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "  "], "error: prompt 1 is empty"),
        (
            ["--prompt", "The", "--max-new-tokens", "100"],
            "exceeds the model's context of 64 tokens",
        ),
        (["--prompt", "a", "--temperature", "-1"], "error: temperature=-1.0 must be"),
        (["--prompt", "a", "--temperature", "nan"], "error: temperature=nan must be"),
        (["--prompt", "a", "--top-p", "0"], "error: top_p=0.0 must be in (0, 1]"),
        (["--prompt", "a", "--top-k", "-2"], "error: top_k=-2 must be an integer >= 0"),
    ],
)
def test_bad_inputs_give_one_line_errors(setup, capsys, args, message):
    root, _, _ = setup
    code, _, err = _infer_here(capsys, "--checkpoint", str(root / "ckpt"), *args)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_tokenizer_and_mismatched_checkpoint(setup, capsys, tmp_path):
    root, _, ours = setup
    no_tok = tmp_path / "no_tok"
    checkpoint.save_model(str(no_tok), mj.get_params(ours), ours.cfg)
    code, _, err = _infer_here(capsys, "--checkpoint", str(no_tok), "--prompt", "a")
    assert code == 1 and "no tokenizer at" in err
    # A checkpoint whose config.json disagrees with its weights.
    bad = tmp_path / "bad"
    checkpoint.save_model(str(bad), mj.get_params(ours), ours.cfg, str(root / "tok.model"))
    mj.save_hf_config(ours.cfg.replace(num_experts=5), str(bad / "config.json"))
    code, _, err = _infer_here(capsys, "--checkpoint", str(bad), "--prompt", "a")
    assert code == 1 and "does not match its config.json" in err
    code, _, err = _infer_here(capsys, "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "a")
    assert code == 1 and "does not exist" in err


def test_compute_overrides_reach_the_model_and_architecture_ones_are_refused(setup, capsys):
    """--model.<compute field> as train.py takes it: the dense oracle dispatch and the default
    give the same greedy tokens; an architecture field is one line naming the rule."""
    root, _, _ = setup
    args = [
        "--checkpoint",
        str(root / "ckpt"),
        "--json",
        "--prompt",
        "The",
        "--max-new-tokens",
        "8",
    ]
    code, default, err = _infer_here(capsys, *args)
    assert code == 0, err
    code, dense, err = _infer_here(
        capsys, *args, "--model.moe_impl=dense", "--model.decode_expert_impl=off"
    )
    assert code == 0, err
    assert (
        json.loads(dense)["completions"][0]["ids"] == json.loads(default)["completions"][0]["ids"]
    )
    code, out, err = _infer_here(capsys, *args, "--model.num_layers=3")
    assert code == 1 and not out
    assert "model.num_layers is architecture" in err and len(err.strip().splitlines()) == 1


def test_loading_draws_no_random_weights(setup, monkeypatch):
    """load_for_inference builds the model from the loaded weights: Mixtral.__init__ runs only
    abstractly (tracer leaves), never drawing real random weights, and the logits are those of
    the model the files were written from."""
    root, _, ours = setup
    drawn = []  # one entry per Mixtral.__init__: True when it made real (not abstract) weights
    real_init = mj.Mixtral.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        drawn.append(not isinstance(jax.tree.leaves(nnx.state(self))[0], jax.core.Tracer))

    monkeypatch.setattr(mj.Mixtral, "__init__", recording_init)
    tokens = np.array([[1, 5, 9, 2, 7, 3]], np.int32)
    want = np.asarray(ours(tokens).logits)
    for layout in ("ckpt", "hf", "fused"):
        drawn.clear()
        model, _ = load_for_inference(str(root / layout))
        assert drawn and not any(drawn), layout
        np.testing.assert_allclose(np.asarray(model(tokens).logits), want, rtol=1e-5, atol=1e-5)
