"""Request validation, Mistral's instruct format and response bodies (no engine, no server)."""

import pytest

from mixtral_jax.serve import protocol
from mixtral_jax.serve.protocol import ApiError, Limits, parse_chat, parse_completion
from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path, train_tokenizer

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts routes tokens.",
    "Sparse models read only the chosen experts.",
] * 20
LIMITS = Limits(model_name="tiny", context=64, vocab_size=96, max_prompt_tokens=40)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXT, str(tmp_path_factory.mktemp("tok") / "tok.model"), 96)


@pytest.fixture(scope="module")
def mistral():
    return Tokenizer.load(default_tokenizer_path(32000))


def test_a_completion_body_becomes_a_generation(tok):
    body = {
        "model": "tiny",
        "prompt": "The quick brown fox",
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 3,
        "stop": ["dog", "."],
        "stop_token_ids": [2],
        "stream": True,
        "stream_options": {"include_usage": True},
        "routing": True,
        "return_token_ids": True,
        "ignore_eos": True,
        "user": "someone",
    }
    gen = parse_completion(body, tok, LIMITS)
    assert gen.prompt == tok.encode("The quick brown fox") and gen.prompt[0] == tok.bos_id
    assert (gen.max_tokens, gen.seed, gen.stop, gen.stop_ids) == (7, 3, ("dog", "."), (2,))
    assert (gen.sampling.temperature, gen.sampling.top_p, gen.sampling.top_k) == (0.5, 0.9, 5)
    assert gen.stream and gen.include_usage and gen.routing and gen.return_token_ids
    assert gen.ignore_eos
    assert not gen.chat


def test_completion_defaults_and_prompt_forms(tok):
    gen = parse_completion({"prompt": "fox"}, tok, LIMITS)
    assert gen.max_tokens == protocol.DEFAULT_MAX_TOKENS  # OpenAI's 16
    assert gen.sampling.temperature == 1.0 and gen.sampling.top_k == 0
    assert 0 <= gen.seed < 2**32 and gen.seed != parse_completion({"prompt": "x"}, tok, LIMITS).seed
    assert parse_completion({"prompt": ["fox"]}, tok, LIMITS).prompt == tok.encode("fox")
    assert parse_completion({"prompt": [1, 5, 9]}, tok, LIMITS).prompt == [1, 5, 9]
    assert parse_completion({"prompt": [[1, 5]]}, tok, LIMITS).prompt == [1, 5]
    assert parse_completion({"prompt": ""}, tok, LIMITS).prompt == [tok.bos_id]  # BOS only
    assert parse_completion({"prompt": "x", "top_k": -1}, tok, LIMITS).sampling.top_k == 0
    assert parse_completion({"prompt": "x", "top_k": 10**6}, tok, LIMITS).sampling.top_k == 96
    many = parse_completion({"prompt": [1] * 40, "max_tokens": 24}, tok, LIMITS)
    assert many.max_tokens == 24  # exactly the context


BAD_COMPLETIONS = [
    ({"n": 2}, "n", "not supported"),
    ({"best_of": 3}, "best_of", "not supported"),
    ({"logprobs": 1}, "logprobs", "not supported"),
    ({"echo": True}, "echo", "not supported"),
    ({"suffix": "x"}, "suffix", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ({"temperature": 2.5}, "temperature", "[0.0, 2.0]"),
    ({"temperature": -0.1}, "temperature", "[0.0, 2.0]"),
    ({"temperature": float("nan")}, "temperature", "[0.0, 2.0]"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"temperature": True}, "temperature", "must be a number"),
    ({"top_p": 0}, "top_p", "(0.0, 1.0]"),
    ({"top_p": 1.0001}, "top_p", "(0.0, 1.0]"),
    ({"top_k": -2}, "top_k", ">= -1"),
    ({"top_k": 2.5}, "top_k", "integer"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": "5"}, "max_tokens", "integer"),
    ({"max_tokens": 5.0}, "max_tokens", "integer"),
    ({"max_tokens": 10**9}, "max_tokens", "context of 64 tokens"),
    ({"seed": 2**32}, "seed", "must be in [0, 4294967295]"),
    ({"seed": -1}, "seed", "must be in [0, 4294967295]"),
    ({"ignore_eos": "no"}, "ignore_eos", "true or false"),
    ({"model": "gpt-4"}, "model", "not served here"),
    ({"model": 4}, "model", "string"),
    ({"stop": [""]}, "stop", "empty string"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "limit of 4"),
    ({"stop": 3}, "stop", "string or a list"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "outside the vocabulary"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"routing": 1}, "routing", "true or false"),
    ({"frobnicate": 1}, "frobnicate", "unknown field"),
    ({"prompt": None}, "prompt", "must be a string"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": []}, "prompt", "must be a string"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": [1, 96]}, "prompt", "token id 96, outside [0, 96)"),
    ({"prompt": [1, True]}, "prompt", "must be a string"),
    ({"prompt": "\ud800"}, "prompt", "lone surrogate"),
    ({"prompt": [1] * 41}, "prompt", "41 tokens, more than the limit of 40"),
    ({"prompt": [1] * 40, "max_tokens": 25}, "max_tokens", "65 exceeds the model's context"),
]


