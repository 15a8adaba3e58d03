"""The optimizers and the learning-rate schedule.

`build_optimizer` builds the one optimizer the training loop holds, as `settings.OPTIMIZERS` names it:
a new optimizer is a builder function here and one entry there. An optimizer made of several torch
optimizers (`MuonWithAdamW`) lists them in `parts`; the checkpoint saves and restores each
(`optimizer_parts`).
"""

from __future__ import annotations

import math

import torch

from .distributed import native_bf16, plain_module
from .model import GatedDeltaNet, RMSNorm
from .settings import OPTIMIZERS
from .util import UserError


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    decay_norms: bool = True, kind: str = "adamw"):
    """The optimizer `kind` (a name in settings.OPTIMIZERS) over `model`'s parameters: weight decay on
    matrices and (as Qwen3-Next does) on the zero-centred norm weights, whose zero is the identity; none on
    A_log, dt_bias, biases or the gated norm's plain multiplier."""
    groups = parameter_groups(plain_module(model), weight_decay, decay_norms)
    builder = globals()[OPTIMIZERS[kind].builder]
    return builder(model, groups, lr, weight_decay, betas)


def optimizer_parts(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimisers behind the training loop's one (two for MuonWithAdamW)."""
    return list(getattr(optimizer, "parts", [optimizer]))


def parameter_groups(module: torch.nn.Module, weight_decay: float, decay_norms: bool) -> list[dict]:
    """[decayed, not decayed] parameter groups."""
    norm_params = {id(m.weight) for m in module.modules() if isinstance(m, RMSNorm)}
    no_decay_ids = {id(p) for m in module.modules() if isinstance(m, GatedDeltaNet) for p in (m.A_log, m.dt_bias)}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in no_decay_ids or name.endswith(".bias"):
            no_decay.append(p)
        elif id(p) in norm_params:
            (decay if decay_norms else no_decay).append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------ the builders OPTIMIZERS names
def adamw(model: torch.nn.Module, groups: list[dict], lr: float, weight_decay: float,
          betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW, its weight decay in `groups`."""
    device = next(p for g in groups for p in g["params"]).device
    # fused kernels where this torch has them for the device, else foreach; both are deterministic
    fused = device.type in ("cuda", "cpu", "mps")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def muon_with_adamw(model: torch.nn.Module, groups: list[dict], lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> "MuonWithAdamW":
    """Muon for the decayed 2-D weights of the decoder layers and the MTP block, AdamW for the rest."""
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is {torch.__version__}")
    module = plain_module(model)
    layers = [module.model.layers] + ([module.mtp] if getattr(module, "mtp", None) is not None else [])
    matrices = {id(p) for part in layers for p in part.parameters() if p.ndim == 2}
    decayed = groups[0]["params"]
    device = next(iter(decayed)).device if decayed else torch.device("cpu")
    kind = torch.optim.Muon if native_bf16(device) else Float32Muon
    muon = kind([p for p in decayed if id(p) in matrices], lr=lr, weight_decay=weight_decay,
                adjust_lr_fn="match_rms_adamw")
    rest = [{**groups[0], "params": [p for p in decayed if id(p) not in matrices]}, groups[1]]
    return MuonWithAdamW(muon, adamw(model, rest, lr, weight_decay, betas))


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Muon's orthogonalisation of a 2-D update: torch's quintic Newton-Schulz iteration
    (`torch.optim._muon`), in float32 instead of bfloat16."""
    a, b, c = coefficients
    x = update.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(update.dtype)


# torch < 2.9 has no Muon (muon_with_adamw refuses it, auto.optimizer picks AdamW): the class below is
# then defined on Optimizer only so that this module imports, and is never built
try:
    from torch.optim._muon import _adjust_lr  # Muon's step size for a matrix's shape
except ImportError:
    _adjust_lr = None


class Float32Muon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):
    """`torch.optim.Muon` with its Newton-Schulz iterations in float32, for a CPU without bfloat16
    arithmetic (AVX2, no AVX512-BF16 or AMX), which torch's bfloat16 iterations run emulated: on such a
    2-core EPYC they took 17.6 of the 20.9 s of a tiny_10m training step. The same state (a momentum buffer
    a matrix) and the same update otherwise, as torch's `_single_tensor_muon` makes it."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            momentum = group["momentum"]
            for p, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


class MuonWithAdamW:
    """Muon (Jordan et al. 2024, `torch.optim.Muon`: momentum orthogonalised by Newton-Schulz
    iterations) for the 2-D weights of the decoder layers and the MTP block, AdamW for the embedding, the
    output layer, norms, gates' vectors and the conv; one optimiser to the training loop. Muon's step is
    scaled to AdamW's update size (Moonlight's `match_rms_adamw`), so --learning-rate and --weight-decay
    mean the same for both (docs/log.md: Tiny Shakespeare held out 2.118 -> 2.107 at the same weight decay,
    2.087-2.101 at the decay of 2.0 it takes).
    The checkpoint holds both states (`parts`)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW):
        self.parts = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


# ------------------------------------------------------------------------------------------ schedule
def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int, anchor_step: int | None = None,
          anchor_progress: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_lr` at `total` (step counts from 0);
    `anchor_*`: a time budget moved `total` (see `decay_progress`)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = decay_progress(step, warmup, total, anchor_step, anchor_progress)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def decay_progress(step: int, warmup: int, total: int, anchor_step: int | None = None,
                   anchor_progress: float = 0.0) -> float:
    """How far the decay has gone at `step` (0 at the end of warm-up, 1 at `total`), linear in the step.
    A time budget's re-plan (budget.replan) moves `total` at `anchor_step`, where the decay had gone
    `anchor_progress` of the way: the rest of the way is then spread over the steps up to the new total,
    so the learning rate stays continuous (only its slope changes) and still ends at the minimum."""
    start = warmup if anchor_step is None else max(anchor_step, warmup)
    if step <= start:
        return anchor_progress if anchor_step is not None else 0.0
    return min(1.0, anchor_progress + (step - start) * (1.0 - anchor_progress) / max(1, total - start))
