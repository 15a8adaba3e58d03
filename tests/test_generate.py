"""Decoding: cached = uncached, batched = one by one, seeded sampling, top-k=1 = greedy."""

import pytest
import torch

from sakimi_next.config import PRESETS, preset
from sakimi_next.generate import (STEP_PREFILL_MAX, SamplingSettings, apply_repetition_penalty, generate, prefill,
                                  sample)
from sakimi_next.model import Qwen3NextForCausalLM

from .helpers import small_config


def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(small_config()).eval()
    with torch.no_grad():
        for p in m.parameters():  # sharper, less uniform logits than a fresh init
            p.mul_(3.0) if p.ndim >= 2 else p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.mark.parametrize("name", list(PRESETS))
def test_cached_greedy_equals_uncached_presets(name):
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(preset(name)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    prompt = torch.randint(0, m.config.vocab_size, (70,)).tolist()
    n = 12 if name == "small_50m" else 24
    assert generate(m, [prompt], n)[0] == greedy_without_cache(m, prompt, n)


@pytest.mark.parametrize("prompt_len", [1, 5, 64, 65])
def test_cached_greedy_equals_uncached(model, prompt_len):
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist()
    assert generate(model, [prompt], 40)[0] == greedy_without_cache(model, prompt, 40)


@pytest.mark.parametrize("prompt_len", [STEP_PREFILL_MAX, STEP_PREFILL_MAX + 1])
def test_prefill_paths_give_the_forward_and_its_cache(model, prompt_len):
    """A short prompt is read token by token (the step path), a longer one by the chunked kernel: both
    give the uncached forward's last logits and a cache that decodes on as the forward's would."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len + 1), generator=g)
    with torch.no_grad():
        full = model(ids).logits[0]
    cache = model.new_cache(1, capacity=prompt_len + 1)
    torch.testing.assert_close(prefill(model, ids[:, :-1], None, cache)[0], full[-2], rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(model.decode_step(ids[:, -1], cache)[0], full[-1], rtol=1e-4, atol=1e-4)


def test_batched_equals_one_by_one(model):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 17, 9, 40)]
    batched = generate(model, prompts, 20, pad_id=0)
    for p, out in zip(prompts, batched):
        assert out == generate(model, [p], 20)[0]


def test_stops_at_end_of_text(model):
    prompt = [5, 6, 7]
    free = generate(model, [prompt], 10)[0]
    eos = free[3]
    out = generate(model, [prompt], 10, eos_id=eos)[0]
    assert out == free[: free.index(eos) + 1]


def test_seeded_sampling_is_reproducible(model):
    s = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0)
    a = generate(model, [[1, 2, 3]] * 3, 30, s, seed=123)
    b = generate(model, [[1, 2, 3]] * 3, 30, s, seed=123)
    c = generate(model, [[1, 2, 3]] * 3, 30, s, seed=124)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # rows of one batch draw different samples


def test_top_k_1_equals_greedy(model):
    prompt = [[4, 8, 15, 16, 23, 42]]
    greedy = generate(model, prompt, 25)
    assert generate(model, prompt, 25, SamplingSettings(temperature=1.3, top_k=1), seed=7) == greedy
    assert generate(model, prompt, 25, SamplingSettings(temperature=0.0, top_k=50), seed=7) == greedy


def test_sample_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample(logits, SamplingSettings(temperature=1.0, top_k=2, top_p=1.0), g)
    assert set(top2.tolist()) == {0, 1}
    # top-p: p(0)=0.636, p(1)=0.234 -> the smallest set reaching 0.8 is {0, 1}
    nucleus = sample(logits, SamplingSettings(temperature=1.0, top_k=0, top_p=0.8), g)
    assert set(nucleus.tolist()) == {0, 1}
    frac0 = (nucleus == 0).float().mean().item()
    assert abs(frac0 - 0.636 / (0.636 + 0.234)) < 0.03
    everything = sample(logits, SamplingSettings(temperature=1.0, top_k=0, top_p=1.0), g)
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_settings_validation():
    from sakimi_next.util import UserError

    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(UserError):
            SamplingSettings(**bad).validate()
