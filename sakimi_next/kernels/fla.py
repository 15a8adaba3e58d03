"""flash-linear-attention's Triton kernels for the gated delta rule, used on CUDA only.

This module is imported only after `torch.cuda.is_available()` (importing `fla` on a machine without a
GPU makes transformers bind its Qwen3-Next layers to Triton kernels that then crash).
"""

from __future__ import annotations

import torch

from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk  # noqa: E402


def available() -> bool:
    return torch.cuda.is_available()


def fla_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=True):
    """Same contract as `naive.recurrent_gated_delta_rule` (q, k [B, T, Hk, K]; v [B, T, H, V])."""
    H, Hk = v.shape[2], k.shape[2]
    if H != Hk:  # fla versions differ in grouped-value support: give it one key head per value head
        q, k = (x.repeat_interleave(H // Hk, dim=2) for x in (q, k))
    dtype = v.dtype
    o, S = _fla_chunk(
        q.to(dtype), k.to(dtype), v, g.float(), beta.to(dtype), scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=False,
    )
    return o, S
