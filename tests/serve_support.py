"""A served model for the server and browser tests: a tokenizer trained on the embedded CPython docs,
a small model trained on them for a few steps, saved as a checkpoint and loaded back the way
`--mode serve` loads it, and uvicorn on a free port of 127.0.0.1."""

import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from sakimi_next.pretrained import load_for_inference
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.serve.api import ServerSettings, create_app
from sakimi_next.serve.engine import Engine, Event, Request
from sakimi_next.serve.process import EngineProcess, ModelSource
from sakimi_next.serve.server import BackgroundServer
from sakimi_next.tokenizer import train_tokenizer
from sakimi_next.optim import build_optimizer

from .helpers import make_checkpoint, small_config

VOCAB = 512
MODEL = "docs-tiny"


def docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def make_served_checkpoint(root: Path, steps: int = 30) -> Path:
    """A checkpoint whose greedy replies are word-like text, after `steps` AdamW steps on the docs."""
    texts = docs()
    tok = train_tokenizer(texts, VOCAB)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config(vocab_size=VOCAB, max_position_embeddings=4096,
                                              eos_token_id=tok.eot_id, pad_token_id=tok.pad_id))
    ids = torch.tensor(tok.encode("\n\n".join(texts[:40]))[: 40 * 65])
    windows = ids[: len(ids) // 65 * 65].view(-1, 65)
    opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(0, len(windows), (8,), generator=g)]
        model(batch[:, :-1], batch[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return make_checkpoint(root / "run", model, tok)


@contextmanager
def live_server(checkpoint: Path, max_concurrent: int = 8, max_queue: int = 16, max_prompt_tokens: int = 2000,
                max_tokens: int = 4000, request_timeout: float = 120.0, api_key: str | None = None,
                in_process: bool = True, max_restarts: int = 3):
    """(server, engine): the model loaded from `checkpoint` and served until the block ends; with
    in_process=False the engine runs in a child process, as `--mode serve` runs it."""
    if in_process:
        model, tokenizer, _ = load_for_inference(checkpoint, "cpu")
        engine = Engine(model, tokenizer, max_concurrent, max_queue)
    else:
        engine = EngineProcess(ModelSource(str(checkpoint), "cpu", threads=1), max_concurrent, max_queue,
                               max_restarts=max_restarts)
    engine.start()  # before the app: a child process's engine knows its tokenizer once started
    try:
        app = create_app(engine, ServerSettings(MODEL, max_prompt_tokens, max_tokens, request_timeout, api_key))
        with BackgroundServer(app, on_timeout=engine.stop) as server:
            yield server, engine
    finally:
        engine.stop()


class Collector:
    """The events of several requests, by index; `wait` until each has its last one (bounded)."""

    def __init__(self, n: int):
        self.events: list[list[Event]] = [[] for _ in range(n)]
        self.done = [threading.Event() for _ in range(n)]

    def on_event(self, i: int):
        def put(e: Event):
            self.events[i].append(e)
            if e.last:
                self.done[i].set()
        return put

    def wait(self, seconds: float = 300) -> list[list[Event]]:
        """Generous by default: a compile on a loaded machine can take minutes."""
        for d in self.done:
            assert d.wait(timeout=seconds)
        return self.events


def run_requests(engine, requests: list[dict]) -> list[list[Event]]:
    """Start the engine (in this process or its own), submit all requests (`Request` fields) at once,
    wait until each has its last event, stop it."""
    got = Collector(len(requests))
    engine.start()
    try:
        for i, r in enumerate(requests):
            engine.submit(Request(on_event=got.on_event(i), **r))
        return got.wait()
    finally:
        engine.stop()


def running(pid: int) -> bool:
    """The process exists and has not ended (a zombie has ended; in a container nobody may reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(stat.parent.name))
        except OSError:
            continue
    return found
