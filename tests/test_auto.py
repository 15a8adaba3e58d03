"""--config auto: the rule, and a fresh run that uses it by default."""

import json
from collections import Counter

import pytest

from sakimi_next import auto
from sakimi_next import checkpoint as ckpt
from sakimi_next.cli import main
from sakimi_next.data import load_meta, open_split
from sakimi_next.tokenizer import EOT, Tokenizer, frequent_characters

from .helpers import chinese_text, english_text


def test_vocab_follows_the_text_size():
    assert [auto.vocab_size(n) for n in (0, 420_000, 903_453, 2_300_000, 5_000_000, 10**9)] == \
        [512, 512, 1024, 2048, 4096, 8192]


def zipf(n: int, top: int) -> dict[str, int]:
    """`n` CJK characters, the k-th seen top / k times (at least once)."""
    return {chr(0x4E00 + i): max(1, top // (i + 1)) for i in range(n)}


def test_vocab_follows_the_character_inventory():
    """With the text's characters (a tokenizer over whole characters): the bytes' vocabulary plus the merges
    that give the frequent characters a token each, rounded to 256, at most 16,384."""
    english = {chr(c): 1000 for c in range(32, 127)}
    for n in (0, 420_000, 903_453, 5_000_000, 10**9):  # English: nothing changes
        assert auto.vocab_size(n, english) == auto.vocab_size(n)
    # a few frequent characters of several bytes (curly quotes: 4 merges) are rounded away
    assert auto.vocab_size(1_000_000, {**english, "’": 900, "“": 300, "”": 300}) == 1024
    # 4,299 of 4,500 Zipf-distributed characters make up 99.5%: 4,367 merges; 2,048 + 4,367 -> 6,400
    assert auto.vocab_size(2_250_000, zipf(4500, 100_000)) == 6400
    # a small text: 750 characters seen 4 times or more, 762 merges; 512 + 762 -> 1,280
    assert auto.vocab_size(100_000, zipf(2000, 3000)) == 1280
    # a huge inventory stops at the cap
    assert auto.vocab_size(200_000_000, zipf(20_000, 10**6)) == auto.MAX_VOCAB_WITH_CHARACTERS == 16384
    # generated Chinese (tests/helpers.py, 30,000 characters): 372 characters, 523 merges; 512 + 523 -> 1,024
    text = chinese_text(30_000)
    assert auto.vocab_size(len(text.encode()), Counter(text)) == 1024


def test_prepare_with_whole_characters(tmp_path, capsys):
    """--whole-characters: the vocabulary follows the characters, each frequent character is one token, and
    turning it off trains the tokenizer again."""
    corpus = tmp_path / "zh.txt"
    corpus.write_text(chinese_text(60_000) + english_text(20_000), encoding="utf-8")
    text = corpus.read_text(encoding="utf-8")
    data = tmp_path / "data"
    assert main(["--mode", "prepare_data", "--train-data", str(corpus), "--out-dir", str(data),
                 "--whole-characters"]) == 0
    out = capsys.readouterr().out
    vocab = auto.vocab_size(corpus.stat().st_size, Counter(text))
    assert vocab == 1024 and f"a vocabulary of {vocab:,} for {corpus.stat().st_size:,} bytes" in out
    assert "over whole characters" in out
    meta = load_meta(data)
    assert meta["vocab_size"] == vocab and meta["settings"]["whole_characters"] is True
    tok = Tokenizer.load(data / "tokenizer.json")
    # the tokenizer learned from the training split (the text less its validation stretches)
    train_text = tok.decode(open_split(data, "train").tolist()).replace(EOT, "")
    assert 0 < len(text) - len(train_text) < 0.11 * len(text)  # --config auto holds out 10% here
    assert all(len(tok.encode(ch)) == 1 for ch in frequent_characters(Counter(train_text)))
    assert main(["--mode", "prepare_data", "--train-data", str(corpus), "--out-dir", str(data),
                 "--whole-characters"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert auto.WHOLE_CHARACTERS  # --config auto's default: the same folder, the same settings
    assert main(["--mode", "prepare_data", "--train-data", str(corpus), "--out-dir", str(data)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["--mode", "prepare_data", "--train-data", str(corpus), "--out-dir", str(data),
                 "--no-whole-characters"]) == 0
    assert "training byte-level BPE, vocab 512 (the training data or settings changed" in capsys.readouterr().out
    assert load_meta(data)["vocab_size"] == 512 and "whole_characters" not in load_meta(data)["settings"]


def test_dropout_follows_the_passes_the_budget_allows():
    assert [auto.dropout_for(p) for p in (0.5, 1.0, 3.0, 4.0, 6.0)] == [0.0, 0.0, 0.1, 0.1, 0.2]
    # the half trunk: 0.1 beyond one pass, up to the SHALLOW_MAX_PASSES it stops at
    shallow = [auto.dropout_for(p, auto.SHALLOW_LAYERS) for p in (0.5, 1.0, 3.0, 6.0, auto.SHALLOW_MAX_PASSES)]
    assert shallow == [0.0, 0.0, 0.1, 0.1, 0.1]
    assert auto.measured_choices(1000, 6000)["dropout"] == 0.2  # a measured plan of 6 passes, each trunk its own
    assert auto.measured_choices(1000, 6000, auto.SHALLOW_LAYERS)["dropout"] == 0.1
    cpu = auto.TOKENS_PER_S["cpu"]
    tokens = int(60 * 60 * cpu / 3)  # an hour: the whole trunk reads them three times, half of it ~5.7
    assert auto.dropout(tokens, 60, "cpu") == auto.dropout_for(3 * auto.SHALLOW_SPEEDUP, auto.SHALLOW_LAYERS) == 0.1
    assert auto.dropout(tokens, 600, "cpu") == 0.2  # thirty: all the layers, and the most dropout
    assert auto.dropout(tokens * 100, 60, "cpu") == 0.0  # well under one pass
    assert auto.dropout(100_000_000, None, "cpu") == 0.0  # no budget: the default steps, under one pass
    assert auto.training_defaults(1000, 1, "cpu")["learning_rate"] == 2e-3


def test_weight_decay_follows_the_passes_the_budget_allows():
    assert [auto.weight_decay_for(p) for p in (0.5, 1.0, 1.5, 6.0)] == [0.1, 0.1, auto.WD_MANY, auto.WD_MANY]
    cpu = auto.TOKENS_PER_S["cpu"]
    tokens = int(60 * 60 * cpu / 3)
    assert auto.weight_decay(tokens * 100, 60, "cpu") == 0.1  # well under one pass: the usual
    assert auto.weight_decay(tokens, 60, "cpu") == auto.WD_MANY > 0.1  # several
    assert auto.training_defaults(tokens, 600, "cpu")["weight_decay"] == auto.WD_MANY
    assert auto.weight_decay(100_000_000, None, "cpu") == 0.1


def test_depth_follows_the_passes_the_budget_allows():
    """All of the trunk's layers where the budget lets them read the text MAX_PASSES times at the
    prior speed, else half of them, which read it SHALLOW_SPEEDUP times as often."""
    cpu = auto.TOKENS_PER_S["cpu"]
    enough = int(20 * 60 * cpu / auto.MAX_PASSES)  # the most tokens 20 minutes read often enough
    assert auto.layers(enough, 20, "cpu") == auto.TRUNK_LAYERS == 8
    assert auto.layers(enough + 1, 20, "cpu") == auto.SHALLOW_LAYERS == 4
    assert auto.layers(enough + 1, 40, "cpu") == 8  # a longer budget: the whole trunk
    assert auto.layers(10**9, None, "cpu") == 8  # no budget: the steps are the user's
    assert auto.layers(enough * 60, 20, "cuda") == 8  # a GPU reads far more in the same minutes
    shallow = auto.MAX_PASSES / 2 * auto.SHALLOW_SPEEDUP
    assert auto.passes(2 * enough, 20, "cpu") == pytest.approx(shallow, rel=1e-4)
    assert auto.passes(2 * enough, 20, "cpu", depth=8) == pytest.approx(auto.MAX_PASSES / 2, rel=1e-4)
    # dropout and weight decay follow the passes of the trunk that trains
    assert auto.dropout(2 * enough, 20, "cpu") == auto.dropout_for(shallow, auto.SHALLOW_LAYERS) == 0.1
    assert auto.dropout(enough, 20, "cpu") == auto.dropout_for(auto.MAX_PASSES) == 0.2
    config = auto.model_config(1024, 4)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size) == \
        (4, auto.SHALLOW_HIDDEN, 3 * auto.SHALLOW_HIDDEN, 1024) == (4, 320, 960, 1024)
    assert auto.model_config(1024).hidden_size == 256  # the whole trunk is tiny_10m's
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]  # still 3:1


def test_default_run_is_auto(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["--mode", "prepare_data", "--out-dir", str(data)]) == 0
    assert "a vocabulary of 512" in capsys.readouterr().out
    assert load_meta(data)["vocab_size"] == 512
    run = tmp_path / "run"
    args = ["--mode", "train", "--data-dir", str(data), "--out-dir", str(run), "--steps", "1", "--batch-size", "2",
            "--seq-len", "32", "--eval-batches", "1", "--device", "cpu"]
    assert main(args) == 0
    assert "--config auto: tiny_10m's trunk with vocab 512" in capsys.readouterr().out
    latest = ckpt.find_latest(run)
    config = json.loads((latest / "config.json").read_text())
    state = json.loads((latest / ckpt.STATE_FILE).read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (512, 256, 8)
    assert state["preset"] == "auto" and state["args"]["dropout"] == 0.2 and state["args"]["learning_rate"] == 2e-3
    assert state["args"]["weight_decay"] == auto.WD_MANY and state["args"]["optimizer"] == "muon"
    train_tokens = load_meta(data)["splits"]["train"]["tokens"]
    assert state["args"]["lead_in"] == auto.context(train_tokens)["lead_in"] == auto.LONG_CONTEXT["lead_in"]
    assert state["args"]["ema"] == 0.1  # the model handed out is the weights' average
    assert json.loads((latest / "optimizer.json").read_text())["class"] == "MuonWithAdamW"
    # the command line still wins
    assert main([*args, "--out-dir", str(tmp_path / "run2"), "--dropout", "0", "--weight-decay", "0.1",
                 "--optimizer", "adamw"]) == 0
    state = json.loads((ckpt.find_latest(tmp_path / "run2") / ckpt.STATE_FILE).read_text())
    assert (state["args"]["dropout"], state["args"]["weight_decay"], state["args"]["optimizer"]) == (0.0, 0.1, "adamw")
    # a budget too short for the whole trunk to read the text often: half of its layers, and resuming keeps them
    budget = [*args, "--out-dir", str(tmp_path / "run3"), "--max-minutes", "1"]
    assert main(budget) == 0
    assert "--config auto: tiny_10m's trunk at 4 of its 8 layers, 320 wide, with vocab 512" in capsys.readouterr().out
    shallow = json.loads((ckpt.find_latest(tmp_path / "run3") / "config.json").read_text())
    assert (shallow["num_hidden_layers"], shallow["hidden_size"]) == (4, 320)
    assert main([*budget, "--steps", "2", "--resume-from", "auto"]) == 0
    resumed = json.loads((ckpt.find_latest(tmp_path / "run3") / "config.json").read_text())
    assert (resumed["num_hidden_layers"], resumed["hidden_size"]) == (4, 320)


def test_the_pass_cap_in_steps():
    from sakimi_next import auto

    assert auto.max_steps(345_299, 8 * 256) == 927  # Tiny Shakespeare at 8 x 256 (the README's run)
    assert auto.max_steps(10, 2048) == 1  # at least one step
    assert auto.max_steps(376_059, 2048, depth=4) == 1836  # half the trunk: 10 passes


def test_long_windows_and_lead_in_need_text_to_spare():
    tiny_shakespeare = auto.context(345_299)
    assert tiny_shakespeare == auto.LONG_CONTEXT == dict(batch_size=4, seq_len=512, lead_in=512)
    assert auto.context(10_250) == auto.LONG_CONTEXT
    assert auto.context(10_249) == auto.SHORT_CONTEXT == dict(batch_size=8, seq_len=256, lead_in=0)
    for c in (auto.LONG_CONTEXT, auto.SHORT_CONTEXT):
        assert c["batch_size"] * c["seq_len"] == auto.TOKENS_PER_STEP  # the passes the rule assumes


def test_validation_share_follows_the_text_size(tmp_path, capsys):
    from .helpers import english_text

    sizes = (1000, 200_000, 400_000, 1_000_000, 1_003_836, 10**9)
    assert [auto.val_fraction(n) for n in sizes] == pytest.approx([0.1, 0.1, 0.05, 0.02, 0.02, 0.02])
    text = tmp_path / "big.txt"
    text.write_text((english_text(200_000) + "\n") * 2)  # ~400 KB: 20 KB of it is 5%
    auto_share = auto.val_fraction(text.stat().st_size)
    assert auto_share == pytest.approx(0.05, abs=0.002)
    for extra, share in (([], auto_share), (["--config", "tiny_10m"], 0.1), (["--val-fraction", "0.2"], 0.2)):
        out = tmp_path / f"data{share}"
        assert main(["--mode", "prepare_data", "--train-data", str(text), "--out-dir", str(out), *extra]) == 0
        meta = load_meta(out)
        held = meta["splits"]["val"]["bytes"] / (meta["splits"]["val"]["bytes"] + meta["splits"]["train"]["bytes"])
        assert meta["settings"]["val_fraction"] == share and abs(held - share) < 0.01, (extra, held)
