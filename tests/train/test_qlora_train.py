"""QLoRA runs: LoRA adapters trained over a quantized checkpoint (`python -m mixtral_jax.quantize`).
The codes and scales come out of the compiled steps bit-identical, the run's state holds the
adapters and their moments alone (leaves and bytes counted), a stopped run resumes bit for bit,
`infer.py --adapters` generates over the quantized base, `surgery merge-lora` writes the
dequantized float model plus the adapters, and anything that would train a quantized weight
itself is a one-line error naming the setting."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.adapters import load_adapters
from mixtral_jax.config import ConfigError
from mixtral_jax.generate.loading import load_for_inference
from mixtral_jax.model import lora, quantized
from mixtral_jax.parallel import sharding
from mixtral_jax.quantize.stream import quantize_checkpoint
from mixtral_jax.surgery import cli as surgery_cli
from mixtral_jax.tokenizer import train_tokenizer
from mixtral_jax.train import trainable, trainer
from mixtral_jax.train.config import TrainConfig, load_run_config
from mixtral_jax.train.step import init_state, make_optimizer, make_train_step, state_shardings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import ROOT, _final_state
from test_trainable import SMALL, _moments, _nbytes

TEXT = ["Mixture of experts routes tokens to experts.", "Adapters train on one GPU."] * 30
TARGETS = ("q_proj", "o_proj", "w_gate", "w_down")
QLORA = ["train.lora_rank=4", f"train.lora_targets={json.dumps(list(TARGETS))}"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """(root, quantized checkpoint: int4 experts and attention in groups of 32)."""
    root = tmp_path_factory.mktemp("qlora")
    tokenizer = train_tokenizer(TEXT, str(root / "tok.model"), 64)
    cfg = mj.ModelConfig.tiny(vocab_size=tokenizer.vocab_size, num_layers=1)
    params = jax.device_get(jax.jit(lambda: mj.get_params(mj.init(cfg, 0)))())
    checkpoint.save_model(str(root / "float"), params, cfg, str(root / "tok.model"))
    quantize_checkpoint(
        str(root / "float"), str(root / "int4"), bits=4, group_size=32, attention=True
    )
    return root, str(root / "int4")


def _run(run_dir, base, *overrides):
    cfg = load_run_config(
        None,
        [f"checkpoint.dir={run_dir}", f"checkpoint.init_from={base}", *SMALL, *QLORA, *overrides],
    )
    return trainer.run(cfg, show_progress=False)


@pytest.fixture(scope="module")
def qlora_run(bases):
    root, base = bases
    _run(root / "run", base, "train.steps=3")
    return root / "run"


def test_steps_leave_the_quantized_codes_and_scales_bit_identical(bases):
    _, base = bases
    cfg, params = checkpoint.load_model(base)
    assert cfg.expert_bits == cfg.attention_bits == 4
    before = jax.device_get(params)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    part = trainable.Partition(lcfg=lcfg, rows={})
    tc = TrainConfig(steps=10, batch_size=2, seq_len=16, warmup_steps=0, lr=1e-2)
    adapters = lora.init_adapters(cfg, lcfg, seed=0)
    tx = make_optimizer(tc, adapters)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    step = make_train_step(
        nnx.graphdef(trainable.abstract_model(cfg, part)),
        tx,
        tc,
        mesh=mesh,
        shardings=state_shardings(adapters, tx, mesh),
        frozen=(part, params),
    )
    state = init_state(adapters, tx, 0)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 2, 16))
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=-1),
        "loss_mask": np.ones_like(tokens, np.float32),
        "positions": np.broadcast_to(np.arange(16), tokens.shape),
        "segment_ids": np.ones_like(tokens),
    }
    for _ in range(2):
        state, m = step(state, batch)
        assert bool(m["finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), before)
    assert before["layers"]["moe"]["w_gate"].dtype == np.uint8  # int4 codes, compared above
    b = jax.device_get(state.params["layers"]["moe"]["lora_w_gate_b"])
    assert np.any(b != 0)  # the adapters trained


def test_the_run_state_holds_the_adapters_and_their_moments_alone(qlora_run):
    _, state = _final_state(qlora_run)
    lcfg, adapters = load_adapters(str(qlora_run / "model"))
    assert lcfg.targets == TARGETS
    jax.tree.map(np.testing.assert_array_equal, adapters, state["params"])
    mu, nu = _moments(state["opt_state"])
    assert len(jax.tree.leaves(mu)) == len(jax.tree.leaves(nu)) == 2 * len(TARGETS)
    assert _nbytes(mu) == _nbytes(nu) == _nbytes(adapters)
    assert _nbytes(state["opt_state"]) < 2 * _nbytes(adapters) + 64  # + step counters
    integers = [x for x in jax.tree.leaves(state) if np.asarray(x).dtype.kind in "iu"]
    assert all(np.asarray(x).size <= 2 for x in integers)  # counters and the key, no codes
    assert sorted(os.listdir(qlora_run / "model")) == ["adapters.json", "adapters.npz"]


def test_a_stopped_qlora_run_resumes_bit_identically(bases, qlora_run, tmp_path, capsys):
    """The kill -9 test's pattern, cheaply: a copy of the finished run cut back to its step-1
    checkpoint (what a run stopped after step 1 leaves) resumes to the same final state."""
    cut = tmp_path / "cut"
    shutil.copytree(qlora_run, cut)
    for step in ("2", "3"):
        shutil.rmtree(cut / "checkpoints" / step)
        shutil.rmtree(cut / "manifests" / step)
    shutil.rmtree(cut / "model")
    os.remove(cut / trainer.MODEL_STEP_FILE)
    _run(cut, bases[1], "train.steps=3")
    assert f"resumed from step 1 of {cut}" in capsys.readouterr().out
    (step, state), (ref_step, ref) = _final_state(cut), _final_state(qlora_run)
    assert step == ref_step == 3
    jax.tree.map(np.testing.assert_array_equal, state, ref)


def test_infer_with_adapters_over_the_quantized_base_generates(bases, qlora_run, capsys):
    _, base = bases
    sys.path.insert(0, ROOT)
    try:
        import infer
    finally:
        sys.path.remove(ROOT)
    argv = ["--checkpoint", base, "--adapters", str(qlora_run / "model"), "--prompt", "Mixture"]
    code = infer.main([*argv, "--max-new-tokens", "4", "--json", "--quiet", "--no-compile-cache"])
    out = capsys.readouterr().out
    assert code == 0, out
    (row,) = json.loads(out.splitlines()[-1])["completions"]
    assert 1 <= len(row["ids"]) <= 4 and row["finish"]


def _logits(model, tokens):
    return jax.jit(lambda m, t: m(t).logits)(model, tokens)


def test_loaded_adapters_over_the_quantized_base_and_merge_lora_equal_base_plus_adapters(
    bases, qlora_run, tmp_path
):
    _, base = bases
    adapters = str(qlora_run / "model")
    model, _ = load_for_inference(base, adapters=adapters)
    assert lora.get_adapters(model)  # kept as factors: codes take no merge
    cfg, params = checkpoint.load_model(base)
    lcfg, factors = load_adapters(adapters)
    oracle = mj.from_params(quantized.float_config(cfg), quantized.dequantize_params(params, cfg))
    lora.attach(oracle, lcfg, factors)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    want = _logits(oracle, tokens)
    np.testing.assert_allclose(_logits(model, tokens), want, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(_logits(mj.from_params(cfg, params), tokens) - want))) > 1e-4

    out = str(tmp_path / "merged")
    argv = ["merge-lora", "--checkpoint", base, "--adapters", adapters, "--out", out]
    assert surgery_cli.main(argv) == 0
    merged_cfg, merged = checkpoint.load_model(out)
    assert not merged_cfg.quantized
    np.testing.assert_allclose(
        _logits(mj.from_params(merged_cfg, merged), tokens), want, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.lora_rank=0"], "train.lora_rank=0: full fine-tuning cannot train the quantized"),
        (
            ["train.lora_rank=0", 'train.trainable=["layers.*.moe.experts[1]"]'],
            "train.trainable: 'layers.*.moe.experts[1]' selects layers.moe.w_down, stored quantized",
        ),
        (
            ["train.lora_rank=0", 'train.trainable=["layers.0.attn"]'],
            "'layers.0.attn' selects layers.attn.k_proj, stored quantized",
        ),
    ],
)
def test_training_a_quantized_weight_itself_is_a_one_line_error(bases, overrides, message):
    _, base = bases
    cfg = load_run_config(None, [f"checkpoint.init_from={base}", *overrides])
    with pytest.raises(ConfigError) as e:
        trainer.base_model_config(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert f"checkpoint.init_from={base}" in str(e.value)


def test_float_parts_of_a_quantized_base_may_train_alone(bases):
    _, base = bases
    cfg = load_run_config(None, [f"checkpoint.init_from={base}", 'train.trainable=["lm_head"]'])
    part = trainable.partition(cfg.train, trainer.base_model_config(cfg))
    assert part.rows == {("lm_head",): None}
