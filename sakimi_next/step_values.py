"""A training step's numbers (its micro-batches' losses, the gradient norm) stay on the device until the
loop reads them, a print interval's at once (`read_steps`). Reading a value (`.item()`, `float()`) makes
the host wait until the device has finished all it was given; once per step, that leaves a GPU idle
between steps while the host prepares the next. Read, they are the same Python floats a per-step
`.item()` gave: the same float32 values, summed in the same order, and under torchrun the loss averaged
over the processes the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .distributed import Distributed


@dataclass(frozen=True)
class StepValues:
    """One optimizer step's numbers, read: the mean loss (and MTP, auxiliary loss) of its micro-batches,
    and the gradient norm before clipping."""

    loss: float
    mtp: float
    aux: float
    grad_norm: float
    loss_finite: bool  # every micro-batch's loss, on every process

    @property
    def finite(self) -> bool:
        return self.loss_finite and math.isfinite(self.grad_norm)

    @property
    def what(self) -> str:
        """What is not finite, for the message."""
        return f"loss {self.loss}" if not self.loss_finite else f"gradient norm {self.grad_norm}"


@dataclass
class PendingStep:
    """One optimizer step as the loop issued it, its numbers on the device until read."""

    index: int  # 0 for the first step; its metrics record says step index + 1
    lr: float
    losses: torch.Tensor  # [micro-batches, 3]: loss, MTP loss, auxiliary loss (0 where the model has none)
    grad_norm: torch.Tensor  # []
    tokens_seen: int = 0  # after the step
    elapsed_s: float = 0.0  # host time when the step was issued (the device may still be working on it)
    values: StepValues | None = None  # once read


def read_steps(steps: list[PendingStep], ddp: Distributed) -> list[StepValues]:
    """The values of `steps`, reading those not read yet in one go from the device (under torchrun, then
    a second time after averaging the losses over the processes): a collective, so every process must
    read the same steps."""
    todo = [p for p in steps if p.values is None]
    if todo:
        rows = torch.stack([torch.cat([p.losses.flatten(), p.grad_norm.reshape(1).to(p.losses.dtype)])
                            for p in todo]).tolist()
        values = [_step_values(row[:-1], row[-1]) for row in rows]
        if ddp.enabled:
            values = _averaged(values, ddp)
        for p, v in zip(todo, values):
            p.values = v
    return [p.values for p in steps]


def _step_values(micro: list[float], grad_norm: float) -> StepValues:
    """A step's values from its micro-batches' [loss, mtp, aux, loss, mtp, aux, ...]: their means, summed
    as the loop once did, one micro-batch's `.item()` at a time."""
    n = len(micro) // 3
    loss = mtp = aux = 0.0
    finite = True
    for i in range(n):
        finite = finite and math.isfinite(micro[3 * i])
        loss += micro[3 * i] / n
        mtp += micro[3 * i + 1] / n
        aux += micro[3 * i + 2] / n
    return StepValues(loss, mtp, aux, grad_norm, finite)


def _averaged(values: list[StepValues], ddp: Distributed) -> list[StepValues]:
    """Each step's loss averaged over the processes, and non-finite where it is on any of them (the
    gradient norm is already the same on all: DDP averages the gradients, FSDP2's is summed whole)."""
    t = torch.tensor([[v.loss, float(not v.loss_finite)] for v in values], device=ddp.device)
    dist.all_reduce(t)
    return [StepValues(loss / ddp.world_size, v.mtp, v.aux, v.grad_norm, bad == 0)
            for v, (loss, bad) in zip(values, t.tolist())]
