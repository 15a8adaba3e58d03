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
