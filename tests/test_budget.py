"""--max-minutes as a time budget: the plan's arithmetic, a budgeted run (on a fake clock) whose resume
is bit-identical to the uninterrupted run, and bad budgets."""

import itertools
import json
from dataclasses import replace

import pytest
import torch

from sakimi_next import budget
from sakimi_next import checkpoint as ckpt
from sakimi_next.cli import main
from sakimi_next.optim import optimizer_parts
from sakimi_next.util import UserError

from .fake_machine import FakeMachine

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


def test_config_auto_stops_the_half_trunk_at_its_own_passes(data_dir, tmp_path, monkeypatch, capsys):
    """On a machine the prior finds too slow for the whole trunk, --config auto trains half of its layers,
    and a budget that allows more passes stops at the half trunk's cap (SHALLOW_MAX_PASSES), not the
    whole trunk's; its dropout is the half trunk's."""
    from sakimi_next import auto
    from sakimi_next.data import open_split

    train_tokens = len(open_split(data_dir, "train"))
    step_tokens = 2 * 32
    monkeypatch.setattr(auto, "TOKENS_PER_S", {"cpu": 1e-3})  # the prior: 30 minutes read almost nothing
    monkeypatch.setattr(auto, "MAX_PASSES", 3.5 * step_tokens / train_tokens)  # 3 steps for the whole trunk
    monkeypatch.setattr(auto, "SHALLOW_MAX_PASSES", 6.5 * step_tokens / train_tokens)  # 6 for half of it
    monkeypatch.setattr(auto, "SHALLOW_DROPOUT_BY_PASSES", ((float("inf"), 0.05),))  # the half trunk's own
    fake_clock(monkeypatch, 0.2)  # the measured plan: thousands of steps in 30 minutes
    args = ["--mode", "train", "--config", "auto", *TRAIN[4:], "--data-dir", str(data_dir), "--no-compile",
            "--out-dir", str(tmp_path / "run"), "--max-minutes", "30"]
    assert main(args) == 0
    out = capsys.readouterr().out
    latest = ckpt.find_latest(tmp_path / "run")
    state = json.loads((latest / ckpt.STATE_FILE).read_text())
    assert json.loads((latest / "config.json").read_text())["num_hidden_layers"] == auto.SHALLOW_LAYERS
    assert "at 4 of its 8 layers" in out
    assert state["budget"]["steps"] == state["step"] == state["scheduler"]["steps"] == 6
    assert "the run stops at 6 steps, before its budget" in out
    assert state["args"]["dropout"] == 0.05


