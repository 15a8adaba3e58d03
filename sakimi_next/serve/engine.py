"""The scheduler: one background thread that owns the model and decodes every active request together.

Each loop: drop the requests that were cancelled (a client went away) or ran out of time; admit
waiting requests into free slots (prompts of one length are prefilled together, each row's first
token sampled, and their caches join the batch); then one decoding step for the whole batch, a token
sampled for each row with that request's own settings and random generator, and the finished rows
leave. Requests beyond `max_concurrent` wait in a queue of at most `max_queue`; beyond that `submit`
refuses them.

The web side never touches the model: it submits a `Request` and receives `Event`s through the
request's callback, called from the engine thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import Cache
from ..generate import DecodeFn, SamplingSettings, decode_one_token, prefill, sampling_probs
from ..text import TextRow
from .batch import BatchCache

log = logging.getLogger("sakimi_next.serve")


@dataclass
class Request:
    prompt: list[int]  # token ids, at least one
    max_tokens: int
    sampling: SamplingSettings
    on_event: Callable[["Event"], None]  # called from the engine thread: must not block
    seed: int | None = None  # None: a fresh random seed
    stop: list[str] = field(default_factory=list)  # the reply ends before the first of these strings
    stop_ids: frozenset[int] = frozenset()  # tokens that end the reply (not part of its text)
    deadline: float | None = None  # time.monotonic() after which the request fails with a timeout
    id: int = 0  # set by submit, unless given


@dataclass
class Event:
    """`text`: new reply text (may be empty). A last event has `finish_reason` ("stop" or "length")
    or `error` (with `code`: "timeout", "server_shutdown" or "internal_error"; from the engine's own
    process also "engine_stopped" or "queue_full"), and the token counts."""
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


class _Sequence:
    def __init__(self, request: Request, tokenizer, device):
        self.request = request
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.text = TextRow(tokenizer, request.stop, request.stop_ids)
        self.generated = 0


class Engine:
    """Continuous batching over `model`. `start()` runs the loop in a daemon thread; `stop()` ends it
    and fails whatever is left."""

    def __init__(self, model, tokenizer, max_concurrent: int = 8, max_queue: int = 64,
                 decode: DecodeFn = decode_one_token, threads: int | None = None,
                 on_pass_end: Callable[[], None] | None = None):
        self.model, self.tokenizer, self.decode = model, tokenizer, decode
        self.config = model.config
        self.on_pass_end = on_pass_end  # called by the engine thread after each pass: events can go out together
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.threads = threads or torch.get_num_threads()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: set[int] = set()
        self._ids = itertools.count(1)
        self._running = False
        self._thread: threading.Thread | None = None
        self.batch = BatchCache(model)
        self.active: list[_Sequence] = []  # row i of the batch
        self._next: list[int] = []  # the token each row feeds to the next step
        self.served = self.tokens_generated = self.steps = 0
        self.clock = time.monotonic  # what deadlines are compared with (tests move it forward)

    # ------------------------------------------------------------------ called from any thread
    def submit(self, request: Request) -> int:
        with self._cond:
            if not self._running:
                raise EngineStopped("the engine is not running")
            free = max(self.max_concurrent - len(self.active), 0)  # slots the next loop will fill
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"{len(self.active)} requests running and {len(self._waiting)} waiting; "
                                "try again later")
            if not request.id:  # ids given by the caller (the engine process's parent) are kept
                request.id = next(self._ids)
            self._waiting.append(request)
            self._cond.notify()
            return request.id

    def cancel(self, request_id: int) -> None:
        """Forget a request (its client went away): a waiting one leaves the queue now, a running one
        leaves the batch before the next step. No event follows."""
        with self._cond:
            for r in self._waiting:
                if r.id == request_id:
                    self._waiting.remove(r)
                    return
            self._cancelled.add(request_id)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"engine": "running" if self._running else "stopped",
                    "active": len(self.active), "queued": len(self._waiting), "max_concurrent": self.max_concurrent,
                    "max_queue": self.max_queue, "requests_served": self.served,
                    "tokens_generated": self.tokens_generated, "decode_steps": self.steps}

    def start(self) -> None:
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="sakimi-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop after its current pass (what is left fails with the shutdown error); wait for
        it, at most `timeout` seconds (a daemon thread stuck in the model goes with the process)."""
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        torch.set_flush_denormal(True)  # see cli.main: strongly decaying gates make denormals
        if self.threads:  # MKL's and OpenMP's thread counts are per thread: set them in this one
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while self._running and not self._waiting and not self.active:
                        self._cond.wait()
                    if not self._running:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    admitted = [self._waiting.popleft()
                                for _ in range(min(len(self._waiting), self.max_concurrent - len(self.active)))]
                self._drop(cancelled)
                self._admit(admitted)
                if self.active:
                    self._step()
                if self.on_pass_end is not None:
                    self.on_pass_end()
        self._fail_all("the server is shutting down", "server_shutdown")
        if self.on_pass_end is not None:
            self.on_pass_end()

    def _drop(self, cancelled: set[int]) -> None:
        """Remove cancelled rows, and fail the rows and waiting requests that are past their deadline."""
        now = self.clock()
        with self._cond:
            late = [r for r in self._waiting if r.deadline is not None and now > r.deadline]
            for r in late:
                self._waiting.remove(r)
        for r in late:
            self._emit(r, Event(error="the request timed out waiting for a free slot", code="timeout",
                                prompt_tokens=len(r.prompt)))
        rows = []
        for i, seq in enumerate(self.active):
            r = seq.request
            if r.id in cancelled:
                rows.append(i)
            elif r.deadline is not None and now > r.deadline:
                rows.append(i)
                self._emit(r, Event(error="the request timed out", code="timeout", prompt_tokens=len(r.prompt),
                                    completion_tokens=seq.generated))
        self._leave(rows)

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the prompts that are still in time, those of one length together (requests often
        arrive together: one batched prefill costs little more than one alone), and let them join."""
        now, groups = self.clock(), {}
        for r in requests:
            if r.deadline is not None and now > r.deadline:
                self._emit(r, Event(error="the request timed out waiting for a free slot", code="timeout",
                                    prompt_tokens=len(r.prompt)))
            else:
                groups.setdefault(len(r.prompt), []).append(r)
        for group in groups.values():
            try:
                seqs, cache, tokens = self._prefill(group)
            except Exception as e:  # one bad request must not take the others down: retry them alone
                if len(group) > 1:
                    for r in group:
                        self._admit([r])
                    continue
                log.exception("prefill failed")
                self._emit(group[0], Event(error=f"internal error: {e}", code="internal_error",
                                           prompt_tokens=len(group[0].prompt)))
                continue
            self._join(seqs, cache, tokens)

    def _prefill(self, group: list[Request]) -> tuple[list[_Sequence], Cache, list[int]]:
        """Prefill equal-length prompts as one batch; each row's first token, sampled with its own
        settings. Returns (sequences, their cache, first tokens)."""
        seqs = [_Sequence(r, self.tokenizer, self.model.device) for r in group]
        T = len(group[0].prompt)
        cache = self.model.new_cache(len(group), capacity=T + min(max(r.max_tokens for r in group), 256))
        ids = torch.tensor([r.prompt for r in group], device=self.model.device)
        logits = prefill(self.model, ids, None, cache)
        return seqs, cache, self._sample(logits, seqs)

    def _join(self, seqs: list[_Sequence], cache: Cache, tokens: list[int]) -> None:
        """Send each prefilled sequence's first token; those not finished by it join the batch."""
        done = [self._accept(seq, token) for seq, token in zip(seqs, tokens)]
        joining = BatchCache(self.model, cache)
        joining.remove([i for i, finished in enumerate(done) if finished])
        if joining.cache is not None:
            self.batch.add(joining.cache)
        for seq, token, finished in zip(seqs, tokens, done):
            if not finished:
                self.active.append(seq)
                self._next.append(token)

    def _step(self) -> None:
        """One decoding step for every active row."""
        try:
            tokens = torch.tensor(self._next, device=self.model.device)
            logits = self.decode(self.model, tokens, self.batch.cache)
            chosen = self._sample(logits, self.active)
        except Exception as e:
            log.exception("decoding step failed")
            self._fail_all(f"internal error: {e}", "internal_error")
            return
        self.steps += 1
        done = []
        for i, (seq, token) in enumerate(zip(self.active, chosen)):
            self._next[i] = token
            if self._accept(seq, token):
                done.append(i)
        self._leave(done)

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """A token for each row (row i is seqs[i]): greedy rows by one argmax; the rows that share
        sampling settings get their distributions in one call, and each draws from its own with its
        own generator."""
        chosen = logits.argmax(dim=-1).tolist()
        groups: dict[tuple, list[int]] = {}
        for i, seq in enumerate(seqs):
            s = seq.request.sampling
            if not s.greedy:
                groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
        for rows in groups.values():
            probs = sampling_probs(logits[rows], seqs[rows[0]].request.sampling)
            for j, i in enumerate(rows):
                chosen[i] = int(torch.multinomial(probs[j:j + 1], 1, generator=seqs[i].generator))
        return chosen

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """Take a sampled token into its sequence and send the new text; True when it is finished."""
        r = seq.request
        seq.generated += 1
        self.tokens_generated += 1
        reason = None
        if seq.text.add(token):  # a stop token or a stop string
            reason = "stop"
        elif seq.generated >= r.max_tokens:
            reason = "length"
        if reason is None:
            text = seq.text.take()
            if text:
                self._emit(r, Event(text=text))
            return False
        if reason == "length":  # the characters still held back are whole now
            seq.text.finish()
        self.served += 1
        self._emit(r, Event(text=seq.text.take(), finish_reason=reason, prompt_tokens=len(r.prompt),
                            completion_tokens=seq.generated))
        return True

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        self.batch.remove(rows)
        gone = set(rows)
        self.active = [s for i, s in enumerate(self.active) if i not in gone]
        self._next = [t for i, t in enumerate(self._next) if i not in gone]

    def _fail_all(self, message: str, code: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for r in waiting + [s.request for s in self.active]:
            self._emit(r, Event(error=message, code=code, prompt_tokens=len(r.prompt)))
        self._leave(list(range(len(self.active))))

    @staticmethod
    def _emit(request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # a client that is gone (its event loop closed) must not stop the engine
            log.debug("could not deliver an event to request %d", request.id, exc_info=True)
