"""Under torchrun (gloo on the CPU): the defaults (--config auto: Muon, dropout, weight averaging, windows
after a lead-in) give in 2 processes the losses of 1 process with the same global batch, and resume bit for
bit; a time budget's ranks agree on one plan however their speeds differ."""

import json

import pytest
import torch

from sakimi_next import checkpoint as ckpt
from sakimi_next.cli import main

from .helpers import TWO_PROCESSES_LOSS_REL, english_text, torchrun

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """~60 KB of the CPython docs, prepared as --config auto prepares them."""
    root = tmp_path_factory.mktemp("data")
    (root / "text.txt").write_text(english_text(60_000))
    out = root / "prepared"
    assert main(["--mode", "prepare_data", "--train-data", str(root / "text.txt"), "--out-dir", str(out)]) == 0
    return out


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


@pytest.mark.slow
def test_the_defaults_in_two_processes_equal_one_and_resume_exactly(data_dir, tmp_path):
    """--config auto as a fresh run resolves it (Muon, dropout, weight decay, weight averaging, windows after a
    lead-in), at a quarter of its window and lead-in to keep the test short: 2 processes with half the
    default batch each give the losses (to reduction order) and validation of 1 process with the default
    batch, dropout masks included. Interrupted after 2 steps and resumed under torchrun, the run is the
    uninterrupted one bit for bit."""
    common = ["--mode", "train", "--data-dir", str(data_dir), "--device", "cpu", "--steps", "4", "--eval-every", "2",
              "--save-every", "2", "--eval-batches", "1", "--keep-last", "5", "--seq-len", "128", "--lead-in", "256"]
    assert main([*common, "--out-dir", str(tmp_path / "one")]) == 0
    state = json.loads((ckpt.find_latest(tmp_path / "one") / ckpt.STATE_FILE).read_text())["args"]
    assert state["optimizer"] == "muon" and state["dropout"] > 0 and state["ema"] > 0 and state["lead_in"] > 0
    half = str(state["batch_size"] // 2)
    assert "world size: 2 (DDP)" in torchrun(*common, "--out-dir", str(tmp_path / "two"), "--batch-size", half)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for s in one:
        assert abs(one[s] - two[s]) <= TWO_PROCESSES_LOSS_REL * abs(one[s]), (s, one[s], two[s])
    val = [[r["val_loss"] for r in records(tmp_path / d) if "val_loss" in r] for d in ("one", "two")]
    assert len(val[0]) == len(val[1]) == 2 and all(abs(a - b) <= TWO_PROCESSES_LOSS_REL * a for a, b in zip(*val))

    torchrun(*common, "--out-dir", str(tmp_path / "resumed"), "--batch-size", half,
             "--resume-from", str(tmp_path / "two" / "step_000002"))
    assert losses(tmp_path / "resumed") == {s: two[s] for s in (3, 4)}
    a = ckpt.load_tensors(tmp_path / "two" / "step_000004" / ckpt.MODEL_FILE)
    b = ckpt.load_tensors(tmp_path / "resumed" / "step_000004" / ckpt.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_budget_ranks_agree_on_the_slowest_ones_plan(data_dir, tmp_path):
    """A time budget under torchrun on a fake clock where rank 1's steps take twice rank 0's: every rank plans
    and re-plans from the slowest one's measurement (else they would stop at different steps and hang)."""
    args = ["--mode", "train", "--config", "tiny_5m", "--data-dir", str(data_dir), "--device", "cpu", "--batch-size",
            "2", "--seq-len", "32", "--eval-batches", "1", "--max-minutes", "0.5"]
    torchrun("0.5", "1", *args, "--out-dir", str(tmp_path / "run"), module="tests.fake_machine")
    state = json.loads((ckpt.find_latest(tmp_path / "run") / ckpt.STATE_FILE).read_text())
    plan = state["budget"]
    assert plan["step_s"] == 1.0 and state["step"] == plan["steps"]  # rank 1's 2 x 0.5 s
    assert plan["steps"] <= (30 - plan["setup_s"]) / 1.0
