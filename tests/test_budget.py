"""--max-minutes as a time budget: the plan's arithmetic, a budgeted run (on a fake clock) whose resume
is bit-identical to the uninterrupted run, and bad budgets."""

import itertools
import json

import pytest
import torch

from sakimi_next import budget
from sakimi_next import checkpoint as ckpt
from sakimi_next.cli import main
from sakimi_next.optim import optimizer_parts
from sakimi_next.util import UserError

TRAIN = ["--mode", "train", "--config", "tiny_5m", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2",
         "--print-every", "1", "--device", "cpu", "--learning-rate", "3e-3"]


def test_plan_arithmetic():
    p = budget.plan(10, setup_s=30, step_s=1.0, eval_s=5.0)
    # 570 s left; evaluations may take 8% of it: int(0.08 * 570 / 5) = 9 of them, 45 s
    assert (p.steps, p.eval_every, p.warmup_steps) == (525, 59, 26)
    assert p.setup_s + p.steps * p.step_s + -(-p.steps // p.eval_every) * p.eval_s <= 600
    # a long budget: at most MAX_EVALS evaluations, warm-up capped
    p = budget.plan(600, setup_s=60, step_s=0.5, eval_s=2.0)
    assert p.steps == int((36000 - 60 - 20 * 2.0) / 0.5) and p.eval_every == -(-p.steps // 20)
    assert p.warmup_steps == budget.MAX_WARMUP_STEPS
    # a short one: one evaluation, at the end
    p = budget.plan(1, setup_s=20, step_s=2.0, eval_s=10.0)
    assert (p.steps, p.eval_every, p.warmup_steps) == (15, 15, 1)
    # the user's warm-up and evaluation interval are kept
    p = budget.plan(10, 30, 1.0, 5.0, warmup_steps=7, eval_every=100)
    assert (p.steps, p.warmup_steps, p.eval_every) == (525, 7, 100)
    assert budget.Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_plan_refuses_a_budget_too_short():
    with pytest.raises(UserError, match="--max-minutes 0.1 is too short"):
        budget.plan(0.1, setup_s=3, step_s=1.0, eval_s=2.5)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="must be a positive number of minutes"):
            budget.plan(bad, 0, 1.0, 1.0)


def test_plan_stops_at_max_steps():
    """--config auto's cap: a budget that would pass over the text too often ends early."""
    p = budget.plan(10, setup_s=30, step_s=1.0, eval_s=5.0, max_steps=100)
    assert (p.steps, p.eval_every, p.warmup_steps) == (100, 12, 5)
    assert budget.plan(10, setup_s=30, step_s=1.0, eval_s=5.0, max_steps=10**6).steps == 525  # no cap reached


def test_measure_on_a_fake_clock(monkeypatch):
    ticks = iter([0, 1, 10, 12, 20, 21.5, 30, 33, 40, 47])  # steps of 1, 2, 1.5, 3 s; an evaluation of 7 s
    monkeypatch.setattr(budget, "clock", lambda: next(ticks))
    calls = []
    step_s, eval_s, result = budget.measure(lambda: calls.append("step"), lambda: "evaluated")
    assert (step_s, eval_s, result) == (1.75, 7, "evaluated")
    assert calls == ["step"] * (budget.WARM_STEPS + budget.TIMED_STEPS)


def test_a_compiled_run_times_its_second_evaluation(monkeypatch):
    """The first evaluation of a compiled model compiles its own graph: it is run untimed."""
    ticks = iter([0, 1, 10, 12, 20, 21.5, 30, 33, 40, 47])
    monkeypatch.setattr(budget, "clock", lambda: next(ticks))
    calls = []
    step_s, eval_s, _ = budget.measure(lambda: calls.append("step"), lambda: calls.append("eval"), compiled=True)
    assert (step_s, eval_s) == (1.75, 7)
    assert calls == ["step"] * budget.WARM_STEPS + ["eval"] + ["step"] * budget.TIMED_STEPS + ["eval"]


def test_compile_is_chosen_for_long_budgets_only(monkeypatch):
    from sakimi_next.distributed import COMPILE_MIN_MINUTES, use_compile

    cpu, long = torch.device("cpu"), COMPILE_MIN_MINUTES
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)  # a compiler is at hand
    assert use_compile(None, long, None, cpu)
    assert not use_compile(None, long - 1, None, cpu)  # too short to pay for compiling
    assert not use_compile(None, long, 500, cpu)  # --steps: --max-minutes only cuts the run short
    assert not use_compile(None, None, None, cpu)
    assert not use_compile(None, long, None, cpu, lead_in=512)  # its cache-carrying layers compile slowly
    assert use_compile(True, None, 10, cpu) and not use_compile(False, long, None, cpu)  # the user's word wins
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler: inductor cannot build
    assert not use_compile(None, long, None, cpu)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded CPython docs, prepared with a 300-token vocabulary."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    assert main(["--mode", "prepare_data", "--out-dir", str(out), "--config", "tiny_5m", "--vocab-size", "300"]) == 0
    return out


