"""--dropout: it changes training, and nothing else: not evaluation, not generation, not the saved or
exported files."""

import json

import pytest
import torch

from sakimi_next import checkpoint as ckpt
from sakimi_next.cli import main
from sakimi_next.model import Qwen3NextForCausalLM

from .helpers import small_config


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config())
    x = torch.randint(0, 160, (2, 24))
    model.eval()
    with torch.no_grad():
        reference = model(x).logits
        model.train()
        assert torch.equal(model(x).logits, reference)  # p = 0: training mode computes the same thing
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        hf = model.config.to_hf_dict()
        model.set_dropout(0.3)
        dropped = model(x).logits
        assert not torch.allclose(dropped, reference)
        assert not torch.equal(model(x).logits, dropped)  # a new mask each call
        model.eval()
        assert torch.equal(model(x).logits, reference)  # evaluation and generation never drop
        cache = model.new_cache(2)
        assert torch.equal(model(x, cache=cache).logits, reference)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model.config.to_hf_dict() == hf and "dropout" not in model.config.to_dict()
    with pytest.raises(ValueError):
        model.set_dropout(1.0)


def test_processes_drop_what_one_process_drops():
    """Under torchrun each process draws the masks of the whole global batch and keeps its rows: two processes
    with 2 rows each (their generators in the same state) compute what one process with the 4 rows computes,
    and their masks differ (the same seed would otherwise give every rank the same masks)."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config())
    x = torch.randint(0, 160, (4, 24))
    model.set_dropout(0.3)
    torch.manual_seed(1)
    whole = model(x).logits
    halves = []
    for rank in (0, 1):
        model.set_dropout(0.3, (rank, 2))
        torch.manual_seed(1)
        halves.append(model(x[2 * rank:2 * rank + 2]).logits)
    assert torch.equal(torch.cat(halves), whole)
    model.set_dropout(0.3)
    torch.manual_seed(1)
    same_seed = model(x[2:]).logits  # rank 1 drawing only its own rows: rank 0's masks
    assert not torch.allclose(same_seed, whole[2:])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    assert main(["--mode", "prepare_data", "--out-dir", str(out), "--config", "tiny_5m", "--vocab-size", "300"]) == 0
    return out


def test_dropout_changes_training_not_the_files(data_dir, tmp_path):
    args = ["--mode", "train", "--config", "tiny_5m", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
            "--eval-every", "2", "--eval-batches", "1", "--device", "cpu", "--data-dir", str(data_dir)]
    assert main([*args, "--out-dir", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "dropped"), "--dropout", "0.2"]) == 0
    runs = {name: ckpt.find_latest(tmp_path / name) for name in ("plain", "dropped")}
    first = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for name in runs}
    assert first["plain"] != first["dropped"]  # the same weights and batch, another loss: dropout was on
    assert (runs["plain"] / "config.json").read_bytes() == (runs["dropped"] / "config.json").read_bytes()
    state = json.loads((runs["dropped"] / ckpt.STATE_FILE).read_text())
    assert state["args"]["dropout"] == 0.2  # a training setting, kept for resuming
    for name, path in runs.items():
        out = tmp_path / f"hf_{name}"
        assert main(["--mode", "export", "--resume-from", str(path), "--out-dir", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert [k for k in config if "dropout" in k] == ["attention_dropout"] and config["attention_dropout"] == 0.0
    plain, dropped = (tmp_path / "hf_plain" / "config.json"), (tmp_path / "hf_dropped" / "config.json")
    assert plain.read_bytes() == dropped.read_bytes()
