"""scripts/quality.py: the 90/10 split of the quality benchmark (the benchmark itself reads ../shared/data
and runs for 40 minutes: `make quality`)."""

import importlib.util

from .helpers import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "scripts" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_90_10_at_a_newline():
    quality = load_script()
    text = "".join(f"第{i}回 line {i} {'x' * (i % 7)}\n" for i in range(1000)) + "no final newline"
    train, heldout = quality.split_90_10(text)
    assert train + heldout == text and train.endswith("\n")
    assert len(text) * 0.9 - 30 < len(train) <= len(text) * 0.9  # the last newline before 90%
    assert quality.DEFAULT_CORPORA == ["tinyshakespeare", "hongloumeng"]
    assert set(quality.CORPORA) == {"tinyshakespeare", "hongloumeng", "sanguoyanyi", "shuihuzhuan", "cmn_eng", "kjv",
                                    "wikitext2"}


def test_tokenizer_table_on_generated_text():
    """scripts/tokenizer_table.py's measurement: on Chinese, the tokenizer over whole characters gets a larger
    vocabulary and makes every character one token; on ASCII it is the very same tokenizer."""
    from .helpers import chinese_text, english_text

    spec = importlib.util.spec_from_file_location("tokenizer_table", ROOT / "scripts" / "tokenizer_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = chinese_text(60_000, seed=4)
    bpe, whole, bpe_large = table.measure(text[:50_000], text[50_000:])
    assert (bpe["kind"], whole["kind"], bpe_large["kind"]) == ("bpe", "whole characters", "bpe at the larger vocabulary")
    assert bpe["vocab"] < whole["vocab"] == bpe_large["vocab"]
    assert whole["single_token_chars"] > 0.99 and bpe["single_token_chars"] < whole["single_token_chars"]
    ascii_ = english_text(60_000).encode("ascii", "ignore").decode()
    rows = table.measure(ascii_[:50_000], ascii_[50_000:])
    assert len(rows) == 2 and rows[0]["sha256"] == rows[1]["sha256"] and rows[0]["single_token_chars"] is None
