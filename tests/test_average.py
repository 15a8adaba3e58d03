"""--ema: the weights a run hands out are the power-function average of its weights; training itself is
unchanged, and a resumed run is the uninterrupted one bit for bit, its average included."""

import json
import math
import os

import pytest
import torch

from sakimi_next import checkpoint as ckpt
from sakimi_next.average import WeightAverage, gamma
from sakimi_next.cli import main
from sakimi_next.data import prepare_data

from .helpers import english_text

TRAIN = ["--mode", "train", "--config", "tiny_5m", "--batch-size", "4", "--seq-len", "64", "--learning-rate", "3e-3",
         "--warmup-steps", "2", "--eval-batches", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "text.txt").write_text(english_text(60_000))
    return prepare_data([str(root / "text.txt")], None, root / "prepared", vocab_size=512)


def test_the_average_weighs_each_step_by_a_power_of_it():
    """After t steps, step tau weighs (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1): the discrete power-function
    profile, ~ tau^g; a step H of the run back weighs half as much as the last."""
    layer = torch.nn.Linear(3, 2, dtype=torch.float64)
    average = WeightAverage(layer, 0.1)
    g = gamma(0.1)
    assert (1 - 0.1) ** g == pytest.approx(0.5)
    steps = 200
    seen = []
    for t in range(1, steps + 1):
        with torch.no_grad():
            layer.weight.normal_()
        seen.append(layer.weight.detach().clone())
        average.update(t)
    weights = [(tau ** (g + 1) - (tau - 1) ** (g + 1)) / steps ** (g + 1) for tau in range(1, steps + 1)]
    expected = sum(w * x for w, x in zip(weights, seen))
    assert math.isclose(sum(weights), 1.0)
    assert torch.allclose(average.average[0], expected, rtol=1e-10, atol=1e-12)
    assert weights[int(0.9 * steps) - 1] / weights[-1] == pytest.approx(0.5, rel=0.05)


def test_applied_exchanges_and_gives_back_exactly():
    layer = torch.nn.Linear(4, 4)
    average = WeightAverage(layer, 0.2)
    own = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        for a in average.average:
            a.add_(1.0)  # an average that differs from the weights
    with average.applied():
        assert torch.equal(layer.weight, own["weight"] + 1.0) and torch.equal(layer.bias, own["bias"] + 1.0)
    assert all(torch.equal(v, own[k]) for k, v in layer.state_dict().items())
    with pytest.raises(RuntimeError), average.applied():
        raise RuntimeError  # an error inside still gives the training weights back
    assert all(torch.equal(v, own[k]) for k, v in layer.state_dict().items())


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def training_weights(checkpoint):
    tensors = ckpt.load_tensors(checkpoint / ckpt.OPTIM_FILE)
    return {k[len(ckpt.TRAINING_WEIGHTS):]: v for k, v in tensors.items() if k.startswith(ckpt.TRAINING_WEIGHTS)}


def test_training_is_unchanged_and_the_checkpoint_holds_the_average(data_dir, tmp_path):
    """The same losses step by step as without --ema; the training weights (kept beside the optimiser's
    state) are the plain run's weights bit for bit, step by step; model.safetensors is their
    power-function average over the steps so far, and the validation is the average's."""
    steps, h = 8, 0.3
    args = [*TRAIN, "--data-dir", str(data_dir), "--steps", str(steps), "--eval-every", "4", "--save-every", "1",
            "--keep-last", "0"]
    assert main([*args, "--out-dir", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "ema"), "--ema", str(h)]) == 0
    plain, ema = metrics(tmp_path / "plain"), metrics(tmp_path / "ema")
    assert [r["loss"] for r in plain if "loss" in r] == [r["loss"] for r in ema if "loss" in r]
    plain_val = [r["val_loss"] for r in plain if "val_loss" in r]
    ema_val = [r["val_loss"] for r in ema if "val_loss" in r]
    assert len(ema_val) == 2 and all(a != b for a, b in zip(plain_val, ema_val))
    trained = []
    for step in range(1, steps + 1):
        plain_weights = ckpt.load_tensors(tmp_path / "plain" / ckpt.step_dir_name(step) / ckpt.MODEL_FILE)
        kept = training_weights(tmp_path / "ema" / ckpt.step_dir_name(step))
        assert kept.keys() == plain_weights.keys() and all(torch.equal(kept[k], plain_weights[k]) for k in kept)
        trained.append(kept)
    g = gamma(h)
    weights = [(tau ** (g + 1) - (tau - 1) ** (g + 1)) / steps ** (g + 1) for tau in range(1, steps + 1)]
    averaged = ckpt.load_tensors(tmp_path / "ema" / ckpt.step_dir_name(steps) / ckpt.MODEL_FILE)
    for name, value in averaged.items():
        expected = sum(w * t[name].double() for w, t in zip(weights, trained))
        assert torch.allclose(value.double(), expected, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(averaged["model.embed_tokens.weight"], trained[-1]["model.embed_tokens.weight"])
    state = json.loads((tmp_path / "ema" / ckpt.step_dir_name(steps) / ckpt.STATE_FILE).read_text())
    assert state["args"]["ema"] == h


def test_resumed_run_keeps_its_average_bit_for_bit(data_dir, tmp_path):
    """Resumed half-way (training goes on from the training weights, the average from the checkpoint's
    model): the losses, the validations of the average and every saved tensor as if never interrupted."""
    common = ["--steps", "12", "--eval-every", "6", "--save-every", "6", "--ema", "0.2", "--dropout", "0.1"]
    assert main([*TRAIN, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "whole"), *common]) == 0
    (tmp_path / "cut").mkdir()
    os.symlink(tmp_path / "whole" / "step_000006", tmp_path / "cut" / "half")
    assert main([*TRAIN, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "cut"), "--steps", "12",
                 "--eval-every", "6", "--save-every", "6", "--resume-from", str(tmp_path / "cut" / "half")]) == 0
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [r["loss"] for r in cut if r["step"] > 6 and "loss" in r] == \
        [r["loss"] for r in whole if r["step"] > 6 and "loss" in r]
    assert [r["val_loss"] for r in cut if "val_loss" in r] == [r["val_loss"] for r in whole if "val_loss" in r][1:]
    for name in (ckpt.MODEL_FILE, ckpt.OPTIM_FILE):
        a = ckpt.load_tensors(tmp_path / "whole" / "latest" / name)
        b = ckpt.load_tensors(tmp_path / "cut" / "latest" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
