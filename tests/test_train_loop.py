"""The training loop keeps its values on the device and reads them at --print-every: it logs the same
numbers as a plain loop that reads every micro-batch's loss and the gradient norm at once (`reference`),
with gradient accumulation, MTP, a non-finite step (stopped or skipped), and under two processes; and
between print steps it reads nothing from the device."""

import json
import math
import os
import re

import pytest
import torch

from sakimi_next import checkpoint as ckpt
from sakimi_next.batches import window_loss
from sakimi_next.distributed import Distributed
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.optim import lr_at
from sakimi_next.settings import Hyperparameters, TrainSettings
from sakimi_next.train import TrainingRun, build_run

from .helpers import english_text


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from sakimi_next.data import prepare_data

    root = tmp_path_factory.mktemp("data")
    (root / "text.txt").write_text(english_text(100_000))
    return prepare_data([str(root / "text.txt")], None, root / "prepared", vocab_size=2048, doc_split="blank-line")


def settings(data_dir, out, steps=5, print_every=1, skip_nonfinite=False, **hyper) -> TrainSettings:
    hyper = Hyperparameters(steps=steps, learning_rate=3e-3, warmup_steps=2, batch_size=2, seq_len=32,
                            eval_every=100, save_every=100, eval_batches=1, **hyper)
    return TrainSettings(data_dir=data_dir, hyper=hyper, preset="tiny_5m", out_dir=out, device="cpu",
                         print_every=print_every, skip_nonfinite=skip_nonfinite)


def poison_forward(monkeypatch, at: int | None, only_rank: int | None = None):
    """The `at`-th training forward (from 1) returns a NaN loss (on `only_rank` alone when given)."""
    real, calls = Qwen3NextForCausalLM.forward, {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        if self.training and k.get("cache") is None:  # a training window, not its lead-in
            calls["n"] += 1
            rank_hit = only_rank is None or int(os.environ.get("RANK", "0")) == only_rank
            if calls["n"] == at and rank_hit:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Qwen3NextForCausalLM, "forward", poisoned)
    return calls


def reference(run: TrainingRun, skip_nonfinite: bool) -> tuple[dict[int, tuple], int | None]:
    """The plain loop: every value read at once. Returns ({step: (loss, mtp, grad_norm)}, the step index a
    non-finite value stopped the run at, or None)."""
    h, out = run.h, {}
    for step in range(h.steps):
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(step, h.learning_rate, h.min_lr, h.warmup_steps, h.steps)
        loss = mtp = 0.0
        finite = True
        for micro in range(h.grad_accum):
            x, y = run.sampler.batch(step, micro)
            o = window_loss(run.train_model, run.model, x, y, run.sampler.lead(step, micro), h.mtp_weight,
                            run.autocast, run.eot_id)
            (o.loss / h.grad_accum).backward()
            finite = finite and math.isfinite(o.loss.item())
            loss += o.loss.item() / h.grad_accum
            if o.mtp_loss is not None:
                mtp += o.mtp_loss.item() / h.grad_accum
        norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), h.max_grad_norm))
        if not (finite and math.isfinite(norm)):
            run.optimizer.zero_grad(set_to_none=True)
            if skip_nonfinite:
                continue
            return out, step
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        out[step + 1] = (loss, mtp, norm)
    return out, None


def logged(out_dir) -> dict[int, tuple]:
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("mtp_loss", 0.0), r["grad_norm"]) for r in records if "loss" in r}


@pytest.mark.parametrize("print_every, extra, poison, skip", [
    (2, dict(grad_accum=2, mtp_weight=0.3), None, False),
    (3, dict(grad_accum=2), 5, False),  # the 3rd step (index 2) is non-finite: the run stops at step 2
    (4, {}, 2, True),  # the 2nd step is skipped
], ids=["accum-mtp", "nonfinite-stops", "nonfinite-skipped"])
def test_loop_logs_what_the_plain_loop_computes(data_dir, tmp_path, monkeypatch, capsys, print_every, extra,
                                                poison, skip):
    s = settings(data_dir, tmp_path / "run", print_every=print_every, skip_nonfinite=skip, **extra)
    calls = poison_forward(monkeypatch, poison)
    expected, stopped_at = reference(build_run(s, Distributed(), None), skip)
    calls["n"] = 0
    step, exit_code = build_run(s, Distributed(), None).loop()
    err = capsys.readouterr().err
    assert logged(tmp_path / "run") == expected  # bit for bit
    assert (stopped_at is not None or "step skipped" in err) == bool(poison)  # the poison took
    if stopped_at is not None:
        assert exit_code == 1 and f"non-finite loss nan at step {stopped_at}" in err
        assert ckpt.find_latest(tmp_path / "run") is None  # nothing saved after the bad step
    else:
        assert exit_code == 0 and step == s.hyper.steps
        assert ("step skipped" in err) == skip
        printed = [line.split()[1] for line in err.splitlines() if re.match(r"step +\d+/", line)]
        assert printed == [f"{k}/{s.hyper.steps}" for k in range(1, s.hyper.steps + 1)
                           if k % print_every == 0 or k == s.hyper.steps]
