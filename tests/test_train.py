"""Training: the loss falls, resume is exact, saving survives interruption, DDP = one process, NaN guard,
and every bad input gets one line and exit code 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sakimi_next import checkpoint as ckpt
from sakimi_next.cli import main
from sakimi_next.data import prepare_data

from .helpers import ROOT, TWO_PROCESSES_LOSS_REL, TWO_PROCESSES_NORM_REL, english_text, torchrun

TRAIN = ["--mode", "train", "--config", "tiny_5m", "--batch-size", "4", "--seq-len", "64", "--learning-rate", "3e-3",
         "--warmup-steps", "2", "--eval-batches", "2", "--print-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """~100 KB of the CPython docs, prepared with the tiny_5m vocabulary (2048)."""
    root = tmp_path_factory.mktemp("data")
    (root / "stories.txt").write_text(english_text(100_000))
    # paragraphs as documents, so that training windows hold several (--document-masking has work to do)
    return prepare_data([str(root / "stories.txt")], None, root / "prepared", vocab_size=2048, doc_split="blank-line")


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def train(data_dir, out, *extra):
    return main([*TRAIN, "--data-dir", str(data_dir), "--out-dir", str(out), *extra])


def test_loss_decreases(data_dir, tmp_path):
    assert train(data_dir, tmp_path / "run", "--steps", "40", "--eval-every", "20", "--save-every", "20") == 0
    l = losses(tmp_path / "run")
    first, last = sum(l[s] for s in range(1, 6)) / 5, sum(l[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert all(k in evals[0] for k in ("val_ppl", "val_bpb"))
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    latest = ckpt.find_latest(tmp_path / "run")
    assert latest.name == "step_000040" and (latest / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "best").resolve() == latest


def run_cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sakimi_next", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_step(run_dir: Path, step: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir) or [0]) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_kill_and_resume_is_bit_identical(data_dir, tmp_path, how):
    common = ["--steps", "14", "--eval-every", "7", "--save-every", "3"]
    assert train(data_dir, tmp_path / "whole", *common) == 0
    proc = run_cli(*TRAIN, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "cut"), *common)
    wait_for_step(tmp_path / "cut", 5, proc)
    proc.send_signal(how)
    out, err = proc.communicate(timeout=120)
    if how == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "SIGTERM received" in err
    assert ckpt.find_latest(tmp_path / "cut") is not None
    assert train(data_dir, tmp_path / "cut", *common, "--resume-from", "auto") == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # bit for bit, every step
    a = ckpt.load_tensors(tmp_path / "whole" / "latest" / "model.safetensors")
    b = ckpt.load_tensors(tmp_path / "cut" / "latest" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_while_saving_resumes_exactly(data_dir, tmp_path):
    """A real SIGKILL while the step-8 checkpoint is being written (saving made slow by the command line's
    tests-side wrapper, tests/slow_save_cli.py): step 4 stays the last complete checkpoint, and resuming
    from it ends bit-identical to an uninterrupted run."""
    common = ["--steps", "8", "--eval-every", "100", "--save-every", "4"]
    assert train(data_dir, tmp_path / "whole", *common) == 0
    run = tmp_path / "cut"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.slow_save_cli", "10", *TRAIN, "--data-dir", str(data_dir),
                             "--out-dir", str(run), *common], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(run.glob(f".step_000008.tmp-*/{ckpt.MODEL_FILE}")):  # the save is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list(run.glob(".step_000008.tmp-*")) and not (run / "step_000008").exists()  # killed mid-save
    assert ckpt.find_latest(run, verify=True).name == "step_000004"
    assert train(data_dir, run, *common, "--resume-from", "auto") == 0
    assert losses(run) == losses(tmp_path / "whole")  # bit for bit, every step
    a = ckpt.load_tensors(tmp_path / "whole" / "latest" / ckpt.MODEL_FILE)
    b = ckpt.load_tensors(run / "latest" / ckpt.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run.glob(".step_*.tmp-*"))  # the half-written checkpoint was cleaned up


def test_interrupted_while_saving(data_dir, tmp_path, monkeypatch):
    """A crash in the middle of writing a checkpoint leaves the previous one, which resumes exactly."""
    common = ["--steps", "8", "--eval-every", "100", "--save-every", "4"]
    assert train(data_dir, tmp_path / "whole", *common) == 0
    real = ckpt._write_json
    calls = {"n": 0}

    def crash_on_second_checkpoint(path, obj):
        if path.name == ckpt.STATE_FILE:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # the process dies while the step-8 checkpoint is half written
        return real(path, obj)

    monkeypatch.setattr(ckpt, "_write_json", crash_on_second_checkpoint)
    assert train(data_dir, tmp_path / "cut", *common) == 130  # the CLI reports the interrupt
    monkeypatch.setattr(ckpt, "_write_json", real)
    run = tmp_path / "cut"
    assert not list(run.glob(".step_*.tmp-*"))  # the half-written checkpoint was removed
    assert ckpt.find_latest(run).name == "step_000004"
    assert train(data_dir, run, *common, "--resume-from", "auto") == 0
    assert losses(run) == losses(tmp_path / "whole")


def test_nonfinite_loss_stops_or_skips(data_dir, tmp_path, monkeypatch, capsys):
    from sakimi_next.model import Qwen3NextForCausalLM

    real = Qwen3NextForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Qwen3NextForCausalLM, "forward", poisoned)
    rc = train(data_dir, tmp_path / "run", "--steps", "8", "--eval-every", "100", "--save-every", "2")
    err = capsys.readouterr().err
    assert rc == 1
    assert "non-finite loss nan at step 4" in err and "step_000004" in err
    assert ckpt.find_latest(tmp_path / "run").name == "step_000004"

    calls["n"] = 0
    rc = train(data_dir, tmp_path / "skip", "--steps", "8", "--eval-every", "100", "--save-every", "100",
               "--skip-nonfinite")
    assert rc == 0 and "step skipped" in capsys.readouterr().err
    assert ckpt.find_latest(tmp_path / "skip").name == "step_000008"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(data_dir, tmp_path, strategy):
    """gloo on CPU: 2 processes with batch 2 each follow 1 process with batch 4 (same windows), and the
    checkpoint they write (full, unsharded) resumes in a single process. With --ema each process averages
    its part (FSDP: its shards), and the validation of the average agrees too."""
    common = [*TRAIN, "--data-dir", str(data_dir), "--steps", "4", "--eval-every", "4", "--save-every", "2",
              "--lead-in", "16", "--ema", "0.2"]  # each rank reads its rows' lead-in (FSDP: reshards after it)
    assert main([*common, "--out-dir", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    extra = ["--fsdp"] if strategy == "fsdp" else []
    out = torchrun(*common, "--out-dir", str(tmp_path / "two"), "--batch-size", "2", *extra)
    assert f"world size: 2 ({'FSDP2' if extra else 'DDP'})" in out
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for s in one:
        assert abs(one[s] - two[s]) <= TWO_PROCESSES_LOSS_REL * abs(one[s]), (s, one[s], two[s])
    norms = [[json.loads(x)["grad_norm"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
              if "grad_norm" in x] for d in ("one", "two")]  # FSDP2: the whole norm, not one shard's
    assert all(abs(a - b) <= TWO_PROCESSES_NORM_REL * a for a, b in zip(*norms)), norms
    val = [json.loads(x)["val_loss"] for d in ("one", "two")
           for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert abs(val[0] - val[1]) <= TWO_PROCESSES_LOSS_REL * val[0]
    # its step-2 checkpoint resumes in 2 processes (each takes its part of the training weights and of
    # the average) as the uninterrupted run went on, and here, single process, with its optimiser state
    torchrun(*common, "--out-dir", str(tmp_path / "resumed"), "--batch-size", "2", "--resume-from",
             str(tmp_path / "two" / "step_000002"), *extra)
    resumed = losses(tmp_path / "resumed")
    assert resumed == {s: two[s] for s in (3, 4)}
    a = ckpt.load_tensors(tmp_path / "two" / "step_000004" / ckpt.MODEL_FILE)
    b = ckpt.load_tensors(tmp_path / "resumed" / "step_000004" / ckpt.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main([*common, "--out-dir", str(tmp_path / "two"), "--batch-size", "4", "--resume-from",
                 str(tmp_path / "two" / "step_000002"), "--steps", "4"]) == 0


def test_resume_refuses_other_preset(data_dir, tmp_path, capsys):
    assert train(data_dir, tmp_path / "run", "--steps", "2", "--eval-every", "100", "--save-every", "100") == 0
    capsys.readouterr()
    args = [a if a != "tiny_5m" else "tiny_10m" for a in TRAIN]
    rc = main([*args, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"), "--resume-from", "auto",
               "--steps", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "is a tiny_5m model, not tiny_10m" in err


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps (0) must be positive"),
    (["--batch-size", "-2"], "--batch-size (-2) must be positive"),
    (["--learning-rate", "0"], "--learning-rate (0.0) must be positive"),
    (["--seq-len", "100000"], "exceeds the model's max_position_embeddings"),
    (["--resume-from", "/nonexistent/ckpt"], "checkpoint not found"),
    (["--lead-in", "-1"], "--lead-in (-1) must be >= 0"),
    (["--lead-in", "10000000"], "fewer than --lead-in + --seq-len + 1"),
    (["--lead-in", "64", "--document-masking"], "use one of them"),
])
def test_bad_training_input(data_dir, tmp_path, capsys, extra, message):
    rc = train(data_dir, tmp_path / "run", "--steps", "3", *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_missing_data_dir(tmp_path, capsys):
    rc = main([*TRAIN, "--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run"), "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no prepared data in" in err and len(err.splitlines()) == 1


def test_vocab_mismatch(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(english_text(100_000))
    big = prepare_data([str(tmp_path / "t.txt")], None, tmp_path / "big", vocab_size=2400,
                       allow_vocab_mismatch=True)
    rc = main([*TRAIN, "--data-dir", str(big), "--out-dir", str(tmp_path / "run"), "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "2,400" in err and "2,048" in err and len(err.splitlines()) == 1
    rc = main([*TRAIN, "--data-dir", str(big), "--out-dir", str(tmp_path / "run"), "--steps", "2",
               "--eval-every", "2", "--allow-vocab-mismatch"])
    assert rc == 0
    assert ckpt.load_config(ckpt.find_latest(tmp_path / "run")).vocab_size == 2400


def test_document_masking(data_dir, tmp_path):
    """--document-masking trains, and changes what the model sees (windows hold several documents)."""
    common = ["--steps", "3", "--eval-every", "3", "--save-every", "100"]
    assert train(data_dir, tmp_path / "plain", *common) == 0
    assert train(data_dir, tmp_path / "masked", *common, "--document-masking") == 0
    plain, masked = losses(tmp_path / "plain"), losses(tmp_path / "masked")
    assert plain.keys() == masked.keys() and plain[1] != masked[1]
    state = json.loads((ckpt.find_latest(tmp_path / "masked") / ckpt.STATE_FILE).read_text())
    assert state["args"]["document_masking"] is True


@pytest.mark.slow
def test_compiled_training_matches_eager(data_dir, tmp_path):
    """--compile (each decoder layer through torch.compile) trains to the eager run's losses and
    writes the same parameter names."""
    import shutil

    from safetensors import safe_open

    if not shutil.which("c++") and not shutil.which("g++"):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    common = ["--steps", "3", "--eval-every", "3", "--save-every", "3"]
    assert train(data_dir, tmp_path / "eager", *common) == 0
    from torch._dynamo.utils import counters

    counters.clear()
    assert train(data_dir, tmp_path / "compiled", *common, "--compile") == 0
    assert counters["stats"]["unique_graphs"] >= 2  # a linear-attention and a full-attention layer graph
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4)
    names = []
    for run in ("eager", "compiled"):
        with safe_open(str(ckpt.find_latest(tmp_path / run) / "model.safetensors"), "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1]


def test_muon_trains_resumes_exactly_and_keeps_its_optimizer(data_dir, tmp_path, capsys):
    """--optimizer muon: the loss falls; resumed from a checkpoint half-way (Muon's momentum and AdamW's
    moments restored), the run gives the uninterrupted run's losses and weights bit for bit; a resumed run
    keeps the optimizer it was trained with, and asking for the other one is one line, exit code 2."""
    common = ["--steps", "14", "--eval-every", "7", "--save-every", "7", "--optimizer", "muon"]
    assert train(data_dir, tmp_path / "whole", *common) == 0
    whole = losses(tmp_path / "whole")
    assert sum(whole[s] for s in range(12, 15)) / 3 < sum(whole[s] for s in range(1, 4)) / 3 - 0.5
    assert json.loads((tmp_path / "whole" / "latest" / "optimizer.json").read_text())["class"] == "MuonWithAdamW"
    (tmp_path / "cut").mkdir()
    os.symlink(tmp_path / "whole" / "step_000007", tmp_path / "cut" / "half")  # a checkpoint is read, never changed
    assert train(data_dir, tmp_path / "cut", *common[:6], "--resume-from", str(tmp_path / "cut" / "half")) == 0
    cut = losses(tmp_path / "cut")
    assert {s: cut[s] for s in range(8, 15)} == {s: whole[s] for s in range(8, 15)}
    a = ckpt.load_tensors(tmp_path / "whole" / "latest" / "model.safetensors")
    b = ckpt.load_tensors(tmp_path / "cut" / "latest" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    rc = train(data_dir, tmp_path / "cut", "--steps", "16", "--resume-from", "auto", "--optimizer", "adamw")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "trained with --optimizer muon" in err, err


def test_muon_takes_the_layers_matrices():
    """Muon gets exactly the 2-D weights of the decoder layers and the MTP block; AdamW the embedding
    (the tied output layer), norms, the conv, A_log and dt_bias; every parameter once."""
    from sakimi_next.config import preset
    from sakimi_next.model import Qwen3NextForCausalLM
    from sakimi_next.optim import build_optimizer

    model = Qwen3NextForCausalLM(preset("tiny_5m", mtp_num_hidden_layers=1))
    opt = build_optimizer(model, 1e-3, 0.5, (0.9, 0.95), kind="muon")
    muon, adamw = opt.parts
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    layers = ("model.layers.", "mtp.")
    assert in_muon == {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith(layers)}
    assert "model.embed_tokens.weight" in in_adamw and all(g["weight_decay"] == 0.5 for g in muon.param_groups)
    assert len(opt.param_groups) == len(muon.param_groups) + len(adamw.param_groups)


@pytest.mark.parametrize("bf16_in_hardware", [False, True])
def test_muon_orthogonalises_in_float32_where_bf16_is_emulated(monkeypatch, bf16_in_hardware):
    """On a CPU without bfloat16 arithmetic torch's Muon runs its Newton-Schulz iterations emulated (17.6 of
    a 20.9 s step on an AVX2 EPYC): Muon then takes the same steps in float32. Its parameters follow
    torch.optim.Muon's to bfloat16 rounding, its state is torch's (each loads the other's), and a CPU with
    bfloat16 in hardware keeps torch's own."""
    from sakimi_next import optim
    from sakimi_next.config import preset
    from sakimi_next.model import Qwen3NextForCausalLM

    monkeypatch.setattr(optim, "native_bf16", lambda device: bf16_in_hardware)
    opt = optim.build_optimizer(Qwen3NextForCausalLM(preset("tiny_5m")), 1e-3, 0.1, (0.9, 0.95), kind="muon")
    assert type(opt.parts[0]) is (torch.optim.Muon if bf16_in_hardware else optim.Float32Muon)

    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours_opt, theirs_opt = optim.Float32Muon(ours, **settings), torch.optim.Muon(theirs, **settings)
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for params, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        assert not torch.equal(a, b)  # float32 iterations, not bfloat16 ones
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    theirs_opt.load_state_dict(ours_opt.state_dict())
    ours_opt.load_state_dict(theirs_opt.state_dict())
    before = [p.detach().clone() for p in ours]
    assert ours_opt.step(lambda: torch.tensor(7.0)) == 7.0  # a closure's loss comes back, as from any optimizer
    assert all(not torch.equal(a, b) for a, b in zip(ours, before))
    g = torch.randn(40, 24, dtype=torch.float64)
    singular = torch.linalg.svdvals(optim.newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    assert singular.dtype == torch.float64 and 0.5 < singular.min() and singular.max() < 1.3


NO_MUON = """
import sys, torch, torch.optim
del torch.optim.Muon
sys.modules["torch.optim._muon"] = None  # what torch < 2.9 lacks
from sakimi_next import auto, cli, optim, train
from sakimi_next.config import preset
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.util import UserError
model = Qwen3NextForCausalLM(preset("tiny_5m"))
assert auto.optimizer() == "adamw"
optim.build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), kind="adamw").step()
try:
    optim.build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), kind="muon")
except UserError as e:
    print(e)
"""


def test_a_torch_without_muon_imports_trains_with_adamw_and_refuses_muon_in_one_line():
    """pyproject allows torch >= 2.5; torch.optim.Muon came in 2.9: the package imports without it, --config
    auto takes AdamW, and --optimizer muon is one clear error."""
    run = subprocess.run([sys.executable, "-c", NO_MUON], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is {torch.__version__}"


def test_every_optimizer_of_the_registry_builds_and_steps():
    """settings.OPTIMIZERS names each optimizer's builder in optim.py: each builds over every parameter once
    and takes a step."""
    from sakimi_next.config import preset
    from sakimi_next.model import Qwen3NextForCausalLM
    from sakimi_next.optim import build_optimizer, optimizer_parts
    from sakimi_next.settings import OPTIMIZERS

    model = Qwen3NextForCausalLM(preset("tiny_5m", vocab_size=300))
    ids = torch.randint(0, 300, (2, 16))
    for name in OPTIMIZERS:
        opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), kind=name)
        params = [p for part in optimizer_parts(opt) for g in part.param_groups for p in g["params"]]
        assert sorted(map(id, params)) == sorted(map(id, model.parameters()))
        model(ids, ids).loss.backward()
        opt.step()
        opt.zero_grad()
        assert all(part.state for part in optimizer_parts(opt))


def test_lead_in_is_the_text_before_the_window_read_as_one_pass():
    """--lead-in: each window's lead-in is the text right before it, and the window's loss after reading
    it equals the loss of those positions in one forward pass over lead-in and window together."""
    from contextlib import nullcontext

    import numpy as np

    from sakimi_next.config import preset
    from sakimi_next.batches import WindowSampler, window_loss
    from sakimi_next.model import Qwen3NextForCausalLM

    tokens = np.arange(5000, dtype=np.uint16) % 500
    sampler = WindowSampler(tokens, 24, 3, seed=1, rank=0, world=1, lead_in=40)
    lead, (x, y) = sampler.lead(5, 0), sampler.batch(5, 0)
    for row in range(3):
        start = int(sampler.starts(5, 0)[row])
        assert start >= 40 and lead[row].tolist() == tokens[start - 40:start].tolist()
        assert x[row].tolist() == tokens[start:start + 24].tolist()
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(preset("tiny_5m", vocab_size=500)).train()
    out = window_loss(model, model, x, y, lead, 0.0, nullcontext(), None)
    out.loss.backward()
    whole = model(torch.cat([lead, x], dim=1)).logits[:, 40:]
    expected = torch.nn.functional.cross_entropy(whole.flatten(0, 1), y.flatten())
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.training and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    bf16 = window_loss(  # a bf16 run's lead-in state is bf16 too
        model, model, x, y, lead, 0.0, torch.autocast("cpu", dtype=torch.bfloat16), None)
    assert bf16.loss.item() == pytest.approx(expected.item(), rel=2e-2)


def test_lead_in_trains_and_resumes_exactly(data_dir, tmp_path):
    """A run with --lead-in learns, records it, and resumed half-way gives the uninterrupted run's losses
    and weights bit for bit (the lead-in is read in evaluation mode: no dropout draws)."""
    common = ["--steps", "12", "--eval-every", "6", "--save-every", "6", "--lead-in", "48", "--dropout", "0.1"]
    assert train(data_dir, tmp_path / "whole", *common) == 0
    whole = losses(tmp_path / "whole")
    assert sum(whole[s] for s in range(10, 13)) / 3 < sum(whole[s] for s in range(1, 4)) / 3 - 0.5
    state = json.loads((tmp_path / "whole" / "latest" / ckpt.STATE_FILE).read_text())
    assert state["args"]["lead_in"] == 48
    (tmp_path / "cut").mkdir()
    os.symlink(tmp_path / "whole" / "step_000006", tmp_path / "cut" / "half")
    assert train(data_dir, tmp_path / "cut", "--steps", "12", "--eval-every", "6", "--save-every", "6",
                 "--resume-from", str(tmp_path / "cut" / "half")) == 0
    cut = losses(tmp_path / "cut")
    assert {s: cut[s] for s in range(7, 13)} == {s: whole[s] for s in range(7, 13)}
    a = ckpt.load_tensors(tmp_path / "whole" / "latest" / "model.safetensors")
    b = ckpt.load_tensors(tmp_path / "cut" / "latest" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_checkpoints_resume_without_lead_in():
    """A checkpoint from before --lead-in (no lead_in in its settings) keeps cold windows, even under
    --config auto, whose fresh runs read one; chat data (document masking) reads none either. One from
    before --ema goes on handing out its last weights."""
    from sakimi_next import auto
    from sakimi_next.hyperparameters import resolve_hyperparameters
    from sakimi_next.settings import Hyperparameters

    fresh = resolve_hyperparameters(Hyperparameters(), None, auto.NAME, 400_000, 20, "cpu")
    assert (fresh.batch_size, fresh.seq_len, fresh.lead_in) == (4, 512, 512)  # auto.LONG_CONTEXT
    short = resolve_hyperparameters(Hyperparameters(), None, auto.NAME, 10_000, 20, "cpu")
    assert (short.batch_size, short.seq_len, short.lead_in) == (8, 256, 0)  # too short to spare a lead-in
    old = {k: v for k, v in vars(fresh).items() if k not in ("lead_in", "ema")}
    resumed = resolve_hyperparameters(Hyperparameters(), old, auto.NAME, 400_000, 20, "cpu")
    assert (resumed.lead_in, resumed.ema, fresh.ema) == (0, 0.0, 0.1)
    chat = resolve_hyperparameters(Hyperparameters(document_masking=True), None, auto.NAME, 400_000, 20, "cpu")
    assert chat.lead_in == 0
