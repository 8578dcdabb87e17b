"""OpenAI's completion protocol: request validation, Mistral's instruct format, response bodies.

A request body (already JSON) becomes a `Generation`: the prompt's token ids and how to sample,
each field checked against OpenAI's rules and ours. A bad field is an `ApiError` (HTTP 400) whose
message names the field, the value and the rule, in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`. Fields we do not implement (n > 1, logprobs,
echo, penalties, tools) are refused by name instead of ignored; unknown fields are refused too.

Extensions beside OpenAI's fields: `top_k` (0 or -1 = off), `routing` (per generated token, the
experts each layer chose and their gate weights), `return_token_ids` (the prompt's and the
completion's ids, vLLM's name), `stop_token_ids` and `ignore_eos` (vLLM's names; the latter for
benchmarks of fixed lengths).

Chat prompts follow Mistral's instruct format as mistral-common's V1 tokenizer (Mixtral 8x7B)
encodes it: `<s>[INST] user [/INST] assistant</s>[INST] user [/INST]`, each message encoded on
its own; system messages are joined by a blank line and put before the first user message.

Nothing here touches the engine: the app turns a `Generation` into an engine request.
"""

from __future__ import annotations

import dataclasses
import math
import secrets

from mixtral_jax.config import ConfigError
from mixtral_jax.generate.sampling import SamplingParams

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 256
MAX_STOP_IDS = 64
MAX_MESSAGES = 1024
SEED_RANGE = (0, 2**32 - 1)  # the engine's: keys are fold_in(key(seed), token index)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Fields OpenAI clients send that change nothing here: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
# Fields of OpenAI's API we do not implement, with the value that means "off".
UNSUPPORTED_COMMON = {
    "n": 1,
    "logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
}
UNSUPPORTED_COMPLETION = {**UNSUPPORTED_COMMON, "best_of": 1, "echo": False, "suffix": None}
UNSUPPORTED_CHAT = {
    **UNSUPPORTED_COMMON,
    "logprobs": False,
    "top_logprobs": None,
    "tools": None,
    "tool_choice": None,
    "parallel_tool_calls": None,
    "functions": None,
    "function_call": None,
}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids")
COMMON_FIELDS = (
    "model",
    "max_tokens",
    "stream",
    "stream_options",
    "routing",
    "return_token_ids",
    "ignore_eos",
)
COMPLETION_FIELDS = frozenset(("prompt", *COMMON_FIELDS, *SAMPLING_FIELDS)) | IGNORED
CHAT_FIELDS = (
    frozenset(("messages", "max_completion_tokens", "response_format", *COMMON_FIELDS))
    | frozenset(SAMPLING_FIELDS)
    | IGNORED
)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str = "invalid_value",
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.code, self.kind, self.headers = code, kind, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the served model allows: its name, context (tokens), vocabulary and prompt limit."""

    model_name: str
    context: int
    vocab_size: int
    max_prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Generation:
    """One validated request.

    Attributes:
      chat: a chat completion (else a text completion).
      prompt: [P] token ids, BOS included.
      stop: stop strings: the text is cut before the first one found.
      stop_ids: token ids that end the completion (not included in it).
    """

    chat: bool
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    stream: bool = False
    include_usage: bool = False
    routing: bool = False
    return_token_ids: bool = False
    ignore_eos: bool = False


# ---- field checks ----------------------------------------------------------------------------
def _bad(name: str, value, rule: str, code: str = "invalid_value") -> ApiError:
    return ApiError(f"{name}={_show(value)} {rule}", param=name, code=code)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(name, value, "must be an integer", "invalid_type")
    if value < lo or (hi is not None and value > hi):
        rule = f"must be >= {lo}" if hi is None else f"must be in [{lo}, {hi}]"
        raise _bad(name, value, rule)
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float, open_lo: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise _bad(name, value, "must be a number", "invalid_type")
    if not math.isfinite(value) or value > hi or (value <= lo if open_lo else value < lo):
        raise _bad(name, value, f"must be in {'(' if open_lo else '['}{lo}, {hi}]")
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, value, "must be true or false", "invalid_type")
    return value


def _check_fields(body: dict, allowed: frozenset, unsupported: dict) -> None:
    """Unknown fields, and unimplemented ones set to anything but their 'off' value, refused."""
    for name in body:
        if name not in allowed and name not in unsupported:
            raise ApiError(f"unknown field {_show(name)}", param=name, code="unknown_field")
    for name, off in unsupported.items():
        value = body.get(name)
        if value is not None and value != off and not (off is None and value in ({}, [])):
            raise _bad(name, value, f"is not supported (only {off!r})", "unsupported")


def _stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", value, "must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", value, f"has {len(stops)} strings, more than the limit of {MAX_STOPS}")
    for s in stops:
        if not s:
            raise _bad("stop", value, "holds an empty string (it would stop at once)")
        if len(s) > MAX_STOP_CHARS:
            raise _bad("stop", value, f"holds a string longer than {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _stop_ids(body: dict, vocab: int) -> tuple[int, ...]:
    value = body.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(i) for i in value):
        raise _bad("stop_token_ids", value, "must be a list of integers", "invalid_type")
    if len(value) > MAX_STOP_IDS:
        raise _bad("stop_token_ids", value, f"has more than {MAX_STOP_IDS} ids")
    for i in value:
        if not 0 <= i < vocab:
            raise _bad("stop_token_ids", value, f"holds {i}, outside the vocabulary [0, {vocab})")
    return tuple(value)


def _model(body: dict, limits: Limits) -> None:
    value = body.get("model")
    if value is None:
        return
    if not isinstance(value, str):
        raise _bad("model", value, "must be a string", "invalid_type")
    if value != limits.model_name:
        raise _bad(
            "model", value, f"is not served here (only {limits.model_name!r})", "model_not_found"
        )


def _stream_options(body: dict, stream: bool) -> bool:
    """stream_options.include_usage (a last chunk with the usage counts)."""
    value = body.get("stream_options")
    if value is None:
        return False
    if not stream:
        raise _bad("stream_options", value, "is only allowed with stream=true")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise _bad("stream_options", value, "must be an object with only include_usage")
    return _bool(value, "include_usage")


def _sampling(body: dict, vocab: int) -> tuple[SamplingParams, int]:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True)
    top_k = _int(body, "top_k", 0, -1)
    seed = _int(body, "seed", None, *SEED_RANGE)
    try:
        sampling = SamplingParams(temperature, min(max(top_k, 0), vocab), top_p)
    except ConfigError as e:  # ranges are checked above: this is a second guard
        raise ApiError(str(e)) from None
    return sampling, secrets.randbits(32) if seed is None else seed


def _length(body: dict, name: str, prompt_len: int, default: int | None, limits: Limits) -> int:
    """max_tokens: >= 1 and, with the prompt, within the context (default: what is left)."""
    room = limits.context - prompt_len
    max_tokens = _int(body, name, None, 1)
    if max_tokens is None:
        max_tokens = room if default is None else min(default, room)
        if max_tokens < 1:
            raise ApiError(
                f"the prompt of {prompt_len} tokens leaves no room in the model's context of "
                f"{limits.context} tokens",
                param=name,
                code="context_length_exceeded",
            )
    elif prompt_len + max_tokens > limits.context:
        raise ApiError(
            f"prompt of {prompt_len} tokens + {name}={max_tokens} = {prompt_len + max_tokens} "
            f"exceeds the model's context of {limits.context} tokens",
            param=name,
            code="context_length_exceeded",
        )
    return max_tokens


def _check_prompt_length(ids: list[int], name: str, limits: Limits) -> None:
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(
            f"{name} is {len(ids)} tokens, more than the limit of {limits.max_prompt_tokens}",
            param=name,
            code="prompt_too_long",
        )


def _unicode(text: str, name: str) -> str:
    """`text`, or a 400 when it is not Unicode text (JSON can carry a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            f"{name} holds {e.object[e.start : e.end]!r} at character {e.start}, not valid "
            "Unicode (a lone surrogate)",
            param=name,
        ) from None
    return text


