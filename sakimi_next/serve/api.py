"""The OpenAI-compatible HTTP API over the engine, and the chat page.

    POST /v1/chat/completions   messages rendered with ChatML; the reply ends at <|im_end|>
    POST /v1/completions        plain text continuation; ends at <|endoftext|>
    GET  /v1/models, GET /health (the engine's counters), GET / (the chat page)

`stream: true` sends server-sent events, one chunk per piece of text, then `data: [DONE]`. Errors are
OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with the matching HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import SamplingSettings
from ..chat import check_messages, render
from ..tokenizer import IM_END
from ..util import UserError
from .engine import Engine, EngineStopped, Event, QueueFull, Request


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    max_prompt_tokens: int  # longer prompts get 413
    max_tokens: int  # the most a request may ask for; also the default
    request_timeout: float  # seconds from arrival to the last token
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ------------------------------------------------------------------------------------------- bodies
class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of the OpenAI API that do not apply are ignored
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


class ChatBody(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None  # the newer name of max_tokens


class CompletionBody(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None


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


# --------------------------------------------------------------------------------------------- app
def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="sakimi-next", docs_url=None, redoc_url=None, openapi_url=None)
    api = Completions(engine, settings)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        err = errors[0]
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return error_response(422, f"{where or 'body'}: {err.get('msg')}", "invalid_request_error", where,
                              "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, message, kind, None, "unknown_url" if e.status_code == 404 else None)

    if settings.api_key:
        app.add_middleware(KeyCheck, key=settings.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "sakimi-next"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("sakimi_next.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HttpRequest):
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await api.complete(body, request, api.chat_prompt(body), limit, api.chat_stop_ids, "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HttpRequest):
        prompt = api.completion_prompt(body)
        return await api.complete(body, request, prompt, body.max_tokens, api.text_stop_ids, "text_completion")

    return app


class Mailbox:
    """Events from the engine thread to the event loop's queues, with one wake-up of the loop for all
    the events posted before it runs (a decoding step posts one per row): each wake-up costs both
    threads, and the engine's Python waits for the loop's."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, Event]] = []

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._items.append((loop, queue, event))
            if len(self._items) > 1:  # a wake-up is already on its way
                return
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed (the server is going away): nobody will read these
            with self._lock:
                self._items.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for loop, queue, event in items:
            if loop is asyncio.get_running_loop():
                queue.put_nowait(event)
            else:  # another loop's (tests may run servers in several threads)
                loop.call_soon_threadsafe(queue.put_nowait, event)