def test_budgeted_run_resumes_bit_identically(data_dir, tmp_path, monkeypatch, capsys):
    """On a machine that slows down (the run re-plans), a run resumed half-way on the same fake clock replays
    the re-plans its checkpoint holds and takes the later ones as the uninterrupted run did: the same losses,
    learning rates, evaluations, plan and weights, bit for bit."""
    stepped, forget = [], budget.forget_step

    def forget_and_note(model, optimizer, initial):  # a throw-away step took an optimiser step if it left state
        stepped.append(all(part.state for part in optimizer_parts(optimizer)))
        forget(model, optimizer, initial)

    monkeypatch.setattr(budget, "forget_step", forget_and_note)

    def machine():  # 2 s a step, 3 s from step 4 on, 4 s from step 10 on; 1.5 s an evaluation
        return FakeMachine(lambda step: 2.0 if step < 4 else 3.0 if step < 10 else 4.0,
                           eval_s=1.5).install(monkeypatch.setattr)

    common = [*TRAIN, "--data-dir", str(data_dir), "--dropout", "0.1", "--save-every", "4", "--keep-last", "20",
              "--max-minutes", "1", "--eval-every", "5"]
    clock = machine()
    assert main([*common, "--out-dir", str(tmp_path / "whole")]) == 0
    out = capsys.readouterr().out
    state = json.loads((ckpt.find_latest(tmp_path / "whole") / ckpt.STATE_FILE).read_text())
    plan = state["budget"]
    assert plan["steps"] == state["step"] == state["scheduler"]["steps"] and plan["replans"]  # re-planned
    assert plan["warmup_steps"] == state["scheduler"]["warmup_steps"] and plan["eval_every"] == 5
    assert clock.now <= 60  # within the budget
    whole = metrics(tmp_path / "whole")
    lrs = [r["lr"] for r in whole if "lr" in r]
    assert lrs[-1] == last_lr(plan) and max(lrs) == pytest.approx(3e-3)  # on the way to --min-lr at the end
    assert [r["step"] for r in whole if "val_loss" in r][-1] == plan["steps"]  # evaluated at the end
    assert (tmp_path / "whole" / "best").exists() and "budget 1 min" in out
    assert stepped == [True] * (budget.WARM_STEPS + budget.TIMED_STEPS)  # the optimiser's step is timed too

    # resumed from step 8 (after re-plans) on the same machine: its plan and clock come from the checkpoint
    assert plan["replans"][0][0] < 8 < plan["replans"][-1][0]
    machine()
    resume = ["--resume-from", str(tmp_path / "whole" / "step_000008"), "--out-dir", str(tmp_path / "resumed")]
    assert main([*common, *resume]) == 0
    resumed = metrics(tmp_path / "resumed")

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs if r["step"] > 8]

    assert strip(whole) != [] and strip(resumed) == strip(whole)  # the same losses, learning rates and evaluations
    a, b = (json.loads((ckpt.find_latest(tmp_path / d) / ckpt.STATE_FILE).read_text()) for d in ("whole", "resumed"))
    assert a["budget"] == b["budget"] and a["elapsed_s"] == b["elapsed_s"]
    a = (ckpt.find_latest(tmp_path / "whole") / "model.safetensors").read_bytes()
    b = (ckpt.find_latest(tmp_path / "resumed") / "model.safetensors").read_bytes()
    assert a == b


def last_lr(plan: dict, lr: float = 3e-3) -> float:
    """The learning rate of a budgeted run's last step, as its last plan has it (--min-lr a tenth of `lr`)."""
    from sakimi_next.optim import lr_at

    return lr_at(plan["steps"] - 1, lr, lr / 10, plan["warmup_steps"], plan["steps"], plan["anchor_step"],
                 plan["anchor_progress"])


def budgeted_run(data_dir, run_dir, monkeypatch, step_s) -> tuple[FakeMachine, dict, list[dict]]:
    """A 1-minute budget on a fake machine whose steps take step_s(machine) seconds (~20 steps), evaluations 1 s:
    (the machine, the last checkpoint's state, the metrics)."""
    clock = FakeMachine(lambda step: step_s(clock), eval_s=1.0).install(monkeypatch.setattr)
    assert main([*TRAIN, "--data-dir", str(data_dir), "--out-dir", str(run_dir), "--max-minutes", "1"]) == 0
    state = json.loads((ckpt.find_latest(run_dir) / ckpt.STATE_FILE).read_text())
    return clock, state, metrics(run_dir)


def test_a_machine_that_slows_down_keeps_the_budget(data_dir, tmp_path, monkeypatch, capsys):
    """Steps take twice as long after half the budget: the run re-plans to fewer steps and still ends,
    with its last evaluation and checkpoint, within the minute; the learning rate decays without a jump
    and reaches --min-lr at the new end."""
    clock, state, records = budgeted_run(data_dir, tmp_path / "run", monkeypatch,
                                         lambda m: 2.0 if m.now < 30 else 4.0)
    plan = state["budget"]
    first = budget.plan(1, plan["setup_s"], 2.0, 1.0 + plan["save_s"]).steps  # the plan fixed at the start
    assert plan["steps"] == state["step"] < first and plan["replans"]
    assert 60 - 2 * 4.0 <= clock.now <= 60, clock.now  # within the budget, and not much before its end
    assert "budget: " in capsys.readouterr().err
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[-1] == last_lr(plan)  # the decay's end moved with the plan
    assert all(a >= b for a, b in zip(lrs[plan["warmup_steps"]:], lrs[plan["warmup_steps"] + 1:]))


def test_a_faster_machine_uses_the_time(data_dir, tmp_path, monkeypatch):
    clock, state, _ = budgeted_run(data_dir, tmp_path / "run", monkeypatch, lambda m: 4.0 if m.now < 30 else 2.0)
    plan = state["budget"]
    first = budget.plan(1, plan["setup_s"], 4.0, 1.0 + plan["save_s"]).steps
    assert plan["steps"] == state["step"] > first
    assert 60 - 2 * 4.0 <= clock.now <= 60, clock.now


