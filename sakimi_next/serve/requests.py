"""What a client may send, checked at the edge: nothing it sends reaches the engine unchecked, and
nothing it sends ends in a 5xx.

In the order a request meets them: the body's size in bytes (the Content-Length header, then the bytes
as they arrive, before anything is parsed: 413); JSON that Python holds as it is (no NaN or Infinity,
no nesting deeper than the parser's stack, no lone surrogate escape such as "\\ud800", which no
tokenizer can encode: 400); the body's shape (pydantic: 422); every value's range (400, naming the
field); and the prompt's length: a text longer in characters than `max_prompt_tokens` tokens can cover
is refused (413) before it is tokenized, the rest is tokenized off the event loop and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import ClientDisconnect

from ..generate import SamplingSettings

GREEDY_BELOW = 1e-5  # a temperature this small samples greedily (dividing by 1e-300 would overflow)
SEED_RANGE = (-2**63, 2**64 - 1)  # what a torch.Generator takes
MAX_STOPS = 4


class ApiError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ------------------------------------------------------------------------------------------- bodies
class _Body(BaseModel):
    # the fields of OpenAI's API that do not apply here are ignored
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Message(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class Common(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not in OpenAI's API; vLLM and llama.cpp accept it too
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class ChatBody(Common):
    messages: list[Message]
    max_completion_tokens: int | None = None  # the newer name of max_tokens

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionBody(Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None


# ----------------------------------------------------------------------------------------- reading
async def read_body(http: HttpRequest, schema: type[Common], max_bytes: int) -> Common:
    """The request's body as `schema`, or an ApiError: the size is checked before the bytes are kept."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:
        async for chunk in http.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer; uvicorn drops what is sent
        raise ApiError(400, "the client disconnected while sending the request") from None
    try:
        value = json.loads(b"".join(chunks), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "the request body is not valid JSON") from None
    if not _valid_unicode(value):
        raise ApiError(400, "the request body holds text that is not valid Unicode (a lone surrogate escape "
                            "such as \\ud800)", code="invalid_unicode")
    try:
        return schema.model_validate(value)
    except ValidationError as e:
        err = e.errors(include_input=False)[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or None
        raise ApiError(422, f"{where or 'body'}: {err.get('msg')}", param=where, code="invalid_value") from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server takes ({max_bytes:,} bytes)",
                    code="request_too_large")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _valid_unicode(value) -> bool:
    """Whether every string in a parsed JSON value (keys too) encodes as UTF-8."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return False
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


# ---------------------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class Generation:
    """A request's checked settings, as the engine takes them."""
    max_tokens: int | None  # None: the server's --max-tokens
    sampling: SamplingSettings
    seed: int | None
    stop: list[str]


def check_generation(body: Common, model_name: str, max_tokens: int) -> Generation:
    """Every setting of `body` in its range, or an ApiError naming the field (400; 404 for another model)."""
    if body.model and body.model != model_name:
        raise ApiError(404, f"the model {body.model[:100]!r} does not exist; this server has {model_name!r}",
                       "not_found_error", "model", "model_not_found")
    if body.n != 1:
        raise ApiError(400, "n must be 1", param="n")
    limit = body.token_limit
    if limit is not None and not 1 <= limit <= max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {max_tokens}", param="max_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 <= temperature <= 2:
        raise ApiError(400, "temperature must be between 0 and 2", param="temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    if body.top_k is not None and body.top_k < 0:
        raise ApiError(400, "top_k must be >= 0 (0 = off)", param="top_k")
    if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
        raise ApiError(400, "seed must be an integer that fits in 64 bits", param="seed")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", param="stop")
    sampling = SamplingSettings(temperature=temperature if temperature >= GREEDY_BELOW else 0.0,
                                top_k=body.top_k or 0, top_p=top_p)
    return Generation(limit, sampling, body.seed, stop)


def text_of(m: Message) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:  # the list form: [{"type": "text", "text": ...}]
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def completion_prompt(body: CompletionBody, max_prompt_tokens: int, vocab_size: int) -> str | list[int]:
    """The prompt of a completion: its text, or its token ids (checked)."""
    if body.echo or body.logprobs:
        raise ApiError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], str):
        if len(p) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        p = p[0]
    if isinstance(p, str):
        return p
    if len(p) > max_prompt_tokens:
        raise prompt_too_long(f"{len(p):,} tokens", max_prompt_tokens, "prompt")
    if not p or min(p) < 0 or max(p) >= vocab_size:
        raise ApiError(400, "prompt token ids must be a non-empty list of ids in the vocabulary", param="prompt")
    return list(p)


def prompt_too_long(size: str, max_prompt_tokens: int, param: str) -> ApiError:
    return ApiError(413, f"the prompt is too long: {size}; this server takes at most {max_prompt_tokens} tokens",
                    param=param, code="context_length_exceeded")


# ------------------------------------------------------------------------------------------ limits
def prompt_char_limit(tokenizer, max_prompt_tokens: int) -> int:
    """The most characters a text of `max_prompt_tokens` tokens can have: a longer one is refused
    without tokenizing it. A token stands for at most as many characters of the text as its own
    string in the vocabulary has (a byte-level token's symbols are bytes, a character is at least
    one; a special token is its text); a normalizer may compose up to 4 characters into one (Hangul
    jamo, a letter with its accents), so then the bound is 4 times looser. Exact, never too tight."""
    longest = max((len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size)), default=1)
    normalizer = getattr(getattr(tokenizer, "_tk", None), "normalizer", "unknown")
    return max_prompt_tokens * max(longest, 1) * (1 if normalizer is None else 4)


def body_byte_limit(prompt_chars: int) -> int:
    """The largest body a request whose prompt fits can need: a character is at most 12 bytes of
    JSON ("\\ud83d\\ude00"), plus a megabyte for the other fields and the messages' structure."""
    return 12 * prompt_chars + (1 << 20)
