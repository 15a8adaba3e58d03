"""A CPU stand-in for flash-linear-attention's `chunk_gated_delta_rule`, so that what we pass to fla (shapes,
head grouping, `cu_seqlens`, initial and final states) is tested without a GPU.

It implements fla's contract as read in fla/ops/gated_delta_rule/chunk.py (v0.5.2), with the plain
recurrence as its arithmetic, the way fla's own tests build their reference
(tests/ops/test_gdn.py: `repeat(q, 'b t h d -> b t (h g) d')`, one sequence of `cu_seqlens` at a time):

- q, k [B, T, H, K], v [B, T, HV, V], HV a multiple of H: value head j reads key head j // (HV // H);
- `cu_seqlens` [N + 1] int64 from 0 to T with B = 1; initial_state / final state [N, HV, K, V] float32;
- returns o in q's dtype and the final state (or None).

It also refuses what our wrapper promises never to pass (q, k, v of different dtypes, non-float32 gates
or states, empty sequences), and records each call's arguments in `calls`.
"""

from __future__ import annotations

import itertools
import sys
import types

import torch

from sakimi_next.kernels.naive import recurrent_gated_delta_rule

calls: list[dict] = []


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}")
    H, HV = q.shape[2], v.shape[2]
    if HV % H:
        raise ValueError(f"For GVA, num_v_heads (HV={HV}) must be evenly divisible by num_heads (H={H})")
    assert not use_qk_l2norm_in_kernel and not kwargs, kwargs
    assert q.dtype == k.dtype == v.dtype == beta.dtype, (q.dtype, k.dtype, v.dtype, beta.dtype)
    assert g.dtype == torch.float32 and (initial_state is None or initial_state.dtype == torch.float32)
    B, T = q.shape[:2]
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError(f"The batch size is expected to be 1 rather than {B} when using `cu_seqlens`.")
        cu = cu_seqlens.tolist()
        assert cu_seqlens.dtype == torch.int64 and cu[0] == 0 and cu[-1] == T, cu
        assert all(a < b for a, b in itertools.pairwise(cu)), f"empty sequence in {cu}"
        assert cu_seqlens_cpu is None or cu_seqlens_cpu.tolist() == cu
        bounds = [(0, a, b) for a, b in itertools.pairwise(cu)]
    if initial_state is not None and initial_state.shape[0] != len(bounds):
        raise ValueError(f"{len(bounds)} initial states expected, got {initial_state.shape[0]}")
    calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape), "dtype": q.dtype,
                  "cu_seqlens": None if cu_seqlens is None else cu_seqlens.tolist(),
                  "initial_state": None if initial_state is None else tuple(initial_state.shape)})
    outs, states = [], []
    for n, (b, t0, t1) in enumerate(bounds):
        qn, kn, vn, gn, bn = (x[b:b + 1, t0:t1] for x in (q, k, v, g, beta))
        qn, kn = (x.repeat_interleave(HV // H, dim=2) for x in (qn, kn))  # fla's GVA grouping
        o, S = recurrent_gated_delta_rule(qn, kn, vn, gn, bn, scale,
                                          None if initial_state is None else initial_state[n:n + 1], True)
        outs.append(o)
        states.append(S)
    o = torch.cat(outs, dim=1 if cu_seqlens is not None else 0).to(q.dtype)
    return o, (torch.cat(states).float() if output_final_state else None)


def install(monkeypatch, version: str = "0.5.2", ops: bool = True, hopper_old_triton: bool = False) -> None:
    """Make `import fla` find this fake (`fla.__version__ == version`; without `ops`, fla.ops does not
    import; `hopper_old_triton`: fla.utils' flags of an H100 with Triton 3.6) and CUDA look available, for
    the length of a test. `uninstall` undoes what monkeypatch can't."""
    fla = types.ModuleType("fla")
    fla.__version__ = version
    fla.utils = types.ModuleType("fla.utils")
    fla.utils.IS_NVIDIA_HOPPER = fla.utils.TRITON_ABOVE_3_4_0 = hopper_old_triton
    fla.utils.TRITON_ABOVE_3_7_1 = False
    monkeypatch.setitem(sys.modules, "fla.utils", fla.utils)
    gdr = types.ModuleType("fla.ops.gated_delta_rule")
    gdr.chunk_gated_delta_rule = chunk_gated_delta_rule
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.ops", types.ModuleType("fla.ops"))
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", gdr if ops else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    uninstall()


def uninstall() -> None:
    """Forget what was decided or imported against a fake: the checks run again, the wrapper re-imports."""
    from sakimi_next import kernels

    kernels.fla_problem.cache_clear()
    kernels._say_why_not_fla.cache_clear()
    sys.modules.pop("sakimi_next.kernels.fla", None)
    if hasattr(kernels, "fla"):
        delattr(kernels, "fla")
    calls.clear()
