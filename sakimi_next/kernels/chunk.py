"""The chunked gated delta rule for training and prefill: a `torch.autograd.Function` whose backward is
derived by hand and reuses what the forward computed, so autograd never records the chunk algebra.

Within a chunk of C positions (log-gates cumulated: G_i = g_1 + ... + g_i, Γ_ij = exp(G_i - G_j) for
i >= j, else 0), the delta rule's updates u (the "new values") come from a unit lower-triangular
system (the WY/UT form), solved once as an explicit inverse T = (I + A)⁻¹:

    A  = strictly-lower(diag(β) K Kᵀ ⊙ Γ)
    U  = T diag(β) V,     W = T diag(β e^G) K
    u  = U - W S                                        S: the state entering the chunk [K, V]
    O  = diag(e^G) Q S + (Q Kᵀ ⊙ Γ) u
    S' = e^{G_C} S + (diag(e^{G_C - G}) K)ᵀ u

Everything except the S -> S' scan is batched over all chunks at once; the scan is a Python loop over
chunks (T/64 steps), never over time steps. Value heads are laid out as [Hk, r] (r = H/Hk value heads
per key head), so q, k, K Kᵀ and Q Kᵀ are computed once per key head and broadcast, never copied; the
gradients of q and k are reduced over r before their matrix products. All exponents are <= 0 where they
are used (and clamped at -80, see MIN_EXPONENT). Computation in float32 (float64 for float64 inputs).
Shapes as in `naive.py`: q, k [B, T, Hk, K]; v [B, T, H, V]; g, beta [B, T, H]; state [B, H, K, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import _compute_dtype

CHUNK_SIZE = 64
# exp() of arguments below about -87 takes a slow underflow path on CPUs (30-100x slower); every
# exponent here is a decay, so it is clamped at -80, where exp is 2e-35 instead of (nearly) 0.
MIN_EXPONENT = -80.0


def _decay(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for x <= 0, with x clamped at MIN_EXPONENT."""
    return x.clamp(min=MIN_EXPONENT).exp_()


