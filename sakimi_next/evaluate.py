"""Scoring a model: loss, perplexity and bits per byte of a text (`--mode eval`), of a validation split
while training (`validate`), and of chat data's assistant replies (`assistant_loss`).

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
import torch.distributed as dist
import torch.nn.functional as F

from .batches import document_starts, eval_windows, masked_targets
from .distributed import Distributed, reshard_fsdp
from .model import Qwen3NextForCausalLM


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sum of -log p(target) in float32, how many targets count): logits [..., V], targets [...];
    a target of -100 (`batches.masked_targets`) does not count."""
    nats = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="sum", ignore_index=-100)
    return nats, (targets != -100).sum()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """Nats (of a text, or per token) over the UTF-8 bytes they cover (the text's, or per token)."""
    return nats / math.log(2) / n_bytes


def bytes_per_token(split: dict) -> float | None:
    """A prepared split's (meta.json) bytes per token; None for chat data, whose masked loss counts only
    some tokens and so has no bits per byte."""
    return split["bytes"] / split["tokens"] if split.get("tokens") and "mask" not in split else None


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
        total += summed_nll(logits, targets[start:start + window])[0].item()
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
        total += summed_nll(logits[-new:], ids[end - new + 1:end + 1])[0].item()
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
    out = {"loss": loss, "ppl": perplexity(loss), "tokens": tokens}
    if n_bytes:
        out.update(bytes=n_bytes, bpb=bits_per_byte(nats, n_bytes))
    return out


@torch.no_grad()
def validate(model, tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int, device,
             bytes_per_token: float | None, autocast, ddp: Distributed, eot_id: int | None = None,
             loss_mask: np.ndarray | None = None) -> dict:
    """Mean validation loss over fixed windows (sharded across ranks), perplexity and bits per byte.
    `loss_mask` (chat data): only the targets where it is 1 count."""
    seq_len = min(seq_len, len(tokens) - 1)
    per_round = batch_size * ddp.world_size  # the global set, in whole batches for every process
    starts = eval_windows(len(tokens), seq_len, per_round * n_batches, per_round)
    mine = starts[ddp.rank::ddp.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, number of tokens
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), batch_size):
        rows = np.stack([tokens[s:s + seq_len + 1] for s in mine[i:i + batch_size]]).astype(np.int64)
        t = torch.from_numpy(rows).to(device)
        starts = document_starts(t[:, :-1], eot_id) if eot_id is not None else None
        with autocast:
            logits = model(t[:, :-1], doc_starts=starts).logits
        targets = t[:, 1:]
        if loss_mask is not None:
            targets = masked_targets(targets, [loss_mask[s + 1:s + seq_len + 1] for s in mine[i:i + batch_size]])
        nats, count = summed_nll(logits, targets)
        total += torch.stack([nats.double(), count.to(torch.float64)])
    if ddp.enabled:
        dist.all_reduce(total)
    reshard_fsdp(model)
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    out = {"val_loss": loss, "val_ppl": perplexity(loss), "val_tokens": int(total[1].item())}
    if bytes_per_token:
        out["val_bpb"] = bits_per_byte(loss, bytes_per_token)
    return out


def assistant_loss(model, tokens: np.ndarray, mask: np.ndarray, eot_id: int, row_tokens: int = 2048) -> float:
    """Mean cross-entropy per assistant target over every conversation of a split, each seen whole and
    alone: whole conversations are packed into rows of up to `row_tokens` with document masking."""
    from .chat import conversations_of

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
            nats, n = summed_nll(logits, y)
            total += nats.item()
            count += int(n)
    model.train(was_training)
    return total / max(count, 1)
