"""The chunked gated delta rule for training and prefill: a `torch.autograd.Function` whose backward is
derived by hand and reuses what the forward computed, so autograd never records the chunk algebra.

Within a chunk of C positions (log-gates cumulated: G_i = g_1 + ... + g_i, Γ_ij = exp(G_i - G_j)),
the delta rule's updates u (the "new values") solve a unit lower-triangular system (WY/UT form):

    (I + A) [U | W] = [diag(β) V | diag(β e^G) K],     A = tril(diag(β) K Kᵀ ⊙ Γ, -1)
    u = U - W S                                         S: state at the chunk's start [K, V]
    O = diag(e^G) Q S + tril(Q Kᵀ ⊙ Γ) u
    S' = e^{G_C} S + (diag(e^{G_C - G}) K)ᵀ u

Everything except the S -> S' scan is batched over all chunks at once; the scan is a Python loop over
chunks (T/64 steps), never over time steps. All exponents are <= 0 where they are used, and the
triangular solve runs in float32 (float64 for float64 inputs). Shapes as in `naive.py`.
"""

from __future__ import annotations

import torch

from .naive import _compute_dtype

CHUNK_SIZE = 64


def _to_chunks(x: torch.Tensor, n: int, C: int, r: int = 1) -> torch.Tensor:
    """[B, T, h, d] -> [B, h*r, n, C, d] (zero-padded at the end; heads repeated r times)."""
    B, T, h, d = x.shape
    x = x.permute(0, 2, 1, 3)
    if r > 1:
        x = x.unsqueeze(2).expand(B, h, r, T, d).reshape(B, h * r, T, d)
    if n * C != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, n * C - T))
    return x.reshape(B, h * r, n, C, d)