def _pad_time(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero-pad dimension `dim` (time) at the end to `length` (a zero log-gate and beta change nothing)."""
    if x.shape[dim] == length:
        return x
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, length - x.shape[dim]]
    return F.pad(x, pad)


def _key_chunks(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    """q or k [B, T, Hk, K] -> [B, Hk, 1, n, C, K] (the 1 broadcasts over a key head's value heads)."""
    x = _pad_time(x.transpose(1, 2), 2, n * C)
    return x.unflatten(2, (n, C)).unsqueeze(2).contiguous()  # one copy now, not one per matmul


def _value_chunks(x: torch.Tensor, n: int, C: int, r: int) -> torch.Tensor:
    """v [B, T, Hk*r, V] -> [B, Hk, r, n, C, V]; value head j belongs to key head j // r."""
    x = _pad_time(x.unflatten(2, (x.shape[2] // r, r)).permute(0, 2, 3, 1, 4), 3, n * C)
    return x.unflatten(3, (n, C)).contiguous()


def _gate_chunks(x: torch.Tensor, n: int, C: int, r: int) -> torch.Tensor:
    """g or beta [B, T, Hk*r] -> [B, Hk, r, n, C]."""
    x = _pad_time(x.unflatten(2, (x.shape[2] // r, r)).permute(0, 2, 3, 1), 3, n * C)
    return x.unflatten(3, (n, C)).contiguous()


def _unchunk(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, Hk, r, n, C, d] -> [B, T, Hk*r, d]: the inverse of `_value_chunks` (r = 1 for q and k)."""
    return x.flatten(3, 4)[..., :T, :].flatten(1, 2).transpose(1, 2)


def _unchunk_gates(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, Hk, r, n, C] -> [B, T, Hk*r]."""
    return x.flatten(3, 4)[..., :T].flatten(1, 2).transpose(1, 2)


class ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, chunk_size, doc_starts):
        with torch.autocast(v.device.type, enabled=False):  # this math runs in float32 whatever the caller's autocast
            return ChunkGatedDeltaRule._forward(ctx, q, k, v, g, beta, scale, initial_state, chunk_size, doc_starts)

    @staticmethod
    def backward(ctx, dO, dS_final):
        with torch.autocast(dO.device.type, enabled=False):
            return ChunkGatedDeltaRule._backward(ctx, dO, dS_final) + (None,)

    @staticmethod
    def _forward(ctx, q, k, v, g, beta, scale, initial_state, chunk_size, doc_starts):
        B, T, Hk, K = k.shape
        H, V = v.shape[-2:]
        r, C = H // Hk, chunk_size
        n = -(-T // C)
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype)
        dt = _compute_dtype(v)
        q = _key_chunks(q.to(dt) * scale, n, C)  # [B, Hk, 1, n, C, K]
        k = _key_chunks(k.to(dt), n, C)
        v = _value_chunks(v.to(dt), n, C, r)  # [B, Hk, r, n, C, V]
        beta = _gate_chunks(beta.to(dt), n, C, r)  # [B, Hk, r, n, C]
        G = _gate_chunks(g.to(dt), n, C, r).cumsum(-1)

        # Γ; exponents above the diagonal are positive and could overflow: clamp to 0, then zero them
        decay = (G[..., :, None] - G[..., None, :]).clamp_(MIN_EXPONENT, 0.0).exp_().tril_()
        masks = _document_masks(doc_starts, n, C, v.dtype) if doc_starts is not None else None
        if masks is not None:
            decay.mul_(masks[0])
        kT = k.transpose(-1, -2)
        KK, QK = k @ kT, q @ kT  # once per key head: [B, Hk, 1, n, C, C]
        A = KK * decay
        A.mul_(beta[..., None])  # only the strictly lower part is read by the unitriangular solve
        eye = torch.eye(C, dtype=dt, device=v.device)
        Tinv = torch.linalg.solve_triangular(A, eye.expand(A.shape), upper=False, unitriangular=True)
        P = QK * decay
        eG, to_end = _decay(G), _decay(G[..., -1:] - G)
        if masks is not None:
            eG, to_end = eG * masks[1], to_end * masks[2]
        U = Tinv @ (v * beta[..., None])
        W = Tinv @ (k * (beta * eG)[..., None])
        qg = q * eG[..., None]  # [B, Hk, r, n, C, K]
        kgT = (k * to_end[..., None]).transpose(-1, -2)
        chunk_decay = eG[..., -1, None, None]  # [B, Hk, r, n, 1, 1]

        S = v.new_zeros(B, Hk, r, K, V) if initial_state is None else initial_state.to(dt).view(B, Hk, r, K, V).clone()
        states = v.new_empty(B, Hk, r, n, K, V)  # the state entering each chunk
        u = torch.empty_like(U)
        for c in range(n):
            states[:, :, :, c] = S
            u[:, :, :, c] = U[:, :, :, c] - W[:, :, :, c] @ S
            S = S * chunk_decay[:, :, :, c] + kgT[:, :, :, c] @ u[:, :, :, c]
        O = torch.matmul(qg, states).add_(P @ u)

        ctx.save_for_backward(q, k, v, beta, G, decay, KK, QK, Tinv, P, U, W, u, states, S,
                              *(masks[1:] if masks is not None else ()))
        ctx.meta = (T, scale, initial_state is not None)
        return _unchunk(O, T).to(ctx.in_dtypes[2]), S.reshape(B, H, K, V)

    @staticmethod
    def _backward(ctx, dO, dS_final):
        q, k, v, beta, G, decay, KK, QK, Tinv, P, U, W, u, states, S_final, *masks = ctx.saved_tensors
        T, scale, has_initial = ctx.meta
        B, Hk, r, n, C, V = v.shape
        K = k.shape[-1]
        dt = v.dtype
        dO = _value_chunks(dO.to(dt), n, C, r)
        dS = torch.zeros_like(S_final) if dS_final is None else dS_final.to(dt).view_as(S_final).clone()
        eG = _decay(G)
        to_end = _decay(G[..., -1:] - G)  # decay from each position to the chunk's end
        if masks:  # the same document masks as the forward (Γ, saved as `decay`, has them already)
            eG, to_end = eG * masks[0], to_end * masks[1]
        chunk_decay = eG[..., -1, None, None]
        kg = k * to_end[..., None]
        qg = q * eG[..., None]

        # reverse scan over chunks: only what depends on the incoming state gradient
        du = P.transpose(-1, -2) @ dO  # [B, Hk, r, n, C, V]; the state's part is added in the loop
        QtdO = qg.transpose(-1, -2) @ dO  # [B, Hk, r, n, K, V]
        Wt = W.transpose(-1, -2)
        dS_out = torch.empty_like(states)  # gradient of the state leaving each chunk
        for c in reversed(range(n)):
            dS_out[:, :, :, c] = dS
            du[:, :, :, c] += kg[:, :, :, c] @ dS
            dS = dS * chunk_decay[:, :, :, c] + QtdO[:, :, :, c] - Wt[:, :, :, c] @ du[:, :, :, c]
        d_initial = dS.reshape(B, Hk * r, K, V) if has_initial else None

        # everything else, batched over chunks
        statesT = states.transpose(-1, -2)
        dP = dO @ u.transpose(-1, -2)  # only its lower part matters: it meets Γ or P next
        dqg = dO @ statesT  # [B, Hk, r, n, C, K]
        dkg = u @ dS_out.transpose(-1, -2)
        TinvT = Tinv.transpose(-1, -2)
        dVb = TinvT @ du  # the gradient of diag(β) V, through U = T diag(β) V
        dKbg = TinvT @ (du @ statesT).neg_()  # ... and of diag(β e^G) K, through W (dW = -du Sᵀ)
        dA = (dVb @ U.transpose(-1, -2)).add_(dKbg @ Wt).neg_().tril_(-1)  # d(I + A)⁻¹ = -T dA T

        dAd = dA.mul_(decay)  # gradient w.r.t. β_i (k_i·k_j), per value head (reuses dA's memory)
        dKK = dAd * beta[..., None]  # ... and w.r.t. k_i·k_j
        dQK = dP.mul_(decay)  # w.r.t. q_i·k_j
        X = dKK * KK + dQK * QK  # d/dΓ ⊙ Γ: the gradient through every exp(G_i - G_j)
        dG = X.sum(-1) - X.sum(-2)
        dbeta = (dAd * KK).sum(-1) + (dVb * v).sum(-1)

        kbeG = (dKbg * k).sum(-1)  # [B, Hk, r, n, C]
        dbeta += kbeG * eG
        dG += (dqg * qg).sum(-1) + kbeG * beta * eG
        rk = (dkg * kg).sum(-1)
        dG -= rk
        dG[..., -1] += rk.sum(-1) + chunk_decay[..., 0, 0] * (dS_out * states).sum((-1, -2))
        dg = dG.flip(-1).cumsum(-1).flip(-1)  # through the within-chunk cumsum

        # q and k: the value heads' terms summed per key head, then one product each
        dKK_k = dKK.sum(2, keepdim=True)
        dQK_k = dQK.sum(2, keepdim=True)
        dk = (dKK_k + dKK_k.transpose(-1, -2)) @ k + dQK_k.transpose(-1, -2) @ q
        dk += (dkg * to_end[..., None] + dKbg * (beta * eG)[..., None]).sum(2, keepdim=True)
        dq = (dQK_k @ k + (dqg * eG[..., None]).sum(2, keepdim=True)) * scale
        dv = dVb * beta[..., None]

        dq, dk, dv = (_unchunk(x, T) for x in (dq, dk, dv))
        return (dq.to(ctx.in_dtypes[0]), dk.to(ctx.in_dtypes[1]), dv.to(ctx.in_dtypes[2]),
                _unchunk_gates(dg, T).to(ctx.in_dtypes[3]), _unchunk_gates(dbeta, T).to(ctx.in_dtypes[4]),
                None, d_initial, None)


def _document_masks(doc_starts: torch.Tensor, n: int, C: int, dtype) -> tuple[torch.Tensor, ...]:
    """Where packed documents must not see each other, per chunk (c_i = document starts at or before
    position i within the chunk): Γ_ij only within one document (c_i == c_j), the decay from the chunk's
    start only before the first start (c_i == 0), the decay to the chunk's end only in its last
    document (c_i == c_C). Shapes [B, 1, 1, n, C, C], [B, 1, 1, n, C] (broadcast over heads).
    The exponents themselves stay exact: no -inf trick."""
    c = _pad_time(doc_starts.to(torch.int32), 1, n * C).unflatten(1, (n, C)).cumsum(-1)[:, None, None]
    same = (c[..., :, None] == c[..., None, :]).to(dtype)
    return same, (c == 0).to(dtype), (c == c[..., -1:]).to(dtype)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    chunk_size: int = CHUNK_SIZE,
    doc_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over a whole sequence, chunk by chunk. Same contract as
    `naive.recurrent_gated_delta_rule`: q, k [B, T, Hk, K]; v [B, T, H, V]; g, beta [B, T, H];
    initial_state [B, H, K, V]; doc_starts [B, T] bool (packed documents: the state is dropped where
    a document starts). Returns o [B, T, H, V] and the final state [B, H, K, V] (float32)."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    T = k.shape[1]
    if isinstance(T, int) and T < chunk_size:  # a short input (a prompt): one chunk of T, not padded to C
        chunk_size = max(16, 1 << (T - 1).bit_length())
    o, S = ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, chunk_size, doc_starts)
    return o, (S if output_final_state else None)
