"""What a client sends, at the edge of --mode serve: random bodies and values never give a 5xx nor a
traceback (hypothesis), and the limits act before the work (the body's bytes before it is parsed, a
prompt's length before it is tokenized; tokenizing off the event loop, so /health answers meanwhile)."""

import json
import logging
import select
import socket
import threading

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from .serve_support import MODEL, live_server, make_served_checkpoint

MAX_PROMPT, MAX_TOKENS = 64, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_served_checkpoint(tmp_path_factory.mktemp("serve-edge"))


class Problems(logging.Handler):
    """Every warning or error logged while it is installed (uvicorn's "Exception in ASGI application"
    with its traceback, the engine's failures), from any thread. uvicorn's loggers do not propagate
    to the root one: it listens to both."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        for name in ("", "uvicorn"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("", "uvicorn"):
            logging.getLogger(name).removeHandler(self)


@pytest.fixture(scope="module")
def server(checkpoint):
    with live_server(checkpoint, max_prompt_tokens=MAX_PROMPT, max_tokens=MAX_TOKENS) as (srv, engine):
        with Problems() as problems:
            yield srv, engine, problems


def openai_error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    return err


def check_reply(r: httpx.Response) -> None:
    """A 2xx with a reply (whole, or server-sent events ending in [DONE]), or a 4xx with OpenAI's error."""
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        openai_error(r)
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert all("choices" in c or "usage" in c for c in chunks), chunks  # no error event: nothing failed
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# --------------------------------------------------------------------------------- random requests
TEXT = st.lists(st.characters() | st.sampled_from(["\ud800", "\udfff", "<|im_end|>", "<|endoftext|>", "\x00", "😀"]),
                max_size=16).map("".join)
NUMBER = (st.integers() | st.sampled_from([0, 1, -1, 2**63, 2**64, -2**63 - 1, 10**30, 10**400])
          | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
          | st.sampled_from([5e-324, 1e-300, 1e-6, 0.5, 2.0]))
JSON = st.recursive(st.none() | st.booleans() | NUMBER | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
PLAIN = st.text(max_size=24)  # no lone surrogates, rarely a reserved marker
PLAUSIBLE = {  # values a client means
    "model": st.just(MODEL),
    "max_tokens": st.integers(1, MAX_TOKENS),
    "max_completion_tokens": st.integers(1, MAX_TOKENS),
    "temperature": st.just(0) | st.floats(0, 2, allow_subnormal=False),
    "top_p": st.floats(0.01, 1, allow_subnormal=False),
    "top_k": st.integers(0, 50),
    "seed": st.integers(-2**63, 2**64 - 1),
    "stop": st.lists(PLAIN.filter(bool), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
    "echo": st.just(False),
    "logprobs": st.none(),
}
WILD = {  # anything at all, and the edges of each range
    **{k: JSON for k in PLAUSIBLE},
    "max_tokens": st.sampled_from([-1, 0, MAX_TOKENS + 1, 2**64, True, "4", 1.5]),
    "temperature": st.sampled_from([-1e-9, 2.000001, 5e-324, 1e308, "hot"]),
    "top_p": st.sampled_from([0, -0.5, 1.0000001, 5e-324]),
    "seed": st.sampled_from([2**64, -2**63 - 1, 10**30, 1.5]),
    "stop": st.lists(TEXT, max_size=6),
    "messages": st.lists(st.fixed_dictionaries({"role": JSON | st.just("user"), "content": TEXT | JSON | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT | JSON}))}), max_size=3),
    "prompt": TEXT | st.lists(TEXT, max_size=2) | st.lists(st.integers(-5, 600), max_size=5) | st.just("x" * 5000),
    "echo": st.booleans() | JSON,
    "logprobs": JSON,
}


def body(base: dict, fields: list[str]):
    """A body a client means (`base` and some of `fields`), often with one field set to a wild value."""
    wild = st.sampled_from(fields + list(base)).flatmap(lambda k: st.tuples(st.just(k), WILD[k]))
    return st.tuples(st.fixed_dictionaries(base, optional={k: PLAUSIBLE[k] for k in fields}),
                     st.none() | wild).map(lambda t: {**t[0], **dict([t[1]] if t[1] else [])})


CHAT = body({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                         "content": PLAIN}), min_size=1, max_size=3)},
            [k for k in PLAUSIBLE if k not in ("echo", "logprobs")])
COMPLETION = body({"prompt": PLAIN}, [k for k in PLAUSIBLE if k != "max_completion_tokens"])
BODY = (st.tuples(st.just("/v1/chat/completions"), CHAT | JSON)
        | st.tuples(st.just("/v1/completions"), COMPLETION | JSON))


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=BODY)
def test_random_bodies_get_a_reply_or_an_openai_error(server, request):
    srv, _, problems = server
    path, body = request
    problems.records.clear()  # each example on its own (the first failure would fail the rest)
    r = httpx.post(srv.url + path, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                   timeout=60)
    check_reply(r)
    event(f"{path} {r.status_code} {r.headers['content-type'].split(';')[0]}")
    assert not problems.records, [problems.format(rec) for rec in problems.records]


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), raw=st.binary(max_size=64)
       | st.sampled_from([b"", b"{", b"[" * 5000, b'{"prompt": NaN}', b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
                          b'{"prompt": "\\ud800"}', b'{"prompt": "\xff"}', b'{"messages": [' * 3000]))