def _from_chunks(x: torch.Tensor, T: int, r: int = 1) -> torch.Tensor:
    """[B, H, n, C, d] -> [B, T, H/r, d], summing each group of r heads (the adjoint of _to_chunks)."""
    B, H, n, C, d = x.shape
    x = x.reshape(B, H, n * C, d)[:, :, :T]
    if r > 1:
        x = x.reshape(B, H // r, r, T, d).sum(2)
    return x.transpose(1, 2)


def _gates_to_chunks(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    """[B, T, H] -> [B, H, n, C], padded with zeros (a zero log-gate and a zero beta change nothing)."""
    B, T, H = x.shape
    x = x.transpose(1, 2)
    if n * C != T:
        x = torch.nn.functional.pad(x, (0, n * C - T))
    return x.reshape(B, H, n, C)


class ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, chunk_size):
        B, T, Hk, K = k.shape
        H, V = v.shape[-2:]
        r, C = H // Hk, chunk_size
        n = -(-T // C)
        ctx.in_dtypes = (q.dtype, k.dtype)
        dt = _compute_dtype(v)
        q = _to_chunks(q.to(dt), n, C, r) * scale
        k = _to_chunks(k.to(dt), n, C, r)
        v = _to_chunks(v.to(dt), n, C)
        beta = _gates_to_chunks(beta.to(dt), n, C)
        G = _gates_to_chunks(g.to(dt), n, C).cumsum(-1)  # [B, H, n, C]

        causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
        # exponents of the upper triangle are positive and would overflow: mask before exp
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # Γ
        kb = k * beta[..., None]
        A = (kb @ k.transpose(-1, -2) * decay).tril(-1)
        eG = G.exp()
        rhs = torch.cat([v * beta[..., None], k * (beta * eG)[..., None]], dim=-1)
        eye = torch.eye(C, dtype=dt, device=v.device)
        UW = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
        U, W = UW.split([V, K], dim=-1)
        P = q @ k.transpose(-1, -2) * decay  # already lower-triangular: Γ is 0 above the diagonal
        qg = q * eG[..., None]
        kg = k * (G[..., -1:] - G).exp()[..., None]
        chunk_decay = eG[..., -1]  # [B, H, n]

        S = v.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt).clone()
        states = v.new_empty(B, H, n, K, V)  # the state entering each chunk
        u = torch.empty_like(U)
        kgT = kg.transpose(-1, -2)
        for c in range(n):
            states[:, :, c] = S
            u[:, :, c] = U[:, :, c] - W[:, :, c] @ S
            S = S * chunk_decay[:, :, c, None, None] + kgT[:, :, c] @ u[:, :, c]
        O = qg @ states + P @ u

        ctx.save_for_backward(q, k, v, beta, G, decay, A, P, U, W, u, states, S)
        ctx.meta = (T, r, scale, initial_state is not None)
        o = _from_chunks(O, T).to(v.dtype)
        return o, S

    @staticmethod
    def backward(ctx, dO, dS_final):
        q, k, v, beta, G, decay, A, P, U, W, u, states, S_final = ctx.saved_tensors
        T, r, scale, has_initial = ctx.meta
        B, H, n, C, K = k.shape
        V = v.shape[-1]
        dt = v.dtype
        dO = _to_chunks(dO.to(dt), n, C)
        dS = torch.zeros_like(S_final) if dS_final is None else dS_final.to(dt).clone()
        eG = G.exp()
        chunk_decay = eG[..., -1]
        kg = k * (G[..., -1:] - G).exp()[..., None]
        qg = q * eG[..., None]

        # reverse scan over chunks: only what depends on the incoming state gradient
        PtdO = P.transpose(-1, -2) @ dO  # [B, H, n, C, V]
        QtdO = qg.transpose(-1, -2) @ dO  # [B, H, n, K, V]
        Wt = W.transpose(-1, -2)
        du = torch.empty_like(u)
        dS_out = torch.empty_like(states)  # gradient of the state leaving each chunk
        for c in reversed(range(n)):
            dS_out[:, :, c] = dS
            du[:, :, c] = PtdO[:, :, c] + kg[:, :, c] @ dS
            dS = dS * chunk_decay[:, :, c, None, None] + QtdO[:, :, c] - Wt[:, :, c] @ du[:, :, c]
        d_initial = dS if has_initial else None

        # everything else, batched over chunks
        dP = (dO @ u.transpose(-1, -2)).tril()
        dqg = dO @ states.transpose(-1, -2)  # [B, H, n, C, K]
        dkg = u @ dS_out.transpose(-1, -2)
        dW = -(du @ states.transpose(-1, -2))
        eye = torch.eye(C, dtype=dt, device=v.device)
        # (I + A)ᵀ x = [dU | dW], with dU = du
        dVb_dKb = torch.linalg.solve_triangular(
            (A + eye).transpose(-1, -2), torch.cat([du, dW], dim=-1), upper=True, unitriangular=True
        )
        dVb, dKbg = dVb_dKb.split([V, K], dim=-1)
        dA = -(dVb @ U.transpose(-1, -2) + dKbg @ W.transpose(-1, -2)).tril(-1)

        dPd, dAd = dP * decay, dA * decay
        kb = k * beta[..., None]
        beG = beta * eG
        dq = dPd @ k + dqg * eG[..., None]
        dk = (
            dPd.transpose(-1, -2) @ q
            + dAd.transpose(-1, -2) @ kb
            + (dAd @ k) * beta[..., None]
            + dkg * (G[..., -1:] - G).exp()[..., None]
            + dKbg * beG[..., None]
        )
        dv = dVb * beta[..., None]
        dbeta = ((dAd @ k) * k).sum(-1) + (dVb * v).sum(-1) + (dKbg * k).sum(-1) * eG

        X = dA * A + dP * P  # d/dΓ ⊙ Γ, the gradient through every exp(G_i - G_j)
        dG = X.sum(-1) - X.sum(-2)
        dG = dG + (dqg * qg).sum(-1) + (dKbg * k).sum(-1) * beG
        rk = (dkg * kg).sum(-1)
        dG = dG - rk
        last = rk.sum(-1) + chunk_decay * (dS_out * states).sum((-1, -2))
        dG[..., -1] += last
        dg = dG.flip(-1).cumsum(-1).flip(-1)  # through the within-chunk cumsum

        def gates_back(x):
            return x.reshape(B, H, n * C)[:, :, :T].transpose(1, 2)

        dq = _from_chunks(dq * scale, T, r).to(ctx.in_dtypes[0])
        dk = _from_chunks(dk, T, r).to(ctx.in_dtypes[1])
        return dq, dk, _from_chunks(dv, T), gates_back(dg), gates_back(dbeta), None, d_initial, None


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over a whole sequence, chunk by chunk. Same contract as
    `naive.recurrent_gated_delta_rule`: q, k [B, T, Hk, K]; v [B, T, H, V]; g, beta [B, T, H];
    initial_state [B, H, K, V]. Returns o [B, T, H, V] and the final state [B, H, K, V] (float32)."""
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    o, S = ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, chunk_size)
    return o, (S if output_final_state else None)
