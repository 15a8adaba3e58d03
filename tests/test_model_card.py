"""The model card (README.md) every transformers export writes: front matter read back with
huggingface_hub's own parser (what the Hub reads), the training data, the held-out figures of the
checkpoint's metrics, and a command line that trains the same weights again."""

import json
import shlex

import pytest
import torch
from safetensors.torch import load_file

from sakimi_next.cli import build_parser, main
from sakimi_next.commands import train as train_command
from sakimi_next.export.card import detect_languages, front_matter

from .helpers import chinese_text, english_text

TRAIN = ["--mode", "train", "--config", "tiny_5m", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
         "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "2", "--save-every", "4", "--device", "cpu",
         "--no-compile"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run: two source files prepared, four steps trained, validated twice."""
    root = tmp_path_factory.mktemp("card")
    (root / "english.txt").write_text(english_text(40_000), encoding="utf-8")
    (root / "chinese.txt").write_text(chinese_text(12_000), encoding="utf-8")
    args = [*TRAIN, "--train-data", str(root / "english.txt"), str(root / "chinese.txt"), "--vocab-size", "600",
            "--data-dir", str(root / "data"), "--out-dir", str(root / "run")]
    assert main(args) == 0
    return root


def load_card(path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(path / "README.md")
    return card.data.to_dict(), card.text


def export(run, out, *flags):
    assert main(["--mode", "export", "--resume-from", str(run / "run"), "--out-dir", str(out), *flags]) == 0
    return out


def test_card_by_default(run, tmp_path):
    meta, text = load_card(export(run, tmp_path / "hf"))
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "other" and "--license ID" in text  # not chosen, and said so
    assert sorted(meta["language"]) == ["en", "zh"]  # from the training text's scripts
    assert {"qwen3_5", "sakimi-next"} <= set(meta["tags"]) and "base_model" not in meta
    assert "`english.txt`, `chinese.txt`" in text and "Qwen3_5ForCausalLM" in text
    evals = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in evals if "val_loss" in m][-1]
    assert f"| last | {last['step']} | {last['val_loss']:.4f} | {last['val_ppl']:.2f} | {last['val_bpb']:.4f} |" in text


def test_card_flags(run, tmp_path):
    out = export(run, tmp_path / "hf", "--license", "cc-by-4.0", "--language", "en", "fr", "en", "--dataset-name",
                 'My "novels", 2024', "--base-model", "someone/base-model", "--hf-layout", "qwen3_next")
    meta, text = load_card(out)
    assert meta["license"] == "cc-by-4.0" and meta["language"] == ["en", "fr"]
    assert meta["base_model"] == "someone/base-model" and "qwen3_next" in meta["tags"]
    assert 'Trained on My "novels", 2024:' in text and "Languages detected" not in text


def test_card_when_the_data_is_gone(run, tmp_path):
    (run / "data").rename(run / "moved")
    try:
        meta, text = load_card(export(run, tmp_path / "hf"))
    finally:
        (run / "moved").rename(run / "data")
    assert "(not found at export time)" in text
    assert sorted(meta["language"]) == ["en", "zh"]  # from the tokenizer's vocabulary instead


@pytest.mark.slow
def test_command_line_trains_the_same_weights(run, tmp_path):
    """The card's command line parses with the train command's flags into the settings the run recorded,
    and, run again (into another directory), gives the same weights bit for bit."""
    _, text = load_card(export(run, tmp_path / "hf"))
    command = text.split("```sh\n")[1].split("\n```")[0]
    words = shlex.split(command)
    assert words[:3] == ["sakimi-next", "--mode", "train"]
    parsed = train_command.settings(build_parser("train").parse_args(words[1:])).training
    recorded = json.loads((run / "run" / "latest" / "trainer_state.json").read_text())["args"]
    given = parsed.record(parsed.hyper)
    for name, value in recorded.items():  # an on/off flag left out is off (None resolves to False)
        if name != "resume_from":
            assert given[name] == value or (value is False and given[name] is None), name
    again = words[1:]
    again[again.index("--out-dir") + 1] = str(tmp_path / "again")
    assert main(again) == 0
    first, second = (load_file(d / "latest" / "model.safetensors") for d in (run / "run", tmp_path / "again"))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("flags,expect", [
    (["--license", "Apache 2.0"], "is not a license id"),
    (["--language", "english"], "is not an ISO 639 code"),
    (["--base-model", "base"], "is not a Hugging Face model id"),
    (["--format", "gguf", "--out-file", "m.gguf", "--license", "mit"], "--license is for --format hf"),
])
def test_bad_card_flags(tmp_path, capsys, flags, expect):
    args = ["--mode", "export", "--resume-from", str(tmp_path), *flags]
    rc = main(args if "--format" in flags else [*args, "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err


def test_languages_by_script():
    assert detect_languages("The quick brown fox. " * 20) == ["en"]
    assert detect_languages(chinese_text(300)) == ["zh"]
    assert detect_languages("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。") == ["ja"]
    assert detect_languages("안녕하세요, 만나서 반갑습니다.") == ["ko"]
    assert detect_languages("1234 !?") == []
    assert detect_languages("Some English, " * 50 + "一点中文") == ["en"]  # a few characters are not a language


def test_front_matter_quotes_what_yaml_would_misread():
    import yaml

    lines = front_matter({"license": "other", "language": ["no", "en"], "base_model": None, "datasets": [],
                          "tags": ['a "b": c', "x/y-1.0"]})
    assert yaml.safe_load("\n".join(lines[1:-1])) == {"license": "other", "language": ["no", "en"],
                                                       "tags": ['a "b": c', "x/y-1.0"]}
