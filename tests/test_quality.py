"""The quality benchmark's plumbing, without its corpora or a nanoGPT checkout (the benchmark itself reads
../shared/data and trains for 20 minutes a corpus: `make quality`, `make compare NANOGPT=DIR`): the 90/10
split, nanoGPT's character-level data from that split, its held-out scoring (a fake nanoGPT checkout: a
bigram model.py written here), bits per byte, the plan that fills the minutes, and the tables."""

from __future__ import annotations

import importlib
import json
import math
import pickle
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from .helpers import ROOT, chinese_text


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return SimpleNamespace(**{m: importlib.import_module(m) for m in
                              ("quality", "quality_table", "compare_nanogpt", "nanogpt_score")})


def mixed_text(n_lines: int = 400) -> str:
    zh = chinese_text(8_000).splitlines()
    return "".join(f"Line {i}: the {i % 13}th cat.\t{zh[i % len(zh)]}\n" for i in range(n_lines))


def test_split_90_10_at_a_newline(scripts):
    text = "".join(f"第{i}回 line {i} {'x' * (i % 7)}\n" for i in range(1000)) + "no final newline"
    train, heldout = scripts.quality.split_90_10(text)
    assert train + heldout == text and train.endswith("\n")
    assert len(text) * 0.9 - 30 < len(train) <= len(text) * 0.9  # the last newline before 90%
    assert scripts.quality.DEFAULT_CORPORA == ["tinyshakespeare", "hongloumeng", "sanguoyanyi", "kjv", "cmn_eng"]
    assert list(scripts.quality.CORPORA) == scripts.quality.DEFAULT_CORPORA + ["shuihuzhuan", "wikitext2"]


def test_read_corpus_describes_the_split(scripts, tmp_path):
    text = mixed_text()
    (tmp_path / "cmn_eng").mkdir()
    (tmp_path / "cmn_eng" / "cmn.txt").write_text(text, encoding="utf-8")
    train, heldout, split = scripts.quality.read_corpus(tmp_path, "cmn_eng")
    assert (train, heldout) == scripts.quality.split_90_10(text)
    assert split["train_chars"] + split["heldout_chars"] == len(text)
    assert split["heldout_bytes"] == len(heldout.encode("utf-8")) > split["heldout_chars"]  # Chinese: 3 bytes
    assert split["heldout_sha256"] == scripts.quality.sha256(heldout) != split["sha256"]
    assert scripts.quality.slug(["--dropout", "0.1"]) == "dropout-0.1" and scripts.quality.slug([]) == "default"


def test_swap_in_replaces_a_previous_run_only_when_the_new_one_is_complete(scripts, tmp_path):
    final, new = tmp_path / "kjv", tmp_path / ".kjv.partial"
    final.mkdir()
    (final / "results.json").write_text("old")
    new.mkdir()
    (new / "results.json").write_text("new")
    scripts.quality.swap_in(new, final)
    assert (final / "results.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kjv"]


def decode(path, itos) -> str:
    return "".join(itos[i] for i in np.fromfile(path, dtype=np.uint16).tolist())


def test_nanogpt_data_from_the_same_split(scripts, tmp_path):
    """train.bin + val.bin decode to our training text, heldout.bin to the newline before the held-out text
    and the held-out text; the vocabulary covers both, a character only the held-out text has included."""
    train, heldout = scripts.quality.split_90_10(mixed_text() + "only here: 龘\n")
    info = scripts.compare_nanogpt.prepare_char_data(train, heldout, tmp_path, val_fraction=0.1)
    meta = pickle.loads((tmp_path / "meta.pkl").read_bytes())
    assert set(meta) == {"vocab_size", "itos", "stoi"}  # data/shakespeare_char/prepare.py's
    assert meta["vocab_size"] == info["vocab_size"] == len(set(train + heldout))
    assert sorted(meta["itos"]) == list(range(meta["vocab_size"]))
    assert all(meta["stoi"][c] == i for i, c in meta["itos"].items())
    nano_train, nano_val = decode(tmp_path / "train.bin", meta["itos"]), decode(tmp_path / "val.bin", meta["itos"])
    assert nano_train + nano_val == train and nano_train.endswith("\n")
    assert info["val_chars"] == len(nano_val) and 0.08 * len(train) < len(nano_val) <= 0.11 * len(train)
    assert decode(tmp_path / "heldout.bin", meta["itos"]) == "\n" + heldout
    unseen = json.loads((tmp_path / "unseen.json").read_text(encoding="utf-8"))
    assert "龘" in unseen["chars"] and unseen["ids"] == [meta["stoi"][c] for c in unseen["chars"]]
    assert set(unseen["chars"]) == set(heldout) - set(nano_train) and info["unseen_chars"] == len(unseen["ids"])
    assert info["unseen_occurrences"] == sum(c in unseen["chars"] for c in heldout)
    assert info["train_bytes"] == len(nano_train.encode())


