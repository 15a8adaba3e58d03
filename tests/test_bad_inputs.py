"""Bad input, across every mode: exit code 2, one `error: ...` line on stderr, no traceback, and nothing
touched. Each case runs `python -m sakimi_next` in a fresh process, in a working directory that holds
a prepared data directory and a training run; every byte and name under it must be the same after."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sakimi_next.cli import main

from .helpers import ROOT

WORDS = ["river", "stone", "light", "garden", "window", "quiet", "morning", "paper", "silver", "market",
         "orange", "little", "number", "winter", "simple", "letter", "forest", "summer", "yellow", "bridge"]

TRAIN = ["--mode", "train", "--config", "tiny_5m", "--data-dir", "data", "--out-dir", "run", "--device", "cpu",
         "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--steps", "2"]
GENERATE = ["--mode", "generate", "--resume-from", "run/latest", "--prompt", "river", "--max-new-tokens", "2"]
EVAL = ["--mode", "eval", "--resume-from", "run/latest", "--text-file", "story.txt"]
PREPARE = ["--mode", "prepare_data", "--config", "tiny_5m", "--train-data", "story.txt", "--out-dir", "data",
           "--vocab-size", "300"]
TEST = ["--mode", "test", "--config", "tiny_5m", "--batch-size", "1", "--seq-len", "16"]

# id -> (arguments, text the error line must contain)
CASES = {
    # test
    "test batch 0": ([*TEST, "--batch-size", "0"], "--batch-size (0) must be positive"),
    "test seq-len too long": ([*TEST, "--seq-len", "999999"], "exceeds max_position_embeddings"),
    "test unknown preset": ([*TEST, "--config", "tiny_1m"], "unknown preset 'tiny_1m'"),
    "test negative seed": ([*TEST, "--seed", "-1"], "--seed (-1) must be >= 0"),
    "test flag of another mode": ([*TEST, "--temperature", "0.5"], "unrecognized arguments: --temperature"),
    # prepare_data
    "prepare negative seed": ([*PREPARE, "--seed", "-3"], "--seed (-3) must be >= 0"),
    "prepare val-fraction 1.5": ([*PREPARE, "--val-fraction", "1.5"], "--val-fraction (1.5) must be in [0, 1)"),
    "prepare val-fraction nan": ([*PREPARE, "--val-fraction", "nan"], "--val-fraction (nan) must be a finite number"),
    "prepare vocab 10": ([*PREPARE, "--vocab-size", "10"], "--vocab-size (10) must be at least 260"),
    "prepare vocab huge": ([*PREPARE, "--vocab-size", "99999999999"], "at most 16,777,216"),
    "prepare out-dir under a file": ([*PREPARE, "--out-dir", "afile/data"], "cannot write to afile"),
    "prepare tokenizer is a dir": ([*PREPARE, "--tokenizer", "data"], "--tokenizer data is a directory"),
    "prepare two dirs": ([*PREPARE, "--data-dir", "other"], "and --data-dir (other) differ"),
    "prepare seed not a number": ([*PREPARE, "--seed", "abc"], "invalid int value: 'abc'"),
    "prepare missing text": ([*PREPARE, "--train-data", "nope.txt"], "nope.txt does not exist"),
    # train
    "train negative seed": ([*TRAIN, "--seed", "-1"], "--seed (-1) must be >= 0"),
    "train beta1 2": ([*TRAIN, "--beta1", "2"], "--beta1 (2.0) must be in [0, 1)"),
    "train beta2 -0.1": ([*TRAIN, "--beta2", "-0.1"], "--beta2 (-0.1) must be in [0, 1)"),
    "train ema 1": ([*TRAIN, "--ema", "1"], "--ema (1.0) must be in [0, 1)"),
    "train ema -0.1": ([*TRAIN, "--ema", "-0.1"], "--ema (-0.1) must be in [0, 1)"),
    "train print-every 0": ([*TRAIN, "--print-every", "0"], "--print-every (0) must be positive"),
    "train weight-decay -1": ([*TRAIN, "--weight-decay", "-1"], "--weight-decay (-1.0) must be >= 0"),
    "train lr inf": ([*TRAIN, "--learning-rate", "inf"], "--learning-rate (inf) must be a finite number"),
    "train lr 0": ([*TRAIN, "--learning-rate", "0"], "--learning-rate (0.0) must be positive"),
    "train min-lr above lr": ([*TRAIN, "--learning-rate", "1e-3", "--min-lr", "1e-2"],
                              "must be between 0 and the learning rate"),
    "train min-lr -1": ([*TRAIN, "--min-lr", "-1"], "--min-lr (-1.0) must be >= 0"),
    "train grad-clip nan": ([*TRAIN, "--grad-clip", "nan"], "--grad-clip (nan) must be a finite number"),
    "train steps 0": ([*TRAIN, "--steps", "0"], "--steps (0) must be positive"),
    "train grad-accum 0": ([*TRAIN, "--grad-accum", "0"], "--grad-accum (0) must be positive"),
    "train eval-batches 0": ([*TRAIN, "--eval-batches", "0"], "--eval-batches (0) must be positive"),
    "train save-every -5": ([*TRAIN, "--save-every", "-5"], "--save-every (-5) must be positive"),
    "train warmup -1": ([*TRAIN, "--warmup-steps", "-1"], "--warmup-steps (-1) must be >= 0"),
    "train keep-last -1": ([*TRAIN, "--keep-last", "-1"], "--keep-last (-1) must be >= 0"),
    "train patience -1": ([*TRAIN, "--early-stop-patience", "-1"], "--early-stop-patience (-1) must be >= 0"),
    "train max-minutes 0": ([*TRAIN, "--max-minutes", "0"], "--max-minutes (0.0) must be positive"),
    "train mtp-weight inf": ([*TRAIN, "--mtp-weight", "inf"], "--mtp-weight (inf) must be a finite number"),
    "train mtp-weight -0.3": ([*TRAIN, "--mtp-weight", "-0.3"], "--mtp-weight (-0.3) must be >= 0"),
    "train out-dir under a file": ([*TRAIN, "--out-dir", "afile/run"], "cannot write to afile"),
    "train resume and init": ([*TRAIN, "--resume-from", "auto", "--init-from", "run/latest"], "not both"),
    "train missing checkpoint": ([*TRAIN, "--resume-from", "nothing/here"], "checkpoint not found"),
    "train no prepared data": ([*TRAIN, "--data-dir", "empty"], "no prepared data in empty"),
    "train fla on cpu": ([*TRAIN, "--kernel", "fla"], "kernel 'fla' needs a CUDA device"),
    "train optimizer sgd": ([*TRAIN, "--optimizer", "sgd"], "invalid choice: 'sgd'"),
    "train muon with fsdp": ([*TRAIN, "--optimizer", "muon", "--fsdp"], "--optimizer muon does not work with --fsdp"),
    # generate
    "generate temperature nan": ([*GENERATE, "--temperature", "nan"], "--temperature (nan) must be a finite number"),
    "generate temperature inf": ([*GENERATE, "--temperature", "inf"], "--temperature (inf) must be a finite number"),
    "generate repetition-penalty nan": ([*GENERATE, "--repetition-penalty", "nan"],
                                        "--repetition-penalty (nan) must be a finite number"),
    "generate repetition-penalty 0": ([*GENERATE, "--repetition-penalty", "0"], "must be positive"),
    "generate top-p 0": ([*GENERATE, "--top-p", "0"], "--top-p (0.0) must be in (0, 1]"),
    "generate top-k -1": ([*GENERATE, "--top-k", "-1"], "--top-k (-1) must be >= 0"),
    "generate empty stop": ([*GENERATE, "--stop", ""], "--stop must not be empty"),
    "generate max-new-tokens 0": ([*GENERATE, "--max-new-tokens", "0"], "--max-new-tokens (0) must be positive"),
    "generate num-samples 0": ([*GENERATE, "--num-samples", "0"], "--num-samples (0) must be positive"),
    "generate draft-len 0": ([*GENERATE, "--draft-len", "0"], "--draft-len (0) must be positive"),
    "generate negative seed": ([*GENERATE, "--seed", "-5"], "--seed (-5) must be >= 0"),
    "generate speculative sampling": ([*GENERATE, "--speculative", "mtp"], "pass --temperature 0"),
    "generate no model": (["--mode", "generate", "--prompt", "x"], "--resume-from"),
    "generate missing prompt file": ([*GENERATE[:4], "--prompt-file", "nope.txt"], "cannot read --prompt-file"),
    "generate cuda missing": ([*GENERATE, "--device", "cuda"], "CUDA is not available"),
    # eval
    "eval seq-len 0": ([*EVAL, "--seq-len", "0"], "--seq-len (0) must be positive"),
    "eval two sources": ([*EVAL, "--data-dir", "data"], "exactly one of --text-file"),
    "eval missing text": ([*EVAL[:4], "--text-file", "nope.txt"], "cannot read --text-file"),
    "eval not a checkpoint": ([*EVAL[:2], "--resume-from", "data", *EVAL[4:]], "not a checkpoint"),
    # export
    "export no out-dir": (["--mode", "export", "--resume-from", "run/latest"], "--out-dir"),
    "export no checkpoint": (["--mode", "export", "--out-dir", "hf"], "--resume-from"),
    "export out-dir under a file": (["--mode", "export", "--resume-from", "run/latest", "--out-dir", "afile/hf"],
                                    "cannot write to afile"),
    # bench
    "bench cuda": (["--mode", "bench", "--device", "cuda"], "--device cpu"),
    "bench compare vllm": (["--mode", "bench", "--compare", "vllm"], "invalid choice: 'vllm'"),
    "bench out-dir under a file": (["--mode", "bench", "--out-dir", "afile/b"], "cannot write to afile"),
    # the mode itself
    "unknown mode": (["--mode", "serve-me"], "invalid choice: 'serve-me'"),
}


def story(n_words: int = 6000, seed: int = 0) -> str:
    """Plain generated English-like text: sentences of common words, paragraphs between them."""
    import random

    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_words // 60):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(6)]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def tree_digest(root: Path) -> str:
    """Every name under `root` with its kind and its bytes (or its link target)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            h.update(f"L {rel} -> {os.readlink(p)}\n".encode())
        elif p.is_dir():
            h.update(f"D {rel}\n".encode())
        else:
            h.update(f"F {rel} {hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory with a prepared data directory (data/), a two-step tiny_5m run (run/), the
    text (story.txt), a regular file to put directories under (afile) and an empty directory."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "story.txt").write_text(story())
    (root / "afile").write_text("a regular file\n")
    (root / "empty").mkdir()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(PREPARE) == 0
        assert main([*TRAIN, "--eval-every", "2", "--save-every", "2"]) == 0
    finally:
        os.chdir(cwd)
    assert (root / "data" / "meta.json").is_file() and (root / "run" / "latest").is_dir()
    return root


@pytest.mark.parametrize("args, needle", list(CASES.values()), ids=list(CASES))
def test_bad_input(workdir, args, needle):
    before = tree_digest(workdir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "sakimi_next", *args], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert tree_digest(workdir) == before, "a bad input changed the working directory"
