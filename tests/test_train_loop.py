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


def poison_forward(monkeypatch, at: tuple[int, ...]):
    """The training forwards numbered `at` (from 1) return a NaN loss."""
    real, calls = Qwen3NextForCausalLM.forward, {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        if self.training and k.get("cache") is None:  # a training window, not its lead-in
            calls["n"] += 1
            if calls["n"] in at:
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
    (2, dict(grad_accum=2, mtp_weight=0.3), (), False),
    (3, dict(grad_accum=2), (5,), False),  # the 3rd step (index 2) is non-finite: the run stops at step 2
    (3, {}, (2, 5), True),  # the 2nd and the last step are skipped (step 4 is read after the loop)
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
        assert printed == [f"{k}/{s.hyper.steps}" for k in expected if k % print_every == 0 or k == s.hyper.steps]


def test_no_reads_from_the_device_between_print_steps(data_dir, tmp_path, monkeypatch):
    """Every way Python reads a tensor's value, counted over a run of 6 steps printed every 3: one read
    at each print step (all of its steps' values at once), none in the steps between; evaluating and
    saving read what they need."""
    run = build_run(settings(data_dir, tmp_path / "run", steps=6, print_every=3, grad_accum=2, mtp_weight=0.3),
                    Distributed(), None)
    reads, counting = [], [True]

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if counting[0]:
                reads.append(name)
            return real(self, *a, **k)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))

    def uncounted(method):
        def call(*a, **k):
            counting[0] = False
            try:
                return method(*a, **k)
            finally:
                counting[0] = True
        return call

    reports = []
    real_report = run.report
    monkeypatch.setattr(run, "report", lambda pending, bar: reports.append(len(reads)) or real_report(pending, bar))
    monkeypatch.setattr(run, "evaluate", uncounted(run.evaluate))
    monkeypatch.setattr(run, "save", uncounted(run.save))
    assert run.loop() == (6, 0)
    assert reports == [0, 1] and reads == ["tolist", "tolist"]  # nothing before the first report, one in each
    assert sorted(logged(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- two processes (gloo)
def _worker(rank: int, port: int, args: list[str], scenario: str, results) -> None:
    """One of two torchrun-like processes running the training command line under `scenario`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import signal
    from datetime import timedelta

    import torch.distributed as dist

    from sakimi_next import train
    from sakimi_next.cli import main

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a disagreement fails, never hangs
    real, calls = Qwen3NextForCausalLM.forward, {"n": 0}

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if self.training and k.get("cache") is None:
            calls["n"] += 1
            if scenario == "nan-on-rank-1" and rank == 1 and calls["n"] == 3:
                out.loss = out.loss * float("nan")
            if scenario == "sigterm-on-rank-0" and rank == 0 and calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return out

    Qwen3NextForCausalLM.forward = forward
    train.AGREE_EVERY = 3
    results.put((rank, main(args)))


@pytest.mark.parametrize("scenario", ["nan-on-rank-1", "sigterm-on-rank-0"])
def test_two_processes_agree(data_dir, tmp_path, capfd, scenario):
    """A non-finite loss on one process only (read at the print step) and a signal to one process only
    (agreed on at the AGREE_EVERY schedule, here 3): both stop at the same step, nobody waits forever."""
    import socket

    import torch.multiprocessing as mp

    args = ["--mode", "train", "--config", "tiny_5m", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"),
            "--device", "cpu", "--batch-size", "1", "--seq-len", "32", "--steps", "6", "--learning-rate", "3e-3",
            "--warmup-steps", "2", "--eval-every", "100", "--eval-batches", "1", "--save-every", "2",
            "--print-every", "4"]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(rank, port, args, scenario, results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    codes = dict(results.get(timeout=5) for _ in procs)
    err = capfd.readouterr().err
    if scenario == "nan-on-rank-1":  # the 3rd step is non-finite; found at step 4 (printed), before saving it
        assert codes == {0: 1, 1: 1}
        assert "non-finite loss nan at step 2" in err
        assert ckpt.find_latest(tmp_path / "run").name == "step_000002"
    else:  # received during step 2, agreed on after step 3
        assert codes == {0: 128 + 15, 1: 128 + 15}
        assert "SIGTERM received at step 3" in err
        assert ckpt.find_latest(tmp_path / "run").name == "step_000003"


# ------------------------------------------------------------------------------------- the pieces
def test_bf16_is_native_only_on_gpus_that_have_it(monkeypatch):
    """A T4 or V100 emulates bf16 (torch's default `including_emulation=True` says yes): fp32 there."""
    from sakimi_next import distributed

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or False)
    assert not distributed.native_bf16(torch.device("cuda")) and asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert distributed.native_bf16(torch.device("cuda"))


def test_tf32_for_float32_training_on_cuda_only(monkeypatch):
    from sakimi_next.distributed import allow_tf32

    calls, capability = [], [(7, 0)]  # a V100
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert not allow_tf32("fp32", torch.device("cuda"))  # it has no TF32
    capability[0] = (9, 0)  # an H100
    assert not allow_tf32("bf16", torch.device("cuda")) and not allow_tf32("fp32", torch.device("cpu"))
    assert calls == []
    assert allow_tf32("fp32", torch.device("cuda")) and calls == ["high"]


def test_clip_gradients_is_clip_grad_norm():
    from sakimi_next.distributed import clip_gradients

    from .helpers import small_config

    grads = []
    for clip in (lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5), lambda m: clip_gradients(m, 0.5)):
        torch.manual_seed(0)
        model = Qwen3NextForCausalLM(small_config())
        x = torch.randint(0, model.config.vocab_size, (2, 16))
        model(x, x).loss.backward()
        norm = clip(model)
        grads.append((norm, [p.grad for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = grads
    assert torch.equal(a, b) and not isinstance(b, float) and a > 0.5
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_sampler_checks_token_ids_on_the_host():
    import numpy as np

    from sakimi_next.batches import WindowSampler

    tokens = np.arange(100, dtype=np.uint16)
    x, y = WindowSampler(tokens, 8, 2, seed=0, rank=0, world=1, vocab_size=100).batch(0, 0)
    assert int(y.max()) < 100
    with pytest.raises(ValueError, match="token id 9[0-9] is outside the vocabulary"):
        for step in range(50):  # some window reaches past id 89
            WindowSampler(tokens, 8, 2, seed=0, rank=0, world=1, vocab_size=90).batch(step, 0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        WindowSampler(tokens, 8, 2, seed=0, rank=0, world=1, lead_in=60, vocab_size=50).lead(0, 0)
