"""The app's answers in states a live server rarely shows on cue: a full queue (429 with
Retry-After), draining (503) and a closed engine (503); Starlette's in-process test client, an
engine that never steps (nothing compiles)."""

import gc
import weakref

import pytest
from starlette.testclient import TestClient

import mixtral_jax as mj
from mixtral_jax.config import ConfigError
from mixtral_jax.serve.app import create_app
from mixtral_jax.serve.engine import Engine
from mixtral_jax.tokenizer import train_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog.", "Mixture of experts routes tokens."] * 30
BODY = {"prompt": "fox", "max_tokens": 3}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok = train_tokenizer(TEXT, str(tmp_path_factory.mktemp("tok") / "tok.model"), 64)
    cfg = mj.ModelConfig.tiny(vocab_size=tok.vocab_size, max_seq_len=32)
    return mj.init(cfg, seed=0), tok


def _client(parts, num_blocks=None, **kw):
    model, tok = parts
    engine = Engine(model, max_batch=1, max_queue=0, block_size=8, num_blocks=num_blocks)
    # every valid submit: QueueFull
    app = create_app(engine, tok, model_name="m", context=model.cfg.max_seq_len, **kw)
    return TestClient(app), engine, app


def test_a_full_queue_is_a_429_with_retry_after(parts):
    client, _, _ = _client(parts)
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 429


def test_a_request_the_whole_pool_cannot_hold_is_a_400_naming_the_pool(parts):
    """Rows short of blocks are preempted and recomputed, so only a request that alone needs
    more than the pool is refused, up front."""
    client, _, _ = _client(parts, num_blocks=3)  # 2 blocks of 8 tokens
    r = client.post("/v1/completions", json={"prompt": "fox", "max_tokens": 20})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "needs 3 KV blocks of 8 tokens at once; the pool has 2" in r.json()["error"]["message"]
    assert (
        client.post("/v1/completions", json={"prompt": "fox", "max_tokens": 5}).status_code == 429
    )


def test_draining_and_a_closed_engine_are_503s(parts):
    client, engine, app = _client(parts)
    app.state.server.draining = True
    assert client.post("/v1/completions", json=BODY).status_code == 503
    assert client.get("/health").json() == {"status": "draining"}
    app.state.server.draining = False
    engine.shutdown()
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_small_limits_and_bad_settings(parts):
    client, _, _ = _client(parts, max_body_bytes=100, max_prompt_tokens=4)
    r = client.post("/v1/completions", json={"prompt": "x" * 200})
    assert r.status_code == 413 and "limit of 100 bytes" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": [1, 5, 5, 5, 5]})
    assert r.status_code == 400 and "limit of 4" in r.json()["error"]["message"]
    chunked = client.post("/v1/completions", content=iter([b"{" + b" " * 60, b" " * 60 + b"}"]))
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    with pytest.raises(ConfigError, match="max_prompt_tokens=32 must be in"):
        _client(parts, max_prompt_tokens=32)
    with pytest.raises(ConfigError, match="max_body_bytes=0"):
        _client(parts, max_body_bytes=0)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--checkpoint", "nowhere", "--port", "70000"], "--port 70000 must be in [0, 65535]"),
        (["--checkpoint", "nowhere", "--max-batch", "0"], "--max-batch 0 must be >= 1"),
        (
            ["--checkpoint", "nowhere", "--prefill-budget", "64"],
            "--prefill-budget 64 must be >= --prefill-chunk 128",
        ),
        (
            ["--checkpoint", "nowhere", "--max-batch", "8", "--decode-batches", "4,16"],
            "--decode-batches 4,16 must be integers in [1, --max-batch 8]",
        ),
        (["--checkpoint", "nowhere", "--api-key", " "], "API key"),
        (["--checkpoint", "nowhere"], "checkpoint nowhere does not exist"),
    ],
)
def test_cli_bad_flags_are_one_line_errors(capsys, args, words):
    from mixtral_jax.serve.__main__ import main

    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and err.startswith("error: ") and "\n" not in err


def test_an_engine_failure_is_a_500_whole_and_an_error_event_streamed(parts, monkeypatch):
    model, tok = parts
    engine = Engine(model, max_batch=2, max_queue=4, block_size=8)

    def boom(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.steps, "decode_with_chunk", boom)  # fails the rows it ran
    engine.start()
    try:
        client = TestClient(create_app(engine, tok, model_name="m", context=32))
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={**BODY, "stream": True})
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert "device lost" in events[-2] and '"error"' in events[-2]
        assert events[-1] == "data: [DONE]"
        assert client.get("/health").status_code == 200  # the server goes on
    finally:
        engine.shutdown()


def test_freeze_heap_leaves_start_up_objects_alone_and_collects_what_serving_makes():
    """The server freezes its start-up heap (no full collection walks JAX and the model while
    streams wait); cycles made later are still collected."""
    from mixtral_jax.serve.__main__ import freeze_heap

    class Node:
        pass

    old = Node()
    old.me = old  # a cycle alive at start-up
    old_ref = weakref.ref(old)
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        del old
        gc.collect()
        assert old_ref() is not None  # frozen: out of the collector's reach
        new = Node()
        new.me = new
        new_ref = weakref.ref(new)
        del new
        gc.collect()
        assert new_ref() is None
    finally:
        gc.unfreeze()
    gc.collect()
    assert old_ref() is None


def test_the_server_runs_on_uvloop_and_httptools():
    """`serve` leaves uvicorn's loop and parser on "auto", which takes these two package
    dependencies when they import (the server's event loop does every stream's per-token work)."""
    import uvicorn
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    async def app(scope, receive, send):
        pass

    config = uvicorn.Config(app, lifespan="on")
    config.load()
    assert config.loop == "auto" and config.http_protocol_class is HttpToolsProtocol
    if hasattr(config, "get_loop_factory"):  # uvicorn >= 0.36; older ones set up a policy
        loop = config.get_loop_factory()()
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