def test_replan_moves_the_end_and_keeps_the_learning_rate_continuous():
    from sakimi_next.optim import lr_at

    p = budget.plan(10, setup_s=30, step_s=1.0, eval_s=5.0)  # 525 steps, an evaluation every 59
    assert p.replan_every == 525 // budget.REPLANS

    def lr(plan, step):
        return lr_at(step, 1e-3, 1e-4, plan.warmup_steps, plan.steps, plan.anchor_step, plan.anchor_progress)

    # at step 200, 230 s in, steps now take 2 s: (600 - 230 - 5 (last evaluation)) / (2 + 5 / 59) more steps
    slow = budget.replan(p, 200, elapsed_s=230, step_s=2.0, eval_s=5.0)
    assert slow.steps == 200 + int((600 - 230 - 5 - 0) / (2 + 5 / 59)) and slow.replans == ((200, slow.steps),)
    assert lr(slow, 200) == pytest.approx(lr(p, 200), rel=1e-12) and lr(slow, slow.steps) == pytest.approx(1e-4)
    assert lr(slow, 201) < lr(p, 201)  # the rest of the decay is steeper
    fast = budget.replan(p, 200, elapsed_s=230, step_s=0.5, eval_s=5.0)
    assert fast.steps > p.steps and lr(fast, fast.steps) == pytest.approx(1e-4)
    assert budget.replan(p, 200, elapsed_s=230, step_s=0.5, eval_s=5.0).to_dict() == fast.to_dict()
    # a cap holds however fast the machine; with no time left the run ends at once
    assert budget.replan(replace(p, max_steps=600), 200, 230, 0.1, 5.0).steps == 600
    assert budget.replan(p, 200, elapsed_s=599, step_s=1.0, eval_s=5.0).steps == 200
    # during warm-up the decay has not started: its start stays where it was
    early = budget.replan(p, 10, elapsed_s=50, step_s=2.0, eval_s=5.0)
    assert (early.anchor_step, early.anchor_progress) == (None, 0.0) and lr(early, 10) == lr(p, 10)
    # a checkpoint's plan from before re-planning still reads
    old = {k: v for k, v in p.to_dict().items() if k in ("minutes", "setup_s", "step_s", "eval_s", "steps",
                                                          "warmup_steps", "eval_every")}
    assert budget.Plan.from_dict(old).replan_every == 0 and budget.Plan.from_dict(json.loads(
        json.dumps(slow.to_dict()))) == slow


def test_the_pacer_counts_evaluations_and_saves_apart_from_steps(monkeypatch):
    """10 steps of 1 s with an evaluation of 3 s (its checkpoint inside it) and a save of 2 s: 1 s a step, 3 s an
    evaluation. A checkpoint written during the evaluation holds the time up to then, as the resumed run's
    clock starts there."""
    from sakimi_next.distributed import Distributed

    now = [0.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    p = replace(budget.plan(2, setup_s=5, step_s=1.0, eval_s=3.0), replan_every=10)
    pacer = budget.Pacer(p, t0=0.0)
    now[0] = 5 + 4
    with pacer.overhead(evaluation=True):
        now[0] += 2
        with pacer.overhead(evaluation=False):  # the evaluation's best checkpoint
            elapsed, state = pacer.state()
            now[0] += 1
    assert elapsed == 11 and state["pace"] == {"step": 0, "start_s": 5, "overhead_s": 2, "evals_s": 2, "evals": 1}
    with pacer.overhead(evaluation=False):
        now[0] += 2
    now[0] += 6
    assert pacer.due(10) and not pacer.due(5)
    new = pacer.replan(10, Distributed(0, 1, 0, torch.device("cpu")))
    assert (new.step_s, new.eval_s) == (1.0, 3.0) and not pacer.due(10)
    resumed = budget.Pacer(new, t0=100.0, elapsed_before=elapsed, pace=state["pace"])
    assert resumed.window_start_s == 5 and resumed.evals == 1


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
