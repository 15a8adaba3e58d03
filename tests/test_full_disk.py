"""A disk that refuses a write loses nothing: a checkpoint save, an export (Hugging Face and GGUF) and
prepare_data end with one `error:` line and exit code 2, what was there before is intact, no temporary
file is left, and `--resume-from auto` goes on from the last good checkpoint.

The refusal is real: RLIMIT_FSIZE makes the kernel refuse to grow any file of this process past a size
(EFBIG, "File too large", where a full disk says ENOSPC), in safetensors' Rust writer, numpy's and
gguf's alike. Small files (metrics, the loss curve, JSON) still fit; weights and token files do not."""

import contextlib
import hashlib
import resource
import shutil
from pathlib import Path

import pytest

from sakimi_next import checkpoint as ckpt
from sakimi_next.cli import main

from .helpers import english_text

LIMIT = 1 << 20  # bytes: above the loss curve and the JSON files, below tiny_5m's weights
TRAIN = ["--mode", "train", "--config", "tiny_5m", "--batch-size", "4", "--seq-len", "64", "--warmup-steps", "2",
         "--eval-every", "100", "--eval-batches", "1", "--save-every", "3", "--device", "cpu"]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """No file this process writes may grow past `nbytes` while the block runs. (Python ignores
    SIGXFSZ, so the write fails with EFBIG instead of the signal ending the process.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) with the sha256 of its bytes, links with their target."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + str(p.readlink())
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(e in lines[0] for e in expected), lines[0]
    return lines[0]


def temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from sakimi_next.data import prepare_data

    root = tmp_path_factory.mktemp("full-disk-data")
    (root / "text.txt").write_text(english_text(60_000))
    return prepare_data([str(root / "text.txt")], None, root / "prepared", vocab_size=2048, doc_split="blank-line")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A run directory with the checkpoint of step 3."""
    run = tmp_path_factory.mktemp("full-disk-run") / "run"
    assert main([*TRAIN, "--data-dir", str(data_dir), "--out-dir", str(run), "--steps", "3"]) == 0
    return run


def losses(run: Path) -> dict[int, float]:
    import json

    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_checkpoint_save_on_a_full_disk(data_dir, trained, tmp_path, capsys):
    reference, run = tmp_path / "reference", tmp_path / "run"
    shutil.copytree(trained, reference, symlinks=True)
    shutil.copytree(trained, run, symlinks=True)
    go_on = [*TRAIN, "--data-dir", str(data_dir), "--steps", "6", "--resume-from", "auto"]
    assert main([*go_on, "--out-dir", str(reference)]) == 0  # steps 4..6 with room to save
    before = snapshot(run / "step_000003")
    capsys.readouterr()
    with file_size_limit(LIMIT):
        assert main([*go_on, "--out-dir", str(run)]) == 2
    one_error(capsys, f"could not write {run / 'step_000006'}: File too large",
              f"the last checkpoint, {run / 'step_000003'}, is intact: continue with --resume-from auto")
    assert snapshot(run / "step_000003") == before and ckpt.damage(run / "step_000003") is None
    assert ckpt.find_latest(run).name == "step_000003" and (run / "latest").resolve().name == "step_000003"
    assert temporaries(run) == []
    assert main([*go_on, "--out-dir", str(run)]) == 0  # room again: on from step 3
    assert ckpt.find_latest(run).name == "step_000006"
    assert losses(run) == losses(reference)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_an_export_on_a_full_disk(trained, tmp_path, capsys, fmt):
    out = tmp_path / ("out" if fmt == "hf" else "model.gguf")
    command = ["--mode", "export", "--resume-from", str(trained / "latest")]
    command += ["--out-dir", str(out)] if fmt == "hf" else ["--format", "gguf", "--out-file", str(out)]
    assert main(command) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    with file_size_limit(LIMIT):
        assert main(command) == 2
    one_error(capsys, f"could not write {out}: ", "File too large" if fmt == "hf" else "is the disk full?",
              f"the previous {out} is intact")
    assert snapshot(tmp_path) == before  # the previous export as it was, and nothing beside it


def test_prepare_data_on_a_full_disk(tmp_path, capsys):
    (tmp_path / "small.txt").write_text(english_text(20_000))
    (tmp_path / "large.txt").write_text(english_text(500_000) * 6)  # ~1.4 M tokens: 2.8 MB of uint16
    out = tmp_path / "prepared"
    prepare = ["--mode", "prepare_data", "--out-dir", str(out), "--vocab-size", "512"]
    assert main([*prepare, "--train-data", str(tmp_path / "small.txt")]) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    with file_size_limit(LIMIT):  # the larger text's train.bin does not fit
        assert main([*prepare, "--train-data", str(tmp_path / "large.txt"), "--rebuild-tokenizer"]) == 2
    one_error(capsys, f"could not write {out}: File too large", f"the previous {out} is intact")
    assert snapshot(tmp_path) == before
