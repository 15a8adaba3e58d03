"""The checks of scripts/train_gpu.sh, in Python so that they are tested (tests/test_gpu_setup.py):

    python3 scripts/gpu_env.py plan [--no-fla]   # which torch the GPU venv gets (stdout), and why (stderr);
                                                 # TORCH_INDEX=URL in the environment overrides the choice
    .venv-gpu/bin/python scripts/gpu_env.py verify [--no-fla]   # after installing: torch sees the GPU,
                                                                 # fla imports (one summary line)

`plan` runs with the system's python3 before anything is installed, on the standard library alone (and
the system's torch, if it has one). It prints `system` when that torch is a CUDA build that sees the GPU
(the venv then reuses it: --system-site-packages) and, unless --no-fla, comes with a Triton that fla
trains with on this GPU; else the pip arguments of a pinned CUDA torch whose build the driver supports.
Any problem is one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys

# torch for a fresh venv: the version the CPU tests run (the Makefile's TORCH), from PyTorch's CUDA wheel
# index. PyTorch 2.13 is built for CUDA 12.6 and 13.0 (its release matrix); CUDA 13.0 needs driver >= 580,
# CUDA 12.6 runs on any CUDA 12 driver (>= 525) through CUDA's minor-version compatibility.
TORCH_PIN = "torch==2.13.0"
CUDA_BUILDS = ((580, "cu130"), (525, "cu126"))  # (oldest driver, build), newest first
WHEEL_INDEX = "https://download.pytorch.org/whl/{}"
SYSTEM_TORCH_MIN = (2, 7)  # a system torch is reused from this version on (fla-core needs torch >= 2.7)
# Tritons [from, to) under which fla refuses to train on a Hopper GPU; TORCH_PIN requires Triton 3.7.1
TRITON_HOPPER_BAD = ((3, 4, 0), (3, 7, 1))
DRIVER_FOR_CUDA = {13: 580, 12: 525}  # the oldest driver each CUDA major version runs on


class SetupError(Exception):
    """A problem the user must fix on the machine: reported as one `error:` line, exit code 2."""


def _numbers(version: str, n: int) -> tuple[int, ...]:
    """'580.159.03' -> (580, 159); '2.13.0+cu130' -> (2, 13); missing or unreadable parts are 0."""
    parts = [int("".join(c for c in p.split("+")[0] if c.isdigit()) or 0) for p in version.split(".")[:n]]
    return tuple(parts + [0] * (n - len(parts)))


def gpus() -> list[tuple[str, str]]:
    """(name, driver version) of each GPU, from nvidia-smi; [] when there is no working nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [tuple(part.strip() for part in line.rsplit(",", 1)) for line in out.stdout.splitlines() if "," in line]


def system_torch() -> dict | None:
    """The system python's torch: version, CUDA version (None for a CPU build), whether it sees a GPU, and
    the installed Triton's version (None without one)."""
    try:
        import torch
    except Exception:  # absent, or broken: either way it is not reused
        return None
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"version": torch.__version__, "cuda": torch.version.cuda, "available": bool(torch.cuda.is_available()),
            "triton": triton}


def fla_refuses(gpu_name: str, triton: str | None) -> bool:
    """fla's backward is wrong on Hopper GPUs under Triton 3.4.0 to 3.7.0, and fla-core 0.5.2 refuses to
    run it there (fla issue #640; an H100 with torch 2.11's Triton 3.6.0 showed it). fla's own test of
    the GPU: 'NVIDIA H' in its name (H100, H200, H800, H20), or GH200."""
    hopper = "NVIDIA H" in gpu_name or "GH200" in gpu_name
    return hopper and triton is not None and TRITON_HOPPER_BAD[0] <= _numbers(triton, 3) < TRITON_HOPPER_BAD[1]