@pytest.mark.parametrize(("change", "param", "words"), BAD_COMPLETIONS)
def test_each_bad_completion_field_is_a_400_naming_it(tok, change, param, words):
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": "fox", **change}, tok, LIMITS)
    assert (e.value.status, e.value.param) == (400, param)
    assert words in e.value.message and param.split("[")[0] in e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_a_missing_prompt_is_named(tok):
    with pytest.raises(ApiError, match="prompt is required"):
        parse_completion({"max_tokens": 3}, tok, LIMITS)


def _chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_chat_prompt_equals_mistral_common(mistral):
    """The oracle: mistral-common's own V1 instruct tokenizer (Mixtral 8x7B's)."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    official = MistralTokenizer.v1()
    cases = [
        [("user", "Hi there")],
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "MoE?")],
        [
            ("user", "a"),
            ("assistant", "b"),
            ("user", "c\nd"),
            ("assistant", "é 漢字 🙂"),
            ("user", "e"),
        ],
    ]
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    limits = Limits("m", 4096, 32000, 4000)
    for turns in cases:
        want = official.encode_chat_completion(
            ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in turns])
        ).tokens
        gen = parse_chat({"messages": _chat(*turns)}, mistral, limits)
        assert gen.prompt == want, turns
        assert gen.chat and gen.max_tokens == 4096 - len(want)  # default: the rest of the context
    # infer.py --chat wraps one prompt the same way
    single = parse_chat({"messages": _chat(("user", "Hi there"))}, mistral, limits).prompt
    assert single == mistral.encode("[INST] Hi there [/INST]")


def test_chat_content_parts_and_max_completion_tokens(tok):
    parts = [{"type": "text", "text": "quick "}, {"type": "text", "text": "fox"}]
    gen = parse_chat(
        {"messages": [{"role": "user", "content": parts}], "max_completion_tokens": 3}, tok, LIMITS
    )
    assert gen.prompt == parse_chat({"messages": _chat(("user", "quick fox"))}, tok, LIMITS).prompt
    assert gen.max_tokens == 3


BAD_CHATS = [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": None}, "messages", "non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "object with role"),
    ({"messages": _chat(("tool", "x"))}, "messages[0].role", "'system', 'user' or 'assistant'"),
    ({"messages": _chat(("user", "a"), ("user", "b"))}, "messages[1].role", "alternate"),
    ({"messages": _chat(("assistant", "a"))}, "messages[0].role", "alternate"),
    ({"messages": _chat(("user", "a"), ("assistant", "b"))}, "messages", "last message"),
    ({"messages": _chat(("system", "a"))}, "messages", "last message"),
    (
        {"messages": _chat(("user", "a"), ("assistant", ""), ("user", "c"))},
        "messages[1].content",
        "empty",
    ),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content",
        "parts",
    ),
    ({"messages": [{"role": "user", "content": "a", "x": 1}]}, "messages[0]", "unknown message"),
    ({"messages": _chat(("user", "\udfff"))}, "messages[0].content", "lone surrogate"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"max_tokens": 3, "max_completion_tokens": 3}, "max_tokens", "not both"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ({"prompt": "x"}, "prompt", "unknown field"),
    ({"messages": _chat(("user", "fox " * 40))}, "messages", "more than the limit of 40"),
]


@pytest.mark.parametrize(("change", "param", "words"), BAD_CHATS)
def test_each_bad_chat_field_is_a_400_naming_it(tok, change, param, words):
    body = {"messages": _chat(("user", "fox")), **change}
    with pytest.raises(ApiError) as e:
        parse_chat(body, tok, LIMITS)
    assert (e.value.status, e.value.param) == (400, param)
    assert words in e.value.message


def test_response_pieces(tok):
    gen = parse_completion({"prompt": "x", "routing": True, "return_token_ids": True}, tok, LIMITS)
    routing = [[[(3, 0.75), (1, 0.25)], [(0, 0.5), (2, 0.5)]]]  # one token, L=2, k=2
    choice = protocol.choice(gen, "hi", "eos", [7], routing)
    assert choice == {
        "index": 0,
        "text": "hi",
        "logprobs": None,
        "finish_reason": "stop",
        "token_ids": [7],
        "routing": [{"experts": [[3, 1], [0, 2]], "weights": [[0.75, 0.25], [0.5, 0.5]]}],
    }
    chat = parse_chat({"messages": _chat(("user", "x"))}, tok, LIMITS)
    assert protocol.choice(chat, "yo", "length")["message"] == {
        "role": "assistant",
        "content": "yo",
    }
    assert protocol.choice(chat, "", None, delta=True)["delta"] == {}
    assert "routing" not in protocol.choice(chat, "", None, [1], routing)  # not asked for
    assert protocol.envelope(chat, "i", 5, "tiny", True)["object"] == "chat.completion.chunk"
    assert protocol.envelope(gen, "i", 5, "tiny", False)["object"] == "text_completion"
    assert protocol.usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
