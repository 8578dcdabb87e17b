"""The server end to end: `python -m mixtral_jax.serve` on loopback, the official openai client.

One server process per module (the CLI: checkpoint loader, LoRA adapters merged over the base
with --adapters, engine, uvicorn, an API key) serves every test here; infer.py runs in this
process on the same checkpoint and adapters as the oracle of greedy tokens (and without the
adapters, to show they change them). The last test stops the server with SIGTERM.
"""

import concurrent.futures
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.adapters import save_adapters
from mixtral_jax.model import lora
from mixtral_jax.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts routes tokens.",
    "Sparse models read only the chosen experts.",
    "def main(): return 0",
] * 20
KEY = "test-key-123"
NAME = "tiny-test"
CONTEXT = 256
MAX_BATCH = 10  # eight others, the greedy one and one spare row


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(base checkpoint, adapter directory): rank-4 adapters on attention, the router and the
    experts, factors of std 0.3 (far from the base)."""
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(TEXT, str(root / "tok.model"), 96)
    cfg = mj.ModelConfig.tiny(vocab_size=tok.vocab_size, max_seq_len=CONTEXT)
    model = mj.init(cfg, seed=3)
    checkpoint.save_model(str(root / "ckpt"), mj.get_params(model), cfg, str(root / "tok.model"))
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "router", "w_up"))
    rng = np.random.default_rng(7)
    factors = jax.tree.map(
        lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
        jax.eval_shape(lambda: lora.init_adapters(cfg, lcfg, 1)),
    )
    save_adapters(str(root / "adapters"), factors, lcfg)
    return str(root / "ckpt"), str(root / "adapters")


class _Server:
    """The CLI serving a checkpoint with an API key on a free port, started at once; `url`
    waits until it answers (so the oracle runs in this process meanwhile)."""

    def __init__(self, ckpt):
        base, adapters = ckpt
        command = [sys.executable, "-m", "mixtral_jax.serve", "--checkpoint", base]
        command += ["--adapters", adapters]
        command += ["--model-name", NAME, "--port", "0", "--max-batch", str(MAX_BATCH)]
        command += ["--max-queue", "64", "--block-size", "8", "--prefill-chunk", "16"]
        command += ["--prefill-budget", "32"]  # groups of 1 and 2 rows: fewer compiles
        command += ["--decode-batches", f"1,{MAX_BATCH}"]  # 2 compiled batches, not 3
        command += ["--quiet", "--log-level", "warning"]
        env = {**os.environ, "MIXTRAL_JAX_API_KEY": KEY, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._url = None

    @property
    def url(self) -> str:
        if self._url is None:
            line = self.proc.stdout.readline()  # "serving NAME on http://HOST:PORT"
            if not line.startswith("serving"):
                self.proc.kill()
                pytest.fail(f"server did not start: {line}{self.proc.stderr.read()[-3000:]}")
            url = line.split(" on ")[1].strip()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.05)
            self._url = url
        return self._url


@pytest.fixture(scope="module")
def server(ckpt):
    server = _Server(ckpt)
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
    server.proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _infer(ckpt, prompt, new, adapters=None):
    """infer.py --json in this process: (ids, text) of the greedy completion of one prompt."""
    sys.path.insert(0, ROOT)
    try:
        import infer
    finally:
        sys.path.remove(ROOT)
    args = ["--checkpoint", ckpt, "--prompt", prompt, "--max-new-tokens", str(new), "--json"]
    args += ["--adapters", adapters] if adapters else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = infer.main([*args, "--quiet", "--no-compile-cache"])
    assert code == 0
    done = json.loads(out.getvalue())["completions"][0]
    return done["ids"], done["text"]


@pytest.fixture(scope="module")
def oracle(server, ckpt):
    """infer.py's greedy completions with the adapters, and of the base alone, computed while
    the server starts."""
    base, adapters = ckpt
    return {"prompt": _infer(base, PROMPT, NEW, adapters), "base": _infer(base, PROMPT, NEW)}


def _engine(url) -> dict:
    """The engine gauges of GET /metrics: {key: value}."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    prefix = "mixtral_jax_engine_"
    return {
        line.split()[0][len(prefix) :]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


PROMPT = "The quick brown fox"
CHAT = "Hello there"
NEW = 16


def test_completions_greedy_equal_infer_whole_and_streamed(oracle, client):
    ids, text = oracle["prompt"]
    got = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=NEW,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = got.choices[0]
    assert choice.token_ids == ids and choice.text == text
    assert oracle["base"][0] != ids  # the served tokens are the adapted model's
    assert choice.finish_reason == ("length" if len(ids) == NEW else "stop")
    assert got.usage.completion_tokens == len(ids)
    assert got.usage.prompt_tokens == len(got.prompt_token_ids)
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=PROMPT,
            max_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ids) and not chunks[-1].choices


