"""The OpenAI API's shapes: request bodies checked field by field into scheduler requests, chat
messages rendered with a chat template, and the response / stream-chunk / error bodies.

Every check raises `ApiError` with the HTTP status and an OpenAI-style error body, so bad input
gets a 4xx that says which field is wrong and what it should be, and the server keeps serving.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from .sampling import TOP_LOGPROBS
from .scheduler import SPECULATIVE, TokenInfo

MAX_N = 8  # most choices one request may ask for (each takes a slot)
MAX_STOP = 4  # OpenAI's limit on stop strings


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _field(body: dict, name: str, types, default=None, check=None, what: str = ""):
    """body[name] if present (not null) and of `types` (bool is never a number) and check(value)."""
    value = body.get(name)
    if value is None:
        return default
    numbers = (int, float)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)))
    if ok and types in (numbers, float) and not math.isfinite(value):
        ok = False
    if not ok or (check is not None and not check(value)):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


# OpenAI fields this server does not implement, with the value that means "not used": a request
# that sets one otherwise is refused rather than answered as if it had not asked
UNSUPPORTED = {"logit_bias": ({}, None), "presence_penalty": (0, None), "frequency_penalty": (0, None),
               "echo": (False, None), "suffix": (None, ""), "best_of": (1, None), "tools": (None, []),
               "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
               "response_format": (None, {"type": "text"})}


def refuse_unsupported(body: dict) -> None:
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out", param=name,
                           code="unsupported_parameter")


def sampling_fields(body: dict, vocab_size: int, chat: bool) -> dict:
    """max_tokens, temperature, top_p, top_k, seed, stop, n, logprobs, stream, speculative of a request."""
    refuse_unsupported(body)
    f = {
        "max_new": _field(body, "max_tokens", int, 16, lambda v: v >= 1, "an integer >= 1"),
        "temperature": _field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"),
        "top_p": _field(body, "top_p", (int, float), None, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "top_k": _field(body, "top_k", int, None, lambda v: v >= -1, "an integer >= 1 (0 or -1: off)"),
        # no seed: a fresh one, so unseeded requests do not all draw the same text
        "seed": _field(body, "seed", int, secrets.randbits(32), lambda v: -(2**63) <= v < 2**64, "an integer"),
        "n": _field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]"),
        "stream": _field(body, "stream", bool, False, what="true or false"),
    }
    if chat and body.get("max_completion_tokens") is not None:
        f["max_new"] = _field(body, "max_completion_tokens", int, 16, lambda v: v >= 1, "an integer >= 1")
    if f["top_k"] is not None and f["top_k"] <= 0:
        f["top_k"] = None
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP
                                 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    f["stop"] = stop or []
    f["seed"] = f["seed"] % 2**32 - (2**32 if f["seed"] % 2**32 >= 2**31 else 0)  # its low 32 bits, as an int32
    if chat:
        want = _field(body, "logprobs", bool, False, what="true or false")
        top = _field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= TOP_LOGPROBS, f"an integer in [0, {TOP_LOGPROBS}]")
        f["top_logprobs"] = top if want else None
        if top and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:
        f["top_logprobs"] = _field(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "an integer in [0, 5]")
    # jaxaccel's own field: "prompt_lookup" speculates, "none" does not; absent: the server's --speculative
    choices = SPECULATIVE + ("none",)
    f["speculative"] = _field(body, "speculative", str, None, lambda v: v in choices,
                              "one of " + ", ".join(json.dumps(c) for c in choices) + " (or left out: the server's "
                              "--speculative)")
    opts = _field(body, "stream_options", dict, {}, what="an object")
    f["include_usage"] = bool(_field(opts, "include_usage", bool, False, what="true or false"))
    return f


def prompt_ids(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """A completion's prompt: a string, or a list of token ids (one prompt per request here)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
        return list(tokenizer(p)["input_ids"])
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} in 'prompt' is outside the vocabulary [0, {vocab_size})", param="prompt")
        return list(p)
    raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                   param="prompt")


ROLES = ("system", "user", "assistant", "tool", "developer")


def check_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)}",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
                raise ApiError(400, f"messages[{i}].content parts must be {{type: text, text}} objects (text only)",
                               param=f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def find_chat_template(source: Path | None, override: Path | None) -> str | None:
    """The chat template: --chat-template FILE, else the model folder's (chat_template.jinja or
    tokenizer_config.json's "chat_template"), else a GGUF's `tokenizer.chat_template` metadata."""
    if override is not None:
        return Path(override).read_text()
    if source is None:
        return None
    source = Path(source)
    if source.is_dir():
        if (source / "chat_template.jinja").is_file():
            return (source / "chat_template.jinja").read_text()
        cfg = source / "tokenizer_config.json"
        if cfg.is_file():
            t = json.loads(cfg.read_text()).get("chat_template")
            return t if isinstance(t, str) else None
        return None
    if source.suffix == ".gguf":
        from gguf import GGUFReader

        f = GGUFReader(source).fields.get("tokenizer.chat_template")
        return None if f is None else bytes(f.parts[f.data[0]]).decode("utf-8")
    return None


def render_chat(template: str, messages: list[dict], tokenizer) -> str:
    """The chat template rendered (sandboxed jinja2) with a generation prompt."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ApiError(400, f"the chat template refused these messages: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {f"{n}_token": getattr(tokenizer, f"{n}_token", None) or "" for n in ("bos", "eos")}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except jinja2.TemplateError as e:
        raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages") from None


# -- responses -----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, speculative: tuple[int, int] | None = None) -> dict:
    """OpenAI's usage counts; a speculative request's also its draft tokens (jaxaccel's own field)."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if speculative is not None:
        out["speculative"] = {"drafted_tokens": speculative[0], "accepted_tokens": speculative[1]}
    return out


def _piece(tokenizer, t: int) -> str:
    return tokenizer.decode([t]) if tokenizer is not None else ""


def chat_logprobs(tokens: list[TokenInfo], tokenizer) -> dict:
    entry = lambda t, lp: {"token": _piece(tokenizer, t), "logprob": lp,
                           "bytes": list(_piece(tokenizer, t).encode("utf-8"))}
    return {"content": [{**entry(x.id, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in (x.top or [])]}
                        for x in tokens]}


def completion_logprobs(tokens: list[TokenInfo], tokenizer, offset: int = 0) -> dict:
    pieces = [_piece(tokenizer, x.id) for x in tokens]
    offsets = [offset + sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    return {"tokens": pieces, "token_logprobs": [x.logprob for x in tokens],
            "top_logprobs": [{_piece(tokenizer, t): lp for t, lp in (x.top or [])} for x in tokens],
            "text_offset": offsets}


def response(kind: str, rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    obj = {"chat": "chat.completion", "chat.chunk": "chat.completion.chunk",
           "text": "text_completion", "text.chunk": "text_completion"}[kind]
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or not kind.endswith("chunk"):
        out["usage"] = use
    return out


def choice(kind: str, index: int, text: str, finish: str | None, logprobs: Any = None, first: bool = False) -> dict:
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}
    if kind == "chat.chunk":
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
