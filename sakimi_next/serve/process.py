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
import os
import signal
import sys
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
    `info` describes the model as `load_for_inference` does.

    A watcher thread hands the child's events to their requests, and notices when the child dies (out
    of memory, a kill): every request in flight then ends with an error (code "engine_stopped", a 503
    for the client), the reason goes to the log, and a new child is started, at most `max_restarts`
    times; until it is ready, and for good after the last restart, new requests are refused."""

    def __init__(self, source: ModelSource, max_concurrent: int = 8, max_queue: int = 64,
                 start_seconds: float = 600.0, max_restarts: int = 3):
        self.source, self.max_concurrent, self.max_queue = source, max_concurrent, max_queue
        self.start_seconds = start_seconds  # loading, and compiling with --compile
        self.max_restarts, self.restarts = max_restarts, 0
        self.tokenizer = self.config = self.info = None
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[Event], None]] = {}  # requests in flight
        self._ids = itertools.count(1)
        self._state = "stopped"  # running, restarting or stopped
        self._stopping = False
        self._stats: dict = {}
        self._process = self._commands = self._watcher = None

    def start(self) -> None:
        events = self._launch()
        self._watcher = threading.Thread(target=self._watch, args=(events,), name="sakimi-engine-watch", daemon=True)
        self._watcher.start()

    def _launch(self):
        """Start a child and wait until it has loaded the model; returns the pipe its events come up.
        A UserError if it could not."""
        ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads' locks
        command_reader, commands = ctx.Pipe(duplex=False)
        events, event_writer = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_child_main, name="sakimi-engine", daemon=True,
                              args=(self.source, self.max_concurrent, self.max_queue, command_reader,
                                    event_writer))
        with self._lock:
            if self._stopping:
                raise UserError("the server is stopping")
            process.start()
            self._process, self._commands = process, commands
        command_reader.close()
        event_writer.close()
        message = self._first_message(events, process)
        if message[0] != "ready":
            process.kill()
            process.join()
            events.close()
            commands.close()
            raise UserError(message[1])
        _, self.tokenizer, self.config, self.info, stats = message
        with self._lock:
            self._stats = stats
            if not self._stopping:
                self._state = "running"
        return events

    def _first_message(self, events, process) -> tuple:
        """("ready", ...) once the child has loaded the model, else ("failed", one line)."""
        if not events.poll(self.start_seconds):
            return "failed", f"the engine process did not load the model within {self.start_seconds:.0f} s"
        try:
            return events.recv()
        except EOFError:
            process.join()
            return "failed", f"the engine process exited while loading the model ({_exit_reason(process)})"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (requests still in flight end with the shutdown error) and wait for it, at
        most `timeout` seconds before it is killed."""
        with self._lock:
            self._stopping = True
            ready, self._state = self._state == "running", "stopped"
            process, commands = self._process, self._commands
        if process is None:
            return
        if ready:
            try:
                commands.send(("stop",))
            except (OSError, ValueError):  # already gone
                pass
            process.join(timeout)
        if process.is_alive():  # still loading (a restart), or stuck
            process.kill()
            process.join()
        if self._watcher is not None:
            self._watcher.join(timeout)

    def submit(self, request: Request) -> int:
        with self._lock:
            if self._state != "running":
                raise EngineStopped("the model's process is restarting; try again shortly"
                                    if self._state == "restarting" else "the engine is not running")
            if len(self._callbacks) >= self.max_concurrent + self.max_queue:  # the engine's own limit
                running = min(len(self._callbacks), self.max_concurrent)
                raise QueueFull(f"{running} requests running and {len(self._callbacks) - running} waiting; "
                                "try again later")
            if not request.id:  # ids given by the caller (an EnginePool, unique over its engines) are kept
                request.id = next(self._ids)
            self._send(("submit", dataclasses.replace(request, on_event=None)))
            self._callbacks[request.id] = request.on_event
            return request.id

    def cancel(self, request_id: int) -> None:
        with self._lock:
            if self._callbacks.pop(request_id, None) is not None and self._state == "running":
                try:
                    self._send(("cancel", request_id))
                except EngineStopped:  # nothing left to cancel
                    pass

    def stats(self) -> dict:
        with self._lock:
            return {**self._stats, "max_queue": self.max_queue, "engine": self._state, "engine_restarts": self.restarts}

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet ended (running or waiting in the child)."""
        with self._lock:
            return len(self._callbacks)

    def _send(self, message: tuple) -> None:
        try:
            self._commands.send(message)
        except (OSError, ValueError):  # the child is gone; the watcher fails what was in flight
            raise EngineStopped("the model's process has stopped") from None

    def _watch(self, events) -> None:
        """The watcher thread: the child's events to their requests; when the child is gone (stopped,
        or died), what was in flight fails, and a child that died is replaced while restarts are left."""
        while True:
            self._receive(events)
            process = self._process
            process.join(timeout=5)  # it has closed its pipe: its exit code follows
            with self._lock:
                stopping = self._stopping
                restart = not stopping and self.restarts < self.max_restarts
                self._state = "restarting" if restart else "stopped"
                left, self._callbacks = list(self._callbacks.values()), {}
            if stopping:
                error = Event(error="the server is shutting down", code="server_shutdown")
            else:
                reason = _exit_reason(process)
                error = Event(error=f"the model's process stopped ({reason})"
                                    + ("; it is being restarted, try again shortly" if restart else ""),
                              code="engine_stopped")
                if restart:
                    self.restarts += 1
                    log.error("the model's process stopped (%s): restarting it (restart %d of %d)", reason,
                              self.restarts, self.max_restarts)
                else:
                    log.error("the model's process stopped (%s) after %d restart(s): not restarting it; requests "
                              "get 503", reason, self.restarts)
            for callback in left:
                _deliver(callback, error)
            if not restart:
                return
            try:
                events = self._launch()
            except UserError as e:
                with self._lock:
                    self._state = "stopped"
                    stopping = self._stopping
                if not stopping:
                    log.error("could not restart the model's process: %s", e)
                return
            log.warning("the model's process is serving again")

    def _receive(self, events) -> None:
        """Hand each event to its request's callback until the child is gone."""
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
        events.close()


