"""Gated delta rule kernels. Each has the same contract (see `naive.py`):

- `recurrent`: the plain step-by-step reference (`naive.py`), used for decoding one token.
- `chunk`: chunks of 64 with a hand-derived backward (`chunk.py`), for training and prefill on any device.
- `fla`: flash-linear-attention's Triton kernels (`fla.py`), only when CUDA is available, a recent
  enough `fla` imports and it trains on this GPU (`fla_problem`). `--kernel auto` takes it on CUDA, and
  says once why when it cannot.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re

import torch

from ..settings import KERNELS  # defined there, for the command line to list without torch
from ..util import UserError
from .chunk import chunk_gated_delta_rule
from .naive import recurrent_gated_delta_rule, recurrent_step

# fla 0.5.0 is the first with grouped value heads (more value than key heads, passed without copies)
# and with the kernels alone as the package fla-core; FLA_PIN is the version scripts/gpu_check.py checks
FLA_MIN_VERSION = (0, 5, 0)
FLA_PIN = "fla-core==0.5.2"

log = logging.getLogger(__name__)


def _version_tuple(version: str) -> tuple[int, ...]:
    """'0.5.2' -> (0, 5, 2); '0.6.0.dev1+g1234' -> (0, 6, 0); unreadable parts count as 0."""
    return tuple(int(m.group()) if (m := re.match(r"\d+", part)) else 0 for part in version.split(".")[:3])


@functools.cache
def fla_problem() -> str | None:
    """Why the `fla` kernel cannot run here, or None when it can. Checked once per process. fla is
    imported only when CUDA is present (SPEC pitfall 10: fla without a GPU breaks transformers)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import fla
    except ImportError as e:
        return f"flash-linear-attention is not installed ({e}); pip install '{FLA_PIN}'"
    version = getattr(fla, "__version__", "unknown")
    if _version_tuple(version) < FLA_MIN_VERSION:
        minimum = ".".join(map(str, FLA_MIN_VERSION))
        return f"flash-linear-attention {version} is older than {minimum}; pip install '{FLA_PIN}'"
    try:
        from . import fla as _  # noqa: F401  (imports fla.ops.gated_delta_rule, and with it Triton)
    except Exception as e:  # a broken install (no Triton, a mismatched torch) must not stop a run
        return f"fla {version} is installed but fla.ops.gated_delta_rule does not import: {type(e).__name__}: {e}"
    return _fla_backward_problem(version)


def _fla_backward_problem(version: str) -> str | None:
    """fla 0.5.2 refuses its backward on Hopper GPUs (H100, H200) under Triton 3.4.0 to 3.7.0, which
    gives wrong gradients there (fla issue #640), unless tilelang takes that kernel. Found on an H100
    with torch 2.11's Triton 3.6.0: the first backward raised. Read from fla's own flags, so a fla that
    drops them (or the guard) is taken at its word."""
    import fla.utils

    hopper = getattr(fla.utils, "IS_NVIDIA_HOPPER", False)
    affected = getattr(fla.utils, "TRITON_ABOVE_3_4_0", False) and not getattr(fla.utils, "TRITON_ABOVE_3_7_1", True)
    if not (hopper and affected) or importlib.util.find_spec("tilelang") is not None:
        return None
    return (f"fla {version} refuses to train on a Hopper GPU with a Triton from 3.4.0 to 3.7.0 (wrong gradients, "
            "fla issue #640); pip install tilelang, or a torch whose Triton is >= 3.7.1")


def fla_available() -> bool:
    """True when CUDA is present and a recent enough flash-linear-attention imports."""
    return fla_problem() is None


@functools.cache
def _say_why_not_fla(reason: str) -> None:
    """One line per process (per reason): `--kernel auto` on CUDA falls back to the chunk kernel."""
    log.warning("note: --kernel auto uses the chunk kernel, not fla: %s", reason)


def resolve_kernel(name: str, device: torch.device | str) -> str:
    """The one place a kernel choice is resolved: `auto` -> `fla` on CUDA when installed, else `chunk`.
    An unusable choice is the user's to fix: UserError."""
    device = torch.device(device)
    if name not in KERNELS:
        raise UserError(f"unknown kernel {name!r}; choose one of: {', '.join(KERNELS)}")
    if device.type != "cuda":
        if name == "fla":
            raise UserError("kernel 'fla' needs a CUDA device and the flash-linear-attention package "
                            f"(pip install '{FLA_PIN}')")
        return "chunk" if name == "auto" else name
    problem = fla_problem() if name in ("auto", "fla") else None
    if name == "auto":
        if problem is None:
            return "fla"
        _say_why_not_fla(problem)
        return "chunk"
    if problem is not None:
        raise UserError(f"kernel 'fla' cannot run: {problem}")
    return name


def gated_delta_rule(kernel: str, q, k, v, g, beta, scale=None, initial_state=None, output_final_state=True,
                     doc_starts=None):
    """Dispatch to the named kernel (already resolved: chunk, recurrent or fla)."""
    if kernel == "chunk":
        return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, doc_starts=doc_starts)
    if kernel == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, doc_starts)
    if kernel == "fla":
        from .fla import fla_gated_delta_rule

        return fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, doc_starts)
    raise ValueError(f"unknown kernel {kernel!r}")


__all__ = [
    "KERNELS", "FLA_MIN_VERSION", "FLA_PIN", "chunk_gated_delta_rule", "recurrent_gated_delta_rule",
    "recurrent_step", "resolve_kernel", "gated_delta_rule", "fla_available", "fla_problem",
]
