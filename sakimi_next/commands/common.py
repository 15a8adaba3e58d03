"""What the commands share: flag groups and the checks that turn a parsed flag into a trusted value.

Every check raises `UserError` with a message that names the flag and the value, e.g.
`--beta1 (2.0) must be in [0, 1)`; the CLI prints it as one `error: ...` line and exits with code 2.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..config import PRESETS, RECOMMENDED_PRESET
from ..settings import AUTO_PRESET, INFERENCE_DTYPES, KERNELS, QUANTIZE
from ..util import UserError


# ------------------------------------------------------------------------------------------ checks
def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return ("must be positive" if lo == 0 else f"must be > {lo:g}") if lo_open else f"must be >= {lo:g}"
    return f"must be {'<' if hi_open else '<='} {hi:g}"


def finite_float(flag: str, x: float | None, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float | None:
    """`x` if it is a finite number in the range (None passes: the flag was not given)."""
    if x is None:
        return None
    if not math.isfinite(x):
        raise UserError(f"{flag} ({x}) must be a finite number")
    if ((lo is not None and (x < lo or (lo_open and x == lo)))
            or (hi is not None and (x > hi or (hi_open and x == hi)))):
        raise UserError(f"{flag} ({x}) {_range_text(lo, hi, lo_open, hi_open)}")
    return x


def positive_float(flag: str, x: float | None) -> float | None:
    return finite_float(flag, x, lo=0, lo_open=True)


def count(flag: str, n: int | None, minimum: int = 1, note: str = "") -> int | None:
    """A whole number >= `minimum` (1: "must be positive"; 0 where 0 means off). None passes."""
    if n is not None and n < minimum:
        raise UserError(f"{flag} ({n}) {'must be positive' if minimum == 1 else f'must be >= {minimum}'}{note}")
    return n


def seed(n: int | None) -> int | None:
    return count("--seed", n, minimum=0)


def nonempty_strings(flag: str, values: list[str] | None) -> tuple[str, ...]:
    for v in values or ():
        if v == "":
            raise UserError(f"{flag} must not be empty")
    return tuple(values or ())


def preset_name(name: str | None, default: str | None = RECOMMENDED_PRESET, allow_auto: bool = False) -> str | None:
    if name is not None and name not in PRESETS and not (allow_auto and name == AUTO_PRESET):
        choices = ", ".join(PRESETS) + (f", {AUTO_PRESET}" if allow_auto else "")
        raise UserError(f"unknown preset {name!r}; choose one of: {choices}")
    return name if name is not None else default


def writable_dir(flag: str, path: str | Path) -> Path:
    """A directory we may create or write into: the path, or the nearest part of it that exists, must
    be a writable directory. Nothing is created here."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise UserError(f"{flag} {path}: {probe} is a broken symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{flag} {path}: cannot write to {probe}, it is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write to {probe} (permission denied)")
    return path


# ------------------------------------------------------------------------------------- flag groups
def add_preset(p, help_text: str | None = None) -> None:
    p.add_argument("--config", default=None,
                   help=help_text or f"model preset: {', '.join(PRESETS)} (default {RECOMMENDED_PRESET})")


def add_device(p, kernel: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    if kernel:
        p.add_argument("--kernel", default="auto", choices=KERNELS,
                       help="gated delta rule kernel: auto = fla on CUDA when installed, else chunk")
    p.add_argument("--disable-fast-kernels", action="store_true",
                   help="use the plain recurrent kernel everywhere (same as --kernel recurrent)")


def add_precision(p) -> None:
    """--dtype and --quantize: the precision a model is loaded in for inference (`quantize.py`)."""
    p.add_argument("--dtype", default="fp32", choices=INFERENCE_DTYPES,
                   help="weights and activations: bf16 halves the memory and is faster on GPUs and on CPUs "
                        "with AVX512-BF16/AMX (elsewhere: a note, and float32; the DeltaNet state stays fp32)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="int8: the weights of every matrix product as int8 with one scale per output row "
                        "(a quarter of float32's bytes to read per token; --mode eval reports its cost in "
                        "bits/byte)")


def add_compile(p, what: str) -> None:
    """--compile / --no-compile, default auto (`what`: what auto does there; decoder.choose_decoder)."""
    p.add_argument("--compile", dest="compile", action="store_const", const="yes", default="auto",
                   help=f"run the compiled decoding step ({what}), compiling it first if needed "
                        "(minutes, once: kept on disk)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="no",
                   help="decode with the plain eager step")


def add_attention_window(p) -> None:
    p.add_argument("--attention-window", type=int, default=None, metavar="N",
                   help="attention sees the last N positions of a long text or conversation, the DeltaNet "
                        "states all of it (default: what the checkpoint was trained on, --seq-len + "
                        "--lead-in; a Hugging Face directory: all; 0 = all)")


def attention_window(args) -> int | None:
    """--attention-window: None (the checkpoint's default) or a count, 0 meaning every key."""
    return count("--attention-window", args.attention_window, minimum=0)


def add_seed(p, help_text: str = "random seed") -> None:
    p.add_argument("--seed", type=int, default=None, help=f"{help_text} (0)")


def add_checkpoint(p, help_text: str) -> None:
    p.add_argument("--resume-from", "--checkpoint", dest="resume_from", default=None, help=help_text)


def kernel_name(args) -> str:
    """--kernel, or `recurrent` with --disable-fast-kernels (bench has no --kernel: chunk). What the
    choice means on a device is decided in one place, kernels.resolve_kernel."""
    return "recurrent" if args.disable_fast_kernels else getattr(args, "kernel", "chunk")


def required(flag: str, value, what: str):
    if not value:
        raise UserError(f"pass {what}: {flag}")
    return value
