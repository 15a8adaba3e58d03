"""Continuous batching: one batch of active sequences, decoded together, that sequences join and leave
between decoding steps.

The batch is an ordinary decoding `Cache` whose rows are the active sequences, kept right-aligned:
every row's newest token sits in the last cached column, and a row with a shorter history has
padding on its left (the key mask hides it; RoPE uses each row's own position). That is the layout
`Qwen3NextForCausalLM.decode_step` already decodes, so a step over the batch is one model call.

- `BatchCache.add(cache)`: sequences prefilled together (an unpadded cache: prompts of one length)
  join as new rows. Their DeltaNet conv windows and states are copied as they are; their keys and
  values are placed at the right end, and when their history is longer than the batch's, the other
  rows shift right.
- `BatchCache.remove(rows)`: finished sequences leave; the left columns that only held padding are
  dropped, so the cached length follows the longest active sequence, not the server's uptime.

A sequence decoded in a changing batch computes what it computes alone, row by row; only the
floating-point summation order of a batched matrix product can differ (see tests/test_serve_batch.py).
"""

from __future__ import annotations

import torch

from ..cache import AttentionCache, Cache, LinearAttentionCache

HEADROOM = 64  # free columns given to a rebuilt cache, so the next steps do not reallocate


class BatchCache:
    """The decoding cache of the active sequences, one row each, in the order they joined
    (a leaving row closes its gap)."""

    def __init__(self, model, cache: Cache | None = None):
        self.model = model
        self.cache = cache

    @property
    def size(self) -> int:
        return 0 if self.cache is None else self.cache.batch_size

    def add(self, joining: Cache) -> None:
        """Append the sequences held in `joining` (rows of one length, no padding, as a prefill of
        equal-length prompts leaves them), in their order."""
        if joining.has_padding:
            raise ValueError("joining sequences must be unpadded rows")
        if self.cache is None:
            self.cache = joining
            return
        old, n, m = self.cache, self.cache.batch_size, joining.batch_size
        L, p = max(old.length, joining.length), joining.length
        new = self.model.new_cache(n + m, capacity=L + HEADROOM)
        new.length = L
        shift = L - old.length  # the old rows move right when the newcomers' history is longer
        new.key_mask[:n, :shift] = False
        new.key_mask[:n, shift:L] = old.key_mask[:, :old.length]
        new.key_mask[n:, :L - p] = False
        for dst, a, b in zip(new.layers, old.layers, joining.layers):
            if isinstance(dst, AttentionCache):
                dst.keys[:n, :, shift:L] = a.keys[:, :, :old.length]
                dst.values[:n, :, shift:L] = a.values[:, :, :old.length]
                dst.keys[n:, :, L - p:L] = b.keys[:, :, :p]
                dst.values[n:, :, L - p:L] = b.values[:, :, :p]
            else:
                _copy_rows(dst, a, b)
        new.next_position = torch.cat([old.next_position, joining.next_position])
        new.has_padding = not bool(new.key_mask[:, :L].all())
        self.cache = new

    def remove(self, rows: list[int]) -> None:
        """Drop these rows (indices into the current batch)."""
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(self.size) if i not in gone]
        if not keep:
            self.cache = None
            return
        c = self.cache
        idx = torch.tensor(keep, device=c.next_position.device)
        mask = c.key_mask[idx, :c.length]
        # right-aligned rows: the columns before the first one any row uses hold only padding
        first = int(mask.to(torch.int8).argmax(dim=1).min()) if not bool(mask.all()) else 0
        for layer in c.layers:
            if isinstance(layer, AttentionCache):
                layer.keys = layer.keys[idx, :, first:].contiguous()
                layer.values = layer.values[idx, :, first:].contiguous()
            else:
                layer.conv_window = layer.conv_window[idx]
                layer.recurrent_state = layer.recurrent_state[idx]
        c.key_mask = c.key_mask[idx, first:].contiguous()
        c.next_position = c.next_position[idx]
        c.length -= first
        c.batch_size = len(keep)
        c.has_padding = not bool(c.key_mask[:, :c.length].all())


def _copy_rows(dst: LinearAttentionCache, a: LinearAttentionCache, b: LinearAttentionCache) -> None:
    n = a.conv_window.shape[0]
    dst.conv_window[:n], dst.conv_window[n:] = a.conv_window, b.conv_window
    dst.recurrent_state[:n], dst.recurrent_state[n:] = a.recurrent_state, b.recurrent_state
