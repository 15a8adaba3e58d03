"""The OpenAI-compatible HTTP API over the engine, and the chat page.

    POST /v1/chat/completions   messages rendered with ChatML; the reply ends at <|im_end|>
    POST /v1/completions        plain text continuation; ends at <|endoftext|>
    GET  /v1/models, GET /health (the engine's counters), GET / (the chat page)

`stream: true` sends server-sent events, one chunk per piece of text, then `data: [DONE]`. Errors are
OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with the matching HTTP status. What a
client sends is read and checked in `requests.py` before any work; nothing it sends gives a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import check_messages, render
from ..tokenizer import IM_END
from ..util import UserError
from .engine import Engine, EngineStopped, Event, QueueFull, Request
from .requests import (ApiError, ChatBody, Common, CompletionBody, Generation, body_byte_limit, check_generation,
                       completion_prompt, prompt_char_limit, prompt_too_long, read_body, text_of)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    max_prompt_tokens: int  # longer prompts get 413
    max_tokens: int  # the most a request may ask for; also the default
    request_timeout: float  # seconds from arrival to the last token
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None):
    return ApiError(status, message, type, param, code).response()


# --------------------------------------------------------------------------------------------- app
def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="sakimi-next", docs_url=None, redoc_url=None, openapi_url=None)
    api = Completions(engine, settings)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, message, kind, None, "unknown_url" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):  # a bug, never a client's input: still OpenAI's shape (uvicorn logs it)
        return error_response(500, "internal error", "server_error", None, "internal_error")

    if settings.api_key:
        app.add_middleware(KeyCheck, key=settings.api_key)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return JSONResponse({"status": "ok" if stats["engine"] == "running" else "unavailable",
                             "model": settings.model_name, **stats},
                            status_code=200 if stats["engine"] == "running" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "sakimi-next"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("sakimi_next.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        return await api.chat(await read_body(http, ChatBody, api.body_bytes), http)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await api.completion(await read_body(http, CompletionBody, api.body_bytes), http)

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
        self.max_prompt = min(settings.max_prompt_tokens, self.context - 1)
        self.prompt_chars = prompt_char_limit(self.tokenizer, self.max_prompt)
        self.body_bytes = body_byte_limit(self.prompt_chars)
        ends = (self.tokenizer.eot_id, self.tokenizer.token_to_id(IM_END))
        self.chat_stop_ids = frozenset(i for i in ends if i is not None)
        self.text_stop_ids = frozenset({self.tokenizer.eot_id})

    async def chat(self, body: ChatBody, http: HttpRequest):
        generation = check_generation(body, self.settings.model_name, self.settings.max_tokens)
        try:  # the library's ChatML: roles checked, reserved markers refused (they would forge turns)
            messages = check_messages([{"role": m.role, "content": text_of(m)} for m in body.messages], "the request")
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompt = await self.tokenize(render(messages, add_generation_prompt=True), "messages")
        return await self.complete(body, http, prompt, generation, self.chat_stop_ids, "chat.completion")

    async def completion(self, body: CompletionBody, http: HttpRequest):
        generation = check_generation(body, self.settings.model_name, self.settings.max_tokens)
        prompt = completion_prompt(body, self.max_prompt, self.engine.config.vocab_size)
        if isinstance(prompt, str):
            prompt = await self.tokenize(prompt, "prompt") or [self.tokenizer.eot_id]
        return await self.complete(body, http, prompt, generation, self.text_stop_ids, "text_completion")

    async def tokenize(self, text: str, param: str) -> list[int]:
        """The prompt's token ids, counted: a text too long to fit is refused before it is tokenized,
        and the tokenizing runs in a thread (encode_batch lets go of Python's lock meanwhile)."""
        if len(text) > self.prompt_chars:
            raise prompt_too_long(f"{len(text):,} characters, more than {self.max_prompt} tokens can hold",
                                  self.max_prompt, param)
        ids = (await asyncio.to_thread(self.tokenizer.encode_batch, [text]))[0]
        if len(ids) > self.max_prompt:
            raise prompt_too_long(f"{len(ids):,} tokens", self.max_prompt, param)
        return ids

    async def complete(self, body: Common, http: HttpRequest, prompt: list[int], generation: Generation,
                       stop_ids: frozenset[int], kind: str):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        max_tokens = min(generation.max_tokens or self.settings.max_tokens, self.context - len(prompt))
        request = Request(prompt=prompt, max_tokens=max_tokens, sampling=generation.sampling,
                          on_event=lambda e: self.mailbox.post(loop, events, e), seed=generation.seed,
                          stop=generation.stop, stop_ids=stop_ids,
                          deadline=time.monotonic() + self.settings.request_timeout)
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

    async def _watch_disconnect(self, http: HttpRequest, request: Request, events: asyncio.Queue) -> None:
        """Until the response starts: a client that hangs up frees its slot (and its queue place)."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(request.id)
        events.put_nowait(Event(error="the client disconnected", code="disconnected"))

    def _failure(self, event: Event) -> ApiError:
        """The error of a request the engine ended: 500 for a bug, 429 for a full queue, 503 for what
        passes (a timeout, the server stopping, the model's process restarting)."""
        if event.code == "timeout":
            return ApiError(503, f"{event.error} (--request-timeout {self.settings.request_timeout:g} s)",
                            "server_error", None, "timeout")
        if event.code == "queue_full":
            return ApiError(429, event.error, "rate_limit_error", None, "queue_full")
        return ApiError(500 if event.code == "internal_error" else 503, event.error, "server_error", None, event.code)

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

    def __init__(self, kind: Literal["chat.completion", "text_completion"], model: str, body: Common,
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
