"""`--mode eval`: loss, perplexity and bits per byte of a text file or a prepared validation split.

Two ways to score a text longer than the model's training context:
- `carry` (default): one pass, window after window, carrying the DeltaNet states and the attention
  K/V cache across windows: exactly one forward pass over the whole text, at the cost of windows.
  Attention reaches as far back as the model's attention window (`set_attention_window`, by default
  what it was trained on): keys further back only dilute what a model trained on shorter reaches.
- `sliding`: independent windows of `window` tokens moving by `stride`, each token scored once with
  at least `window - stride` tokens of context (the usual recipe for models without a state).
"""

from __future__ import annotations

import math

import numpy as np

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


def assistant_loss(model, tokens: np.ndarray, mask: np.ndarray, eot_id: int, row_tokens: int = 2048) -> float:
    """Mean cross-entropy per assistant target over every conversation of a split, each seen whole and
    alone: whole conversations are packed into rows of up to `row_tokens` with document masking."""
    from .chat import conversations_of
    from .train import document_starts, masked_targets

    rows, row = [], []
    for a, b in conversations_of(tokens, eot_id):
        if row and row[-1][1] - row[0][0] + (b - a) > row_tokens:
            rows.append((row[0][0], row[-1][1]))
            row = []
        row.append((a, b + 1))
    if row:
        rows.append((row[0][0], row[-1][1]))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for a, b in rows:
            x = torch.from_numpy(np.asarray(tokens[a:b], dtype=np.int64))[None].to(model.device)
            y = masked_targets(x[:, 1:], np.asarray(mask[a + 1:b])[None])
            logits = model(x[:, :-1], doc_starts=document_starts(x[:, :-1], eot_id)).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum",
                                     ignore_index=-100).item()
            count += int((y != -100).sum())
    model.train(was_training)
    return total / max(count, 1)
