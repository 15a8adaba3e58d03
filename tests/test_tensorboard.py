"""train --tensorboard: metrics.jsonl's records as TensorBoard scalars, read back with TensorBoard's own reader."""

import importlib.util
import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sakimi_next.cli import main
from sakimi_next.data import prepare_data
from sakimi_next.metrics import MetricsLog

from .helpers import english_text

TRAIN = ["--mode", "train", "--config", "tiny_5m", "--batch-size", "2", "--seq-len", "32", "--learning-rate", "3e-3",
         "--warmup-steps", "1", "--eval-batches", "1", "--print-every", "1", "--device", "cpu", "--no-compile",
         "--save-every", "2", "--eval-every", "2", "--keep-last", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "text.txt").write_text(english_text(40_000))
    return prepare_data([str(root / "text.txt")], None, root / "prepared", vocab_size=400, doc_split="blank-line")


def train(data_dir, out, *extra) -> int:
    return main([*TRAIN, "--data-dir", str(data_dir), "--out-dir", str(out), *extra])


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `directory`, as TensorBoard reads them (restarts purged)."""
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged(run_dir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by name, rounded to float32 as TensorBoard stores them."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
            if name != "step":
                out.setdefault(name, []).append((record["step"], float(np.float32(value))))
    return out


def test_scalars_equal_metrics_jsonl(data_dir, tmp_path):
    tb = tmp_path / "board"
    assert train(data_dir, tmp_path / "run", "--steps", "4", "--tensorboard", str(tb)) == 0
    expected = logged(tmp_path / "run")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"} <= set(expected)
    assert [s for s, _ in expected["loss"]] == [1, 2, 3, 4] and [s for s, _ in expected["val_bpb"]] == [2, 4]
    assert scalars(tb) == expected
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.slow
def test_resume_appends_and_a_fresh_run_starts_over(data_dir, tmp_path):
    """A run resumed from step 2 of 4 replaces steps 3 and 4 as metrics.jsonl does (the first run's stay in
    their file, hidden); a fresh run in the same directory hides everything before it."""
    run, tb = tmp_path / "run", tmp_path / "run" / "tensorboard"
    assert train(data_dir, run, "--steps", "4", "--tensorboard") == 0
    first = scalars(tb)
    assert train(data_dir, run, "--steps", "4", "--tensorboard", "--resume-from", str(run / "step_000002")) == 0
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    assert scalars(tb) == logged(run)
    assert scalars(tb)["loss"] == first["loss"]  # resume is exact: steps 3 and 4 again, once each

    assert train(data_dir, run, "--steps", "2", "--tensorboard") == 0
    assert scalars(tb) == logged(run) and [s for s, _ in scalars(tb)["loss"]] == [1, 2]


def test_flush_makes_the_records_visible_before_the_end(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", True, None, tmp_path / "tb")
    log.add({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5})
    log.add({"step": 2, "loss": 2.25, "lr": 2e-3, "grad_norm": 0.25, "skipped": True, "note": "text"})
    log.flush()
    f32 = [float(np.float32(x)) for x in (1e-3, 2e-3)]  # as TensorBoard stores them
    assert scalars(tmp_path / "tb") == {"loss": [(1, 2.5), (2, 2.25)], "lr": [(1, f32[0]), (2, f32[1])],
                                        "grad_norm": [(1, 0.5), (2, 0.25)]}  # numbers only, true/false not
    log.close()


def test_without_tensorboard_installed_one_line_before_any_work(data_dir, tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    assert train(data_dir, tmp_path / "run", "--steps", "2", "--tensorboard") == 2
    err = capsys.readouterr().err
    assert err == "error: --tensorboard needs the tensorboard package: pip install 'sakimi-next[tensorboard]'\n"
    assert not (tmp_path / "run").exists()
