"""An attention window in the decoding cache: every query sees at most the last W positions (itself
included) while the DeltaNet states carry everything. Checked against a brute-force reference: one
forward over the whole sequence with attention masked to that band."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sakimi_next.evaluate import score_carry
from sakimi_next.model import Qwen3NextForCausalLM

from .helpers import small_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(small_config()).eval()
    with torch.no_grad():  # move norms and gates off their initial values so nothing is trivially equal
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    yield m
    m.set_attention_window(None)


@torch.no_grad()
def banded_forward(model, x: torch.Tensor, window: int) -> torch.Tensor:
    """The reference: logits [B, T, V] of one uncached forward where query t attends to keys t-W+1..t."""
    T = x.shape[1]
    t = torch.arange(T)
    band = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    h = model.model.embed_tokens(x)
    ctx = model._context(h, None, None, None)
    ctx.attn_mask = band[None, None]
    for layer in model.model.layers:
        h = layer(h, ctx)
    return F.linear(model.model.norm(h), model.lm_head_weight)


def windowed(model, window):
    model.set_attention_window(window)
    return model


def chunked(model, x, sizes, capacity=8):
    """Logits of x read through one cache in chunks of `sizes` (cycled), from a small capacity."""
    cache = model.new_cache(x.shape[0], capacity=capacity)
    out, start, i = [], 0, 0
    while start < x.shape[1]:
        n = sizes[i % len(sizes)]
        out.append(model(x[:, start:start + n], cache=cache).logits)
        start, i = start + n, i + 1
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("window", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("sizes", [[1], [17], [64], [3, 50, 1, 1, 29]])
@torch.no_grad()
def test_windowed_cache_equals_banded_reference(model, window, sizes):
    x = torch.randint(0, model.config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(window))
    ref = banded_forward(model, x, window)
    logits, cache = chunked(windowed(model, window), x, sizes)
    model.set_attention_window(None)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    # old keys were dropped rather than kept: the cache holds a bounded number of columns (it grows
    # until, after a drop, half of it is free)
    assert cache.dropped > 0 and cache.length + cache.dropped == 160
    assert cache.key_mask.shape[1] <= 4 * (window + max(sizes))


@torch.no_grad()
def test_window_wider_than_the_text_changes_nothing(model):
    x = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    plain, _ = chunked(windowed(model, None), x, [7, 30])
    wide, cache = chunked(windowed(model, 101), x, [7, 30])
    model.set_attention_window(None)
    assert torch.equal(wide, plain) and cache.dropped == 0


@pytest.mark.parametrize("window", [4, 23])
@torch.no_grad()
def test_prefill_then_decode_equals_banded_reference(model, window):
    """The lean decoding path (decode_step) with the same window."""
    x = torch.randint(0, model.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(2))
    ref = banded_forward(model, x, window)
    model.set_attention_window(window)
    cache = model.new_cache(2, capacity=16)
    with torch.inference_mode():
        steps = [model(x[:, :30], cache=cache).logits]
        steps += [model.decode_step(x[:, t], cache)[:, None] for t in range(30, 90)]
    model.set_attention_window(None)
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-4)
    assert cache.dropped > 0


@torch.no_grad()
def test_left_padded_batch_windowed_equals_each_row_alone(model):
    window = 9
    gen = torch.Generator().manual_seed(3)
    lengths = [40, 13, 5]
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    L = max(lengths)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):], mask[i, L - len(s):] = s, 1
    nxt = torch.randint(0, model.config.vocab_size, (3, 30), generator=gen)
    model.set_attention_window(window)
    cache = model.new_cache(3, capacity=8)
    first = model(ids, attention_mask=mask, cache=cache).logits
    with torch.inference_mode():
        steps = torch.stack([model.decode_step(nxt[:, t], cache) for t in range(30)], 1)
    model.set_attention_window(None)
    for i, s in enumerate(seqs):
        ref = banded_forward(model, torch.cat([s, nxt[i]])[None], window)[0]
        torch.testing.assert_close(first[i, L - len(s):], ref[:len(s)], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(steps[i], ref[len(s):], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [6, 50])
def test_carried_eval_with_a_window_equals_banded_reference(model, window):
    ids = torch.randint(0, model.config.vocab_size, (301,), generator=torch.Generator().manual_seed(4))
    logits = banded_forward(model, ids[None, :-1], window)[0]
    ref = F.cross_entropy(logits, ids[1:], reduction="sum").item()
    model.set_attention_window(window)
    try:
        for chunk in (1, 64, 300):
            nats, n = score_carry(model, ids, chunk)
            assert n == 300 and math.isclose(nats, ref, rel_tol=1e-5), chunk
    finally:
        model.set_attention_window(None)


def test_carried_eval_shorter_than_the_window_is_unchanged(model):
    ids = torch.randint(0, model.config.vocab_size, (120,), generator=torch.Generator().manual_seed(5))
    plain = score_carry(model, ids, 32)
    model.set_attention_window(120)
    try:
        assert score_carry(model, ids, 32) == plain
    finally:
        model.set_attention_window(None)


@torch.no_grad()
def test_rollback_past_dropped_keys_is_refused(model):
    """A rollback needs the keys it returns to; a windowed cache that dropped them says so."""
    model.set_attention_window(4)
    cache = model.new_cache(1, capacity=8)
    model.set_attention_window(None)
    x = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    model(x[:, :6], cache=cache)
    snap = cache.snapshot()
    model(x[:, 6:], cache=cache)  # needs room: drops the oldest keys
    assert cache.dropped > 0
    with pytest.raises(RuntimeError, match="dropped keys"):
        cache.restore(snap)


@pytest.fixture(scope="module")
def short_context_checkpoint(tmp_path_factory):
    """A checkpoint trained (as its state says) on 32-token windows after a 16-token lead-in."""
    from sakimi_next.tokenizer import train_tokenizer

    from .helpers import english_text, make_checkpoint

    root = tmp_path_factory.mktemp("window")
    tok = train_tokenizer([english_text(30_000)], 512)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(1)
    # weights large enough that attention is sharp and the window shows in what is sampled
    model = Qwen3NextForCausalLM(small_config(vocab_size=512, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id,
                                              initializer_range=0.2)).eval()
    return make_checkpoint(root / "run", model, tok, args={"seq_len": 32, "lead_in": 16}), tok, model


def test_eval_reads_with_the_trained_context_by_default(short_context_checkpoint, tmp_path, capsys):
    from sakimi_next.cli import main

    from .helpers import english_text

    ckpt, tok, model = short_context_checkpoint
    text = english_text(60_000)[-1500:]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = torch.tensor([tok.eot_id] + tok.encode(text))
    assert len(ids) > 3 * 48

    def nats(window):
        logits = banded_forward(model, ids[None, :-1], window)[0]
        return F.cross_entropy(logits, ids[1:], reduction="sum").item()

    assert not math.isclose(nats(48), nats(len(ids)), rel_tol=1e-4)
    for flags, window, reach in (([], 48, 48), (["--attention-window", "20"], 20, 20),
                                 (["--attention-window", "0"], len(ids), None)):
        assert main(["--mode", "eval", "--resume-from", str(ckpt), "--text-file", str(tmp_path / "t.txt"),
                     "--json", *flags]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["attention_window"] == reach and r["window"] == 32
        assert math.isclose(r["loss"] * r["tokens"], nats(window), rel_tol=1e-5), flags


def test_generation_and_serving_use_the_trained_context(short_context_checkpoint, capsys):
    from sakimi_next.cli import main
    from sakimi_next.generate import generate
    from sakimi_next.serve.process import ModelSource, load_model
    from sakimi_next.settings import SamplingSettings

    ckpt, tok, model = short_context_checkpoint
    prompt = "The quick brown fox jumps over the lazy dog, " * 4  # ~120 tokens

    def sampled(window):
        model.set_attention_window(window)
        try:
            ids = generate(model, [tok.encode(prompt)], 40, SamplingSettings(1.0, 0, 1.0), tok.eot_id, seed=0)[0]
        finally:
            model.set_attention_window(None)
        return prompt + tok.decode([i for i in ids if i != tok.eot_id]) + "\n"

    assert sampled(48) != sampled(None)
    assert main(["--mode", "generate", "--resume-from", str(ckpt), "--prompt", prompt, "--max-new-tokens", "40",
                 "--temperature", "1", "--top-k", "0", "--top-p", "1", "--seed", "0"]) == 0
    assert capsys.readouterr().out == sampled(48)
    assert load_model(ModelSource(str(ckpt), "cpu"))[0].attention_window == 48
    assert load_model(ModelSource(str(ckpt), "cpu", attention_window=7))[0].attention_window == 7
    assert load_model(ModelSource(str(ckpt), "cpu", attention_window=0))[0].attention_window is None