def test_chat_greedy_equals_its_instruct_prompt_whole_and_streamed(client):
    """A chat is the completion of its instruct prompt (infer.py --chat's wrapping; the format
    itself is checked against mistral-common in test_protocol.py)."""
    plain = client.completions.create(
        model=NAME,
        prompt=f"[INST] {CHAT} [/INST]",
        max_tokens=NEW,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    ids, text = plain.choices[0].token_ids, plain.choices[0].text
    messages = [{"role": "user", "content": CHAT}]
    got = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=NEW, temperature=0
    )
    assert got.choices[0].message.content == text and got.choices[0].message.role == "assistant"
    assert got.object == "chat.completion" and got.usage.completion_tokens == len(ids)
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=NEW, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_greedy_tokens_unchanged_while_eight_others_run(oracle, server, client):
    """Eight streams of different lengths are decoding when the greedy request comes, and all
    are still going when it has finished."""
    ids, _ = oracle["prompt"]
    prompts = ["Sparse", "def main(): return 0 " * 2, "Mixture of experts " * 3, "The lazy dog"]
    started = [threading.Event() for _ in range(8)]
    ended, counts = [0.0] * 8, [0] * 8

    def other(i):
        stream = client.completions.create(
            model=NAME,
            prompt=prompts[i % 4] * (1 + i % 2),
            max_tokens=150 + 4 * i,
            temperature=1.0,
            seed=i,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        for chunk in stream:
            started[i].set()
            counts[i] += _streamed_ids([chunk])
        ended[i] = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        others = [pool.submit(other, i) for i in range(8)]
        assert all(e.wait(30) for e in started)  # every other one is decoding
        got = client.completions.create(
            model=NAME,
            prompt=PROMPT,
            max_tokens=NEW,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        done = time.monotonic()
        for f in others:
            f.result()
    assert got.choices[0].token_ids == ids
    assert counts == [150 + 4 * i for i in range(8)]
    assert min(ended) > done  # they ran all along


def test_routing_is_returned_per_token(server, client):
    got = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        extra_body={"routing": True, "return_token_ids": True, "ignore_eos": True},
    )
    routing = got.choices[0].routing
    assert len(routing) == len(got.choices[0].token_ids) == 5
    for token in routing:  # tiny: 2 layers, top-2 of 4 experts; weights renormalised
        assert len(token["experts"]) == 2 and all(len(k) == 2 for k in token["experts"])
        assert all(0 <= e < 4 for layer in token["experts"] for e in layer)
        assert all(abs(sum(w) - 1) < 1e-4 for w in token["weights"])
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            stream=True,
            extra_body={"routing": True, "ignore_eos": True},
        )
    )
    streamed = [t for c in chunks for t in (c.choices[0].model_extra.get("routing") or [])]
    assert streamed == routing


