"""python -m mixtral_jax.quantize: the streamed checkpoint equals the in-memory quantization,
infer.py generates from it, a corrupted scale is refused, sizes, inspect, eval, bad input."""

import json
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.model import _open_stores
from mixtral_jax.config import ConfigError
from mixtral_jax.convert import to_hf
from mixtral_jax.model import quantized
from mixtral_jax.quantize import cli, quality, stream
from mixtral_jax.tokenizer import Tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts routes tokens to the experts they need.",
    "Sparse models read only the chosen experts, so bytes decide decode speed.",
    "def main(): return 0",
] * 20
INT4 = ["--bits", "4", "--group-size", "32", "--attention", "--scale-dtype", "bfloat16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    tokenizer = train_tokenizer(TEXT, str(root / "tok.model"), 96)
    (root / "text.txt").write_text("\n\n".join(TEXT))
    cfg = mj.ModelConfig.tiny(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    params = jax.tree.map(np.asarray, mj.get_params(mj.init(cfg, 0)))  # no live device arrays
    checkpoint.save_model(str(root / "float"), params, cfg, str(root / "tok.model"))
    assert cli.main(["--checkpoint", str(root / "float"), "--out", str(root / "q4"), *INT4]) == 0
    return root, cfg, params


def _stored(directory) -> dict:
    return jax.tree.map(np.asarray, checkpoint.load_model(str(directory))[1])


def test_the_streamed_checkpoint_equals_quantizing_in_memory(setup):
    root, cfg, params = setup
    qcfg = mj.load_hf_config(str(root / "q4"))
    assert (qcfg.expert_bits, qcfg.attention_bits, qcfg.quant_group_size) == (4, 4, 32)
    assert qcfg.quant_scale_dtype == "bfloat16" and qcfg.architecture != cfg.architecture
    want = jax.tree.map(np.asarray, quantized.quantize_params(params, qcfg))
    got = _stored(root / "q4")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    assert os.path.isfile(root / "q4" / checkpoint.TOKENIZER_FILE)
    sums = checkpoint.model.read_checksums(str(root / "q4"))  # codes and scales, per slice
    assert sums["layers.moe.w_gate_scale"]["lead"] == 2  # one CRC per expert of each layer
    assert sums["layers.attn.q_proj_scale"]["lead"] == 1
    assert len(sums["layers.moe.w_down"]["crc32"]) == cfg.num_layers * cfg.num_experts


def test_sizes_on_disk_and_inspect(setup, capsys):
    root, cfg, _ = setup
    _, sizes = stream.stored_sizes(str(root / "q4"))
    l, e, d, f, g = cfg.num_layers, cfg.num_experts, cfg.embed_dim, cfg.hidden_dim, 32
    experts = l * e * 3 * (d * f // 2 + d * f // g * 2)  # int4 codes + bf16 scales
    assert sizes["experts"] == {"bytes": experts, "bf16_bytes": l * e * 3 * d * f * 2}
    attn = l * d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    assert sizes["attention"] == {"bytes": attn // 2 + attn // g * 2, "bf16_bytes": attn * 2}
    assert cli.main(["inspect", str(root / "q4")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"experts\s+int4, group 32, bfloat16 scales\s+.* 0\.281\n", out), out
    assert re.search(r"other\s+float32 ", out) and "total" in out


def test_infer_generates_from_the_quantized_checkpoint(setup, capsys):
    root, _, _ = setup
    sys.path.insert(0, ROOT)
    try:
        import infer
    finally:
        sys.path.remove(ROOT)
    args = ["--checkpoint", str(root / "q4"), "--prompt", "The quick", "--max-new-tokens", "5"]
    assert infer.main([*args, "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert '"tokens"' in out or '"text"' in out, out


def _flip_scale_byte(directory, name: str) -> None:
    """Flips one stored byte of array `name` (a dotted leaf) in place, through TensorStore."""
    tree = _open_stores(os.path.join(directory, checkpoint.PARAMS_DIR), None)
    for key in name.split("."):
        tree = tree[key]
    first = tree.store[0, 0].read().result()
    broken = first.copy()
    broken.reshape(-1).view(np.uint8)[3] ^= 0x10
    tree.store[0, 0].write(broken).result()


def test_a_corrupted_scale_is_refused_naming_the_array(setup, tmp_path):
    root, _, _ = setup
    shutil.copytree(root / "q4", tmp_path / "q4")
    _flip_scale_byte(str(tmp_path / "q4"), "layers.moe.w_down_scale")
    with pytest.raises(ConfigError) as err:
        checkpoint.load_model(str(tmp_path / "q4"))
    assert "array layers.moe.w_down_scale slice [0, 0] fails its checksum" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "3"], "error: --bits 3: choose one of 8, 4"),
        (
            ["--bits", "4", "--group-size", "40"],
            "quant_group_size=40: must divide the contraction width embed_dim=64",
        ),
        (["--bits", "8", "--scale-dtype", "int8"], "quant_scale_dtype='int8'"),
    ],
)
def test_bad_arguments_are_one_line_errors_and_write_nothing(setup, capsys, args, message):
    root, _, _ = setup
    out = root / "bad"
    assert cli.main(["--checkpoint", str(root / "float"), "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


def test_bad_checkpoints_are_one_line_errors(setup, capsys):
    root, _, _ = setup
    cases = [
        (root / "q4", root / "again", "is already quantized (expert_bits=4, attention_bits=4)"),
        (root / "float", root / "q4", "already exists: choose a new directory"),
        (root / "nothing", root / "new", "does not exist"),
    ]
    before = sorted(os.listdir(root / "q4"))
    for source, out, message in cases:
        code = cli.main(["--checkpoint", str(source), "--out", str(out), "--bits", "8"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(root / "q4")) == before and not os.path.exists(root / "again")
    with pytest.raises(ConfigError, match="is quantized .*export the checkpoint it was"):
        to_hf(str(root / "q4"), str(root / "hf"), progress=False)
    from mixtral_jax.surgery.cli import main as surgery

    drop = ["drop", "--checkpoint", str(root / "q4"), "--out", str(root / "s"), "--experts", "1"]
    assert surgery(drop) == 1 and "is quantized (expert_bits=4)" in capsys.readouterr().err


def test_eval_compares_original_and_quantized_side_by_side(setup, capsys):
    root, _, _ = setup
    split = {"eval_fraction": 0.0, "seq_len": 16, "batch_size": 4, "max_batches": 2}
    tok = Tokenizer.load(str(root / "tok.model"))
    batches = quality.held_out_batches(str(root / "text.txt"), tok, **split)
    same = quality.compare(str(root / "float"), str(root / "float"), batches)
    assert same.max_logit_error == 0 and same.top1_changed == 0 and same.perplexity_increase == 0
    q4 = quality.compare(str(root / "float"), str(root / "q4"), batches)
    assert q4.max_logit_error > 0 and q4.tokens == same.tokens > 0
    args = ["eval", "--original", str(root / "float"), "--quantized", str(root / "q4")]
    args += ["--data", str(root / "text.txt"), "--eval-fraction", "0", "--seq-len", "16"]
    assert cli.main([*args, "--batch-size", "4", "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{np.exp(q4.quantized_loss):.3f}" in out and f"{np.exp(q4.original_loss):.3f}" in out
    assert re.search(r"perplexity [+-]\d+\.\d+%, max logit error .* top-1 changed on", out), out


def test_full_fine_tuning_refuses_quantized_weights_in_one_line(setup):
    from mixtral_jax.train.config import load_run_config
    from mixtral_jax.train.trainer import base_model_config

    root, _, _ = setup
    start = load_run_config(None, [f"checkpoint.init_from={root / 'q4'}"])
    with pytest.raises(ConfigError, match="lora_rank=0: full fine-tuning cannot train the quant"):
        base_model_config(start)
    fresh = load_run_config(None, ["model.expert_bits=8"])
    with pytest.raises(
        ConfigError, match=r"weights of the \[model\] table .expert_bits=8, attention_bits"
    ):
        base_model_config(fresh)
    qlora = load_run_config(None, ["model.expert_bits=8", "train.lora_rank=4"])
    assert base_model_config(qlora).expert_bits == 8  # LoRA over the frozen codes: QLoRA


def test_dtype_sets_the_compute_dtype_never_the_codes(setup):
    from mixtral_jax.generate.loading import load_for_inference

    root, _, _ = setup
    model, _ = load_for_inference(str(root / "q4"), dtype="bfloat16")
    params = mj.get_params(model)
    assert model.cfg.compute.dtype == "bfloat16" and model.cfg.compute.param_dtype == "float32"
    moe, attn = params["layers"]["moe"], params["layers"]["attn"]
    assert moe["w_gate"].dtype == attn["q_proj"].dtype == np.uint8  # codes as stored
    assert moe["w_gate_scale"].dtype == np.dtype("bfloat16")  # scales as stored
    assert params["embed"]["embedding"].dtype == np.float32


def test_held_out_batches_tokenize_only_the_held_out_texts_and_equal_the_trainers(setup):
    """The quick path (only held-out texts tokenized) gives the batches of the trainer's own
    split and packing over every text's tokens (`train.data`, as `trainer._prepare_data`)."""
    from mixtral_jax.train import data

    root, _, _ = setup
    tok = Tokenizer.load(str(root / "tok.model"))
    source = str(root / "docs.jsonl")  # one document per line: 80 texts
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    split = {"eval_fraction": 0.3, "seed": 3, "seq_len": 16, "batch_size": 2, "max_batches": 3}
    got = quality.held_out_batches(source, tok, **split)
    texts = [t for t in data.read_documents(source) if t.strip()]
    documents = data.Documents(data.tokenize_documents(texts, tok))
    want = data.eval_batches(documents, data.Split(len(texts), 0.3, 3), 2, 16, 3)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