def plan(driver: str, torch_info: dict | None, index: str | None = None, gpu_name: str = "",
         with_fla: bool = True) -> tuple[str, str]:
    """('system', why) to reuse the system's torch, or (pip arguments of a pinned CUDA torch, why).
    `index` (TORCH_INDEX) overrides the choice. With fla on a Hopper GPU, a system torch whose Triton fla
    refuses there is not reused: the pinned torch brings a Triton it takes."""
    if index:
        return f"{TORCH_PIN} --index-url {index}", f"TORCH_INDEX: {TORCH_PIN} from {index}"
    if torch_info and torch_info["cuda"] and torch_info["available"]:
        triton = torch_info.get("triton")
        if _numbers(torch_info["version"], 2) < SYSTEM_TORCH_MIN:
            why = f"the system's torch {torch_info['version']} is older than {'.'.join(map(str, SYSTEM_TORCH_MIN))}"
        elif with_fla and fla_refuses(gpu_name, triton):
            why = (f"the system's torch {torch_info['version']} comes with Triton {triton}, under which fla's "
                   f"backward is wrong on a Hopper GPU ({gpu_name}; fla issue #640)")
        else:
            return "system", f"the system's torch {torch_info['version']} sees the GPU: the venv reuses it"
    elif torch_info:
        cuda = f"CUDA {torch_info['cuda']}" if torch_info["cuda"] else "a CPU build"
        why = f"the system's torch {torch_info['version']} ({cuda}) does not see the GPU"
    else:
        why = "the system's python3 has no torch"
    major = _numbers(driver, 1)[0]
    for oldest, build in CUDA_BUILDS:
        if major >= oldest:
            return (f"{TORCH_PIN} --index-url {WHEEL_INDEX.format(build)}",
                    f"{why}; driver {driver}: {TORCH_PIN} built for CUDA {build[2:-1]}.{build[-1]}")
    raise SetupError(f"the NVIDIA driver {driver} is too old for {TORCH_PIN} (it needs >= {CUDA_BUILDS[-1][0]}): "
                     "update the driver, or set TORCH_INDEX to a wheel index of an older CUDA build")


def verify(with_fla: bool) -> str:
    """After installing: torch is a CUDA build that sees the GPU, and (with_fla) the fla kernel can run.
    Returns the one-line summary; raises SetupError with what to do otherwise."""
    import torch

    version, cuda = torch.__version__, torch.version.cuda
    if cuda is None:
        raise SetupError(f"torch {version} is a CPU build: remove .venv-gpu and run again (or set TORCH_INDEX)")
    if not torch.cuda.is_available():
        driver = next((d for _, d in gpus()), "unknown")
        need = DRIVER_FOR_CUDA.get(_numbers(cuda, 1)[0])
        raise SetupError(f"torch {version} (CUDA {cuda}) does not see the GPU (driver {driver}"
                         f"{f', CUDA {cuda} needs >= {need}' if need else ''}): remove .venv-gpu and run again, "
                         "or set TORCH_INDEX to the wheel index of a CUDA build the driver supports")
    n = torch.cuda.device_count()
    line = f"torch {version} (CUDA {cuda}) sees {n} x {torch.cuda.get_device_name(0)}"
    if not with_fla:
        return line + "; FLA=0: the chunk kernel"
    from sakimi_next.kernels import fla_problem

    problem = fla_problem()
    if problem is not None:
        raise SetupError(f"the fla kernel cannot run: {problem} (FLA=0 trains with the chunk kernel instead)")
    import fla

    return line + f"; flash-linear-attention {fla.__version__} imports: --kernel auto uses it"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="checks of scripts/train_gpu.sh")
    sub = p.add_subparsers(dest="command", required=True)
    which = sub.add_parser("plan", help="which torch the GPU venv gets")
    which.add_argument("--no-fla", action="store_true", help="the venv will not use flash-linear-attention")
    check = sub.add_parser("verify", help="torch sees the GPU and fla imports")
    check.add_argument("--no-fla", action="store_true", help="do not check flash-linear-attention")
    args = p.parse_args(argv)
    try:
        if args.command == "plan":
            found = gpus()
            if not found:
                raise SetupError("nvidia-smi does not answer: this script is for machines with an NVIDIA GPU "
                                 "and its driver")
            (name, driver), info = found[0], system_torch()
            source, why = plan(driver, info, os.environ.get("TORCH_INDEX"), name, with_fla=not args.no_fla)
            print(f"note: {why}", file=sys.stderr)
            print(source)
        else:
            print(verify(with_fla=not args.no_fla))
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