def test_random_bytes_get_a_400(server, path, raw):
    srv, _, problems = server
    problems.records.clear()
    r = httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, r.text[:500]
    openai_error(r)
    assert not problems.records, [problems.format(rec) for rec in problems.records]


def test_values_the_engine_cannot_hold(server):
    """The two 5xx a client could cause before: a lone surrogate (not encodable) and a seed beyond 64 bits."""
    srv, engine, problems = server
    post = lambda body: httpx.post(srv.url + "/v1/completions", content=json.dumps(body).encode(), timeout=60)  # noqa: E731
    for body, param in (({"prompt": "a\ud800b"}, None), ({"prompt": "x", "seed": 2**64}, "seed"),
                        ({"prompt": "x", "seed": -2**63 - 1}, "seed")):
        r = post(body)
        assert r.status_code == 400 and openai_error(r)["param"] == param
    for seed in (2**64 - 1, -2**63):  # the ends of what a torch.Generator takes
        assert post({"prompt": "x", "seed": seed, "max_tokens": 2}).status_code == 200
    # a temperature too small to divide by samples greedily: the greedy reply, not a failed decoding step
    greedy = post({"prompt": "The for", "max_tokens": 4, "temperature": 0}).json()["choices"][0]["text"]
    assert post({"prompt": "The for", "max_tokens": 4, "temperature": 5e-324}).json()["choices"][0]["text"] == greedy
    assert not problems.records


# ---------------------------------------------------------------------------------- limits first
def raw_request(srv, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    s.sendall(head)
    return s


def read_response(s: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of a response (Content-Length framed), from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next(int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length:"))


def test_the_body_is_limited_before_it_is_read(server):
    srv, engine, problems = server
    # a declared length over the limit: refused at once, nothing sent
    with raw_request(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000000000\r\n\r\n") as s:
        status, body = read_response(s)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # a chunked body is counted as it arrives: /health answers while it comes, and it is refused once too large
    with raw_request(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n") as s:
        piece = b"x" * 65536
        s.sendall(b'%x\r\n{"prompt": "\r\n' % len(b'{"prompt": "'))
        for _ in range(4):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert httpx.get(srv.url + "/health", timeout=60).json()["status"] == "ok"  # while the body is half sent
        for _ in range(400):  # bounded: 26 MB at most, far over the limit
            if select.select([s], [], [], 0)[0]:  # the server has answered
                break
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:  # the server answered and closed
                break
        status, body = read_response(s)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert not problems.records


@pytest.fixture
def counted_tokenizer(server, monkeypatch):
    """The server's tokenizer, its calls counted (and held while `hold` is clear)."""
    _, engine, _ = server
    tok, real = engine.tokenizer, engine.tokenizer.encode_batch
    calls, entered, hold = [], threading.Event(), threading.Event()
    hold.set()

    def encode_batch(texts):
        calls.append(sum(map(len, texts)))
        entered.set()
        assert hold.wait(timeout=60)
        return real(texts)

    monkeypatch.setattr(tok, "encode_batch", encode_batch)
    return calls, entered, hold


def test_a_long_prompt_is_refused_before_it_is_tokenized(server, counted_tokenizer):
    srv, engine, problems = server
    calls, _, _ = counted_tokenizer
    for path, body in (("/v1/completions", {"prompt": "x" * 1_000_000}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 100_000}]})):
        r = httpx.post(srv.url + path, json=body, timeout=60)
        assert r.status_code == 413 and openai_error(r)["code"] == "context_length_exceeded"
    assert calls == []  # refused by their length in characters
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "yield " * (MAX_PROMPT + 1)}, timeout=60)
    assert r.status_code == 413 and "tokens" in openai_error(r)["message"]  # short enough to count: counted
    assert calls == [6 * (MAX_PROMPT + 1)]
    assert not problems.records


def test_health_answers_while_a_prompt_is_tokenized(server, counted_tokenizer):
    """The tokenizer runs off the event loop: while it is held in the middle of a prompt, /health and
    other routes still answer (if it ran on the loop, they would wait for it)."""
    srv, engine, problems = server
    calls, entered, hold = counted_tokenizer
    hold.clear()
    got = {}
    request = threading.Thread(target=lambda: got.setdefault("r", httpx.post(
        srv.url + "/v1/completions", json={"prompt": "The for", "max_tokens": 2}, timeout=120)))
    request.start()
    try:
        assert entered.wait(timeout=60)
        assert httpx.get(srv.url + "/health", timeout=60).status_code == 200
        assert httpx.get(srv.url + "/v1/models", timeout=60).json()["data"][0]["id"] == MODEL
        assert "r" not in got  # still held in the tokenizer
    finally:
        hold.set()
        request.join(timeout=120)
    assert got["r"].status_code == 200 and got["r"].json()["usage"]["completion_tokens"] == 2
