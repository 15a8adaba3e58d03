"""Where a training model runs: the processes torchrun starts (NCCL on CUDA, gloo on CPU), and on each,
the model compiled (--compile), wrapped for DistributedDataParallel or sharded with FSDP2 (--fsdp), and
the precision it computes in (--dtype)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .util import UserError, resolve_device


# -------------------------------------------------------------------------------------- processes
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> Distributed:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=resolve_device(device_name))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local, device)


def teardown_distributed(ddp: Distributed) -> None:
    if ddp.enabled and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------- the model on them
def wrap_model(model: torch.nn.Module, ddp: Distributed, fsdp: bool, compile: bool) -> torch.nn.Module:
    """Compile (--compile), then wrap for DDP or shard with FSDP2; returns the module to train."""
    if fsdp and not ddp.enabled:
        raise UserError("--fsdp shards the model across processes: start it with torchrun")
    if compile:
        compile_layers(model)
    if not ddp.enabled:
        return model
    if fsdp:  # shard each decoder layer, then the rest; the optimiser must see the shards
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    device_ids = [ddp.device.index] if ddp.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """Unwrap DDP and torch.compile, whose state-dict keys carry `module.` / `_orig_mod.` prefixes."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the gradients down to a total norm of at most `max_norm` (torch's clip_grad_norm_) and return
    their norm before clipping, on the device (reading it would wait for the backward pass). Under FSDP2
    the norm of sharded gradients is a DTensor holding this process's part: its full value (summed over
    the processes, as torchtitan does) is what every process clips with and reports, so that all of
    them agree about a non-finite step."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def reshard_fsdp(model) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward; shard them again,
    or the optimiser and the checkpoint would see other parameter objects."""
    if hasattr(plain_module(model), "reshard"):
        plain_module(model).reshard()


# ---------------------------------------------------------------------------------------- compile
COMPILE_MIN_MINUTES = 10.0  # compiling costs ~30 s on a CPU and saves ~15% of every step after it


def use_compile(asked: bool | None, max_minutes: float | None, steps: int | None, device: torch.device,
                lead_in: int = 0) -> bool:
    """--compile, --no-compile, or by default: compile for a time budget (no --steps) of
    COMPILE_MIN_MINUTES or more, where torch.compile has what it needs (a C++ compiler on a CPU,
    triton on CUDA), and not with a lead-in: its cache-carrying layers took ~2.5 minutes of compiling on
    a 2-core CPU for ~5% faster steps."""
    if asked is not None:
        return asked
    if max_minutes is None or steps is not None or max_minutes < COMPILE_MIN_MINUTES or lead_in:
        return False
    if device.type == "cpu":
        return shutil.which(os.environ.get("CXX", "g++")) is not None
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place ("regional compilation", as torchtitan does): layers of
    one kind share one compiled graph, so compiling takes about half as long as for the whole model, at
    the same speed. Parameter names do not change."""
    layers = list(model.model.layers) + (list(model.mtp.layers) if hasattr(model, "mtp") else [])
    for layer in layers:
        layer.compile()


# -------------------------------------------------------------------------------------- precision
def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware: a CUDA GPU from Ampere on (T4 and V100 only
    emulate it), or a CPU with AVX512-BF16 or AMX, where bf16 autocast trains ~1.5x faster than fp32
    (docs/log.md, "Tiny Shakespeare in 20 minutes"). Elsewhere bf16 is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
                  getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(check is not None and check() for check in checks)
    return False


def autocast_for(dtype: str, device: torch.device) -> tuple[str, object]:
    """(the dtype --dtype means on `device`: "auto" resolved, the context to compute in)."""
    dtype = dtype if dtype != "auto" else ("bf16" if native_bf16(device) else "fp32")
    return dtype, (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext())


def allow_tf32(dtype: str, device: torch.device) -> bool:
    """Training in float32 on a CUDA GPU that has TensorFloat-32 (Ampere and later): let float32 matrix
    products use it (10 mantissa bits in the products, float32 sums; several times faster), as nanoGPT
    and torchtitan do; torch leaves it off by default. Returns whether it is on (for the run's description)."""
    if dtype != "fp32" or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    return True
