"""`--mode train`: turn prepared token files into a model, on one device or under torchrun.

The loop: random windows of seq_len+1 tokens from the memory-mapped train split (a pure function of
seed and step, so the sampler's state is just the step: batches.py), AdamW (or Muon) with linear warm-up
and cosine decay (optim.py), gradient accumulation and clipping, evaluation on the validation split
(loss, perplexity, bits per byte: evaluate.py), atomic checkpoints (periodic, best, final, and on
SIGINT/SIGTERM), exact resume, a metrics JSONL file and a loss-curve PNG (metrics.py). Under torchrun:
DistributedDataParallel (NCCL on CUDA, gloo on CPU) or FSDP2 with `--fsdp` (distributed.py); only rank 0
writes. A time budget (--max-minutes without --steps) plans the run from its measured speed (budget.py).

This file reads top to bottom: the entry point, the run and its loop, then how the run is built.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import auto, budget
from . import checkpoint as ckpt
from . import pretrained
from .average import WeightAverage
from .batches import WindowSampler, window_loss
from .config import CUSTOM, Config, fmt_count, preset
from .distributed import (Distributed, allow_tf32, autocast_for, clip_gradients, setup_distributed,
                          teardown_distributed, use_compile, wrap_model)
from .evaluate import bytes_per_token, validate
from .hyperparameters import ResolvedHyperparameters, resolve_hyperparameters, validate_hyperparameters
from .metrics import MetricsLog, save_loss_curve
from .model import Qwen3NextForCausalLM
from .optim import build_optimizer, lr_at
from .settings import OPTIMIZERS, TrainSettings
from .step_values import PendingStep, read_steps
from .tokenizer import Tokenizer, check_same_tokenizer
from .util import UserError

AGREE_EVERY = 10  # steps: how often the processes of a torchrun agree on --max-minutes and signals

# ------------------------------------------------------------------------------------- entry point
def run_training(s: TrainSettings, prepare: Callable[[], object] | None = None) -> int:
    """Train as `s` says, on one device or under torchrun; `prepare` (rank 0, first) makes the data
    directory when it is to be prepared from text. Returns the exit code."""
    ddp = setup_distributed(s.device)
    run = None
    try:
        run = build_run(s, ddp, prepare)
        try:
            step, exit_code = run.loop()
            if exit_code != 1:
                run.finish(step)
        finally:
            run.metrics.close()  # TensorBoard's last events reach the disk, also when interrupted
        return exit_code
    finally:
        # the run (its DDP reducer holds the process group) goes first: freed after the group is destroyed,
        # gloo's destructor waits on a worker thread that waits for the GIL, and the process never exits
        run = None
        gc.collect()
        teardown_distributed(ddp)


# ------------------------------------------------------------------------------ the run and its loop
@dataclass
class TrainingRun:
    """One run: what it trains with (built once, by `build_run`), the state a checkpoint keeps, and its loop."""

    s: TrainSettings
    h: ResolvedHyperparameters
    ddp: Distributed
    console: Console
    start: Start
    data: TrainingData
    model: Qwen3NextForCausalLM
    train_model: torch.nn.Module  # the model compiled, wrapped for DDP or sharded with FSDP2
    optimizer: object  # optim.build_optimizer's
    average: WeightAverage | None  # --ema
    sampler: WindowSampler
    autocast: object
    pacer: budget.Pacer | None  # a time budget's plan and clock, kept in every checkpoint
    metrics: MetricsLog = field(init=False)

    def __post_init__(self):
        state = self.start.state or {}
        self.out_dir = self.start.out_dir
        self.start_step = state.get("step", 0)
        self.tokens_per_step = self.h.tokens_per_step(self.ddp.world_size)
        self.bytes_per_token = bytes_per_token(self.data.meta["splits"]["val"])
        self.eot_id = self.data.tokenizer.eot_id if self.h.document_masking else None  # packed documents kept apart
        self.best = dict(loss=state.get("best_val_loss", math.inf), step=state.get("best_step"))
        self.stale_evals = state.get("evals_without_improvement", 0)
        self.tokens_seen = state.get("tokens_seen", 0)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.record = self.s.record(self.h)
        self.t_start = time.perf_counter()
        tensorboard = (self.s.tensorboard_dir or self.out_dir / "tensorboard") if self.s.tensorboard else None
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.ddp.is_main,
                                  self.start_step if self.start.state else None, tensorboard)

    def loop(self) -> tuple[int, int]:
        """Train to the last step (or a stop). Returns (step reached, exit code).

        The steps' losses and gradient norms stay on the device until a step that prints, evaluates,
        saves or stops (`report`): a non-finite step found there stops the run before anything after it
        is evaluated or saved. --skip-nonfinite reads each step before its update."""
        h, say = self.h, self.console.say
        stop = _StopRequest(agreed=self.ddp.enabled)
        stop.install()
        self.t_start = time.perf_counter()
        bar = tqdm(total=h.steps, initial=self.start_step, disable=not self.ddp.is_main, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        step, exit_code, last_saved = self.start_step, 0, self.start_step if self.start.state else None
        self.window_t, self.window_tokens = time.perf_counter(), 0
        pending: list[PendingStep] = []  # issued, not read yet
        try:
            while step < h.steps:
                lr = self.learning_rate(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                done = PendingStep(step, lr, *self.forward_backward(step))
                if self.s.skip_nonfinite:  # whether to update is the host's decision: read the step now
                    [values] = read_steps([done], self.ddp)
                    if not values.finite:
                        self.optimizer.zero_grad(set_to_none=True)
                        say(f"step {step}: non-finite {values.what}; step skipped (--skip-nonfinite)")
                        step += 1
                        bar.update(1)
                        continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                if self.average is not None:
                    self.average.update(step)
                self.tokens_seen += self.tokens_per_step
                self.window_tokens += self.tokens_per_step
                done.tokens_seen = self.tokens_seen
                done.elapsed_s = self.elapsed_before + time.perf_counter() - self.t_start
                pending.append(done)
                bar.update(1)

                time_up = self.time_up(stop, step)
                if self.pacer is not None and self.pacer.due(step):
                    h = self.replan(step, bar)  # before this step's evaluation and save: they keep it
                evaluate = step % h.eval_every == 0 or step == h.steps or time_up  # a run cut short is still measured
                if evaluate or step % h.save_every == 0 or stop.signal is not None or step % self.s.print_every == 0:
                    bad = self.report(pending, bar)
                    pending = []
                    if bad is not None:
                        self.stop_nonfinite(bad.index, bad.values.what)
                        exit_code = 1
                        break
                if evaluate:
                    saved, early_stop = self.evaluate(step)
                    last_saved = step if saved else last_saved
                    if early_stop:
                        break
                if step % h.save_every == 0 and last_saved != step:
                    self.save(step, "periodic")
                    last_saved = step
                if stop.signal is not None:
                    say(f"{signal.Signals(stop.signal).name} received at step {step}: saving and stopping; "
                        "resume with --resume-from auto")
                    exit_code = 128 + stop.signal
                    break
                if time_up:
                    say(f"--max-minutes {self.s.max_minutes:g} reached at step {step}")
                    break
            if pending:  # --skip-nonfinite skipped the last step
                self.report(pending, bar)
            if exit_code != 1 and last_saved != step:
                self.save(step, "final")
        finally:
            bar.close()
            stop.restore()
        return step, exit_code

    # --- one optimizer step
    def forward_backward(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batches of `step`: forward, backward, the gradients clipped. Returns, on the device,
        ([micro-batches, 3]: each one's loss, MTP loss and auxiliary loss (0 where the model has none),
        the gradient norm before clipping)."""
        h, ddp, device = self.h, self.ddp, self.ddp.device
        losses = []
        for micro in range(h.grad_accum):
            x, y = self.sampler.batch(step, micro)  # checked against the vocabulary here, on the host
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = nullcontext()
            if ddp.enabled and not self.s.fsdp and micro < h.grad_accum - 1:
                sync = self.train_model.no_sync()
            with sync:
                out = window_loss(self.train_model, self.model, x, y, self.sampler.lead(step, micro), h.mtp_weight,
                                  self.autocast, self.eot_id, ids_checked=True)
                (out.loss / h.grad_accum).backward()  # outside autocast, as torch recommends
            zero = out.loss.new_zeros(())
            losses.append(torch.stack([v.detach().float() if v is not None else zero
                                       for v in (out.loss, out.mtp_loss, out.aux_loss)]))
        return torch.stack(losses), clip_gradients(self.model, h.max_grad_norm)

    def report(self, pending: list[PendingStep], bar) -> PendingStep | None:
        """Read the steps issued since the last report (one wait for the device), log them, and at
        --print-every say the last; tokens/s is measured over the print interval. Returns the first
        non-finite step (it and those after it are not logged), or None."""
        values = read_steps(pending, self.ddp)
        bad = next((p for p, v in zip(pending, values) if not v.finite), None)
        now = time.perf_counter()
        tok_s = round(self.window_tokens / max(now - self.window_t, 1e-9), 1)
        mtp_weight, is_moe = self.h.mtp_weight, self.start.config.is_moe
        for p, v in zip(pending, values):
            if p is bad:
                return bad
            record = {"step": p.index + 1, "loss": v.loss, "lr": p.lr, "grad_norm": v.grad_norm,
                      "tokens": p.tokens_seen, "tokens_per_s": tok_s, "elapsed_s": round(p.elapsed_s, 2)}
            if mtp_weight:
                record["mtp_loss"] = v.mtp
            if is_moe:
                record["aux_loss"] = v.aux
            self.metrics.add(record)
        if not pending:
            return None
        step, last, v = pending[-1].index + 1, pending[-1], values[-1]
        bar.set_postfix(loss=f"{v.loss:.4f}", lr=f"{last.lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % self.s.print_every == 0 or step == self.h.steps:
            extra = f" mtp {v.mtp:.4f}" if mtp_weight else ""
            extra += f" aux {v.aux:.4f}" if is_moe else ""
            self.console.say(f"step {step:>6}/{self.h.steps}  loss {v.loss:.4f}{extra}  lr {last.lr:.2e}  "
                             f"grad {v.grad_norm:.2f}  {tok_s:,.0f} tok/s")
            self.window_t, self.window_tokens = now, 0
            self.metrics.flush()
        return None

    def learning_rate(self, step: int) -> float:
        h, plan = self.h, self.pacer.plan if self.pacer is not None else None
        anchor = (plan.anchor_step, plan.anchor_progress) if plan is not None else (None, 0.0)
        return lr_at(step, h.learning_rate, h.min_lr, h.warmup_steps, h.steps, *anchor)

    def replan(self, step: int, bar) -> ResolvedHyperparameters:
        """The time budget re-planned at `step` from the speed measured since the last re-plan (budget.py)."""
        before, plan = self.h.steps, self.pacer.replan(step, self.ddp)
        if plan.steps != before:
            self.h, bar.total = replace(self.h, steps=plan.steps), plan.steps
            self.console.say(f"budget: at step {step}, {plan.describe_pace()} (was {before:,})")
        return self.h

    def stop_nonfinite(self, step: int, what: str) -> None:
        prev = ckpt.find_latest(self.out_dir) if self.ddp.is_main else None
        self.console.log(f"error: non-finite {what} at step {step}; stopping. The last good checkpoint is "
                         f"{prev or 'none (nothing saved yet)'}. Lower --learning-rate, or --skip-nonfinite.",
                         file=sys.stderr)

    def time_up(self, stop: _StopRequest, step: int) -> bool:
        """--max-minutes reached; under torchrun every rank takes the same decision (and signal), or the
        others would wait forever: they agree every AGREE_EVERY steps (and at the last), not at each."""
        # a budgeted run follows its plan (re-planned as it goes, budget.Pacer); without a plan, --max-minutes
        # cuts the run short
        time_up = bool(self.s.max_minutes and self.pacer is None
                       and (time.perf_counter() - self.t_start) / 60 >= self.s.max_minutes)
        if self.ddp.enabled:
            if step % AGREE_EVERY and step != self.h.steps:
                return False
            flags = torch.tensor([stop.received or 0, int(time_up)], device=self.ddp.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop.signal, time_up = (int(flags[0]) or None), bool(flags[1])
        return time_up

    # --- evaluation
    def evaluate(self, step: int) -> tuple[bool, bool]:
        """Validate, keep the best checkpoint. Returns (saved a checkpoint, stop early)."""
        with self.pacer.overhead(evaluation=True) if self.pacer is not None else nullcontext():
            return self._evaluate(step)

    def _evaluate(self, step: int) -> tuple[bool, bool]:
        h, data = self.h, self.data
        with self.average.applied() if self.average is not None else nullcontext():  # the model a checkpoint holds
            ev = validate(self.train_model, data.val, h.seq_len, h.batch_size, h.eval_batches, self.ddp.device,
                          self.bytes_per_token, self.autocast, self.ddp, self.eot_id, data.val_mask)
        self.metrics.add({"step": step, **ev})
        bpb = f"  bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
        self.console.say(f"eval {step:>6}: val loss {ev['val_loss']:.4f}  ppl {ev['val_ppl']:.2f}{bpb}")
        self.metrics.flush()
        self.write_loss_curve()
        if ev["val_loss"] < self.best["loss"] - self.s.early_stop_min_delta:
            self.best.update(loss=ev["val_loss"], step=step)
            self.stale_evals = 0
            path = self.save(step, "best")
            if path is not None:
                ckpt.point(self.out_dir, "best", path)
            return True, False
        self.stale_evals += 1
        if self.s.early_stop_patience and self.stale_evals >= self.s.early_stop_patience:
            self.console.log(f"early stop: no improvement for {self.stale_evals} evaluations (best "
                             f"{self.best['loss']:.4f} at step {self.best['step']})")
            return False, True
        return False, False

    def write_loss_curve(self) -> None:
        if self.ddp.is_main:
            save_loss_curve(self.metrics.records, self.out_dir / "loss_curve.png",
                            f"{self.start.preset} on {self.data.directory}")

    # --- saving
    def save(self, step: int, reason: str) -> Path | None:
        """Rank 0 writes. A write the system refuses (a full disk, ...) stops the run, every rank, with
        one line (exit code 2): the checkpoints written before are intact, and --resume-from auto goes on
        from the last of them once there is room."""
        with self.pacer.overhead(evaluation=False) if self.pacer is not None else nullcontext():
            return self._save(step, reason)

    def _save(self, step: int, reason: str) -> Path | None:
        path = failure = None
        ddp = self.ddp
        gathered = self.gather() if self.s.fsdp or ddp.is_main else None  # FSDP: all ranks
        if ddp.is_main:
            try:
                path = ckpt.save_checkpoint(self.out_dir, step, self.model, self.optimizer, self.trainer_state(step),
                                            self.start.config, self.data.tokenizer.path, gathered)
                ckpt.prune(self.out_dir, self.s.keep_last)
                self.console.say(f"saved {reason} checkpoint: {path}")
            except (OSError, UserError) as e:
                last = ckpt.find_latest(self.out_dir)
                what = e if isinstance(e, UserError) else f"could not save step {step}'s checkpoint: {e.strerror or e}"
                failure = f"{what}; " + (f"the last checkpoint, {last}, is intact: continue with --resume-from auto"
                                         if last else "no checkpoint was saved")
        stop = failure is not None
        if ddp.enabled:  # every rank stops together (the all-reduce is also the barrier)
            flag = torch.tensor([int(stop)], device=ddp.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag)
        if stop:
            raise UserError(failure or f"rank 0 could not save the checkpoint of step {step}")
        return path

    def gather(self) -> dict:
        """The checkpoint's tensors; with --ema its model is the average, and the training weights go on
        beside the optimiser's state."""
        gathered = ckpt.gather_state(self.model, self.optimizer)
        if self.average is None:
            return gathered
        with self.average.applied():
            return {**gathered, "model": ckpt.model_tensors(self.model), "training_weights": gathered["model"]}

    def trainer_state(self, step: int) -> dict:
        h = self.h
        elapsed, plan = (self.pacer.state() if self.pacer is not None
                         else (self.elapsed_before + (time.perf_counter() - self.t_start), None))
        return {"preset": self.start.preset, "tokens_seen": self.tokens_seen, "best_val_loss": self.best["loss"],
                "best_step": self.best["step"], "evals_without_improvement": self.stale_evals,
                "elapsed_s": elapsed,
                "sampler": {"kind": "WindowSampler", "seed": h.seed, "next_step": step},
                "scheduler": {"kind": "warmup_cosine", "learning_rate": h.learning_rate, "min_lr": h.min_lr,
                              "warmup_steps": h.warmup_steps, "steps": h.steps},
                "budget": plan,
                "args": self.record, "tokenizer_sha256": self.data.tokenizer.sha256,
                "data_dir": str(self.data.directory), "world_size": self.ddp.world_size,
                "tokens_per_step": self.tokens_per_step}

    def finish(self, step: int) -> None:
        """The loss curve and the last line (rank 0), after a run that did not fail."""
        if self.ddp.is_main and self.metrics.records:
            self.write_loss_curve()
            self.console.log(f"done: step {step}, {self.tokens_seen:,} tokens, best val loss {self.best['loss']:.4f} "
                             f"(step {self.best['step']}); checkpoint {ckpt.find_latest(self.out_dir)}; "
                             f"loss curve {self.out_dir / 'loss_curve.png'}")


class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT stops at once. With
    `agreed` (torchrun), the loop acts on a signal once all processes know of it (`time_up`)."""

    def __init__(self, agreed: bool = False):
        self.received: int | None = None  # by this process
        self.signal: int | None = None  # the one the loop acts on
        self.agreed = agreed
        self._old = {}

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if not self.agreed:
            self.signal = signum


# --------------------------------------------------------------------------------- building the run
def build_run(s: TrainSettings, ddp: Distributed, prepare: Callable[[], object] | None) -> TrainingRun:
    """Everything a run trains with, in the order the checks fail: the data, where the run starts, its
    hyperparameters, the model on its device and the optimiser (restored when resuming), the time budget's
    plan (measured), the run directory."""
    t_launch = budget.clock()  # a time budget counts from here
    console = Console(ddp.is_main)
    meta, tokenizer = _load_data(s, ddp, prepare)
    data = _open_splits(s.data_dir, meta, tokenizer)
    start = _starting_point(s, tokenizer, console, len(data.train), ddp.device.type)
    h = _hyperparameters(s, start, data, ddp, console)
    asked = s.compile if s.compile is not None else ((start.state or {}).get("args") or {}).get("compile")
    # a resume keeps its choice
    s = replace(s, compile=use_compile(asked, s.max_minutes, s.hyper.steps, ddp.device, h.lead_in))

    model, kernel, n_params = _build_model(s, start, h.seed, ddp, h.dropout, h.activation_checkpointing)
    train_model = wrap_model(model, ddp, s.fsdp, s.compile)
    # the average starts from the weights the checkpoint hands out (with --ema, its average); training
    # goes on from its training weights
    average = WeightAverage(model, h.ema) if h.ema else None
    optimizer = _optimizer(model, h, s, start)
    dtype, autocast = autocast_for(s.dtype, ddp.device)
    if allow_tf32(dtype, ddp.device):
        dtype += " (TF32 matmuls)"
    sampler = WindowSampler(data.train, h.seq_len, h.batch_size, h.seed, ddp.rank, ddp.world_size,
                            data.train_mask, h.lead_in, start.config.vocab_size)
    # with --max-minutes and no --steps, the measured speed fixes steps, warm-up and evaluation interval
    cap = (auto.max_steps(len(data.train), h.tokens_per_step(ddp.world_size), start.config.num_hidden_layers)
           if start.preset == auto.NAME else None)
    plan = _budget_plan(s, h, start.state, (model, train_model, optimizer), sampler, data, autocast, ddp,
                        t_launch, console.log, cap)
    pacer = budget.Pacer.for_run(plan, t_launch, start.state) if plan is not None else None
    if plan is not None:
        h = replace(h, steps=plan.steps, warmup_steps=plan.warmup_steps, eval_every=plan.eval_every)
        # --config auto: the dropout and weight decay for the passes the measured speed allows
        chosen = auto.measured_choices(len(data.train), plan.steps * h.tokens_per_step(ddp.world_size),
                                       start.config.num_hidden_layers)
        chosen = {k: v for k, v in chosen.items() if getattr(s.hyper, k) is None and getattr(h, k) != v}
        if chosen and start.preset == auto.NAME and start.state is None:
            h = replace(h, **chosen)
            model.set_dropout(h.dropout, (ddp.rank, ddp.world_size))
            optimizer = _optimizer(model, h, s, start)  # fresh: the measurement's steps left no state
    if start.preset == auto.NAME and start.state is None:
        console.log(auto.describe(h, start.config))
    _describe(s, h, ddp, start, data, n_params, kernel, dtype, console.log)
    if ddp.is_main:
        start.out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(start.out_dir, os.W_OK):
            raise UserError(f"output directory {start.out_dir} is not writable")
    return TrainingRun(s, h, ddp, console, start, data, model, train_model, optimizer, average, sampler, autocast,
                       pacer)


@dataclass
class Console:
    """Lines for the user, from rank 0 only."""

    enabled: bool

    def log(self, *a, **k):
        if self.enabled:
            print(*a, **k)

    def say(self, msg: str):  # a line that does not break the progress bar
        if self.enabled:
            tqdm.write(msg, file=sys.stderr)


def _load_data(s: TrainSettings, ddp: Distributed, prepare: Callable[[], object] | None):
    """Prepare the data directory first when asked (rank 0); return (meta, tokenizer)."""
    from .data import load_meta, load_tokenizer

    if prepare is not None:
        if ddp.is_main:
            prepare()
        if ddp.enabled:
            dist.barrier()
    elif not (s.data_dir / "meta.json").is_file():
        raise UserError(f"no prepared data in {s.data_dir}/ (meta.json missing): run --mode prepare_data "
                        "first, or pass --train-data")
    return load_meta(s.data_dir), load_tokenizer(s.data_dir)


@dataclass(frozen=True)
class TrainingData:
    """The prepared data a run reads: token splits (memory maps) and, for chat data, their loss masks."""

    directory: Path
    meta: dict
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    train_mask: np.ndarray | None
    val_mask: np.ndarray | None


def _open_splits(data_dir: Path, meta: dict, tokenizer: Tokenizer) -> TrainingData:
    from .data import open_loss_mask, open_split

    masks = [open_loss_mask(data_dir, meta, split) for split in ("train", "val")]
    return TrainingData(data_dir, meta, tokenizer, open_split(data_dir, "train"), open_split(data_dir, "val"), *masks)


@dataclass
class Start:
    """Where a run starts: its model, its run directory, and the checkpoint it resumes (if any)."""

    preset: str
    config: Config
    out_dir: Path
    resume_path: Path | None = None
    state: dict | None = None


def _starting_point(s: TrainSettings, tokenizer: Tokenizer, console: Console, train_tokens: int,
                    device_type: str) -> Start:
    """A resumed checkpoint, --init-from weights, or a fresh preset (--config auto's sized for
    `train_tokens` and the budget on `device_type`); the model's vocabulary checked."""
    from .data import check_vocab

    preset_name = s.preset
    out_dir = s.out_dir or Path(f"runs/{preset_name or auto.NAME}")
    resume_path = None
    if s.resume_from == "auto":
        resume_path = ckpt.find_latest(out_dir, verify=True, say=console.say)  # rank 0 says it, once
        console.log(f"resume: from {resume_path}" if resume_path else
                    f"resume: no checkpoint in {out_dir}, starting fresh")
    elif s.resume_from:
        resume_path = ckpt.resolve_checkpoint(s.resume_from)
    if resume_path is not None:
        state = ckpt.read_state(resume_path)
        if preset_name and state.get("preset") and preset_name != state["preset"]:
            raise UserError(f"checkpoint {resume_path} is a {state['preset']} model, not {preset_name}")
        check_same_tokenizer(tokenizer, state.get("tokenizer_sha256"), f"checkpoint {resume_path} was trained with "
                             f"another tokenizer than the one in {s.data_dir}")
        start = Start(state.get("preset") or preset_name, ckpt.load_config(resume_path),
                      s.out_dir or resume_path.parent, resume_path, state)
    elif s.init_from:
        start = Start(preset_name or CUSTOM, pretrained.load_pretrained_config(s.init_from), out_dir)
        init_tok = pretrained.tokenizer_file(s.init_from)
        if init_tok is not None:
            check_same_tokenizer(tokenizer, Tokenizer.load(init_tok).sha256,
                                 f"{s.data_dir} was tokenized with another tokenizer than the model at {s.init_from}",
                                 f"; prepare the data with --tokenizer {init_tok}")
    elif preset_name in (None, auto.NAME):  # --config auto, the default of a fresh run
        layers = auto.layers(train_tokens, s.max_minutes, device_type)
        start = Start(auto.NAME, auto.model_config(tokenizer.vocab_size, layers), out_dir)
    else:
        start = Start(preset_name, check_vocab(preset(preset_name), tokenizer, s.allow_vocab_mismatch), out_dir)
    if start.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {start.config.vocab_size}")
    start.config = start.config.replace(eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id)
    if s.hyper.mtp_weight and not start.config.mtp_num_hidden_layers:
        start.config = start.config.replace(mtp_num_hidden_layers=1)
    return start


def _hyperparameters(s: TrainSettings, start: Start, data: TrainingData, ddp: Distributed,
                     console: Console) -> ResolvedHyperparameters:
    """The run's hyperparameters resolved (see hyperparameters.py) and checked against model and data."""
    hyper = s.hyper
    # chat data carry loss masks (only assistant replies count), and conversations packed in a window
    # do not see each other: document masking is on unless the command line says otherwise
    if data.train_mask is not None and hyper.document_masking is None:
        hyper = replace(hyper, document_masking=True)
    resumed = (start.state or {}).get("args", {}) if start.state else None
    h = resolve_hyperparameters(hyper, resumed, start.preset, len(data.train), s.max_minutes, ddp.device.type, s.fsdp)
    validate_hyperparameters(h, start.config, len(data.train))
    return h


def _build_model(s: TrainSettings, start: Start, seed: int, ddp: Distributed, dropout: float = 0.0,
                 activation_checkpointing: bool = False):
    """The model on its device with its kernel, from the checkpoint or --init-from when given.
    Returns (model, kernel, number of parameters)."""
    device = ddp.device
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(start.config)
    if s.init_from and start.resume_path is None:
        pretrained.load_pretrained_weights(model, s.init_from)
    if start.resume_path is not None:
        ckpt.load_weights(model, ckpt.load_tensors(start.resume_path / ckpt.MODEL_FILE), start.resume_path)
    model.to(device)
    model.set_dropout(dropout, (ddp.rank, ddp.world_size))  # training settings, never saved with the model
    model.set_activation_checkpointing(activation_checkpointing)
    kernel = model.set_kernel(s.kernel, device)
    model.train()
    return model, kernel, model.num_parameters()  # counted before FSDP turns parameters into shards


def _optimizer(model: Qwen3NextForCausalLM, h: ResolvedHyperparameters, s: TrainSettings, start: Start):
    """The optimizer; when resuming, the training weights (--ema), its state and the random generators
    as the checkpoint saved them (its optimizer.safetensors read once for all three)."""
    saved = ckpt.load_tensors(start.resume_path / ckpt.OPTIM_FILE) if start.resume_path is not None else None
    if saved is not None:
        ckpt.load_training_weights(model, start.resume_path, saved)
    problem = OPTIMIZERS[h.optimizer].fsdp_problem
    if problem and s.fsdp:  # a resumed run
        raise UserError(f"this run was trained with --optimizer {h.optimizer}, which does not work with --fsdp "
                        f"({problem}); resume it with DDP (torchrun without --fsdp)")
    optimizer = build_optimizer(model, h.learning_rate, h.weight_decay, (h.beta1, h.beta2),
                                decay_norms=not h.no_decay_norms, kind=h.optimizer)
    if saved is not None:
        ckpt.load_optimizer(model, optimizer, start.resume_path, saved)
        ckpt.restore_rng(start.resume_path, start.state, saved)
    return optimizer


def _budget_plan(s: TrainSettings, h: ResolvedHyperparameters, state: dict | None, modules: tuple,
                 sampler: WindowSampler, data: TrainingData, autocast, ddp: Distributed, t_launch: float, log,
                 max_steps: int | None = None) -> budget.Plan | None:
    """The time budget's plan (see budget.py); None without a budget. A resumed budgeted run keeps its
    checkpoint's plan; a fresh one measures a few throw-away steps and one evaluation first. `max_steps`:
    --config auto's cap."""
    if state and state.get("budget"):
        plan = budget.Plan.from_dict(state["budget"])
        log(plan.describe())
        return plan
    if s.max_minutes is None or s.hyper.steps is not None or state:
        return None  # --steps given (--max-minutes then only cuts the run short), or no budget
    model, train_model, optimizer = modules
    device = ddp.device
    eot = data.tokenizer.eot_id if h.document_masking else None

    def train_step():
        for micro in range(h.grad_accum):
            x, y = (t.to(device) for t in sampler.batch(0, micro))
            loss = window_loss(train_model, model, x, y, sampler.lead(0, micro), h.mtp_weight, autocast, eot,
                               ids_checked=True).loss
            (loss / h.grad_accum).backward()
        clip_gradients(model, h.max_grad_norm)
        optimizer.step()  # timed too: Muon's orthogonalisation is a fair share of a step on a CPU
        optimizer.zero_grad(set_to_none=True)

    def evaluate_once():
        return validate(train_model, data.val, h.seq_len, h.batch_size, h.eval_batches, device,
                        bytes_per_token(data.meta["splits"]["val"]), autocast, ddp, eot)

    # weights + AdamW moments (+ the training weights beside an average), written at ~100 MB/s
    save_s = (12 + 4 * bool(h.ema)) * model.num_parameters() / 100e6
    plan = budget.measured_plan(s.max_minutes, budget.throwaway(train_step, model, optimizer), evaluate_once,
                                bool(s.compile), save_s, t_launch, ddp, log, s.hyper.warmup_steps,
                                s.hyper.eval_every, max_steps)
    if max_steps is not None and plan.steps == max_steps:
        log(f"--config auto: the budget allows more than {auto.MAX_PASSES:g} passes over the training text, "
            f"and more overfit: the run stops at {max_steps:,} steps, before its budget")
    return plan


def _describe(s: TrainSettings, h: ResolvedHyperparameters, ddp: Distributed, start: Start, data: TrainingData,
              n_params: int, kernel: str, dtype: str, log) -> None:
    split, tokens_per_step = data.meta["splits"], h.tokens_per_step(ddp.world_size)
    start_step = (start.state or {}).get("step", 0)
    log(f"model: {start.preset}, {n_params:,} parameters ({fmt_count(n_params)})")
    log(f"device: {ddp.device}   kernel: {kernel}   dtype: {dtype}   compile: {bool(s.compile)}"
        f"{'   world size: ' + str(ddp.world_size) + (' (FSDP2)' if s.fsdp else ' (DDP)') if ddp.enabled else ''}")
    log(f"data: {data.directory} ({split['train']['tokens']:,} train / {split['val']['tokens']:,} validation tokens)")
    log(f"batch: {h.batch_size} x {h.seq_len} tokens x {h.grad_accum} accumulation x {ddp.world_size} process(es) "
        f"= {tokens_per_step:,} tokens per step (global batch {h.batch_size * h.grad_accum * ddp.world_size})")
    log(f"plan: steps {start_step} -> {h.steps}, {tokens_per_step * max(0, h.steps - start_step):,} tokens; "
        f"lr {h.learning_rate:g} (warm-up {h.warmup_steps}, cosine to {h.min_lr:g})"
        f"{f'; weights averaged (--ema {h.ema:g})' if h.ema else ''}; out: {start.out_dir}")
