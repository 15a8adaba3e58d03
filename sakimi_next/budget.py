"""A training run with a time budget: `--mode train --max-minutes M` without `--steps`.

The run first measures itself: a few whole training steps, the optimiser's included, whose updates are
thrown away (the weights, the optimiser and the random generators are put back as they were; with
--compile they also compile) and one evaluation. From those speeds `plan` fixes how many steps fit in
the budget, the warm-up and how often to evaluate, so that the whole schedule (warm-up, cosine decay to
--min-lr, a last evaluation at the end) fits in M minutes.

A machine does not keep the speed of its first seconds (a shared host slows down, a cold one warms up),
so the run re-plans as it goes (`Pacer`): at every evaluation point, from the speed it measured since the
last one and the time it has left, `replan` moves the last step, and the learning-rate decay still to come
is spread over the steps up to it (optim.decay_progress: the rate stays continuous, the end is still
--min-lr). The plan and what the pacer has measured since the last re-plan are written into every
checkpoint: a resumed run replays the decisions taken before it, and takes the later ones from its own
clock (on the same clock, the uninterrupted run's, bit for bit).
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist

from .distributed import Distributed
from .optim import decay_progress, optimizer_parts
from .util import UserError

WARMUP_FRACTION = 0.05  # of the planned steps (nanoGPT's Shakespeare recipe warms up over 2%, GPT-3 ~0.5%-2%)
MAX_WARMUP_STEPS = 200
EVAL_FRACTION = 0.08  # at most this share of the budget goes to evaluations (and the checkpoints they save)
MAX_EVALS = 20  # enough points for the curve and to catch the best checkpoint; more only costs time
WARM_STEPS, TIMED_STEPS = 1, 4  # measured start: steps run untimed (allocation, compilation), then timed
# re-plans over a run: a machine that slows down after the last one overruns by at most that share of the
# run times the slow-down; each costs two clock readings (and an all-reduce under torchrun)
REPLANS = 40


@dataclass(frozen=True)
class Plan:
    minutes: float  # the budget
    setup_s: float  # spent before the first step: loading, building, compiling, measuring
    step_s: float  # measured seconds per optimizer step
    eval_s: float  # measured seconds per evaluation, plus an estimate of the checkpoint it may save
    steps: int
    warmup_steps: int
    eval_every: int
    save_s: float = 0.0  # the estimate of one checkpoint's writing (the last one must fit too)
    replan_every: int = 0  # steps between re-plans, fixed by the first plan (0: a plan from before re-planning)
    max_steps: int | None = None  # never more steps than this (--config auto's cap), however fast the machine
    # the learning-rate decay's progress (0 -> 1) at the step of the last re-plan (None: none yet)
    anchor_step: int | None = None
    anchor_progress: float = 0.0
    replans: tuple[tuple[int, int], ...] = ()  # (step, steps planned then) at each re-plan that moved the end

    def to_dict(self) -> dict:
        return {**asdict(self), "replans": [list(r) for r in self.replans]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """A checkpoint's plan (one from before re-planning: the fields it lacks at their defaults)."""
        given = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**{**given, "replans": tuple(tuple(r) for r in given.get("replans", ()))})

    def progress(self, step: int) -> float:
        """How far the learning-rate decay has gone at `step` (optim.decay_progress)."""
        return decay_progress(step, self.warmup_steps, self.steps, self.anchor_step, self.anchor_progress)

    def describe(self) -> str:
        return (f"budget {self.minutes:g} min: {self.setup_s:.0f} s to start, {self.step_s:.2f} s a step, "
                f"{self.eval_s:.1f} s an evaluation -> {self.steps:,} steps, warm-up {self.warmup_steps}, "
                f"evaluation every {self.eval_every}")

    def describe_pace(self) -> str:
        return f"{self.step_s:.2f} s a step and {self.eval_s:.1f} s an evaluation: the run ends at step {self.steps:,}"


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
                eval_every, replan_every=max(1, steps // REPLANS), max_steps=max_steps)


def replan(p: Plan, step: int, elapsed_s: float, step_s: float, eval_s: float) -> Plan:
    """The plan from `step` on, `elapsed_s` into the budget, when a step now takes `step_s` and an
    evaluation (with the checkpoint it may save) `eval_s`: as many more steps as the time left holds,
    with an evaluation every `eval_every` steps and, at the end, one more and the last checkpoint
    (`save_s`); never past `max_steps`, and none at all when the time is up. The decay's progress at
    `step` is kept (the anchor) and the rest of it spread over the steps up to the new end."""
    left = p.minutes * 60 - elapsed_s - eval_s - p.save_s
    per_step = step_s + eval_s / p.eval_every
    steps = step + max(0, int(left / per_step)) if per_step > 0 else p.steps
    if p.max_steps is not None:
        steps = min(steps, p.max_steps)
    if steps == p.steps:
        return replace(p, step_s=round(step_s, 4), eval_s=round(eval_s, 3))
    anchor = (step, p.progress(step)) if step > p.warmup_steps else (p.anchor_step, p.anchor_progress)
    return replace(p, step_s=round(step_s, 4), eval_s=round(eval_s, 3), steps=steps, anchor_step=anchor[0],
                   anchor_progress=anchor[1], replans=p.replans + ((step, steps),))


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
    result = replace(plan(minutes, setup_s, step_s, eval_s, warmup_steps, eval_every, max_steps),
                     save_s=round(save_s, 3))
    log(f"eval      0: val loss {ev['val_loss']:.4f}" + (f"  bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""))
    log(result.describe())
    return result


class Pacer:
    """A budgeted run's clock: the time spent on the budget (`elapsed`: the checkpoint's, plus this process's
    since `t0`, its start-up included), and since the last re-plan (the window) the seconds, and those of them
    spent evaluating and saving (`overhead`), from which `replan` measures the speed of a step and of an
    evaluation. The window is part of the checkpoint's state (`state`), so a resumed run measures on."""

    def __init__(self, plan: Plan, t0: float, elapsed_before: float = 0.0, pace: dict | None = None, step: int = 0):
        self.plan, self.t0, self.elapsed_before = plan, t0, elapsed_before
        pace = pace or {"step": step, "start_s": plan.setup_s if step == 0 else elapsed_before}
        self.window_step, self.window_start_s = pace["step"], pace["start_s"]
        self.overhead_s = pace.get("overhead_s", 0.0)
        self.evals_s, self.evals = pace.get("evals_s", 0.0), pace.get("evals", 0)
        self.episode: tuple[float, bool] | None = None  # (when the current evaluation or save began, is evaluation)

    @classmethod
    def for_run(cls, plan: Plan, t_launch: float, state: dict | None) -> "Pacer":
        """The pacer of a fresh run (`state` None) or of one resumed from a checkpoint's `state`."""
        state = state or {}
        return cls(plan, t_launch, state.get("elapsed_s", 0.0), (state.get("budget") or {}).get("pace"),
                   state.get("step", 0))

    def elapsed(self) -> float:
        return self.elapsed_before + clock() - self.t0

    @contextmanager
    def overhead(self, evaluation: bool):
        """Time spent on an evaluation (with the checkpoint it may save) or a save, not on steps."""
        if self.episode is not None:  # the save of an evaluation: its time is the evaluation's
            yield
            return
        self.episode = (self.elapsed(), evaluation)
        try:
            yield
        finally:
            self._close_episode(self.elapsed())
            self.episode = None

    def _close_episode(self, now_s: float) -> None:
        began, evaluation = self.episode
        self.overhead_s += now_s - began
        if evaluation:
            self.evals_s += now_s - began
            self.evals += 1

    def due(self, step: int) -> bool:
        """A re-plan point: every `replan_every` steps before the last (deterministic: a resumed run re-plans
        where the uninterrupted one did)."""
        every = self.plan.replan_every or self.plan.eval_every
        return step % every == 0 and self.window_step < step < self.plan.steps

    def replan(self, step: int, ddp: Distributed) -> Plan:
        """The plan from `step` on (`replan`) from what this window measured; under torchrun every rank
        plans from the slowest one's numbers (the same on all), so they agree."""
        now_s = self.elapsed()
        numbers = torch.tensor([now_s, now_s - self.window_start_s, self.overhead_s, self.evals_s],
                               dtype=torch.float64)
        if ddp.enabled:
            numbers = numbers.to(ddp.device)
            dist.all_reduce(numbers, op=dist.ReduceOp.MAX)
        now_s, window_s, overhead_s, evals_s = numbers.tolist()
        p = self.plan
        step_s = (window_s - overhead_s) / (step - self.window_step)
        eval_s = evals_s / self.evals if self.evals else p.eval_s
        self.plan = replan(p, step, now_s, step_s if step_s > 0 else p.step_s, eval_s)
        self.window_step, self.window_start_s, self.overhead_s, self.evals_s, self.evals = step, now_s, 0.0, 0.0, 0
        return self.plan

    def state(self) -> tuple[float, dict]:
        """(the elapsed time, the plan with the window) for a checkpoint written now: an evaluation or save
        under way counts up to now, as the resumed run's clock starts from now."""
        now_s = self.elapsed()
        pace = {"step": self.window_step, "start_s": self.window_start_s, "overhead_s": self.overhead_s,
                "evals_s": self.evals_s, "evals": self.evals}
        if self.episode is not None:
            began, evaluation = self.episode
            pace["overhead_s"] += now_s - began
            if evaluation:
                pace["evals_s"] += now_s - began
                pace["evals"] += 1
        return now_s, {**self.plan.to_dict(), "pace": pace}
