"""--mode generate and --mode eval from the command line: streaming, prompts, stop strings, bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch

from sakimi_next.cli import main
from sakimi_next.text import StreamDecoder, TextRow
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.tokenizer import train_tokenizer

from .helpers import ROOT, chinese_text, make_checkpoint, small_config, train_briefly

CHINESE = "却说贾母正在房中与众人说笑，忽见宝玉进来，便问：“你往哪里去了？”宝玉笑道：“我往林妹妹那里去了。”"


@pytest.fixture(scope="module")
def zh_checkpoint(tmp_path_factory):
    """A small model and a tokenizer trained on Chinese, saved as a training checkpoint."""
    root = tmp_path_factory.mktemp("zh")
    tok = train_tokenizer([chinese_text(35_000) + CHINESE], 1024)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config(vocab_size=1024, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id))
    train_briefly(model, 1024, steps=3)
    ckpt = make_checkpoint(root / "run", model, tok)
    return ckpt, tok, model


def test_stream_decoder_never_splits_a_character(zh_checkpoint):
    _, tok, _ = zh_checkpoint
    ids = tok.encode(CHINESE + " 🤖 emoji, and ASCII.")
    # byte-level BPE on Chinese: some characters are split over several tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    dec = StreamDecoder(tok, window=8)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_text_row_holds_back_what_could_start_a_stop_string(zh_checkpoint):
    """A TextRow gives out its text as it comes (`take`), holding back what could still be the start of a
    stop string; a stop string cuts the text before it; a stop token ends the row and is no text."""
    _, tok, _ = zh_checkpoint
    ids = tok.encode("one two three four five")
    row, taken = TextRow(tok, stops=["four"]), []
    for i in ids:
        done = row.add(i)
        taken.append(row.take())
        assert "one two three ".startswith("".join(taken))  # nothing given out is later cut
        if done:
            break
    assert any(taken[:-1])  # text came out before the stop string was complete
    assert row.done and "".join(taken) == row.finish() == "one two three "
    row = TextRow(tok, stop_ids={ids[2]})
    assert [row.add(i) for i in ids[:3]] == [False, False, True]
    assert row.finish() == tok.decode(ids[:2]) and row.tokens == 3 and row.take() == row.text


def test_streamed_generation_is_whole_characters(zh_checkpoint, capsys, monkeypatch):
    """What streams out, piece by piece, is exactly the decoded text: no piece ever holds half a
    character (a broken one would show as U+FFFD where the whole decode has a real character)."""
    from sakimi_next.generate import generate

    ckpt, tok, model = zh_checkpoint
    writes = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: writes.append(s) or real_write(s))
    rc = main(["--mode", "generate", "--resume-from", str(ckpt), "--prompt", "宝玉笑道", "--max-new-tokens", "60",
               "--temperature", "0"])
    assert rc == 0
    ids = generate(model, [tok.encode("宝玉笑道")], 60, eos_id=tok.eot_id)[0]
    expected = tok.decode([i for i in ids if i != tok.eot_id])
    assert "".join(writes) == "宝玉笑道" + expected + "\n"
    err = capsys.readouterr().err
    assert "tokens in" in err and "tokens/s" in err  # statistics on stderr, not stdout


def test_seeded_cli_sampling_reproducible_and_samples_differ(zh_checkpoint, capsys):
    ckpt, _, _ = zh_checkpoint
    args = ["--mode", "generate", "--resume-from", str(ckpt), "--prompt", "宝玉", "--max-new-tokens", "20",
            "--temperature", "1.0", "--top-p", "0.9", "--num-samples", "3", "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    samples = [s for s in first.split("--- prompt 1, sample ")[1:]]
    assert len(samples) == 3 and len(set(s.split("---\n", 1)[1] for s in samples)) > 1


def test_prompt_file_stdin_stop_and_empty_prompt(zh_checkpoint, tmp_path, capsys):
    ckpt, tok, model = zh_checkpoint
    (tmp_path / "p.txt").write_text("宝玉\n黛玉\n\n贾母\n", encoding="utf-8")
    assert main(["--mode", "generate", "--resume-from", str(ckpt), "--prompt-file", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- prompt") == 3 and "--- prompt 3 ---\n贾母" in out
    # stdin as the prompt
    r = subprocess.run([sys.executable, "-m", "sakimi_next", "--mode", "generate", "--resume-from", str(ckpt),
                        "--max-new-tokens", "5", "--temperature", "0"], input="宝玉", capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("宝玉")
    # an empty prompt starts from <|endoftext|>
    assert main(["--mode", "generate", "--resume-from", str(ckpt), "--prompt", "", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert "tokens in" in capsys.readouterr().err
    # greedy text, then the same with a stop string taken from it: output cut right before the stop
    assert main(["--mode", "generate", "--resume-from", str(ckpt), "--prompt", "宝玉", "--max-new-tokens", "30",
                 "--temperature", "0", "--top-k", "0", "--repetition-penalty", "1.3"]) == 0
    full = capsys.readouterr().out.rstrip("\n")[len("宝玉"):]
    stop = next((full[i:i + 2] for i in range(len(full) // 3, len(full) - 1) if full[i:i + 2].strip()), None)
    assert stop is not None, full  # the greedy text is long enough to take a stop string from
    assert main(["--mode", "generate", "--resume-from", str(ckpt), "--prompt", "宝玉", "--max-new-tokens", "30",
                 "--temperature", "0", "--top-k", "0", "--repetition-penalty", "1.3", "--stop", stop]) == 0
    assert capsys.readouterr().out.rstrip("\n") == "宝玉" + full[: full.index(stop)]


def test_interactive_until_eof(zh_checkpoint):
    ckpt, _, _ = zh_checkpoint
    r = subprocess.run([sys.executable, "-m", "sakimi_next", "--mode", "generate", "--resume-from", str(ckpt),
                        "--interactive", "--max-new-tokens", "4", "--temperature", "0"],
                       input="宝玉\n黛玉\n", capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0
    assert r.stderr.count("tokens in") == 2  # two prompts answered, then EOF ends the loop


def test_eval_bits_per_byte_by_hand(zh_checkpoint, tmp_path, capsys):
    ckpt, tok, model = zh_checkpoint
    text = chinese_text(1000, seed=1)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    assert main(["--mode", "eval", "--resume-from", str(ckpt), "--text-file", str(tmp_path / "t.txt"), "--json",
                 "--seq-len", "100"]) == 0
    r = json.loads(capsys.readouterr().out)
    ids = torch.tensor([tok.eot_id] + tok.encode(text))
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0]
    nats = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
    n_bytes = len(text.encode("utf-8"))
    assert r["tokens"] == len(ids) - 1 and r["bytes"] == n_bytes
    assert math.isclose(r["loss"], nats / r["tokens"], rel_tol=1e-5)
    assert math.isclose(r["bpb"], nats / math.log(2) / n_bytes, rel_tol=1e-5)
    assert math.isclose(r["bpb"], r["loss"] / math.log(2) * r["tokens"] / r["bytes"], rel_tol=1e-9)
    assert main(["--mode", "eval", "--resume-from", str(ckpt), "--text-file", str(tmp_path / "t.txt"), "--json",
                 "--eval-method", "sliding", "--seq-len", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == r["tokens"]


def bad(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_generation_input(zh_checkpoint, tmp_path, capsys):
    ckpt, tok, _ = zh_checkpoint
    g = ["--mode", "generate", "--resume-from", str(ckpt), "--prompt", "宝玉"]

    def generate(path):
        return bad(["--mode", "generate", "--resume-from", str(path), "--prompt", "x"], capsys)

    assert "checkpoint not found" in generate(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    assert "not a checkpoint" in generate(tmp_path / "empty")
    assert "must be >= 0" in bad([*g, "--temperature", "-1"], capsys)
    assert "--top-p" in bad([*g, "--top-p", "0"], capsys)
    assert "--top-p" in bad([*g, "--top-p", "1.5"], capsys)
    assert "--top-k" in bad([*g, "--top-k", "-3"], capsys)
    assert "--max-new-tokens" in bad([*g, "--max-new-tokens", "-1"], capsys)
    speculative = [*g, "--speculative", "mtp", "--temperature", "0"]
    assert "does not apply to --speculative" in bad([*speculative, "--compile"], capsys)
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    assert "not UTF-8" in bad(["--mode", "generate", "--resume-from", str(ckpt), "--prompt-file",
                               str(tmp_path / "latin1.txt")], capsys)
    # a checkpoint without its tokenizer, and one with truncated weights
    import shutil

    no_tok = tmp_path / "no_tok"
    shutil.copytree(ckpt, no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in bad(["--mode", "generate", "--resume-from", str(no_tok), "--prompt", "x"], capsys)
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in bad(["--mode", "generate", "--resume-from", str(broken), "--prompt", "x"], capsys)
    # a prompt longer than the model's context
    long_prompt = "宝玉" * 2000
    assert "--truncate-prompt" in bad([*g[:-2], "--prompt", long_prompt, "--max-new-tokens", "2"], capsys)
    assert main([*g[:-2], "--prompt", long_prompt, "--max-new-tokens", "2", "--truncate-prompt",
                 "--temperature", "0"]) == 0


def test_precision_flags(zh_checkpoint, capsys, monkeypatch):
    """--quantize int8 decodes; --dtype bf16 on a CPU without bf16 says so in one line and uses float32."""
    ckpt, _, _ = zh_checkpoint
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    args = ["--mode", "generate", "--resume-from", str(ckpt), "--prompt", "却说", "--max-new-tokens", "8",
            "--temperature", "0", "--device", "cpu", "--no-compile"]
    assert main([*args, "--quantize", "int8", "--dtype", "bf16"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("却说") and sum("no bfloat16" in line for line in err.splitlines()) == 1
    assert main([*args, "--compile", "--speculative", "mtp"]) == 2
    assert "does not apply to --speculative" in capsys.readouterr().err
