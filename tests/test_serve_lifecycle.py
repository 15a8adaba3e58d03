"""--mode serve over its life: a stop that lets replies finish or cuts them at --shutdown-timeout and
exits 0 without a traceback (real server processes, real signals), and a model's process that comes
back after a SIGKILL, answering as before."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest

from .helpers import ROOT
from .serve_support import MODEL, child_pids, live_server, make_served_checkpoint, running

GREEDY = {"prompt": "The for statement", "max_tokens": 30, "temperature": 0}
SEEDED = {"prompt": "The import", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 7}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_served_checkpoint(tmp_path_factory.mktemp("serve-lifecycle"))


class Stream:
    """A streamed completion read in a thread: its server-sent events as they come."""

    def __init__(self, url: str, body: dict):
        self.events: list[str] = []
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, body))
        self.thread.start()
        assert self.first.wait(timeout=120)

    def _run(self, url, body):
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first.set()
        finally:
            self.first.set()

    def join(self) -> list[str]:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()
        return self.events


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def health_until(url: str, ok, what: str) -> dict:
    """/health until `ok(its JSON)` (polled, bounded)."""
    for _ in range(1200):
        try:
            health = httpx.get(url + "/health", timeout=10).json()
            if ok(health):
                return health
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


# ----------------------------------------------------------------------------------- restarts
def test_the_models_process_comes_back_after_a_kill(checkpoint, caplog):
    caplog.set_level(logging.WARNING)
    with live_server(checkpoint, in_process=False, max_restarts=1) as (srv, engine):
        before = [text(post(srv.url, body)) for body in (GREEDY, SEEDED)]
        stream = Stream(srv.url, {"prompt": "The", "max_tokens": 3000, "temperature": 0})
        whole = {}
        waiting = threading.Thread(
            target=lambda: whole.setdefault("r", post(srv.url, {"prompt": "x", "max_tokens": 3000})))
        waiting.start()
        health_until(srv.url, lambda h: h["active"] == 2, "two requests running")
        os.kill(engine._process.pid, signal.SIGKILL)
        events = stream.join()
        waiting.join(timeout=120)
        # in flight: an OpenAI-shaped 503, or in a stream an error event, then [DONE]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_stopped"
        r = whole["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
        assert "killed by SIGKILL" in r.json()["error"]["message"]
        health = health_until(srv.url, lambda h: h["engine"] == "running", "the model's process to be back")
        assert health["engine_restarts"] == 1
        assert [text(post(srv.url, body)) for body in (GREEDY, SEEDED)] == before
        # the last restart is used: another death leaves the engine down, and says so
        os.kill(engine._process.pid, signal.SIGKILL)
        health = health_until(srv.url, lambda h: h["engine"] == "stopped", "the engine to be down")
        assert health["status"] == "unavailable"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        r = post(srv.url, GREEDY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    logged = [rec.getMessage() for rec in caplog.records]
    assert any("killed by SIGKILL): restarting it (restart 1 of 1)" in m for m in logged), logged
    assert any("after 1 restart(s): not restarting it" in m for m in logged), logged
    assert not any(rec.exc_info for rec in caplog.records)


# ------------------------------------------------------------------------------------ stopping
def test_a_stop_lets_running_streams_finish(checkpoint):
    """Within the shutdown timeout, a stream in flight ends as it would have, and no new connection is
    taken."""
    with live_server(checkpoint) as (srv, engine):
        alone = text(post(srv.url, {**GREEDY, "max_tokens": 60}))
        stream = Stream(srv.url, {**GREEDY, "max_tokens": 60})
        srv.server.should_exit = True  # what SIGTERM does
        events = stream.join()
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(c["choices"][0]["text"] for c in chunks) == alone
        srv.thread.join(timeout=60)
        assert not srv.thread.is_alive()
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url + "/health", timeout=10)


def serve(checkpoint, *flags: str) -> tuple[subprocess.Popen, str]:
    """`--mode serve` in a process of its own on a free port, once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sakimi_next", "--mode", "serve", "--resume-from", str(checkpoint),
                             "--port", str(port), "--model-name", MODEL, "--threads", "1", "--device", "cpu",
                             "--no-compile", *flags],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):  # bounded: loading the model
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start")


def model_process(pid: int) -> int:
    (child,) = [p for p in child_pids(pid) if b"multiprocessing.spawn" in open(f"/proc/{p}/cmdline", "rb").read()]
    return child


def stopped(proc: subprocess.Popen, child: int) -> str:
    """Wait (bounded) for the server to exit; its stderr. It exited 0, without a traceback, and its
    model's process is gone."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Error" not in err, err
    for _ in range(300):  # bounded: the model's process is reaped
        if not running(child):
            break
        time.sleep(0.1)
    assert not running(child)
    return err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_server_stopped_before_serving_exits_0(checkpoint, sig):
    proc, url = serve(checkpoint)
    try:
        child = model_process(proc.pid)
        proc.send_signal(sig)
        assert stopped(proc, child).rstrip().endswith("stopped")
    finally:
        proc.kill()


@pytest.mark.slow
def test_the_stop_is_bounded_with_a_half_sent_request_and_a_long_stream(checkpoint):
    """A client that sent half its request and a stream far from its end: after --shutdown-timeout the
    stream ends with the shutdown error and [DONE] (or its end, on a fast machine), the half-sent
    request's connection is closed, and the server exits 0."""
    proc, url = serve(checkpoint, "--shutdown-timeout", "1", "--max-tokens", "4000")
    try:
        child = model_process(proc.pid)
        stream = Stream(url, {"prompt": "The", "max_tokens": 4000, "temperature": 0})
        half = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=120)
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        proc.send_signal(signal.SIGTERM)
        err = stopped(proc, child)
        events = stream.join()
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last.get("error", {}).get("code") == "server_shutdown" or last["choices"][0]["finish_reason"] == "length"
        try:
            assert half.recv(65536) == b""  # closed, nothing half-answered
        except ConnectionResetError:
            pass
        half.close()
        assert "--shutdown-timeout" in err  # the one line saying what was cut
    finally:
        proc.kill()


@pytest.mark.slow
def test_the_soak_script_runs(checkpoint):
    """scripts/soak_serve.py, briefly: every kind of traffic, no 5xx, the server stopped cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "scripts/soak_serve.py", "--minutes", "0.1", "--warmup", "2",
                          "--clients", "3", "--checkpoint", str(checkpoint), "--port", str(port)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "responses by status: " in out and "200: " in out and "p50 " in out and "p99 " in out
    assert "RSS after the warm-up -> at the end: web process " in out and "model process " in out
    assert "exit code 0 after SIGTERM; no traceback" in out and "slots busy at the end: 0" in out