# ---- the two endpoints -----------------------------------------------------------------------
def _prompt_ids(value, tokenizer, limits: Limits) -> list[int]:
    """A completion prompt: a string, a list of token ids, or a list of one of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if len(value) > limits.max_prompt_tokens * 64:  # no token is that long: don't encode it
            raise _bad("prompt", value, "is far longer than the prompt limit", "prompt_too_long")
        return tokenizer.encode(_unicode(value, "prompt"))
    if isinstance(value, list) and value and all(_is_int(i) for i in value):
        for i in value:
            if not 0 <= i < limits.vocab_size:
                raise _bad("prompt", value, f"holds token id {i}, outside [0, {limits.vocab_size})")
        return list(value)
    if (
        isinstance(value, list)
        and len(value) > 1
        and all(isinstance(v, (str, list)) for v in value)
    ):
        raise _bad("prompt", value, "holds several prompts: send one prompt per request")
    raise _bad("prompt", value, "must be a string or a non-empty list of token ids", "invalid_type")


def parse_completion(body: dict, tokenizer, limits: Limits) -> Generation:
    """A /v1/completions body -> Generation (ApiError for a bad field)."""
    _check_fields(body, COMPLETION_FIELDS, UNSUPPORTED_COMPLETION)
    _model(body, limits)
    if "prompt" not in body:
        raise ApiError("prompt is required", param="prompt", code="missing_field")
    prompt = _prompt_ids(body["prompt"], tokenizer, limits)
    return _generation(body, False, prompt, "prompt", DEFAULT_MAX_TOKENS, tokenizer, limits)


def parse_chat(body: dict, tokenizer, limits: Limits) -> Generation:
    """A /v1/chat/completions body -> Generation (ApiError for a bad field)."""
    _check_fields(body, CHAT_FIELDS, UNSUPPORTED_CHAT)
    _model(body, limits)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad(
            "response_format", fmt, 'is not supported (only {"type": "text"})', "unsupported"
        )
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ApiError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
    turns = chat_turns(body.get("messages"), limits)
    prompt = chat_prompt(turns, tokenizer)
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    return _generation(body, True, prompt, "messages", None, tokenizer, limits, length_name=name)


def _generation(body, chat, prompt, prompt_name, default_len, tokenizer, limits, length_name=None):
    _check_prompt_length(prompt, prompt_name, limits)
    length_name = length_name or "max_tokens"
    max_tokens = _length(body, length_name, len(prompt), default_len, limits)
    sampling, seed = _sampling(body, limits.vocab_size)
    stream = _bool(body, "stream")
    return Generation(
        chat=chat,
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=sampling,
        seed=seed,
        stop=_stops(body),
        stop_ids=_stop_ids(body, limits.vocab_size),
        stream=stream,
        include_usage=_stream_options(body, stream),
        routing=_bool(body, "routing"),
        return_token_ids=_bool(body, "return_token_ids"),
        ignore_eos=_bool(body, "ignore_eos"),
    )


# ---- Mistral's instruct format ---------------------------------------------------------------
def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    value = message.get("content")
    name = f"messages[{i}].content"
    if isinstance(value, str):
        return _unicode(value, name)
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return _unicode("".join(p["text"] for p in value), name)
    raise _bad(name, value, 'must be a string or a list of {"type": "text", "text": ...} parts')


def chat_turns(messages, limits: Limits) -> list[tuple[str, str]]:
    """Checked messages -> [(role, text)] alternating user / assistant, ending with a user
    message; system messages joined ("\\n\\n") before the first user message's text."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", messages, "must be a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise _bad("messages", f"<{len(messages)} messages>", f"exceeds {MAX_MESSAGES} messages")
    system, turns = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", message, "must be an object with role and content")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise _bad(f"messages[{i}]", sorted(extra), "are unknown message fields")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role", role, "must be 'system', 'user' or 'assistant'")
        text = _content(message, i)
        if role == "system":
            system.append(text)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise _bad(
                f"messages[{i}].role",
                role,
                f"should be {expected!r}: after system messages, roles alternate user / "
                "assistant, starting with user",
            )
        if role == "assistant" and not text:
            raise _bad(f"messages[{i}].content", text, "must not be empty")
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(
            "the last message must be a user message", param="messages", code="invalid_value"
        )
    if system:
        turns[0] = ("user", "\n\n".join(system) + "\n\n" + turns[0][1])
    return turns