class Completions:
    """From a validated request body to the engine and back: the reply whole, or streamed as events."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings, self.tokenizer = engine, settings, engine.tokenizer
        self.mailbox = Mailbox()
        self.context = engine.config.max_position_embeddings
        ends = (self.tokenizer.eot_id, self.tokenizer.token_to_id(IM_END))
        self.chat_stop_ids = frozenset(i for i in ends if i is not None)
        self.text_stop_ids = frozenset({self.tokenizer.eot_id})

    def chat_prompt(self, body: ChatBody) -> list[int]:
        try:  # the library's ChatML: roles checked, reserved markers refused (they would forge turns)
            messages = check_messages([{"role": m.role, "content": text_of(m)} for m in body.messages or []],
                                      "the request")
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        return self.tokenizer.encode(render(messages, add_generation_prompt=True))

    def completion_prompt(self, body: CompletionBody) -> list[int]:
        if body.echo or body.logprobs:
            raise ApiError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise ApiError(400, "one prompt per request", param="prompt")
            p = p[0]
        if isinstance(p, str):
            return self.tokenizer.encode(p) or [self.tokenizer.eot_id]
        if not p or min(p) < 0 or max(p) >= self.engine.config.vocab_size:
            raise ApiError(400, "prompt token ids must be a non-empty list of ids in the vocabulary", param="prompt")
        return list(p)

    async def complete(self, body: _Common, http: HttpRequest, prompt: list[int], max_tokens: int | None,
                       stop_ids: frozenset[int], kind: str):
        request, events = self._request(body, prompt, max_tokens, stop_ids)
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", "rate_limit_error", None, "queue_full") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), "server_error", None, "unavailable") from None
        reply = Reply(kind, self.settings.model_name, body, len(prompt))
        watcher = asyncio.create_task(self._watch_disconnect(http, request, events))
        # a safety net a little after the engine's own deadline: one timer per request (a timeout around
        # each of its events would cost the event loop a task or a timer per token)
        safety = asyncio.get_running_loop().call_later(
            max(request.deadline - time.monotonic() + 5.0, 0.1), events.put_nowait,
            Event(error="the request timed out", code="timeout"))
        streaming = False
        try:
            first = await events.get()
            if first.error:
                raise self._failure(first)
            if body.stream:
                streaming = True  # from here on the stream frees the slot when it ends
                return StreamingResponse(self._stream(reply, first, events, request, safety),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            event, text = first, [first.text]
            while not event.last:
                event = await events.get()
                if event.error:
                    raise self._failure(event)
                text.append(event.text)
            return reply.whole("".join(text), event)
        finally:
            watcher.cancel()
            if not streaming:
                safety.cancel()
                self.engine.cancel(request.id)

    def _request(self, body: _Common, prompt: list[int], max_tokens: int | None,
                 stop_ids) -> tuple[Request, asyncio.Queue]:
        """Check the request's settings and make the engine's request, its events going to a queue."""
        limits = self.settings
        if body.model and body.model != limits.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {limits.model_name!r}",
                           "not_found_error", "model", "model_not_found")
        if len(prompt) > limits.max_prompt_tokens or len(prompt) >= self.context:
            raise ApiError(413, f"the prompt has {len(prompt)} tokens, more than this server takes "
                                f"({min(limits.max_prompt_tokens, self.context - 1)})", param="messages",
                           code="context_length_exceeded")
        if body.n != 1:
            raise ApiError(400, "n must be 1", param="n")
        if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}", param="max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 <= temperature <= 2:
            raise ApiError(400, "temperature must be between 0 and 2", param="temperature")
        if not 0 < top_p <= 1:
            raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
        if body.top_k is not None and body.top_k < 0:
            raise ApiError(400, "top_k must be >= 0 (0 = off)", param="top_k")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: at most 4 non-empty strings", param="stop")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request = Request(
            prompt=prompt, max_tokens=min(max_tokens or limits.max_tokens, self.context - len(prompt)),
            sampling=SamplingSettings(temperature=temperature, top_k=body.top_k or 0, top_p=top_p),
            on_event=lambda e: self.mailbox.post(loop, events, e),
            seed=body.seed, stop=stop, stop_ids=stop_ids, deadline=time.monotonic() + limits.request_timeout)
        return request, events

    async def _watch_disconnect(self, http: HttpRequest, request: Request, events: asyncio.Queue) -> None:
        """Until the response starts: a client that hangs up frees its slot (and its queue place)."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(request.id)
        events.put_nowait(Event(error="the client disconnected", code="disconnected"))

    def _failure(self, event: Event) -> ApiError:
        if event.code == "timeout":
            return ApiError(503, f"{event.error} (--request-timeout {self.settings.request_timeout:g} s)",
                            "server_error", None, "timeout")
        return ApiError(503 if event.code == "server_shutdown" else 500, event.error, "server_error", None, event.code)

    async def _stream(self, reply: "Reply", first: Event, events: asyncio.Queue, request: Request,
                      safety: asyncio.TimerHandle):
        try:
            event = first
            yield reply.sse(reply.opening())
            while True:
                text = event.text
                while not event.last and not events.empty():  # the client is behind: send what is ready at once
                    event = events.get_nowait()
                    text += event.text
                if text:
                    yield reply.sse(reply.chunk(text, None))
                if event.error:  # the status line is gone: the error travels as an event
                    e = self._failure(event)
                    yield reply.sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
                    break
                if event.last:
                    yield reply.sse(reply.chunk("", event.finish_reason))
                    if (reply.body.stream_options or {}).get("include_usage"):
                        yield reply.sse(reply.usage_chunk(event))
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): free the slot now
            safety.cancel()
            self.engine.cancel(request.id)


class KeyCheck:
    """ASGI middleware: /v1/* needs "Authorization: Bearer <key>" (the page and /health do not)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "a valid API key is needed: Authorization: Bearer <key>",
                                          "invalid_request_error", None, "invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class Reply:
    """OpenAI's response objects, whole or in chunks, for one request."""

    def __init__(self, kind: Literal["chat.completion", "text_completion"], model: str, body: _Common,
                 prompt_tokens: int):
        self.kind, self.model, self.body, self.prompt_tokens = kind, model, body, prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, event: Event) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": self.prompt_tokens + event.completion_tokens}

    def whole(self, text: str, event: Event) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": event.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
        return {**self._head(self.kind), "choices": [choice], "usage": self.usage(event)}

    def opening(self) -> dict:
        """Chat streams start by naming the role; completions have nothing to say before the text."""
        if self.chat:
            return {**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}
        return self.chunk("", None)

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            delta = {"content": text} if text or finish_reason is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, event: Event) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(event)}

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class BackgroundServer:
    """uvicorn serving `app` from a thread, on a free port of `host` unless one is given (tests and
    benchmarks): `with BackgroundServer(app) as server: server.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = None

    def __enter__(self) -> "BackgroundServer":
        import threading

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        for _ in range(500):  # up to 10 s
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
