"""The depthwise causal convolution of the Gated DeltaNet, followed by SiLU.

Two paths: a whole sequence (training, prefill, or several tokens continuing from a cache) and a single
decoding step that shifts a fixed window. Channels are last: x [B, T, C]; weight [C, 1, W] as stored
by `nn.Conv1d`; the window state [B, C, W] holds the last W inputs (the SPEC's conv-state layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
    """silu(depthwise causal conv) of x [B, T, C] -> [B, T, C].

    `window` [B, C, W] holds the inputs before x (from a cache); without it the past is zeros.
    """
    C, _, W = weight.shape
    xt = x.transpose(1, 2)
    if window is None:
        xt = F.pad(xt, (W - 1, 0))
    else:
        xt = torch.cat([window[..., 1:].to(xt.dtype), xt], dim=-1)
    return F.silu(F.conv1d(xt, weight.to(xt.dtype), groups=C)).transpose(1, 2)


def update_window(window: torch.Tensor, x: torch.Tensor) -> None:
    """Slide the cached window [B, C, W] over new inputs x [B, T, C], in place."""
    W, T = window.shape[-1], x.shape[1]
    if T >= W:
        window.copy_(x[:, T - W:].transpose(1, 2))
    else:
        window.copy_(torch.cat([window[..., T:], x.transpose(1, 2).to(window.dtype)], dim=-1))


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """One decoding step: x [B, C] enters the window [B, C, W] (updated in place); returns silu(conv) [B, C]."""
    window.copy_(torch.roll(window, -1, dims=-1))
    window[..., -1] = x
    return F.silu((window * weight.squeeze(1)).sum(-1)).to(x.dtype)
