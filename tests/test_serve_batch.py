"""Continuous batching: a sequence decoded in a batch that others join and leave gets the tokens and
logits it gets alone; the engine's replies equal plain `generate`."""

import pytest
import torch

from sakimi_next.generate import SamplingSettings, decode_one_token, generate, prefill
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.serve.batch import BatchCache
from sakimi_next.serve.engine import Engine, Event, QueueFull, Request

from .helpers import small_config, train_briefly
from .serve_support import Collector, run_requests

VOCAB = 160


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(small_config(vocab_size=VOCAB))
    train_briefly(m, VOCAB, steps=3)
    return m.eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (int(torch.randint(1, 40, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@torch.inference_mode()
def alone(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of each step, decoding the sequence by itself."""
    cache = model.new_cache(1, capacity=4)
    logits = prefill(model, torch.tensor([prompt]), None, cache)
    tokens, rows = [], []
    for _ in range(steps):
        rows.append(logits[0])
        tokens.append(int(logits.argmax(-1)))
        logits = decode_one_token(model, torch.tensor(tokens[-1:]), cache)
    return tokens, torch.stack(rows)


@torch.inference_mode()
def test_sequences_in_a_changing_batch_decode_as_alone(model):
    """Sequences join at different steps (with histories longer and shorter than the batch's) and
    leave at different steps; every row's greedy tokens are exactly its solo tokens, and its logits
    match to float32 rounding."""
    ps = prompts(7)
    joins = [0, 0, 3, 5, 5, 9, 14]  # the step at which each sequence joins
    lengths = [12, 30, 6, 20, 9, 15, 8]  # tokens each generates before leaving
    solo = [alone(model, p, n) for p, n in zip(ps, lengths)]
    batch = BatchCache(model)
    rows: list[int] = []  # sequence index of each batch row
    got: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in range(len(ps))}
    nxt: list[int] = []
    step = 0
    sizes = set()
    while step < 60 and (rows or step <= max(joins)):
        for i in [i for i, j in enumerate(joins) if j == step]:
            cache = model.new_cache(1, capacity=4)
            logits = prefill(model, torch.tensor([ps[i]]), None, cache)
            got[i].append((int(logits.argmax(-1)), logits[0]))
            batch.add(cache)
            rows.append(i)
            nxt.append(got[i][-1][0])
        if rows:
            sizes.add(len(rows))
            logits = decode_one_token(model, torch.tensor(nxt), batch.cache)
            for r, i in enumerate(rows):
                got[i].append((int(logits[r].argmax()), logits[r]))
                nxt[r] = got[i][-1][0]
            leaving = [r for r, i in enumerate(rows) if len(got[i]) >= lengths[i]]
            batch.remove(leaving)
            rows = [i for r, i in enumerate(rows) if r not in leaving]
            nxt = [t for r, t in enumerate(nxt) if r not in leaving]
        step += 1
    assert not rows and batch.size == 0 and len(sizes) >= 4
    for i, (tokens, logits) in enumerate(solo):
        assert [t for t, _ in got[i]] == tokens, f"sequence {i}"
        torch.testing.assert_close(torch.stack([x for _, x in got[i]]), logits, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_batch_trims_padding_columns_when_the_long_sequence_leaves(model):
    batch = BatchCache(model)
    for p in ([5] * 30, [6] * 3):
        cache = model.new_cache(1, capacity=4)
        prefill(model, torch.tensor([p]), None, cache)
        batch.add(cache)
    assert batch.cache.length == 30 and batch.cache.has_padding
    batch.remove([0])
    assert batch.cache.length == 3 and not batch.cache.has_padding and batch.size == 1
    assert batch.cache.layers[3].keys.shape[0] == 1


def run_engine(model, requests: list[dict], max_concurrent: int = 8, max_queue: int = 64,
               decode=decode_one_token) -> list[list[Event]]:
    """Submit all requests at once; wait (bounded) until each has its last event."""
    return run_requests(Engine(model, TokenIds(), max_concurrent, max_queue, decode), requests)


class TokenIds:
    """A stand-in tokenizer for the engine tests: token i is the text ' i'."""
    eot_id = 0

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


def test_engine_replies_equal_generate(model):
    ps = prompts(10, seed=1)
    greedy = SamplingSettings(temperature=0)
    events = run_engine(model, [dict(prompt=p, max_tokens=5 + 3 * i, sampling=greedy) for i, p in enumerate(ps)],
                        max_concurrent=4)
    for i, (p, ev) in enumerate(zip(ps, events)):
        expected = generate(model, [p], 5 + 3 * i)[0]
        assert "".join(e.text for e in ev) == TokenIds().decode(expected)
        assert ev[-1].finish_reason == "length" and ev[-1].completion_tokens == len(expected)
        assert ev[-1].prompt_tokens == len(p) and sum(e.last for e in ev) == 1


def test_engine_prefills_prompts_of_one_length_together(model):
    """Requests waiting together are prefilled in groups of one prompt length; a row finished by its
    first token leaves the group before it joins; every reply equals `generate` alone."""
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (9, 5, 9, 9, 5, 9)]
    budgets = [6, 4, 1, 8, 7, 3]  # the third finishes with its prefill
    greedy = SamplingSettings(temperature=0)
    engine = Engine(model, TokenIds(), max_concurrent=8)
    groups, prefill_group = [], engine._prefill
    engine._prefill = lambda group: (groups.append([len(r.prompt) for r in group]), prefill_group(group))[1]
    got = Collector(len(ps))
    engine._running = True  # queue everything first, so that the first loop admits it all at once
    for i, (p, n) in enumerate(zip(ps, budgets)):
        engine.submit(Request(p, n, greedy, got.on_event(i)))
    engine.start()
    try:
        events = got.wait()
    finally:
        engine.stop()
    assert groups == [[9, 9, 9, 9], [5, 5]]
    for p, n, ev in zip(ps, budgets, events):
        assert "".join(e.text for e in ev) == TokenIds().decode(generate(model, [p], n)[0])
        assert ev[-1].completion_tokens == n and ev[-1].finish_reason == "length"


def test_engine_with_bf16_weights(model):
    """`--mode serve --dtype bf16`: the bf16 model's decoding logits stay within bf16 rounding of the
    float32 model's along the same tokens, and the engine serves it (the DeltaNet state stays float32)."""
    import copy

    m16 = copy.deepcopy(model).to(torch.bfloat16)
    p = prompts(1, seed=5)[0]
    tokens, logits32 = alone(model, p, 8)
    with torch.inference_mode():
        cache = m16.new_cache(1)
        rows = [prefill(m16, torch.tensor([p]), None, cache)[0]]
        for t in tokens[:-1]:
            rows.append(decode_one_token(m16, torch.tensor([t]), cache)[0])
    assert cache.layers[0].recurrent_state.dtype == torch.float32
    logits16 = torch.stack(rows).float()
    assert (logits16 - logits32).abs().max() < 0.05 * logits32.abs().max()
    (ev,) = run_engine(m16, [dict(prompt=p, max_tokens=8, sampling=SamplingSettings(temperature=0))])
    assert ev[-1].finish_reason == "length" and ev[-1].completion_tokens == 8


def test_engine_seeded_sampling_is_the_same_alone_or_batched(model):
    ps = prompts(6, seed=2)
    s = SamplingSettings(temperature=1.0, top_k=0, top_p=0.9)
    reqs = [dict(prompt=p, max_tokens=12, sampling=s, seed=100 + i) for i, p in enumerate(ps)]
    together = run_engine(model, reqs)
    for i, r in enumerate(reqs):
        (solo,) = run_engine(model, [r])
        assert "".join(e.text for e in solo) == "".join(e.text for e in together[i])
    assert len({"".join(e.text for e in ev) for ev in together}) > 1


def test_engine_stops_at_stop_ids_and_strings(model):
    p = prompts(1, seed=3)[0]
    full = generate(model, [p], 12)[0]
    stop_token = full[4]
    (ev,) = run_engine(model, [dict(prompt=p, max_tokens=12, sampling=SamplingSettings(temperature=0),
                                    stop_ids=frozenset({stop_token}))])
    cut = full.index(stop_token)
    assert "".join(e.text for e in ev) == TokenIds().decode(full[:cut])
    assert ev[-1].finish_reason == "stop" and ev[-1].completion_tokens == cut + 1
    text = TokenIds().decode(full)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    (ev,) = run_engine(model, [dict(prompt=p, max_tokens=12, sampling=SamplingSettings(temperature=0), stop=[stop])])
    assert "".join(e.text for e in ev) == text[:text.index(stop)] and ev[-1].finish_reason == "stop"


def test_engine_queue_limit_and_cancel(model):
    engine = Engine(model, TokenIds(), max_concurrent=1, max_queue=1)  # not started: nothing is admitted
    engine._running = True
    greedy = SamplingSettings(temperature=0)
    first = engine.submit(Request([5, 6], 4, greedy, lambda e: None))
    engine.submit(Request([5, 6], 4, greedy, lambda e: None))
    with pytest.raises(QueueFull):
        engine.submit(Request([5, 6], 4, greedy, lambda e: None))
    engine.cancel(first)
    assert engine.stats()["queued"] == 1


def test_engine_deadlines(model):
    """A request past its deadline fails with a timeout, in the queue or while decoding; the others
    go on. The engine's clock is a count of its readings (two a pass), not the time."""
    import itertools

    greedy = SamplingSettings(temperature=0)
    engine = Engine(model, TokenIds(), max_concurrent=1)
    engine.clock = itertools.count().__next__
    events = run_requests(engine, [dict(prompt=[5, 6], max_tokens=4, sampling=greedy, deadline=-1),
                                   dict(prompt=[5, 6], max_tokens=100000, sampling=greedy, deadline=20),
                                   dict(prompt=[7, 8], max_tokens=6, sampling=greedy)])
    assert events[0] == [Event(error="the request timed out waiting for a free slot", code="timeout", prompt_tokens=2)]
    assert events[1][-1].code == "timeout" and 0 < events[1][-1].completion_tokens < 20
    assert events[2][-1].finish_reason == "length" and events[2][-1].completion_tokens == 6
