"""Gated delta rule kernels. Each has the same contract (see `naive.py`):

- `recurrent`: the plain step-by-step reference (`naive.py`), used for decoding one token.
- `chunk`: chunks of 64 with a hand-derived backward (`chunk.py`), for training and prefill on any device.
- `fla`: flash-linear-attention's Triton kernels (`fla.py`), only when CUDA is available and `fla` imports.
"""

from __future__ import annotations

import torch

from ..settings import KERNELS  # defined there, for the command line to list without torch
from ..util import UserError
from .chunk import chunk_gated_delta_rule
from .naive import recurrent_gated_delta_rule, recurrent_step


def fla_available() -> bool:
    """True when CUDA is present and flash-linear-attention imports (never imported without CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        from . import fla  # noqa: F401

        return fla.available()
    except Exception:
        return False


def resolve_kernel(name: str, device: torch.device | str) -> str:
    """The one place a kernel choice is resolved: `auto` -> `fla` on CUDA when installed, else `chunk`.
    An unusable choice is the user's to fix: UserError."""
    device = torch.device(device)
    if name not in KERNELS:
        raise UserError(f"unknown kernel {name!r}; choose one of: {', '.join(KERNELS)}")
    if name == "auto":
        return "fla" if device.type == "cuda" and fla_available() else "chunk"
    if name == "fla" and not (device.type == "cuda" and fla_available()):
        raise UserError("kernel 'fla' needs a CUDA device and the flash-linear-attention package "
                        "(pip install flash-linear-attention)")
    return name


def gated_delta_rule(kernel: str, q, k, v, g, beta, scale=None, initial_state=None, output_final_state=True,
                     doc_starts=None):
    """Dispatch to the named kernel (already resolved: chunk, recurrent or fla)."""
    if kernel == "chunk":
        return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, doc_starts=doc_starts)
    if kernel == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, doc_starts)
    if kernel == "fla":
        if doc_starts is not None:  # fla wants packed documents as cu_seqlens of a flattened batch: use chunk
            return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                          doc_starts=doc_starts)
        from .fla import fla_gated_delta_rule

        return fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
    raise ValueError(f"unknown kernel {kernel!r}")


__all__ = [
    "KERNELS", "chunk_gated_delta_rule", "recurrent_gated_delta_rule", "recurrent_step",
    "resolve_kernel", "gated_delta_rule", "fla_available",
]
