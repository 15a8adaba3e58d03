"""A training run with a time budget: `--mode train --max-minutes M` without `--steps`.

The run first measures itself: a few whole training steps, the optimiser's included, whose updates are
thrown away (the weights, the optimiser and the random generators are put back as they were; with
--compile they also compile) and one evaluation. From those speeds `plan` fixes how many steps fit in
the budget, the warm-up and how often to evaluate, so that the whole schedule (warm-up, cosine decay to
--min-lr, a last evaluation at the end) fits in M minutes. The plan is written into every checkpoint: a
resumed run keeps it and reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .distributed import Distributed
from .optim import optimizer_parts
from .util import UserError

WARMUP_FRACTION = 0.05  # of the planned steps (nanoGPT's Shakespeare recipe warms up over 2%, GPT-3 ~0.5%-2%)
MAX_WARMUP_STEPS = 200
EVAL_FRACTION = 0.08  # at most this share of the budget goes to evaluations (and the checkpoints they save)
MAX_EVALS = 20  # enough points for the curve and to catch the best checkpoint; more only costs time
WARM_STEPS, TIMED_STEPS = 1, 4  # measured start: steps run untimed (allocation, compilation), then timed


@dataclass(frozen=True)
class Plan:
    minutes: float  # the budget
    setup_s: float  # spent before the first step: loading, building, compiling, measuring
    step_s: float  # measured seconds per optimizer step
    eval_s: float  # measured seconds per evaluation, plus an estimate of the checkpoint it may save
    steps: int
    warmup_steps: int
    eval_every: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        return (f"budget {self.minutes:g} min: {self.setup_s:.0f} s to start, {self.step_s:.2f} s a step, "
                f"{self.eval_s:.1f} s an evaluation -> {self.steps:,} steps, warm-up {self.warmup_steps}, "
                f"evaluation every {self.eval_every}")


def check_minutes(minutes: float) -> None:
    if not (math.isfinite(minutes) and minutes > 0):
        raise UserError(f"--max-minutes ({minutes}) must be a positive number of minutes")


def plan(minutes: float, setup_s: float, step_s: float, eval_s: float, warmup_steps: int | None = None,
         eval_every: int | None = None, max_steps: int | None = None) -> Plan:
    """The schedule that fits `minutes`: as many steps as the time left after setup and evaluations
    allows, at most MAX_EVALS evaluations taking at most EVAL_FRACTION of the budget (at least one, at
    the end). `warmup_steps`/`eval_every`: the user's, else derived from the step count. `max_steps`:
    never more steps than this (the run then ends before its budget)."""
    check_minutes(minutes)
    left = minutes * 60 - setup_s
    if left < eval_s + step_s:
        raise UserError(f"--max-minutes {minutes:g} is too short: starting took {setup_s:.0f} s, and one step "
                        f"({step_s:.1f} s) and one evaluation ({eval_s:.1f} s) do not fit in what is left; "
                        "give more minutes, or fewer --eval-batches")
    n_evals = max(1, min(MAX_EVALS, int(EVAL_FRACTION * left / eval_s) if eval_s > 0 else MAX_EVALS))
    steps = max(1, int((left - n_evals * eval_s) / step_s))
    if max_steps is not None:
        steps = min(steps, max_steps)
    if eval_every is None:
        eval_every = math.ceil(steps / n_evals)
    if warmup_steps is None:
        warmup_steps = min(MAX_WARMUP_STEPS, round(WARMUP_FRACTION * steps))
    return Plan(minutes, round(setup_s, 3), round(step_s, 4), round(eval_s, 3), steps, min(warmup_steps, steps),
                eval_every)


def clock() -> float:
    """Seconds, for everything a plan is made from (tests replace it with a fake clock)."""
    return time.perf_counter()


def measure(train_step: Callable[[], None], evaluate: Callable[[], object],
            compiled: bool = False) -> tuple[float, float, object]:
    """(seconds per step: the median of TIMED_STEPS after WARM_STEPS untimed, seconds for one
    evaluation, what the evaluation returned). The callables must leave the model as they found it.
    `compiled`: the first evaluation compiles its own graph, so a second one is timed."""
    for _ in range(WARM_STEPS):
        train_step()
    if compiled:
        evaluate()
    times = []
    for _ in range(TIMED_STEPS):
        t0 = clock()
        train_step()
        times.append(clock() - t0)
    t0 = clock()
    result = evaluate()
    return statistics.median(times), clock() - t0, result


def throwaway(train_step: Callable[[], None], model: torch.nn.Module, optimizer) -> Callable[[], None]:
    """`train_step` (one whole training step, the optimiser's included) made to leave no trace: after it,
    the weights as they are now and a fresh optimiser state are put back."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def step():
        train_step()
        forget_step(model, optimizer, initial)
    return step


def forget_step(model: torch.nn.Module, optimizer, initial: dict[str, torch.Tensor]) -> None:
    """Put back the weights `initial` (a copy of the state dict) and a fresh optimiser: a throw-away
    step leaves no trace."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            value.copy_(initial[name])
    for part in optimizer_parts(optimizer):
        part.state.clear()


def measured_plan(minutes: float, train_step: Callable[[], None], evaluate: Callable[[], dict], compiled: bool,
                  save_s: float, t_launch: float, ddp: Distributed, log: Callable[[str], None],
                  warmup_steps: int | None, eval_every: int | None, max_steps: int | None) -> Plan:
    """The plan of a fresh budgeted run from its measured speed: `train_step` (a throw-away step) and
    `evaluate` timed (`measure`; the random generators stay as they were), plus `save_s` for the
    checkpoint an evaluation may save, and the time since `t_launch` (`clock`) as the setup's."""
    device = ddp.device
    log(f"budget: measuring the speed ({WARM_STEPS + TIMED_STEPS} throw-away steps, one evaluation)")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        step_s, eval_s, ev = measure(train_step, evaluate, compiled=compiled)
    times = torch.tensor([step_s, eval_s + save_s, clock() - t_launch], dtype=torch.float64)
    if ddp.enabled:  # every rank must plan the same schedule: the slowest one's
        times = times.to(device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    step_s, eval_s, setup_s = times.tolist()
    result = plan(minutes, setup_s, step_s, eval_s, warmup_steps, eval_every, max_steps)
    log(f"eval      0: val loss {ev['val_loss']:.4f}" + (f"  bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""))
    log(result.describe())
    return result
