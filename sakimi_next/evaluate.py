"""`--mode eval`: loss, perplexity and bits per byte of a text file or a prepared validation split.

Two ways to score a text longer than the model's training context:
- `carry` (default): one pass, window after window, carrying the DeltaNet states and the attention
  K/V cache across windows: exactly one forward pass over the whole text, at the cost of windows.
- `sliding`: independent windows of `window` tokens moving by `stride`, each token scored once with
  at least `window - stride` tokens of context (the usual recipe for models without a state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import Qwen3NextForCausalLM


@torch.inference_mode()
def score_carry(model: Qwen3NextForCausalLM, ids: torch.Tensor, window: int) -> tuple[float, int]:
    """Sum of -log p(ids[t+1] | ids[:t+1]) over the whole sequence ids [N], in windows, carrying the cache.
    Returns (total nats, number of predicted tokens = N - 1)."""
    inputs, targets = ids[:-1], ids[1:]
    cache = model.new_cache(1, capacity=min(len(inputs), 4096))
    total = 0.0
    for start in range(0, len(inputs), window):
        x = inputs[start:start + window][None]
        logits = model(x, cache=cache).logits[0]
        total += F.cross_entropy(logits.float(), targets[start:start + window], reduction="sum").item()
    return total, len(targets)


@torch.inference_mode()
def score_sliding(model: Qwen3NextForCausalLM, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Sliding windows of `window` tokens advancing by `stride`; each target scored exactly once."""
    total, scored, prev_end = 0.0, 0, 0
    n = len(ids) - 1  # number of targets
    for end in range(min(window, n), n + stride, stride):
        end = min(end, n)
        if end <= prev_end:
            break
        begin = max(0, end - window)
        x = ids[begin:end][None]
        logits = model(x).logits[0]
        new = end - prev_end  # targets not scored by earlier windows: the last `new` positions
        total += F.cross_entropy(logits[-new:].float(), ids[end - new + 1:end + 1], reduction="sum").item()
        scored += new
        prev_end = end
    return total, scored


def score(model: Qwen3NextForCausalLM, ids: torch.Tensor, window: int, method: str = "carry") -> tuple[float, int]:
    """(total nats, predicted tokens) of ids [N] by `carry` or `sliding` (stride window/2)."""
    if method == "carry":
        return score_carry(model, ids, window)
    return score_sliding(model, ids, window, max(1, window // 2))


def summarize(nats: float, tokens: int, n_bytes: int | None) -> dict:
    loss = nats / tokens
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
    if n_bytes:
        out.update(bytes=n_bytes, bpb=nats / math.log(2) / n_bytes)
    return out
