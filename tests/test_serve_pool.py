"""Several model processes behind one server (`serve/pool.py`, `--engines N`): the same replies as one
engine, requests spread over the engines, cancellation reaching the right one, one engine's death
leaving the others serving; and the lock that lets one of them compile a program in the background."""

import os
import subprocess
import sys

import pytest

from sakimi_next import decoder
from sakimi_next.config import preset
from sakimi_next.decoder import CompiledDecoder, claim_compile
from sakimi_next.generate import SamplingSettings
from sakimi_next.serve.engine import EngineStopped, QueueFull, Request
from sakimi_next.serve.pool import EnginePool
from sakimi_next.serve.process import EngineProcess, ModelSource

from .serve_support import Collector, make_served_checkpoint, run_requests

GREEDY = SamplingSettings(temperature=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_served_checkpoint(tmp_path_factory.mktemp("serve-pool"))


def replies(engine, prompts, sampling=GREEDY, seed=None):
    events = run_requests(engine, [dict(prompt=p, max_tokens=12 + 3 * i, sampling=sampling, seed=seed)
                                   for i, p in enumerate(prompts)])
    return [("".join(e.text for e in ev), ev[-1].finish_reason, ev[-1].error, ev[-1].completion_tokens)
            for ev in events]


def test_two_engines_give_the_replies_of_one_and_share_the_work(checkpoint):
    source = ModelSource(str(checkpoint), "cpu", threads=1)
    prompts = [[5 + i, 6, 7 + 2 * i] for i in range(5)]
    one = replies(EngineProcess(source, max_concurrent=4), prompts)
    assert [(e.max_concurrent, e.max_queue) for e in EnginePool(source, 2, 5, 3).engines] == [(3, 2), (2, 1)]
    pool = EnginePool(source, 2, max_concurrent=4)
    assert [e.max_concurrent for e in pool.engines] == [2, 2]
    assert replies(pool, prompts) == one
    assert all(reason == "length" and error is None for _, reason, error, _ in one)
    served = [e.stats()["requests_served"] for e in pool.engines]
    assert sorted(served) == [2, 3]  # the least busy engine takes each request
    sampled = SamplingSettings(temperature=1.0, top_p=0.9)
    assert replies(EnginePool(source, 2), prompts[:3], sampled, seed=3) == \
        replies(EngineProcess(source), prompts[:3], sampled, seed=3)


def test_limits_cancel_counters_and_an_engine_that_dies(checkpoint):
    pool = EnginePool(ModelSource(str(checkpoint), "cpu", threads=1), 2, max_concurrent=2, max_queue=0,
                      max_restarts=0)
    pool.start()
    try:
        got = Collector(2)
        ids = [pool.submit(Request(prompt=[5, 6], max_tokens=3000, sampling=GREEDY, on_event=got.on_event(i)))
               for i in range(2)]
        assert len(set(ids)) == 2 and sorted(e.in_flight for e in pool.engines) == [1, 1]
        with pytest.raises(QueueFull):  # a slot each, both taken
            pool.submit(Request(prompt=[5], max_tokens=5, sampling=GREEDY, on_event=lambda e: None))
        for _ in range(600):  # bounded: until both have streamed a little
            if all(len(ev) >= 2 for ev in got.events):
                break
            got.done[0].wait(timeout=0.1)
        stats = pool.stats()
        assert (stats["engines"], stats["engines_running"], stats["active"], stats["max_concurrent"]) == (2, 2, 2, 2)
        pool.cancel(ids[0])  # reaches the engine that runs it, and only that one
        for _ in range(600):
            if sum(e.in_flight for e in pool.engines) == 1 and pool.stats()["active"] == 1:
                break
            got.done[0].wait(timeout=0.05)
        assert pool.stats()["active"] == 1 and not got.done[0].is_set()
        busy = next(e for e in pool.engines if e.in_flight)
        busy._process.kill()  # the other engine keeps serving
        assert got.done[1].wait(timeout=120)
        assert got.events[1][-1].code == "engine_stopped"
        stats = pool.stats()
        assert (stats["engine"], stats["engines_running"]) == ("running", 1)
        short = Collector(1)
        pool.submit(Request(prompt=[5], max_tokens=4, sampling=GREEDY, on_event=short.on_event(0)))
        (ev,) = short.wait()
        assert (ev[-1].finish_reason, ev[-1].completion_tokens) == ("length", 4)
        assert pool._owner == {}  # every request that ended is forgotten
    finally:
        pool.stop()
    assert pool.stats()["engine"] == "stopped"
    with pytest.raises(EngineStopped):
        pool.submit(Request(prompt=[5], max_tokens=4, sampling=GREEDY, on_event=lambda e: None))


def test_one_background_compile_per_program(tmp_path):
    """Engines share the programs on disk: the first to ask compiles, the others wait; a lock whose
    process is gone is taken over."""
    path = tmp_path / "step-x.pt2"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "step-x.lock").write_text(str(other.pid))
        assert not claim_compile(path)  # a live process holds it
    finally:
        other.kill()
        other.wait()
    assert claim_compile(path)  # its process is gone
    assert (tmp_path / "step-x.lock").read_text() == str(os.getpid())
    assert not claim_compile(path)  # now this process holds it


def test_two_decoders_in_the_background_start_one_compile(tmp_path, monkeypatch):
    """Two engines' decoders that both miss a program: the first starts the compile, the second decodes
    eagerly without starting another; when the compile ends (here it fails), the lock is released."""
    from sakimi_next.model import Qwen3NextForCausalLM

    started = []

    def fake_compile(spec):
        started.append(spec["path"])
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    monkeypatch.setattr(decoder, "_start_twin_compile", fake_compile)
    model = Qwen3NextForCausalLM(preset("tiny_5m", num_hidden_layers=2, vocab_size=256)).eval()
    first, second = (CompiledDecoder(model, directory=tmp_path, background=True) for _ in range(2))
    assert not first.ready(2) and not second.ready(2)
    assert len(started) == 1 and first.compiling and not second.compiling
    first.compiling[None].kill()
    first.compiling[None].wait()
    assert not first.ready(2) and first.failed  # the compile failed: eager from now on
    assert not first.path(2).with_suffix(".lock").exists()
    assert not second.ready(2) and len(started) == 2  # the lock is free: the other may try
    second.compiling[None].kill()
    second.compiling[None].wait()