def test_stop_strings_cut_the_text_and_finish_with_stop(server, client):
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0)
    text = whole.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    got = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop]
    )
    assert got.choices[0].text == text[: text.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_a_cancelled_stream_frees_its_slot(server, client):
    url = server.url
    before = _engine(url)
    stream = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for _ in range(3):
        next(iter(stream))
    assert _engine(url)["running"] == 1
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 5
    while _engine(url)["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    after = _engine(url)
    assert after["running"] == 0 and after["free_blocks"] == before["free_blocks"]
    assert after["generated_tokens"] - before["generated_tokens"] < 200  # stopped early
    # the engine freed the row by the step after the one running when the server saw the
    # disconnect (the wait above only bounds the test)
    assert after["cancel_lag"] <= 1 and after["calls"] > before["calls"]
    # a whole (non-streamed) answer whose client goes away is cancelled too
    before = _engine(url)
    body = json.dumps({"prompt": "x", "max_tokens": 240, "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 5
        while not _engine(url)["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
    deadline = time.monotonic() + 5
    while _engine(url)["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    after = _engine(url)
    assert after["running"] == 0 and after["free_blocks"] == before["free_blocks"]
    assert 0 < after["generated_tokens"] - before["generated_tokens"] < 240
    assert after["cancel_lag"] <= 1


def _post(url, body, path="/v1/completions", **kw):
    headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
    return httpx.post(f"{url}{path}", headers=headers, json=body, **{"timeout": 30, **kw})


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature", "[0.0, 2.0]"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n", "not supported"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 300}, "max_tokens", "context of 256"),
        ("/v1/completions", {"prompt": [1] * 260}, "prompt", "limit of 255"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, "model", "not served"),
        ("/v1/chat/completions", {"messages": []}, "messages", "non-empty"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "bot", "content": "x"}]},
            "messages[0].role",
            "'user'",
        ),
    ],
)
def test_bad_fields_are_400s_naming_them(server, path, body, param, words):
    r = _post(server.url, body, path)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_bodies_sizes_and_paths(server):
    url = server.url
    r = httpx.post(
        f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b"{nope"
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(
        f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b"[1, 2]"
    )
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = _post(url, {"prompt": "x" * (5 << 20)})
    assert r.status_code == 413 and "limit of 4194304 bytes" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()
    assert _post(url, {"prompt": "x", "max_tokens": 2}).status_code == 200  # still serving


def test_api_key_is_required_everywhere_but_health(server):
    url = server.url
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/completions", headers=headers, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["id"] == NAME and models["data"][0]["max_model_len"] == CONTEXT


def test_metrics_count_requests_and_latencies(server, client):
    client.completions.create(model=NAME, prompt="x", max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):  # counted under status 400 (this test's own)
        client.completions.create(model=NAME, prompt="x", max_tokens=3, temperature=-1)
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for series in (
        "mixtral_jax_engine_queue_depth",
        "mixtral_jax_engine_running",
        "mixtral_jax_output_tokens_per_second",
        "mixtral_jax_output_tokens_total",
        "mixtral_jax_time_to_first_token_seconds_bucket",
        "mixtral_jax_inter_token_latency_seconds_bucket",
        'mixtral_jax_requests_total{endpoint="completions",status="200"}',
        'mixtral_jax_requests_total{endpoint="completions",status="400"}',
    ):
        assert series in text, series


def _streamed_ids(chunks) -> int:
    return sum(len(c.choices[0].model_extra.get("token_ids") or []) for c in chunks if c.choices)


def test_load_200_requests_from_32_clients_none_lost(server, client):
    """Closed-loop load: every response complete (exact token counts), none lost, bounded;
    one request in ten is bad (a 400) and disturbs no other."""

    def one(i):
        """Request i: completion or chat, streamed or not; (asked, usage, received) tokens."""
        n, chat, stream = 2 + i % 7, i % 2 == 1, i % 3 == 0
        create = client.chat.completions.create if chat else client.completions.create
        kw = {"model": NAME, "max_tokens": n, "temperature": 0.7, "seed": i, "timeout": 60}
        if i % 10 == 9:  # a bad request among the others: a 400, and the others go on
            kw["temperature"] = 5.0
            with pytest.raises(openai.BadRequestError, match="temperature"):
                if chat:
                    create(**kw, messages=[{"role": "user", "content": "x"}])
                else:
                    create(**kw, prompt="x")
            return 0, 0, 0
        kw["extra_body"] = {"ignore_eos": True, "return_token_ids": True}
        if chat:
            kw["messages"] = [{"role": "user", "content": f"{i} fox"}]
        else:
            kw["prompt"] = f"{i} fox"
        if stream:
            chunks = list(create(**kw, stream=True, stream_options={"include_usage": True}))
            return n, chunks[-1].usage.completion_tokens, _streamed_ids(chunks)
        r = create(**kw)
        return n, r.usage.completion_tokens, len(r.choices[0].model_extra["token_ids"])

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200), timeout=120))
    assert len(results) == 200
    assert all(want == usage == got for want, usage, got in results), results
    assert time.monotonic() - start < 120
    assert _engine(server.url)["running"] == 0


def test_sigterm_drains_running_streams_and_exits_0(server, client):
    proc, url = server.proc, server.url
    chunks, errors = [], []

    def long_stream():
        try:
            s = client.completions.create(
                model=NAME,
                prompt=PROMPT,
                max_tokens=60,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            chunks.extend(s)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=long_stream)
    thread.start()
    deadline = time.monotonic() + 10
    while not chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises((httpx.HTTPError, openai.APIError)) as refused:  # no longer admitting
        r = _post(url, {"prompt": "x", "max_tokens": 2}, timeout=5)
        if r.status_code == 503:
            raise openai.APIError("503", request=None, body=None)
    assert refused.value is not None
    thread.join(30)
    assert not errors and chunks[-1].choices[0].finish_reason == "length"
    assert _streamed_ids(chunks) == 60
    assert proc.wait(30) == 0
