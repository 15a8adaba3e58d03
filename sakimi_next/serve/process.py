"""The engine in a process of its own, behind `Engine`'s interface (what `--mode serve` runs).

In one process the web server's event loop and the decoding loop take turns on Python's lock: the
JSON and socket writes of each streamed token hold up the next tensor operation of the step, and with
8 streaming clients the two together kept a single core busy. vLLM (V1) splits its server the same
way, into an API-server process and an engine-core process. Here the child loads the model and runs an
`Engine`; the parent encodes prompts and streams text out. Requests and cancellations go down one pipe;
events come back up another, one message per pass of the engine's loop (all the rows of a decoding
step together) with the engine's counters.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..util import UserError
from .engine import EngineStopped, Event, QueueFull, Request

log = logging.getLogger("sakimi_next.serve")


@dataclass(frozen=True)
class ModelSource:
    """What the child loads, as `--mode serve` was told."""
    checkpoint: str
    device: str = "auto"
    kernel: str = "auto"
    dtype: str = "fp32"
    compile: str = "no"  # auto | yes | no: decoder.choose_decoder (auto: compiled in the background)
    threads: int | None = None
    quantize: str = "none"
    attention_window: int | None = None  # None: the checkpoint's; 0: all


class EngineProcess:
    """`Engine`'s interface (submit, cancel, stats, start, stop; tokenizer, config) over an Engine in a
    child process. `start()` returns once the model is loaded (a bad checkpoint is a UserError then);
    `info` describes the model as `load_for_inference` does. If the child dies, every request in flight
    ends with an internal error and new ones are refused."""

    def __init__(self, source: ModelSource, max_concurrent: int = 8, max_queue: int = 64,
                 start_seconds: float = 600.0):
        self.source, self.max_concurrent, self.max_queue = source, max_concurrent, max_queue
        self.start_seconds = start_seconds  # loading, and compiling with --compile
        self.tokenizer = self.config = self.info = None
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[Event], None]] = {}  # requests in flight
        self._ids = itertools.count(1)
        self._running = False
        self._stats: dict = {}
        self._process = self._commands = self._receiver = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads' locks
        command_reader, self._commands = ctx.Pipe(duplex=False)
        events, event_writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_child_main, name="sakimi-engine", daemon=True,
                                    args=(self.source, self.max_concurrent, self.max_queue, command_reader,
                                          event_writer))
        self._process.start()
        command_reader.close()
        event_writer.close()
        message = self._first_message(events)
        if message[0] != "ready":
            self._process.kill()
            self._process.join()
            self._process = None
            events.close()
            self._commands.close()
            raise UserError(message[1])
        _, self.tokenizer, self.config, self.info, self._stats = message
        self._running = True
        self._receiver = threading.Thread(target=self._receive, args=(events,), name="sakimi-engine-events",
                                          daemon=True)
        self._receiver.start()

    def _first_message(self, events) -> tuple:
        """("ready", ...) once the child has loaded the model, else ("failed", one line)."""
        if not events.poll(self.start_seconds):
            return "failed", f"the engine process did not load the model within {self.start_seconds:.0f} s"
        try:
            return events.recv()
        except EOFError:
            self._process.join()
            return "failed", f"the engine process exited while loading the model (exit code {self._process.exitcode})"

    def stop(self) -> None:
        """Stop the child (requests still in flight end with the shutdown error) and wait for it."""
        if self._process is None:
            return
        with self._lock:
            self._running = False
        try:
            self._send(("stop",))
        except EngineStopped:
            pass
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        if self._receiver is not None:
            self._receiver.join(timeout=60)
        self._process = None

    def submit(self, request: Request) -> int:
        with self._lock:
            if not self._running:
                raise EngineStopped("the engine is not running")
            if len(self._callbacks) >= self.max_concurrent + self.max_queue:  # the engine's own limit
                running = min(len(self._callbacks), self.max_concurrent)
                raise QueueFull(f"{running} requests running and {len(self._callbacks) - running} waiting; "
                                "try again later")
            request.id = next(self._ids)
            self._send(("submit", dataclasses.replace(request, on_event=None)))
            self._callbacks[request.id] = request.on_event
            return request.id

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if self._callbacks.pop(request_id, None) is not None and self._running:
                try:
                    self._send(("cancel", request_id))
                except EngineStopped:  # nothing left to cancel
                    pass

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def _send(self, message: tuple) -> None:
        try:
            self._commands.send(message)
        except (OSError, ValueError):  # the child is gone; the receiver fails what was in flight
            raise EngineStopped("the engine process has stopped") from None

    def _receive(self, events) -> None:
        """The receiving thread: hand each event to its request's callback until the child is gone."""
        try:
            while True:
                batch, stats = events.recv()
                with self._lock:
                    self._stats = stats
                    callbacks = [(self._callbacks.get(rid), event) for rid, event in batch]
                    for rid, event in batch:
                        if event.last:
                            self._callbacks.pop(rid, None)
                for callback, event in callbacks:
                    if callback is not None:
                        _deliver(callback, event)
        except (EOFError, OSError):
            pass
        with self._lock:
            if self._running:
                log.error("the engine process exited (code %s)", self._process.exitcode if self._process else None)
            self._running = False
            left, self._callbacks = list(self._callbacks.values()), {}
        for callback in left:
            _deliver(callback, Event(error="internal error: the engine process stopped", code="internal_error"))