def chat_prompt(turns: list[tuple[str, str]], tokenizer) -> list[int]:
    """[(role, text)] (see chat_turns) -> token ids, as mistral-common's V1 tokenizer encodes:
    BOS, then `[INST] user [/INST]` and `assistant` + EOS, each encoded on its own."""
    ids = [tokenizer.bos_id]
    for role, text in turns:
        if role == "user":
            ids += tokenizer.encode(f"[INST] {text} [/INST]", bos=False)
        else:
            ids += tokenizer.encode(text, bos=False) + [tokenizer.eos_id]
    return ids


# ---- responses -------------------------------------------------------------------------------
def routing_json(per_token: list | None) -> list[dict]:
    """Per token [L][k] (expert, gate weight) pairs -> per token {"experts": [L][k] ints,
    "weights": [L][k] floats}."""
    return [
        {
            "experts": [[int(e) for e, _ in layer] for layer in token],
            "weights": [[round(float(w), 6) for _, w in layer] for layer in token],
        }
        for token in per_token or []
    ]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice(gen: Generation, text, finish, token_ids=None, routing=None, delta=False) -> dict:
    """One entry of `choices`: a whole completion, or a streamed chunk's delta (`delta`).

    text: the (new) text; finish: the engine's finish reason or None; token_ids / routing: the
    (new) tokens and their routing, included as requested."""
    out: dict = {"index": 0}
    if not gen.chat:
        out["text"] = text
    elif delta:
        out["delta"] = {"content": text} if text else {}
    else:
        out["message"] = {"role": "assistant", "content": text}
    out["logprobs"] = None
    out["finish_reason"] = None if finish is None else FINISH_REASONS.get(finish, finish)
    if gen.return_token_ids and token_ids is not None:
        out["token_ids"] = list(token_ids)
    if gen.routing and routing is not None:
        out["routing"] = routing_json(routing)
    return out


def envelope(gen: Generation, request_id: str, created: int, model: str, chunk: bool) -> dict:
    """The fields around `choices`: id, object, created, model."""
    if gen.chat:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model}


def role_chunk(gen: Generation, head: dict) -> dict:
    """A chat stream's first chunk: the assistant's role, no content yet."""
    return {
        **head,
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        ],
    }
