"""What a training step reads: random windows of the token split (`WindowSampler`), the text before each
(its lead-in, read first without gradient), chat data's loss masks, and where packed documents start."""

from __future__ import annotations

import numpy as np
import torch

from .distributed import reshard_fsdp
from .model import Qwen3NextForCausalLM, check_id_range


class WindowSampler:
    """Random windows of seq_len+1 tokens. The global batch of step s, micro-step m is drawn from
    numpy's generator seeded with (seed, s, m); rank r takes rows [r*B, (r+1)*B). So the sampler has no
    state besides the step, a resumed run sees the same windows, and N processes with batch B see the
    windows one process with batch N*B would. With `lead_in` L, every window has at least L tokens of
    text before it (`lead` returns them), so the text's first L tokens are only ever read as lead-in.
    With `vocab_size`, every batch is checked against the vocabulary here, on the host, so that the model
    need not read its ids back from the device (`window_loss(..., ids_checked=True)`)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int, world: int,
                 loss_mask: np.ndarray | None = None, lead_in: int = 0, vocab_size: int | None = None):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.max_start = len(tokens) - seq_len - 1
        self.loss_mask = loss_mask  # chat data: targets where it is 0 become -100 (not in the loss)
        self.lead_in = lead_in
        self.vocab_size = vocab_size

    def starts(self, step: int, micro: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(self.lead_in, self.max_start + 1, size=self.batch_size * self.world)
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts(step, micro)
        rows = self._checked(np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64))
        t = torch.from_numpy(rows)
        if self.loss_mask is not None:
            return t[:, :-1], masked_targets(t[:, 1:], [self.loss_mask[s + 1:s + self.seq_len + 1] for s in starts])
        return t[:, :-1], t[:, 1:]

    def lead(self, step: int, micro: int) -> torch.Tensor | None:
        """[B, lead_in]: the text right before each window of `batch(step, micro)` (None without lead-in)."""
        if not self.lead_in:
            return None
        rows = [self.tokens[s - self.lead_in:s] for s in self.starts(step, micro)]
        return torch.from_numpy(self._checked(np.stack(rows).astype(np.int64)))

    def _checked(self, rows: np.ndarray) -> np.ndarray:
        if self.vocab_size is not None and rows.size:
            check_id_range(int(rows.min()), int(rows.max()), self.vocab_size)
        return rows


def window_loss(train_model, model, x, y, lead, mtp_weight: float, autocast, eot_id: int | None,
                ids_checked: bool = False):
    """One training micro-batch's forward pass (the backward is the caller's): with its lead-in read
    first when there is one, else with packed documents masked when `eot_id` is given. `ids_checked`:
    the sampler checked x and lead against the vocabulary on the host; the model does not read them back."""
    check = not ids_checked
    cache = (read_lead_in(train_model, model, lead.to(x.device), autocast, x.shape[1], check)
             if lead is not None else None)
    starts = document_starts(x, eot_id) if eot_id is not None else None
    with autocast:
        return train_model(x, y, mtp_weight=mtp_weight, doc_starts=starts, cache=cache, check_ids=check)


def read_lead_in(train_model, model: Qwen3NextForCausalLM, lead: torch.Tensor, autocast, room: int,
                 check_ids: bool = True):
    """The decoding state after reading `lead` [B, L] in evaluation mode without gradient: the DeltaNet
    states and attention keys and values a training window then continues from (the window's gradient
    stops there, as in Transformer-XL), with `room` for the window's positions."""
    B, L = lead.shape
    # under autocast the keys and values are bf16; a float32 cache would hand attention mixed dtypes
    cache = model.new_cache(B, capacity=L + room,
                            dtype=autocast.fast_dtype if isinstance(autocast, torch.autocast) else None)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast:  # one position's logits: the lead-in's own are never read
        train_model(lead, cache=cache, check_ids=check_ids, logits_to_keep=1)
    model.train(was_training)
    reshard_fsdp(model)
    return cache


def masked_targets(targets: torch.Tensor, mask_rows) -> torch.Tensor:
    """targets [B, T] with -100 (cross-entropy's ignore_index) where mask_rows [B, T] is 0."""
    keep = torch.from_numpy(np.array(mask_rows, dtype=bool)).to(targets.device)  # a copy: memmaps are read-only
    return targets.masked_fill(~keep, -100)


def document_starts(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """x [B, T] -> [B, T] bool: a document starts right after each end-of-text token."""
    starts = torch.zeros_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, :-1] == eot_id
    return starts


def eval_windows(n_tokens: int, seq_len: int, n_windows: int, multiple: int = 1) -> np.ndarray:
    """Start offsets spread evenly over the split: the same windows at every evaluation. At most the
    multiple of `multiple` (full batches on every process) that first covers the split once: more would
    only score the same tokens again (a 2% validation split of a few MB holds ~20 windows of 512 tokens,
    not the 64 of --eval-batches 16 at batch 4)."""
    last = max(0, n_tokens - seq_len - 1)
    cover = -(-(n_tokens - 1) // seq_len)
    n_windows = min(n_windows, -(-cover // multiple) * multiple)
    return np.unique(np.linspace(0, last, max(1, n_windows)).astype(np.int64))
