"""Evaluation: carried state over windows = one full forward; sliding windows; bits per byte."""

import math

import torch
import torch.nn.functional as F

from sakimi_next.evaluate import score_carry, score_sliding, summarize
from sakimi_next.model import Qwen3NextForCausalLM

from .helpers import small_config


def full_nats(model, ids):
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0]
    return F.cross_entropy(logits, ids[1:], reduction="sum").item()


def test_carry_equals_full_forward():
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (300,))
    ref = full_nats(model, ids)
    for window in (1, 7, 64, 100, 299, 1000):
        nats, n = score_carry(model, ids, window)
        assert n == 299
        assert math.isclose(nats, ref, rel_tol=1e-5), window


def test_sliding_window():
    torch.manual_seed(1)
    model = Qwen3NextForCausalLM(small_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (200,))
    nats, n = score_sliding(model, ids, window=500, stride=250)  # one window covers everything
    assert n == 199 and math.isclose(nats, full_nats(model, ids), rel_tol=1e-5)
    nats, n = score_sliding(model, ids, window=64, stride=16)
    assert n == 199  # every target scored exactly once
    # by hand: first window scores its 64 targets, each later one its last 16
    by_hand, prev = 0.0, 0
    with torch.no_grad():
        for end in list(range(64, 199, 16)) + [199]:
            begin = max(0, end - 64)
            logits = model(ids[None, begin:end]).logits[0]
            new = end - prev
            by_hand += F.cross_entropy(logits[-new:], ids[end - new + 1:end + 1], reduction="sum").item()
            prev = end
    assert math.isclose(nats, by_hand, rel_tol=1e-6)


def test_bits_per_byte_by_hand():
    r = summarize(nats=1000.0, tokens=400, n_bytes=1600)
    assert math.isclose(r["loss"], 2.5)
    assert math.isclose(r["ppl"], math.exp(2.5))
    assert math.isclose(r["bpb"], 2.5 / math.log(2) * 400 / 1600)


def test_validation_windows_cover_a_small_split_once():
    """The training run's validation: windows spread evenly over the split, at most as many as cover it
    once, in whole batches for every process (more would score the same tokens again); a large split gets
    the windows asked for."""
    from sakimi_next.batches import eval_windows

    n_tokens, seq_len = 10_393, 512
    starts = eval_windows(n_tokens, seq_len, 64)
    assert len(starts) == 21 and starts[0] == 0 and starts[-1] == n_tokens - seq_len - 1
    targets = [t for s in starts for t in range(s + 1, s + seq_len + 1)]
    assert set(targets) == set(range(1, n_tokens))  # every target of the split, none missed
    assert len(targets) < 1.1 * n_tokens  # and about once
    assert len(eval_windows(10**6, seq_len, 64)) == 64
    assert len(eval_windows(n_tokens, seq_len, 64, multiple=8)) == 24  # whole batches of 4 on each of 2 processes
    assert list(eval_windows(100, 512, 64)) == [0]  # a split shorter than a window: one, clipped by the caller