def _exit_reason(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return "still running" if code is None else f"exit code {code}"


def _deliver(callback: Callable[[Event], None], event: Event) -> None:
    try:
        callback(event)
    except Exception:  # a client that is gone must not stop the others' events
        log.debug("could not deliver an event", exc_info=True)


# ------------------------------------------------------------------------------------ the child process
def _child_main(source: ModelSource, max_concurrent: int, max_queue: int, commands, events) -> None:
    # Ctrl-C reaches the whole process group, and a service manager may send SIGTERM to every process of
    # the server: the parent stops this one when it is done with it (or it goes when the parent's pipe closes)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from .engine import Engine

    def send(message) -> bool:
        try:
            events.send(message)
            return True
        except OSError:  # the parent is gone (killed): nobody to tell; the commands' pipe ends this process
            return False

    try:
        model, tokenizer, info, decode = load_model(source)
    except UserError as e:
        send(("failed", str(e)))
        return
    except Exception as e:  # reported by the parent as one line
        send(("failed", f"could not load the model: {type(e).__name__}: {e}"))
        return
    outbox = _Outbox()

    def send_pass() -> None:  # the engine thread, after each pass of its loop
        batch, stats = outbox.take(), engine.stats()
        if (batch or stats != outbox.sent_stats) and send((batch, stats)):
            outbox.sent_stats = stats

    # The parent applies the limits; here a cancelled row holds its slot until the engine's next pass,
    # so the queue gets room for a batch of them (the parent forgot them when it sent the cancellation)
    engine = Engine(model, tokenizer, max_concurrent, max_queue + max_concurrent, decode, source.threads,
                    on_pass_end=send_pass)
    if not send(("ready", tokenizer, model.config, info, engine.stats())):
        return
    engine.start()
    _serve_commands(engine, commands, outbox)
    engine.stop()  # fails what is left, and its last pass sends that
    events.close()
    sys.stderr.flush()
    os._exit(0)  # all is said: skip the interpreter's teardown with torch loaded (a second or two of a stop)


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
        except QueueFull as e:  # the parent's limit comes first (see above): a 429 all the same
            outbox.put(request.id, Event(error=f"the server is busy: {e}", code="queue_full",
                                         prompt_tokens=len(request.prompt)))
