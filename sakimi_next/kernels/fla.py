"""flash-linear-attention's Triton kernels for the gated delta rule, used on CUDA only.

This module is imported only after `torch.cuda.is_available()` and fla's version are checked
(`kernels.fla_problem`): importing `fla` on a machine without a GPU makes transformers bind its
Qwen3-Next layers to Triton kernels that then crash.

What fla >= 0.5 takes (read in fla/ops/gated_delta_rule/chunk.py of v0.5.2):
- q, k [B, T, Hk, K] and v [B, T, H, V] with H a multiple of Hk ("GVA"): value head j reads key
  head j // (H // Hk) (its kernels index keys with `i_h // (HV // H)`), as in `naive.py`, so q and
  k go in without copies;
- packed sequences as one row: B = 1 and `cu_seqlens` [N + 1] (int64, from 0 to T), one initial and
  one final state per sequence [N, H, K, V] (float32). Document masking uses this: every row of the
  batch and every document inside a row becomes one sequence of a single flattened row.
"""

from __future__ import annotations

import functools

import torch
from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk


class _Packing:
    """How a batch with document starts [B, T] packs into one row of N sequences for `cu_seqlens`."""

    def __init__(self, doc_starts: torch.Tensor):
        B, T = doc_starts.shape
        starts = doc_starts.detach().to("cpu", torch.bool, copy=True)  # one host sync: fla needs N and the lengths
        starts[:, 0] = True  # every row starts a sequence of its own
        counts = starts.sum(dim=1)  # sequences per row
        cu_cpu = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * T])])
        self.cu_seqlens_cpu = cu_cpu
        self.cu_seqlens = cu_cpu.to(doc_starts.device, non_blocking=True)
        device = doc_starts.device
        self.last = (counts.cumsum(0) - 1).to(device)  # each row's last sequence: its final state
        self.first = (counts.cumsum(0) - counts).to(device)  # each row's first: its initial state
        self.keep_initial = ~doc_starts[:, 0]  # a row opening on a document start drops the state it had


@functools.lru_cache(maxsize=1)  # tensors hash by identity: the cache holds the last doc_starts tensor
def _packing(doc_starts: torch.Tensor) -> _Packing:
    """The packing of `doc_starts`, made once per tensor: every DeltaNet layer of a forward gets the
    same doc_starts, so the host sync happens once per forward, and fla, which caches its chunk
    indices by the identity of `cu_seqlens`, computes them once as well."""
    return _Packing(doc_starts)


def fla_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=True,
                         doc_starts=None):
    """Same contract as `naive.recurrent_gated_delta_rule`: q, k [B, T, Hk, K]; v [B, T, H, V]; g, beta
    [B, T, H]; initial_state [B, H, K, V]; doc_starts [B, T] bool. fla computes in v's dtype (q, k and
    beta are cast to it), with the log-gates and the states in float32."""
    dtype = v.dtype
    q, k, beta, g = q.to(dtype), k.to(dtype), beta.to(dtype), g.float()
    # a copy: fla keeps the initial state for its backward, and a caller's cache is updated in place after
    h0 = None if initial_state is None else initial_state.to(torch.float32, copy=True)
    if doc_starts is None:
        return _fla_chunk(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=output_final_state,
                          use_qk_l2norm_in_kernel=False)
    B, T, H, V = v.shape
    p = _packing(doc_starts)
    if h0 is not None:
        rows = h0 * p.keep_initial[:, None, None, None].to(h0.dtype)
        h0 = h0.new_zeros(len(p.cu_seqlens_cpu) - 1, *h0.shape[1:]).index_copy(0, p.first, rows)
    flat = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta))
    o, S = _fla_chunk(*flat, scale=scale, initial_state=h0, output_final_state=output_final_state,
                      use_qk_l2norm_in_kernel=False, cu_seqlens=p.cu_seqlens, cu_seqlens_cpu=p.cu_seqlens_cpu)
    return o.reshape(B, T, H, V), (S[p.last] if output_final_state else None)