def fake_clock(monkeypatch, seconds_per_call: float):
    """budget.clock advances by a fixed amount at each call: the plan no longer depends on the machine."""
    counter = itertools.count()
    monkeypatch.setattr(budget, "clock", lambda: next(counter) * seconds_per_call)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_config_auto_stops_a_long_budget_at_its_passes(data_dir, tmp_path, monkeypatch, capsys):
    """A budget that allows more passes than --config auto's cap plans only the capped steps, says so,
    and the run ends there."""
    from sakimi_next import auto
    from sakimi_next.data import open_split

    train_tokens = len(open_split(data_dir, "train"))
    monkeypatch.setattr(auto, "MAX_PASSES", 6.5 * 2 * 32 / train_tokens)  # 6 steps of 2 x 32 tokens
    fake_clock(monkeypatch, 0.2)
    args = ["--mode", "train", "--config", "auto", *TRAIN[4:], "--data-dir", str(data_dir), "--no-compile",
            "--out-dir", str(tmp_path / "run"), "--max-minutes", "30"]  # 30 minutes would be thousands of steps
    assert main(args) == 0
    out = capsys.readouterr().out
    state = json.loads((ckpt.find_latest(tmp_path / "run") / ckpt.STATE_FILE).read_text())
    assert state["budget"]["steps"] == state["step"] == state["scheduler"]["steps"] == 6
    assert "the run stops at 6 steps, before its budget" in out
    assert not state["args"]["compile"]


def test_budgeted_run_resumes_bit_identically(data_dir, tmp_path, monkeypatch, capsys):
    stepped, forget = [], budget.forget_step

    def forget_and_note(model, optimizer, initial):  # a throw-away step took an optimiser step if it left state
        stepped.append(all(part.state for part in optimizer_parts(optimizer)))
        forget(model, optimizer, initial)

    monkeypatch.setattr(budget, "forget_step", forget_and_note)
    fake_clock(monkeypatch, 0.2)  # 0.2 s a step and an evaluation (+ ~0.5 s for its checkpoint), 2.2 s of setup
    common = [*TRAIN, "--data-dir", str(data_dir), "--dropout", "0.1", "--save-every", "4", "--keep-last", "10"]
    assert main([*common, "--out-dir", str(tmp_path / "whole"), "--max-minutes", "0.1"]) == 0
    out = capsys.readouterr().out
    state = json.loads((ckpt.find_latest(tmp_path / "whole") / ckpt.STATE_FILE).read_text())
    plan = state["budget"]
    assert plan["steps"] == state["step"] == state["scheduler"]["steps"] > 8
    assert plan["warmup_steps"] == state["scheduler"]["warmup_steps"] and plan["eval_every"] <= plan["steps"]
    whole = metrics(tmp_path / "whole")
    lrs = [r["lr"] for r in whole if "lr" in r]
    assert lrs[-1] == pytest.approx(3e-4, rel=0.2) and max(lrs) == pytest.approx(3e-3)  # decayed to --min-lr by the end
    assert [r["step"] for r in whole if "val_loss" in r][-1] == plan["steps"]  # evaluated at the end
    assert (tmp_path / "whole" / "best").exists() and "budget 0.1 min" in out
    assert stepped == [True] * (budget.WARM_STEPS + budget.TIMED_STEPS)  # the optimiser's step is timed too

    # resume from step 4 on a clock three times slower: the plan comes from the checkpoint, not from a new measurement
    fake_clock(monkeypatch, 0.6)
    resume = ["--resume-from", str(tmp_path / "whole" / "step_000004"), "--out-dir", str(tmp_path / "resumed")]
    assert main([*common, *resume, "--max-minutes", "0.1"]) == 0
    resumed = metrics(tmp_path / "resumed")
    assert [r for r in whole if r["step"] > 4 and "loss" in r] != []
    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs if r["step"] > 4]

    assert strip(resumed) == strip(whole)  # the same losses, learning rates and evaluations, bit for bit
    a = (ckpt.find_latest(tmp_path / "whole") / "model.safetensors").read_bytes()
    b = (ckpt.find_latest(tmp_path / "resumed") / "model.safetensors").read_bytes()
    assert a == b


@pytest.mark.parametrize("args, needle", [
    (["--max-minutes", "0.001"], "--max-minutes 0.001 is too short"),
    (["--max-minutes", "0"], "--max-minutes (0.0) must be positive"),
    (["--max-minutes", "1", "--dropout", "1.0"], "--dropout (1.0) must be in [0, 1)"),
    (["--max-minutes", "1", "--dropout", "-0.1"], "--dropout (-0.1) must be in [0, 1)"),
])
def test_bad_budget_and_dropout(data_dir, tmp_path, monkeypatch, capsys, args, needle):
    fake_clock(monkeypatch, 0.1)
    rc = main([*TRAIN, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_throwaway_step_leaves_no_trace():
    """The budget times whole steps, the optimiser's included (Muon's orthogonalisation is a fair share of
    a CPU step), then puts back the weights and a fresh optimiser state."""
    from sakimi_next.config import preset
    from sakimi_next.model import Qwen3NextForCausalLM
    from sakimi_next.budget import forget_step
    from sakimi_next.optim import build_optimizer

    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(preset("tiny_5m", vocab_size=300))
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), kind="muon")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 16))
    model(ids, ids).loss.backward()
    optimizer.step()
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert all(part.state for part in optimizer.parts)
    forget_step(model, optimizer, initial)
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert not any(part.state for part in optimizer.parts)
