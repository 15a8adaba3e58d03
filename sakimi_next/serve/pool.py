"""Several model processes behind one server (`--engines N`): data parallelism, as vLLM's
`--data-parallel-size` runs one engine core per replica.

On a CPU one decoding step at a time leaves cores idle: a step of a few rows is too small for a team of
threads (an OpenMP team of two stalls whenever the web process or a client takes its second core), and
one thread runs a batch of 8 rows at the speed of its memory reads. Two engines of one thread each,
each with its own batch, keep both cores decoding. A request goes to the engine with the fewest
requests in flight; each engine restarts on its own (`EngineProcess`), and the server answers while
any of them runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable

from .engine import EngineStopped, Event, QueueFull, Request
from .process import EngineProcess, ModelSource

# counters of `Engine.stats` that add up over the engines (the rest are the first engine's)
SUMMED = ("active", "queued", "max_concurrent", "max_queue", "requests_served", "tokens_generated", "decode_steps",
          "engine_restarts")


class EnginePool:
    """`Engine`'s interface (submit, cancel, stats, start, stop; tokenizer, config, info) over `engines`
    model processes that share `max_concurrent` slots and `max_queue` places out among them."""

    def __init__(self, source: ModelSource, engines: int, max_concurrent: int = 8, max_queue: int = 64,
                 start_seconds: float = 600.0, max_restarts: int = 3):
        if engines < 1:
            raise ValueError(f"engines must be at least 1, not {engines}")
        share = lambda n, i: n // engines + (i < n % engines)  # noqa: E731  (the first ones take the remainder)
        self.engines = [EngineProcess(source, share(max_concurrent, i), share(max_queue, i), start_seconds,
                                      max_restarts) for i in range(engines)]
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._owner: dict[int, EngineProcess] = {}  # requests in flight -> their engine

    @property
    def tokenizer(self):
        return self.engines[0].tokenizer

    @property
    def config(self):
        return self.engines[0].config

    @property
    def info(self):
        return self.engines[0].info

    def start(self) -> None:
        """Start the engines one after another: the first compiles what is missing (--compile), the
        others load it from disk. A UserError if one could not start (the others are stopped then)."""
        try:
            for engine in self.engines:
                engine.start()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every engine at once (what is in flight fails with the shutdown error)."""
        stopping = [threading.Thread(target=engine.stop, args=(timeout,), daemon=True) for engine in self.engines]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()

    def submit(self, request: Request) -> int:
        """Hand the request to the running engine with the fewest requests in flight."""
        with self._lock:
            request.id = next(self._ids)
        engines = sorted(self.engines, key=lambda e: e.in_flight)
        forwarded = dataclasses.replace(request, on_event=self._forget_when_done(request.id, request.on_event))
        refusals: list[Exception] = []
        for engine in engines:  # one full (its share may be smaller) or restarting: the next may take it
            with self._lock:
                self._owner[request.id] = engine
            try:
                return engine.submit(forwarded)
            except (QueueFull, EngineStopped) as e:
                refusals.append(e)
        with self._lock:
            self._owner.pop(request.id, None)
        raise next((e for e in refusals if isinstance(e, QueueFull)), refusals[-1])

    def _forget_when_done(self, request_id: int, on_event: Callable[[Event], None]) -> Callable[[Event], None]:
        def deliver(event: Event) -> None:
            if event.last:
                with self._lock:
                    self._owner.pop(request_id, None)
            on_event(event)
        return deliver

    def cancel(self, request_id: int) -> None:
        with self._lock:
            engine = self._owner.pop(request_id, None)
        if engine is not None:
            engine.cancel(request_id)

    def stats(self) -> dict:
        each = [engine.stats() for engine in self.engines]
        states = [s["engine"] for s in each]
        state = "running" if "running" in states else "restarting" if "restarting" in states else "stopped"
        summed = {key: sum(s.get(key, 0) for s in each) for key in SUMMED}
        return {**each[0], **summed, "engine": state, "engines": len(each),
                "engines_running": states.count("running")}
