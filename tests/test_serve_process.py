"""The engine in a child process (`serve/process.py`, what `--mode serve` runs): the same replies as
the engine in this process, its limits, cancellation, and what happens when the child fails."""

import pytest

from sakimi_next.generate import SamplingSettings
from sakimi_next.serve.engine import Engine, EngineStopped, QueueFull, Request
from sakimi_next.serve.process import EngineProcess, ModelSource, load_model
from sakimi_next.util import UserError

from .serve_support import Collector, make_served_checkpoint, run_requests

GREEDY = SamplingSettings(temperature=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_served_checkpoint(tmp_path_factory.mktemp("serve-process"))


def run(engine, prompts: list[list[int]], max_tokens: int = 20, sampling=GREEDY, seed=None):
    """Each reply as (text, finish reason, error, completion tokens)."""
    events = run_requests(engine, [dict(prompt=p, max_tokens=max_tokens + 3 * i, sampling=sampling, seed=seed)
                                   for i, p in enumerate(prompts)])
    return [("".join(e.text for e in ev), ev[-1].finish_reason, ev[-1].error, ev[-1].completion_tokens)
            for ev in events]


def test_replies_equal_the_engine_in_this_process(checkpoint):
    source = ModelSource(str(checkpoint), "cpu", threads=1)
    model, tokenizer, _, decode = load_model(source)
    prompts = [tokenizer.encode(w + " statement") for w in ("The for", "A while", "try", "The import", "with")]
    here = run(Engine(model, tokenizer, max_concurrent=3, decode=decode), prompts)
    there = run(EngineProcess(source, max_concurrent=3), prompts)
    assert there == here
    assert all(reason == "length" and error is None for _, reason, error, _ in there)
    sampled = SamplingSettings(temperature=1.0, top_p=0.9)
    assert run(EngineProcess(source), prompts[:2], sampling=sampled, seed=7) == \
        run(Engine(model, tokenizer, decode=decode), prompts[:2], sampling=sampled, seed=7)


def test_limits_cancel_and_counters(checkpoint):
    engine = EngineProcess(ModelSource(str(checkpoint), "cpu", threads=1), max_concurrent=1, max_queue=1)
    assert engine.tokenizer is None
    engine.start()
    try:
        assert engine.config.vocab_size == engine.tokenizer.vocab_size and engine.info["parameters"] > 0
        got = Collector(2)
        long = [engine.submit(Request(prompt=[5, 6], max_tokens=3000, sampling=GREEDY, on_event=got.on_event(i)))
                for i in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(Request(prompt=[5], max_tokens=5, sampling=GREEDY, on_event=lambda e: None))
        for _ in range(600):  # bounded: until the first one has streamed a little
            if len(got.events[0]) >= 3:
                break
            got.done[0].wait(timeout=0.1)
        assert len(got.events[0]) >= 3 and not got.events[1]  # one slot: the second waits
        engine.cancel(long[0])  # the queued one takes its slot
        seen = len(got.events[0])
        for _ in range(600):
            if len(got.events[1]) >= 3:
                break
            got.done[1].wait(timeout=0.1)
        assert len(got.events[1]) >= 3
        engine.cancel(long[1])
        for _ in range(600):
            stats = engine.stats()
            if stats["active"] == 0 and stats["queued"] == 0:
                break
            got.done[1].wait(timeout=0.05)
        assert stats["active"] == 0 and stats["requests_served"] == 0 and stats["decode_steps"] > 0
        assert len(got.events[0]) == seen
        assert not any(e.last for ev in got.events for e in ev)  # no event after a cancel
        short = Collector(1)
        engine.submit(Request(prompt=[5], max_tokens=4, sampling=GREEDY, on_event=short.on_event(0)))
        (ev,) = short.wait()
        assert (ev[-1].finish_reason, ev[-1].error, ev[-1].completion_tokens) == ("length", None, 4)
    finally:
        engine.stop()
    with pytest.raises(EngineStopped):
        engine.submit(Request(prompt=[5], max_tokens=4, sampling=GREEDY, on_event=lambda e: None))


def test_a_child_that_dies_ends_every_request(checkpoint):
    """Without restarts left, a child that dies ends every request in flight (running or queued) with
    an error saying why, and the engine stays down."""
    engine = EngineProcess(ModelSource(str(checkpoint), "cpu", threads=1), max_concurrent=1, max_queue=4,
                           max_restarts=0)
    engine.start()
    try:
        got = Collector(2)
        for i in range(2):  # one running, one waiting
            engine.submit(Request(prompt=[5, 6], max_tokens=3000, sampling=GREEDY, on_event=got.on_event(i)))
        for _ in range(600):
            if got.events[0]:
                break
            got.done[0].wait(timeout=0.1)
        engine._process.kill()
        assert [ev[-1].error for ev in got.wait(120)] == ["the model's process stopped (killed by SIGKILL)"] * 2
        assert got.events[1][-1].code == "engine_stopped"
        assert engine.stats()["engine"] == "stopped"
        with pytest.raises(EngineStopped):
            engine.submit(Request(prompt=[5], max_tokens=4, sampling=GREEDY, on_event=lambda e: None))
    finally:
        engine.stop()


def test_a_bad_checkpoint_is_one_error_at_start(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    for path, message in ((tmp_path / "missing", "checkpoint not found"),
                          (tmp_path, "not a checkpoint or a Hugging Face model directory")):
        with pytest.raises(UserError, match=message):
            EngineProcess(ModelSource(str(path), "cpu")).start()