def _deliver(callback: Callable[[Event], None], event: Event) -> None:
    try:
        callback(event)
    except Exception:  # a client that is gone must not stop the others' events
        log.debug("could not deliver an event", exc_info=True)


# ------------------------------------------------------------------------------------ the child process
def _child_main(source: ModelSource, max_concurrent: int, max_queue: int, commands, events) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    from .engine import Engine

    try:
        model, tokenizer, info, decode = load_model(source)
    except UserError as e:
        events.send(("failed", str(e)))
        return
    except Exception as e:  # reported by the parent as one line
        events.send(("failed", f"could not load the model: {type(e).__name__}: {e}"))
        return
    outbox = _Outbox()

    def send_pass() -> None:  # the engine thread, after each pass of its loop
        batch, stats = outbox.take(), engine.stats()
        if batch or stats != outbox.sent_stats:
            events.send((batch, stats))
            outbox.sent_stats = stats

    engine = Engine(model, tokenizer, max_concurrent, max_queue, decode, source.threads, on_pass_end=send_pass)
    events.send(("ready", tokenizer, model.config, info, engine.stats()))
    engine.start()
    _serve_commands(engine, commands, outbox)
    engine.stop()  # fails what is left, and its last pass sends that
    events.close()


class _Outbox:
    """Events waiting for the end of the engine's pass (filled by the engine thread, and by the main
    thread for a refused request)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: list[tuple[int, Event]] = []
        self.sent_stats: dict = {}

    def put(self, rid: int, event: Event) -> None:
        with self._lock:
            self._events.append((rid, event))

    def take(self) -> list[tuple[int, Event]]:
        with self._lock:
            events, self._events = self._events, []
        return events


def load_model(source: ModelSource):
    """(model, tokenizer, info, decoding step) as `source` says; sets this thread's torch threads."""
    import torch

    from ..decoder import choose_decoder
    from ..pretrained import load_for_inference

    if source.threads:
        torch.set_num_threads(source.threads)
    model, tokenizer, info = load_for_inference(source.checkpoint, source.device, source.kernel, source.dtype,
                                                source.quantize, source.attention_window)
    return model, tokenizer, info, choose_decoder(model, source.compile, 0, on_compile=log.warning, background=True)


def _serve_commands(engine, commands, outbox: _Outbox) -> None:
    """The child's main thread: requests and cancellations from the parent, until it says stop or is
    gone. Requests keep the parent's ids, so a cancellation names the engine's request directly."""
    while True:
        try:
            message = commands.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "cancel":
            engine.cancel(message[1])
            continue
        request: Request = message[1]
        request.on_event = functools.partial(outbox.put, request.id)
        try:
            engine.submit(request)
        except EngineStopped as e:
            outbox.put(request.id, Event(error=str(e), code="server_shutdown", prompt_tokens=len(request.prompt)))
        except QueueFull as e:  # the parent applies the same limit first, so this would be a bug
            outbox.put(request.id, Event(error=f"internal error: {e}", code="internal_error",
                                         prompt_tokens=len(request.prompt)))
