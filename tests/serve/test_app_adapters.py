"""`serve --adapters`: the server's greedy tokens over a base checkpoint plus LoRA adapters equal
`infer.py --adapters`' for the same prompt, and the served weights are not the base's (the
adapters were merged: `tests/generate/test_lora_loading.py` shows they change the logits).

The server is the CLI's own `parse_args` + `build` (checkpoint loader with the adapters merged,
engine, app) behind Starlette's in-process client, its engine on its own thread; infer.py runs
in this process as the oracle.
"""

import contextlib
import io
import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from starlette.testclient import TestClient

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.adapters import save_adapters
from mixtral_jax.generate.loading import load_for_inference
from mixtral_jax.model import lora
from mixtral_jax.serve.__main__ import build, parse_args
from mixtral_jax.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = ["Mixture of experts routes tokens.", "Low-rank adapters train on one GPU."] * 20
PROMPT, NEW = "Mixture of experts", 12


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(base checkpoint, adapter directory): rank-4 adapters on attention, router and experts,
    factors of std 0.3 (both A and B: far from the base)."""
    root = tmp_path_factory.mktemp("serve_adapters")
    tok = train_tokenizer(TEXT, str(root / "tok.model"), 64)
    cfg = mj.ModelConfig.tiny(vocab_size=tok.vocab_size, max_seq_len=64)
    params = jax.device_get(mj.get_params(mj.init(cfg, 0)))
    checkpoint.save_model(str(root / "base"), params, cfg, str(root / "tok.model"))
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "router", "w_up"))
    shapes = jax.eval_shape(lambda: lora.init_adapters(cfg, lcfg, 1))
    rng = np.random.default_rng(7)
    factors = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)
    save_adapters(str(root / "adapters"), factors, lcfg)
    return str(root / "base"), str(root / "adapters")


def _infer(args: list[str]) -> list[int]:
    """infer.py --json in this process: the greedy ids of PROMPT."""
    sys.path.insert(0, ROOT)
    try:
        import infer
    finally:
        sys.path.remove(ROOT)
    out = io.StringIO()
    common = ["--prompt", PROMPT, "--max-new-tokens", str(NEW), "--json", "--quiet"]
    with contextlib.redirect_stdout(out):
        assert infer.main([*args, *common, "--no-compile-cache"]) == 0
    return json.loads(out.getvalue())["completions"][0]["ids"]


def test_served_adapters_equal_infer_with_the_same_adapters(dirs):
    base, adapters = dirs
    args = parse_args(["--checkpoint", base, "--adapters", adapters, "--max-batch", "2"])
    args.block_size, args.prefill_chunk, args.no_warmup = 8, 8, True
    app, engine = build(args, api_key=None)
    engine.start()
    try:
        body = {"prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "return_token_ids": True}
        r = TestClient(app).post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["token_ids"]
    finally:
        engine.shutdown()
    want = _infer(["--checkpoint", base, "--adapters", adapters])
    assert served == want and len(want) == NEW  # no EOS on the way
    plain, _ = load_for_inference(base)
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), engine.steps.state, nnx.state(plain))
    assert sum(jax.tree.leaves(changed)) == 4  # q_proj, v_proj, router and w_up: merged
