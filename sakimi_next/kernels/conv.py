"""The depthwise causal convolution of the Gated DeltaNet, followed by SiLU.

Channels are last: x [B, T, C]; weight [C, 1, W] as stored by `nn.Conv1d`; the cache's window
[B, C, W] holds the last W inputs (the SPEC's conv-state layout). Three paths:

- `causal_conv1d`: a whole sequence (training, prefill, or several tokens continuing from a window).
  With W = 4 taps, the conv is four shifted multiply-adds over contiguous [B, T, C] slices, with a
  hand-written backward; oneDNN's depthwise conv with its layout changes is several times slower here.
- `causal_conv1d_reference`: the same through `F.conv1d`, as transformers computes it (for tests).
- `causal_conv1d_step`: one decoding step, sliding the window in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class CausalConv1dSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, window, doc_starts):
        """x [B, T, C]; weight [C, 1, W]; window [B, C, W] or None -> silu(y) [B, T, C], where
        y[t] = sum_i w_i * xp[t + i] over the input padded on the left with the window (or zeros).
        doc_starts [B, T] bool or None: taps that would reach into an earlier document read zero.
        Computed in x's dtype (autocast does not apply inside)."""
        with torch.autocast(x.device.type, enabled=False):
            return CausalConv1dSiLU._forward(ctx, x, weight, window, doc_starts)

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            return CausalConv1dSiLU._backward(ctx, dout)

    @staticmethod
    def _forward(ctx, x, weight, window, doc_starts):
        B, T, C = x.shape
        W = weight.shape[-1]
        w = conv_taps(weight).to(x.dtype)
        if window is None:
            xp = F.pad(x, (0, 0, W - 1, 0))
        else:
            xp = torch.cat([window[..., 1:].transpose(1, 2).to(x.dtype), x], dim=1)
        masks = _tap_masks(doc_starts, W, x.dtype) if doc_starts is not None else None
        y = xp[:, W - 1:] * w[W - 1]
        for i in range(W - 1):
            tap = xp[:, i:i + T] if masks is None else xp[:, i:i + T] * masks[i]
            y.addcmul_(tap, w[i])
        ctx.save_for_backward(xp, w, y, *(masks or ()))
        ctx.weight_shape = weight.shape
        return F.silu(y)

    @staticmethod
    def _backward(ctx, dout):
        xp, w, y, *masks = ctx.saved_tensors  # w [W, C]: tap i's weights in row i
        T, W = y.shape[1], w.shape[0]
        dy = torch.ops.aten.silu_backward(dout.to(y.dtype), y)
        # the gradient reaching tap i: dy, zeroed where that tap was masked
        dys = [dy * masks[i] if masks else dy for i in range(W - 1)] + [dy]
        dx = dy * w[W - 1]  # dx[s] = sum_i w_i dy_i[s + W-1-i]; dy_i is 0 past the end
        for i in range(W - 1):
            shift = W - 1 - i
            dx[:, :T - shift].addcmul_(dys[i][:, shift:], w[i])
        dw = torch.stack([(xp[:, i:i + T] * dys[i]).sum((0, 1)) for i in range(W)], dim=1)
        return dx, dw.reshape(ctx.weight_shape).to(w.dtype), None, None


def _tap_masks(doc_starts: torch.Tensor, W: int, dtype) -> list[torch.Tensor]:
    """For each of the first W-1 taps ([B, T, 1] each): 1 where the input it reads, W-1-i positions
    back, belongs to the same document as the output position, else 0."""
    T = doc_starts.shape[1]
    pos = torch.arange(T, device=doc_starts.device)
    start = torch.where(doc_starts, pos, -T).cummax(dim=1).values  # the current document's first position
    return [((pos - (W - 1 - i)) >= start).to(dtype)[..., None] for i in range(W - 1)]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor | None = None,
                  doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    """silu(depthwise causal conv) of x [B, T, C] -> [B, T, C]. `window` [B, C, W] holds the inputs
    before x (from a cache); without it the past is zeros. doc_starts [B, T]: packed documents."""
    return CausalConv1dSiLU.apply(x, weight, window, doc_starts)


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
    """The same through F.conv1d (channels first), as transformers computes it."""
    C, _, W = weight.shape
    xt = x.transpose(1, 2)
    xt = F.pad(xt, (W - 1, 0)) if window is None else torch.cat([window[..., 1:].to(xt.dtype), xt], dim=-1)
    return F.silu(F.conv1d(xt, weight.to(xt.dtype), groups=C)).transpose(1, 2)


def update_window(window: torch.Tensor, x: torch.Tensor) -> None:
    """Slide the cached window [B, C, W] over new inputs x [B, T, C], in place."""
    W, T = window.shape[-1], x.shape[1]
    if T >= W:
        window.copy_(x[:, T - W:].transpose(1, 2))
    else:
        window.copy_(torch.cat([window[..., T:], x.transpose(1, 2).to(window.dtype)], dim=-1))


def conv_taps(weight: torch.Tensor) -> torch.Tensor:
    """weight [C, 1, W] -> [W, C]: one contiguous row of C weights per tap. Multiply-adds with a strided
    column of the stored weight are 5-8x slower on a CPU."""
    return weight[:, 0].t().contiguous()


def causal_conv1d_step(x: torch.Tensor, taps: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """One decoding step: x [B, C] enters the window [B, C, W] (updated in place); taps [W, C] from
    `conv_taps` (made once, not per step). Returns silu(conv) [B, C]."""
    W = window.shape[-1]
    taps = taps.to(window.dtype)
    y = x * taps[W - 1]
    for i in range(W - 1):  # x enters as the newest of the W inputs
        y.addcmul_(window[..., i + 1], taps[i])
    if window.is_contiguous():  # shift each batch row as one flat run: a channel's oldest input lands
        flat = window.view(window.shape[0], -1)  # in the previous channel's newest slot, overwritten next
        flat[:, :-1] = flat[:, 1:].clone()
    else:
        window[..., :-1] = window[..., 1:].clone()
    window[..., -1] = x
    return F.silu(y)
