"""infer.py end to end: our checkpoints and Hugging Face directories, output modes, bad input."""

import glob
import json
import os
import re
import subprocess
import sys
import tracemalloc

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
from tests.convert.test_convert import mistral_dir
from tests.hf_reference import legacy_state_dict

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
    mistral_dir(root / "mistral", legacy_state_dict(hf), cfg, stacked=False)
    (root / "mistral" / "tokenizer.model").write_bytes((root / "tok.model").read_bytes())
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
    for layout in ("ckpt", "hf", "fused", "mistral"):
        drawn.clear()
        model, _ = load_for_inference(str(root / layout))
        assert drawn and not any(drawn), layout
        np.testing.assert_allclose(np.asarray(model(tokens).logits), want, rtol=1e-5, atol=1e-5)


def _param_names(ours) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(mj.get_params(ours))[0]
    return {jax.tree_util.keystr(p, simple=True, separator=".") for p, _ in flat}


def test_loading_holds_no_whole_model_on_the_host(tmp_path):
    """The largest host allocation while loading (numpy buffers, traced by tracemalloc) is a few
    slices, not the model: converting the whole model in host memory (the old path) would trace
    at least its bytes. Memory-mapped safetensors pages are not allocations."""
    cfg = mj.ModelConfig.tiny(vocab_size=64, num_layers=8, num_experts=8, max_seq_len=64)
    model = mj.init(cfg, 1)
    total = sum(x.nbytes for x in jax.tree.leaves(mj.get_params(model)))
    hf = make_hf_model(cfg, seed=1)
    hf.save_pretrained(str(tmp_path / "hf"))
    checkpoint.save_model(str(tmp_path / "ckpt"), mj.get_params(model), cfg)
    from mixtral_jax.generate.loading import load_params

    for layout in ("hf", "ckpt"):
        load_params(str(tmp_path / layout), {})  # compiles the placement programs
        tracemalloc.start()
        try:
            load_params(str(tmp_path / layout), {})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < total / 4, (layout, peak, total)


def _corrupt(path: str, offset: int, nbytes: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(nbytes)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))


def test_a_corrupted_weight_byte_is_refused_naming_the_array(setup, capsys, tmp_path):
    """Our checkpoints carry per-slice CRC32s (checksums.json); flipping 4 bytes in the stored
    weights (the converter's uncompressed checkpoint) is one line naming the array, exit 1."""
    root, _, ours = setup
    from mixtral_jax.convert import to_orbax

    to_orbax(str(root / "hf"), str(tmp_path / "conv"), progress=False)
    assert os.path.isfile(tmp_path / "conv" / checkpoint.CHECKSUMS_FILE)
    data = max(
        (
            p
            for p in glob.glob(str(tmp_path / "conv" / "params" / "**"), recursive=True)
            if os.path.isfile(p)
        ),
        key=os.path.getsize,
    )
    _corrupt(data, os.path.getsize(data) // 2)
    code, out, err = _infer_here(capsys, "--checkpoint", str(tmp_path / "conv"), "--prompt", "a")
    assert code == 1 and not out
    assert len(err.strip().splitlines()) == 1, err
    found = re.search(r"array (\S+)", err)
    assert found and found.group(1) in _param_names(ours), err
    assert "checksum" in err or "cannot read" in err, err


def test_a_checkpoint_without_checksums_loads_with_a_one_line_warning(setup, capsys, tmp_path):
    root, _, _ = setup
    import shutil

    shutil.copytree(root / "ckpt", tmp_path / "old")
    os.remove(tmp_path / "old" / checkpoint.CHECKSUMS_FILE)
    args = ["--checkpoint", str(tmp_path / "old"), "--json", "--prompt", "a"]
    code, _, err = _infer_here(capsys, *args, "--max-new-tokens", "2")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not verified" in warnings[0]


def test_compute_dtype_follows_the_checkpoint(setup, tmp_path):
    root, _, ours = setup
    bf16 = ours.cfg.replace(param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype("bfloat16"), mj.get_params(ours))
    checkpoint.save_model(str(tmp_path / "bf16"), params, bf16, str(root / "tok.model"))
    model, _ = load_for_inference(str(tmp_path / "bf16"))
    assert model.cfg.compute.dtype == "bfloat16"
    model, _ = load_for_inference(str(tmp_path / "bf16"), dtype="float32")
    assert model.cfg.compute.dtype == "float32"
    model, _ = load_for_inference(str(root / "ckpt"))
    assert model.cfg.compute.dtype == "float32"


def test_a_second_start_finds_its_programs_in_the_compile_cache(setup, tmp_path):
    """The first infer.py run fills the persistent cache; the second adds nothing (every
    program it compiles is found there)."""
    root, _, _ = setup
    cache = tmp_path / "cache"
    args = ["--checkpoint", str(root / "ckpt"), "--prompt", "The", "--max-new-tokens", "4"]
    first = _infer(*args, "--compile-cache", str(cache))
    assert first.returncode == 0, first.stderr
    entries = set(os.listdir(cache))
    assert entries
    second = _infer(*args, "--compile-cache", str(cache))
    assert second.returncode == 0, second.stderr
    assert set(os.listdir(cache)) == entries
    off = _infer(*args, "--compile-cache", str(tmp_path / "off"), "--no-compile-cache")
    assert off.returncode == 0 and not os.path.exists(tmp_path / "off")


def test_input_errors_are_one_line_and_nothing_is_echoed(setup, capsys, tmp_path):
    root, _, _ = setup
    ckpt = ["--checkpoint", str(root / "ckpt")]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    for args, message in [
        (["--prompt-file", str(bad)], "is not UTF-8 text"),
        (["--prompt", "a", "--seed", str(2**63)], f"seed={2**63} is outside the sampler's range"),
        (["--prompt", "a", "--stop", ""], '--stop ""'),
        (["--prompt", "The", "--max-new-tokens", "100"], "exceeds the model's context"),
    ]:
        code, out, err = _infer_here(capsys, *ckpt, *args)
        assert code == 1 and out == "", (args, out)
        assert message in err and len(err.strip().splitlines()) == 1, err
    piped = subprocess.run(
        [sys.executable, os.path.join(ROOT, "infer.py"), *ckpt],
        input=b"\xff\xfe bad\n",
        capture_output=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert piped.returncode == 1 and piped.stdout == b""
    err = piped.stderr.decode()
    assert "standard input is not UTF-8 text" in err and len(err.strip().splitlines()) == 1, err