def test_bits_per_byte(scripts):
    bpb = scripts.compare_nanogpt.bits_per_byte
    assert bpb(1000 * math.log(256), 1000) == pytest.approx(8.0)  # uniform over bytes
    # 500 Chinese characters (3 bytes each), uniform over 4,096 of them: 12 bits a character
    assert bpb(500 * math.log(4096), 1500) == pytest.approx(4.0)


@pytest.mark.parametrize("n_ids,block,stride", [(2, 64, 32), (64, 64, 32), (65, 64, 32), (1000, 64, 32),
                                                (1000, 64, 1), (1001, 64, 64), (10, 4, 3), (37, 8, 5)])
def test_sliding_windows_predict_every_character_once(scripts, n_ids, block, stride):
    targets = []
    for begin, end, new in scripts.nanogpt_score.sliding_windows(n_ids, block, stride):
        assert 0 <= begin < end <= n_ids - 1 and end - begin <= block and 1 <= new <= end - begin
        first = end - new + 1  # the first target scored: ids[first], read with ids[begin:first] before it
        assert first - begin >= min(block - stride, first)
        targets += range(first, end + 1)
    assert targets == list(range(1, n_ids))


FAKE_MODEL = '''
from dataclasses import dataclass
import torch

@dataclass
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 5

class GPT(torch.nn.Module):
    """A bigram table: the next character's logits depend on the current one only."""
    def __init__(self, config):
        super().__init__()
        print("number of parameters: 0.00M")  # as nanoGPT's does
        self.table = torch.nn.Parameter(torch.zeros(config.vocab_size, config.vocab_size))

    def forward(self, idx, targets=None):
        return self.table[idx], None
'''


def test_nanogpt_score_in_a_fake_checkout(scripts, tmp_path, monkeypatch):
    """nanogpt_score.py, run in the checkout, loads its model.py and checkpoint (torch.compile's _orig_mod.
    prefix removed) and sums the nats of every held-out character once."""
    import torch

    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    checkout, run = tmp_path / "nanogpt", tmp_path / "run"
    for folder in (checkout, run / "out", run / "data"):
        folder.mkdir(parents=True)
    (checkout / "model.py").write_text(FAKE_MODEL)
    table = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    torch.save({"model": {"_orig_mod.table": table}, "model_args": {"block_size": 8, "vocab_size": 5},
                "iter_num": 250, "best_val_loss": torch.tensor(1.5)}, run / "out" / "ckpt.pt")
    ids = torch.randint(0, 5, (101,), generator=torch.Generator().manual_seed(1))
    ids.numpy().astype(np.uint16).tofile(run / "data" / "heldout.bin")
    (run / "data" / "unseen.json").write_text(json.dumps({"chars": "x", "ids": [3]}))
    out = scripts.compare_nanogpt.score_nanogpt(sys.executable, checkout, run, stride=3)
    nll = -torch.log_softmax(table, -1)[ids[:-1], ids[1:]]
    assert out["targets"] == 100 and out["nats"] == pytest.approx(nll.sum().item(), rel=1e-6)
    assert out["unseen_targets"] == int((ids[1:] == 3).sum())
    assert out["unseen_nats"] == pytest.approx(nll[ids[1:] == 3].sum().item(), rel=1e-6)
    assert (out["block_size"], out["stride"], out["iter_num"], out["best_val_loss"]) == (8, 3, 250, 1.5)
    assert sorted(p.name for p in checkout.iterdir()) == ["model.py"]  # the checkout is not written to


def test_the_plan_fills_the_minutes(scripts):
    cg = scripts.compare_nanogpt
    # 0.04 s an iteration; an evaluation every 100 adds 0.5 s; 5 s to start
    dts = {i: 0.04 + (0.5 if i % 100 == 0 and i else 0) + (1.0 if i < 5 else 0) for i in range(450)}
    speed = cg.speed_from(dts, startup_s=5.0, eval_interval=100)
    assert speed.iter_s == pytest.approx(0.04) and speed.eval_s == pytest.approx(0.5)
    # (60 s - 5 s) / (0.04 + 0.5 / 250) = 1,309 iterations: 5 evaluations, every 261 -> 1,305
    assert cg.plan_iters(speed, budget_s=60.0) == (1305, 261)
    assert cg.plan_iters(speed, budget_s=10.0) == (119, 119)  # one evaluation, at the end
    assert cg.plan_iters(speed, budget_s=20 * 60) == (28_386, 249)  # 114 evaluations
    with pytest.raises(cg.Failed):
        cg.speed_from({i: 0.04 for i in range(5, 99)}, 5.0, 100)  # no evaluation timed
    assert cg.ITER_LINE.match("iter 17: loss 2.4512, time 41.20ms, mfu 0.01%").groups() == ("17", "41.20")


def fake_run(system, tag, corpus, title, bpb, sliding=None, **more) -> dict:
    return {"system": system, "tag": tag, "corpus": corpus, "title": title, "heldout_bpb": bpb,
            "heldout_bpb_sliding": sliding, "vocab_size": 1024, "train_bytes_per_token": 2.5,
            "heldout_bytes_per_token": 2.4, "steps": 976, "best_step": 950, "train_minutes": 19.5,
            "minutes_budget": 20, **more}


