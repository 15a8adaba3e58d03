"""The plain gated delta rule, one time step after another: the reference every fast kernel is tested
against, and the kernel used when decoding one token at a time.

Shapes: q, k [B, T, Hk, K]; v [B, T, H, V]; g, beta [B, T, H]; state [B, H, K, V], H a multiple of Hk
(value head j reads key head j // (H // Hk)). q and k arrive l2-normalised; `scale` multiplies q.
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    doc_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T (scale q_t).

    doc_starts [B, T] bool: a new document starts at t, so the state coming into t is dropped (packed
    documents share nothing). Returns o [B, T, H, V] in v's dtype and the final state [B, H, K, V]
    (float32, or float64 for float64 inputs) when `output_final_state`. Differentiable by autograd.
    """
    B, T, Hk, K = k.shape
    H, V = v.shape[-2:]
    scale = K**-0.5 if scale is None else scale
    dt = _compute_dtype(v)
    r = H // Hk
    q, k = (x.to(dt).repeat_interleave(r, dim=2) if r > 1 else x.to(dt) for x in (q, k))
    v, g, beta = v.to(dt), g.to(dt), beta.to(dt)
    q = q * scale
    S = torch.zeros(B, H, K, V, dtype=dt, device=v.device) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        if doc_starts is not None:
            S = S * (~doc_starts[:, t]).to(dt)[:, None, None, None]
        kt = k[:, t]  # [B, H, K]
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., None] * delta[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, dim=1).to(v.dtype)
    return o, (S if output_final_state else None)


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One decoding step, updating `state` in place (no autograd); a handful of small batched products,
    since at one token the cost is the number of operations, not arithmetic.

    q, k [B, Hk, K] (l2-normalised); v [B, H, V]; g, beta [B, H]; state [B, H, K, V] float32.
    Returns o [B, H, V] in v's dtype.
    """
    B, Hk, K = k.shape
    H, V = v.shape[-2:]
    out_dtype, dt = v.dtype, state.dtype
    if not q.dtype == k.dtype == v.dtype == g.dtype == beta.dtype == dt:  # casts only when needed
        q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if torch.compiler.is_compiling():
        o = traced_recurrent_step(q, k, v, g, beta, state, scale)
        return o if o.dtype == out_dtype else o.to(out_dtype)
    S = state.view(B * H, K, V)
    S.mul_(g.exp().reshape(B * H, 1, 1))
    k = k.unsqueeze(2).expand(B, Hk, H // Hk, K).reshape(B * H, 1, K)  # each value head's key head
    delta = (v.reshape(B * H, 1, V) - torch.bmm(k, S)).mul_(beta.reshape(B * H, 1, 1))
    S.baddbmm_(k.transpose(1, 2), delta)  # S += k (beta (v - Sᵀk))ᵀ
    q = q.unsqueeze(2).expand(B, Hk, H // Hk, K).reshape(B * H, 1, K)
    o = torch.bmm(q, S).mul_(scale).view(B, H, V)
    return o if o.dtype == out_dtype else o.to(out_dtype)


def traced_recurrent_step(q, k, v, g, beta, state, scale: float) -> torch.Tensor:
    """`recurrent_step` as a compiler should see it: the old state read once for both of its products
    (Sᵀk and Sᵀq, decayed afterwards: exp(g) Sᵀk = (exp(g) S)ᵀk), the new one written once, in place;
    sums and elementwise products only, which inductor fuses into a loop or two over the state, where
    in-place batched products would each be a library call on a copy of it."""
    B, Hk, K = k.shape
    H, V = v.shape[-2:]
    r = H // Hk
    k, q = (x.repeat_interleave(r, dim=1) if r > 1 else x for x in (k, q))  # [B, H, K]
    decay = g.exp()[..., None]  # [B, H, 1]
    Sk = (state * k[..., None]).sum(-2)  # [B, H, V]
    Sq = (state * q[..., None]).sum(-2)
    delta = (v - decay * Sk) * beta[..., None]
    state.copy_(state * decay[..., None] + k[..., None] * delta[..., None, :])
    return (decay * Sq + (k * q).sum(-1, keepdim=True) * delta) * scale
