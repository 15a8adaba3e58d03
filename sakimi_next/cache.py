"""The decoding cache: what each layer must remember between forward calls.

- full attention layer: keys and values [B, nKV, L, D], preallocated and grown by doubling;
- Gated DeltaNet layer: the conv window [B, conv_dim, W] (the last W pre-conv inputs) and the recurrent
  state [B, H, dk, dv] in float32. Both have a fixed size: their cost per token does not grow.

The cache also keeps, per sequence, which cached positions are padding (left padding in a batch of
prompts of different lengths) and the next position id, so later calls need no mask bookkeeping.

An attention `window` W limits every query to the last W positions (itself included), as the model was
trained: it never saw more keys than its window and lead-in. Keys older than that are dropped when the
cache would otherwise grow, so a long text costs a fixed memory and a fixed work per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FULL, Config


@dataclass
class AttentionCache:
    keys: torch.Tensor  # [B, nKV, capacity, D]
    values: torch.Tensor

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, nKV, T, D] at positions start.. and return all keys and values so far."""
        end = start + k.shape[2]
        if end > self.keys.shape[2]:
            grow = max(end, 2 * self.keys.shape[2])
            self.keys = _grow(self.keys, grow)
            self.values = _grow(self.values, grow)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


@dataclass
class FixedAttentionCache:
    """An `AttentionCache`'s tensors as a static-shape decoding step sees them (`decoder.py`): new keys
    and values are written at positions given as a tensor, and attention reads the whole capacity,
    masked, so the step's shapes never change while the cache fills."""
    keys: torch.Tensor  # [B, nKV, capacity, D]
    values: torch.Tensor

    def append(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, nKV, T, D] at positions `index` [T] and return all keys and values."""
        self.keys.index_copy_(2, index, k.to(self.keys.dtype))
        self.values.index_copy_(2, index, v.to(self.values.dtype))
        return self.keys, self.values


@dataclass
class LinearAttentionCache:
    conv_window: torch.Tensor  # [B, conv_dim, W]
    recurrent_state: torch.Tensor  # [B, H, dk, dv], float32
    # while verifying drafts: the state after each new token, and the window and inputs before them
    history: list | None = None
    window_before: torch.Tensor | None = None
    inputs: torch.Tensor | None = None  # [B, T, conv_dim] pre-conv inputs of the verified tokens


def _grow(x: torch.Tensor, length: int) -> torch.Tensor:
    out = x.new_zeros(*x.shape[:2], length, *x.shape[3:])
    out[:, :, : x.shape[2]] = x
    return out


class Cache:
    """Per-layer decoding state for a batch of `batch_size` sequences."""

    def __init__(self, config: Config, batch_size: int, device=None, dtype=torch.float32, capacity: int = 256,
                 window: int | None = None):
        if window is not None and window < 1:
            raise ValueError(f"attention window {window} must be at least 1")
        self.config = config
        self.batch_size = batch_size
        self.window = window  # attention reaches this many positions back, itself included (None: all)
        self.length = 0  # cached columns: positions processed so far (padding included), less those dropped
        self.dropped = 0  # columns dropped from the front: out of every query's window
        self.layers: list[AttentionCache | LinearAttentionCache] = []
        dev = torch.device(device) if device is not None else torch.device("cpu")
        for kind in config.layer_types:
            if kind == FULL:
                shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
                self.layers.append(AttentionCache(torch.zeros(shape, device=dev, dtype=dtype),
                                                  torch.zeros(shape, device=dev, dtype=dtype)))
            else:
                self.layers.append(LinearAttentionCache(
                    torch.zeros(batch_size, config.linear_conv_dim, config.linear_conv_kernel_dim, device=dev,
                                dtype=dtype),
                    torch.zeros(batch_size, config.linear_num_value_heads, config.linear_key_head_dim,
                                config.linear_value_head_dim, device=dev, dtype=torch.float32),
                ))
        self.key_mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=dev)  # False = padding
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.has_padding = False

    def record(self, mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """Note T new positions (mask [B, T], 1 = real token) and return the key mask [B, length+T]
        when any cached position is padding, else None."""
        self._make_room(T)  # a windowed cache may drop its oldest keys: `length` is after that
        end = self.length + T
        if mask is not None:
            m = mask.to(torch.bool)
            self.key_mask[:, self.length:end] = m
            if not bool(m.all()):
                self.has_padding = True
        else:
            self.key_mask[:, self.length:end] = True
        return self.key_mask[:, :end] if self.has_padding else None

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]

    def reserve(self, T: int) -> None:
        """Room for T more positions in every attention layer and the key mask, all with one capacity
        (doubling; a windowed cache drops its oldest keys first, as `record` does): what a static-shape
        step (`decoder.py`), which writes in place, needs first."""
        self._make_room(T)
        capacity = max([self.capacity, *(l.keys.shape[2] for l in self.layers if isinstance(l, AttentionCache))])
        if capacity > self.capacity:
            self._grow_mask(capacity)
        for layer in self.layers:
            if isinstance(layer, AttentionCache) and layer.keys.shape[2] < capacity:
                layer.keys, layer.values = _grow(layer.keys, capacity), _grow(layer.values, capacity)

    def _make_room(self, T: int) -> None:
        """Room in the key mask for T new positions. A windowed cache that is full first drops the columns
        no later query can see, then keeps as much again free (the next drop is a window's worth of tokens
        away); any cache grows by doubling."""
        needed = self.length + T
        if self.window is not None and needed > self.capacity:
            self._drop_oldest(self.length - (self.window - 1))
            needed = 2 * (self.length + T)
        if needed > self.capacity:
            self._grow_mask(max(needed, 2 * self.capacity))

    def _grow_mask(self, capacity: int) -> None:
        grown = torch.ones(self.batch_size, capacity, dtype=torch.bool, device=self.key_mask.device)
        grown[:, : self.length] = self.key_mask[:, : self.length]
        self.key_mask = grown

    def _drop_oldest(self, n: int) -> None:
        """Forget the first n columns of every attention layer (the next query and all later ones are
        further than the window from them): the others move to the front, so the cache need not grow."""
        if n <= 0:
            return
        keep = self.length - n
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                layer.keys[:, :, :keep] = layer.keys[:, :, n:self.length].clone()
                layer.values[:, :, :keep] = layer.values[:, :, n:self.length].clone()
        self.key_mask[:, :keep] = self.key_mask[:, n:self.length].clone()
        self.key_mask[:, keep:] = True  # free again (a static step reads the mask from `length` on as True)
        self.length, self.dropped = keep, self.dropped + n
        self.has_padding = not bool(self.key_mask[:, :keep].all())

    def snapshot(self) -> dict:
        """What a rollback needs, cheaply: lengths and the fixed-size DeltaNet states. Attention K/V
        need no copy: entries past the restored length are simply overwritten later. (A recurrent state
        cannot be cropped like a KV cache, so it is copied.)"""
        return {"length": self.length, "dropped": self.dropped, "next_position": self.next_position.clone(),
                "linear": [(l.conv_window.clone(), l.recurrent_state.clone()) if isinstance(l, LinearAttentionCache)
                           else None for l in self.layers]}

    def restore(self, snap: dict) -> None:
        self._check_nothing_dropped_since(snap["dropped"])
        self.length = snap["length"]
        self.next_position.copy_(snap["next_position"])
        for layer, saved in zip(self.layers, snap["linear"]):
            if saved is not None:
                layer.conv_window.copy_(saved[0])
                layer.recurrent_state.copy_(saved[1])

    def begin_verify(self) -> None:
        """Record, during the next lean forward of several tokens, what `keep(n)` needs to roll back
        to any prefix of them: a recurrent state cannot be cropped like a KV cache, so each token's
        state is kept (a copy of a fixed-size tensor per token and layer)."""
        self._verify_start = (self.length, self.next_position.clone(), self.dropped)
        for layer in self.layers:
            if isinstance(layer, LinearAttentionCache):
                layer.history, layer.window_before = [], layer.conv_window.clone()

    def keep(self, n: int) -> None:
        """Keep only the first n of the tokens since `begin_verify` (n >= 1), and stop recording."""
        length, position, dropped = self._verify_start
        self._check_nothing_dropped_since(dropped)
        self.length, self.next_position = length + n, position + n
        for layer in self.layers:
            if isinstance(layer, LinearAttentionCache):
                layer.recurrent_state.copy_(layer.history[n - 1])
                W = layer.conv_window.shape[-1]
                inputs = layer.inputs[:, :n].transpose(1, 2).to(layer.window_before.dtype)
                seen = torch.cat([layer.window_before, inputs], -1)
                layer.conv_window.copy_(seen[..., -W:])
                layer.history = layer.window_before = layer.inputs = None

    def _check_nothing_dropped_since(self, dropped: int) -> None:
        """A rollback needs the keys it returns to: a windowed cache drops them only when full, so give
        a cache that rolls back room for the whole generation (speculative decoding does)."""
        if self.dropped != dropped:
            raise RuntimeError("the attention window dropped keys since the state to return to; "
                               "give the cache room for every position it will hold")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every tensor, to restore later (speculative decoding, tests)."""
        out = {"length": torch.tensor(self.length), "dropped": torch.tensor(self.dropped),
               "next_position": self.next_position.clone(),
               "key_mask": self.key_mask[:, : self.length].clone(), "has_padding": torch.tensor(self.has_padding)}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, AttentionCache):
                out[f"{i}.keys"] = layer.keys[:, :, : self.length].clone()
                out[f"{i}.values"] = layer.values[:, :, : self.length].clone()
            else:
                out[f"{i}.conv_window"] = layer.conv_window.clone()
                out[f"{i}.recurrent_state"] = layer.recurrent_state.clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.length, self.dropped = int(state["length"]), int(state["dropped"])
        self.next_position.copy_(state["next_position"])
        self.key_mask[:, : self.length] = state["key_mask"]
        self.has_padding = bool(state["has_padding"])
        for i, layer in enumerate(self.layers):
            if isinstance(layer, AttentionCache):
                if self.length > layer.keys.shape[2]:
                    layer.keys, layer.values = _grow(layer.keys, self.length), _grow(layer.values, self.length)
                layer.keys[:, :, : self.length] = state[f"{i}.keys"]
                layer.values[:, :, : self.length] = state[f"{i}.values"]
            else:
                layer.conv_window.copy_(state[f"{i}.conv_window"])
                layer.recurrent_state.copy_(state[f"{i}.recurrent_state"])