def test_tables_from_results_files(scripts, tmp_path, capsys):
    qt = scripts.quality_table
    default, variant = tmp_path / "quality" / "default", tmp_path / "quality" / "dropout-0.1"
    for folder, tag, figures in ((default, "default", (2.043, 1.914)), (variant, "dropout-0.1", (2.051, 1.880))):
        runs = [fake_run("sakimi-next", tag, "tinyshakespeare", "Tiny Shakespeare", figures[0], 2.05),
                fake_run("sakimi-next", tag, "hongloumeng", "红楼梦", figures[1], 1.93)]
        for run in runs:
            (folder / run["corpus"]).mkdir(parents=True)
            (folder / run["corpus"] / "results.json").write_text(json.dumps(run))
        (folder / "results.json").write_text(json.dumps(runs))  # the tag's gathering repeats them
    (folder / ".kjv.partial").mkdir()  # an interrupted run is not read
    (folder / ".kjv.partial" / "results.json").write_text(json.dumps(fake_run("sakimi-next", tag, "kjv", "KJV", 9.0)))
    nano = tmp_path / "compare.json"
    nano.write_text(json.dumps([fake_run("nanoGPT", "default", "hongloumeng", "红楼梦", 1.887, 1.887)]))
    runs = qt.load([tmp_path / "quality", nano])
    assert len(runs) == 5
    assert qt.comparison_table(runs) == (
        "| text | sakimi-next | sakimi-next `dropout-0.1` | nanoGPT |\n"
        "|---|---|---|---|\n"
        "| Tiny Shakespeare | **2.043** | 2.051 |  |\n"
        "| 红楼梦 | 1.914 | **1.880** | 1.887 |")
    assert "| 红楼梦 | 1.930 | 1.930 | 1.887 |" in qt.comparison_table(runs, "heldout_bpb_sliding").replace("**", "")
    details = qt.details_table(runs).splitlines()
    assert details[2] == ("| Tiny Shakespeare | sakimi-next | 2.0430 | 2.0500 | 1,024 | 2.50 / 2.40 | 976 (best 950) "
                          "| 19.5 of 20 |")
    assert qt.main([str(tmp_path / "quality"), str(nano), "--details"]) == 0
    assert "| 红楼梦 | 1.914 | **1.880** | 1.887 |" in capsys.readouterr().out
    assert qt.main([str(tmp_path / "nothing")]) == 2


def test_our_column_from_an_earlier_run_must_match_the_split(scripts, tmp_path):
    cg, q = scripts.compare_nanogpt, scripts.quality
    (tmp_path / "data" / "cmn_eng").mkdir(parents=True)
    (tmp_path / "data" / "cmn_eng" / "cmn.txt").write_text(mixed_text(), encoding="utf-8")
    _, _, split = q.read_corpus(tmp_path / "data", "cmn_eng")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([fake_run("sakimi-next", "default", "cmn_eng", "pairs", 2.5, split=split)]))
    assert cg.ours_from(results, ["cmn_eng"], tmp_path / "data", 20)["cmn_eng"]["heldout_bpb"] == 2.5
    with pytest.raises(cg.Failed, match="10 minutes, not 20"):
        results.write_text(json.dumps([fake_run("sakimi-next", "default", "cmn_eng", "p", 2.5, split=split,
                                                minutes_budget=10)]))
        cg.ours_from(results, ["cmn_eng"], tmp_path / "data", 20)
    with pytest.raises(cg.Failed, match="another held-out text"):
        results.write_text(json.dumps([fake_run("sakimi-next", "default", "cmn_eng", "p", 2.5,
                                                split={**split, "heldout_sha256": "0"})]))
        cg.ours_from(results, ["cmn_eng"], tmp_path / "data", 20)


def test_compare_refuses_a_folder_that_is_not_nanogpt(scripts, tmp_path, capsys):
    assert scripts.compare_nanogpt.main(["--nanogpt", str(tmp_path), "--shared-data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --nanogpt {tmp_path} is not a nanoGPT checkout")


def test_tokenizer_table_on_generated_text(scripts):
    """scripts/tokenizer_table.py's measurement: on Chinese, the tokenizer over whole characters gets a larger
    vocabulary and makes every character one token; on ASCII it is the very same tokenizer."""
    from .helpers import english_text

    table = importlib.import_module("tokenizer_table")
    text = chinese_text(60_000, seed=4)
    bpe, whole, bpe_large = table.measure(text[:50_000], text[50_000:])
    kinds = (bpe["kind"], whole["kind"], bpe_large["kind"])
    assert kinds == ("bpe", "whole characters", "bpe at the larger vocabulary")
    assert bpe["vocab"] < whole["vocab"] == bpe_large["vocab"]
    assert whole["single_token_chars"] > 0.99 and bpe["single_token_chars"] < whole["single_token_chars"]
    ascii_ = english_text(60_000).encode("ascii", "ignore").decode()
    rows = table.measure(ascii_[:50_000], ascii_[50_000:])
    assert len(rows) == 2 and rows[0]["sha256"] == rows[1]["sha256"] and rows[0]["single_token_chars"] is None
