"""Nothing a user types loses data, and nothing read back is trusted blindly.

Atomic directory publishing (checkpoints, export, prepare_data); export refusing directories it did not
make; checkpoints verified by sha256 with `--resume-from auto` falling back to the newest intact one; a
model checked with its tokenizer; file names from metadata kept inside their directory; every JSON file
checked field by field; no import cycle. The table at the end runs corrupted inputs through the real
command line and checks: exit code 2, one `error:` line, no traceback, guarded directories unchanged.
"""

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sakimi_next import checkpoint as ckpt
from sakimi_next import util
from sakimi_next.cli import main
from sakimi_next.data import load_meta, prepare_data
from sakimi_next.export.hf import export_hf
from sakimi_next.huggingface import EXPORT_RECORD
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.pretrained import load_for_inference
from sakimi_next.tokenizer import train_tokenizer
from sakimi_next.util import UserError, publish_dir

from .helpers import ROOT, chinese_text, english_text, make_checkpoint, small_config

TRAIN = ["--mode", "train", "--config", "tiny_5m", "--batch-size", "2", "--seq-len", "32", "--learning-rate", "3e-3",
         "--warmup-steps", "1", "--eval-batches", "1", "--eval-every", "100", "--print-every", "1", "--device", "cpu"]


def tree(path: Path) -> dict[str, str]:
    """Every file, directory and symlink under `path` with a hash of its content (or link target)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def flip_bit(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared data directory, a 2-step tiny_5m training run, and its Hugging Face export."""
    root = tmp_path_factory.mktemp("world")
    (root / "en.txt").write_text(english_text(30_000))
    data = prepare_data([str(root / "en.txt")], None, root / "data", vocab_size=512)
    assert main([*TRAIN, "--data-dir", str(data), "--out-dir", str(root / "run"), "--steps", "2",
                 "--save-every", "1"]) == 0
    run = root / "run"
    hf = export_hf(run / "step_000002", root / "hf")
    return {"root": root, "data": data, "run": run, "hf": hf}


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------------- publish_dir
@pytest.mark.parametrize("can_exchange", [True, False], ids=["renameat2", "two-renames"])
def test_publish_dir_swaps_and_never_exposes_a_partial_result(tmp_path, monkeypatch, can_exchange):
    if not can_exchange:
        monkeypatch.setattr(util, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    with publish_dir(final) as tmp:
        (tmp / "a").write_text("old")
    assert tree(final) == {"a": hashlib.sha256(b"old").hexdigest()}
    old = tree(final)
    with publish_dir(final) as tmp:
        (tmp / "a").write_text("new")
        (tmp / "b").write_text("new")
        assert tree(final) == old  # while the new one is being built, the old one is whole
    assert sorted(tree(final)) == ["a", "b"] and (final / "a").read_text() == "new"
    with pytest.raises(KeyboardInterrupt):
        with publish_dir(final) as tmp:
            (tmp / "a").write_text("half")
            raise KeyboardInterrupt
    assert (final / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left


def test_publish_dir_leaves_files_and_symlinks_alone(tmp_path):
    (tmp_path / "file").write_text("mine")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    for final in (tmp_path / "file", tmp_path / "link"):
        with pytest.raises(UserError, match="is not a directory"):
            with publish_dir(final):
                pass
    assert (tmp_path / "file").read_text() == "mine" and os.path.islink(tmp_path / "link")


def test_publish_dir_recovers_after_a_crash_between_two_renames(tmp_path):
    """Where directories cannot be swapped in one step, a crash between the two renames leaves the old
    version as .NAME.old; the next publish (or prune) puts it back first."""
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "a").write_text("old")
    util.recover_dir(tmp_path / "out")
    assert (tmp_path / "out" / "a").read_text() == "old" and not (tmp_path / ".out.old").exists()


def test_resaving_a_step_is_a_swap(tmp_path, monkeypatch):
    """Saving a step that exists replaces it in one step: at no point is there no step_000003."""
    tok = train_tokenizer([english_text(20_000)], 300)
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config(vocab_size=300))
    first = make_checkpoint(tmp_path / "run", model, tok)
    seen = []
    real = util._exchange
    monkeypatch.setattr(util, "_exchange", lambda a, b: seen.append(ckpt.is_checkpoint(Path(b))) or real(a, b))
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree",
                        lambda p, *a, **k: seen.append(ckpt.is_checkpoint(first)) or real_rmtree(p, *a, **k))
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    again = make_checkpoint(tmp_path / "run", model, tok)
    assert again == first and seen and all(seen)
    assert torch.equal(ckpt.load_tensors(first / ckpt.MODEL_FILE)["model.embed_tokens.weight"],
                       model.model.embed_tokens.weight)


# ---------------------------------------------------------------------------------------- export
def test_export_replaces_only_its_own_earlier_export(world, tmp_path):
    src = world["run"] / "step_000002"
    out = export_hf(src, tmp_path / "hf")
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["step"] == 2 and set(record["files"]) == {p.name for p in out.iterdir()} - {EXPORT_RECORD}
    export_hf(world["run"] / "step_000001", out)  # an earlier export is replaced whole
    assert json.loads((out / EXPORT_RECORD).read_text())["step"] == 1
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(UserError, match="notes.txt"):
        export_hf(src, out)
    assert tree(out) == before


# ------------------------------------------------------------------------------ verified checkpoints
def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(world, tmp_path, capsys):
    run = copy_of(world["run"], tmp_path / "run")
    flip_bit(run / "step_000002" / ckpt.MODEL_FILE)
    assert ckpt.find_latest(run).name == "step_000002"  # unverified: looks complete
    capsys.readouterr()
    assert ckpt.find_latest(run, verify=True).name == "step_000001"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step_000002" in err and "step_000001" in err and "sha256" in err
    said = []  # training passes its rank-0 console, so that under torchrun one process says it
    assert ckpt.find_latest(run, verify=True, say=said.append).name == "step_000001"
    assert said == [err] and capsys.readouterr().err == ""
    rc = main([*TRAIN, "--data-dir", str(world["data"]), "--out-dir", str(run), "--steps", "3", "--save-every", "100",
               "--resume-from", "auto"])
    out, err = capsys.readouterr()
    assert rc == 0 and "newest intact checkpoint" in err and f"from {run / 'step_000001'}" in out


def test_checkpoint_without_hashes_still_loads(world, tmp_path):
    old = copy_of(world["run"] / "step_000002", tmp_path / "old")
    edit_json(old / ckpt.STATE_FILE, lambda s: {k: v for k, v in s.items() if k != "sha256"})
    flip_bit(old / ckpt.MODEL_FILE, offset=-1)  # not verified without hashes: loads as it is
    model, tok, info = load_for_inference(old, "cpu")
    assert info["step"] == 2 and tok.vocab_size == 512


# ------------------------------------------------------------------------------------ import graph
def test_no_import_cycles():
    """Library modules import one another in one direction only (lazy imports inside functions count)."""
    pkg = ROOT / "sakimi_next"
    modules = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
               for f in pkg.rglob("*.py")}
    graph = {}
    for name, f in modules.items():
        here = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = deps & set(modules) - {name}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    assert "sakimi_next.huggingface" not in graph["sakimi_next.checkpoint"]


# --------------------------------------------------------------------- the command line, corrupted
def _case_export_into_cwd(w, d):
    (d / "config.json").write_text("{}")
    (d / "notes.txt").write_text("keep me")
    return ["--mode", "export", "--resume-from", str(w["run"]), "--out-dir", "."], [d], "current directory"


def _case_export_onto_checkpoint(w, d):
    run = copy_of(w["run"], d / "run")
    return ["--mode", "export", "--resume-from", str(run / "step_000002"), "--out-dir", str(run / "step_000002")], \
        [run], "source checkpoint"


def _case_export_onto_run_dir(w, d):
    run = copy_of(w["run"], d / "run")
    return ["--mode", "export", "--resume-from", str(run / "step_000002"), "--out-dir", str(run)], [run], \
        "source checkpoint"


def _case_export_into_checkpoint(w, d):
    run = copy_of(w["run"], d / "run")
    return ["--mode", "export", "--resume-from", str(run / "latest"), "--out-dir", str(run / "step_000002" / "hf")], \
        [run], "inside the source checkpoint"


def _case_export_onto_foreign_dir(w, d):
    (d / "mine").mkdir()
    (d / "mine" / "config.json").write_text("{}")
    (d / "mine" / "thesis.tex").write_text("years of work")
    return ["--mode", "export", "--resume-from", str(w["run"]), "--out-dir", str(d / "mine")], [d], \
        "holds no earlier export"


def _checkpoint_case(change, message, mode="generate"):
    def case(w, d):
        run = copy_of(w["run"], d / "run")
        change(run / "step_000002")
        extra = ["--prompt", "x", "--max-new-tokens", "2"] if mode == "generate" else ["--out-dir", str(d / "hf")]
        return ["--mode", mode, "--resume-from", str(run / "step_000002"), *extra], [run], message
    return case


def _smaller_config(ck):
    edit_json(ck / ckpt.CONFIG_FILE, lambda c: {**c, "vocab_size": 300})


def _foreign_tokenizer(ck):
    train_tokenizer([chinese_text(5_000)], 400).save(ck / ckpt.TOKENIZER_FILE)


def _hf_case(change, message):
    def case(w, d):
        hf = copy_of(w["hf"], d / "hf")
        change(hf, d)
        return ["--mode", "generate", "--resume-from", str(hf), "--prompt", "x", "--max-new-tokens", "2"], [d], message
    return case


def _index_pointing_at(name_of):
    def change(hf, d):
        os.rename(hf / "model.safetensors", d / "outside.safetensors")
        names = list(ckpt.load_tensors(d / "outside.safetensors"))
        (hf / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: name_of(hf, d) for n in names}}))
    return change


def _symlinked_shard(hf, d):
    os.rename(hf / "model.safetensors", d / "outside.safetensors")
    names = list(ckpt.load_tensors(d / "outside.safetensors"))
    os.symlink(d / "outside.safetensors", hf / "shard.safetensors")
    index = {"weight_map": {n: "shard.safetensors" for n in names}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))


def _data_case(change, message):
    def case(w, d):
        data = copy_of(w["data"], d / "data")
        change(data)
        return [*TRAIN, "--data-dir", str(data), "--out-dir", str(d / "run"), "--steps", "2"], [data], message
    return case


def _resume_case(change, message):
    def case(w, d):
        run = copy_of(w["run"], d / "run")
        change(run)
        return [*TRAIN, "--data-dir", str(w["data"]), "--out-dir", str(run), "--steps", "3",
                "--resume-from", str(run / "step_000002")], [run], message
    return case


def _prepare_with_tokenizer_dir(w, d):
    data = copy_of(w["data"], d / "data")
    (d / "tokdir").mkdir()
    return ["--mode", "prepare_data", "--train-data", str(w["root"] / "en.txt"), "--out-dir", str(data),
            "--tokenizer", str(d / "tokdir"), "--vocab-size", "512"], [data], "is a directory"


CASES = {
    "export --out-dir . (a folder with a config.json)": _case_export_into_cwd,
    "export --out-dir = the checkpoint": _case_export_onto_checkpoint,
    "export --out-dir = the run holding the checkpoint": _case_export_onto_run_dir,
    "export --out-dir inside the checkpoint": _case_export_into_checkpoint,
    "export --out-dir a foreign folder": _case_export_onto_foreign_dir,
    "flipped bit in model.safetensors": _checkpoint_case(lambda c: flip_bit(c / ckpt.MODEL_FILE),
                                                         "model.safetensors is corrupt"),
    "flipped bit, export": _checkpoint_case(lambda c: flip_bit(c / ckpt.MODEL_FILE), "model.safetensors is corrupt",
                                            mode="export"),
    "trainer_state.json is []": _checkpoint_case(lambda c: (c / ckpt.STATE_FILE).write_text("[]"),
                                                 "trainer_state.json must hold a JSON object, not a list"),
    'trainer_state.json "step": "ten"': _checkpoint_case(
        lambda c: edit_json(c / ckpt.STATE_FILE, lambda s: {**s, "step": "ten"}), "field 'step' is \"ten\""),
    "trainer_state.json bad hash": _checkpoint_case(
        lambda c: edit_json(c / ckpt.STATE_FILE, lambda s: {**s, "sha256": {"model.safetensors": "x"}}),
        "field 'sha256'"),
    "config.json is a list": _checkpoint_case(lambda c: (c / ckpt.CONFIG_FILE).write_text("[1, 2]"),
                                              "must be a JSON object, not a list"),
    'config.json rope_theta "abc"': _checkpoint_case(
        lambda c: edit_json(c / ckpt.CONFIG_FILE, lambda x: {**x, "rope_theta": "abc"}), "rope_theta ('abc')"),
    "tokenizer larger than the vocabulary": _checkpoint_case(_smaller_config, "this tokenizer does not belong"),
    "tokenizer not the one trained with": _checkpoint_case(_foreign_tokenizer,
                                                           "not the tokenizer the model was trained"),
    "flipped bit in an export": _hf_case(lambda hf, d: flip_bit(hf / "model.safetensors"),
                                         "model.safetensors is corrupt"),
    "index weight_map ../x": _hf_case(_index_pointing_at(lambda hf, d: "../outside.safetensors"),
                                      "not a relative path inside"),
    "index weight_map absolute": _hf_case(_index_pointing_at(lambda hf, d: str(d / "outside.safetensors")),
                                          "not a relative path inside"),
    "index weight_map through a symlink": _hf_case(_symlinked_shard, "leads outside"),
    "index weight_map is a list": _hf_case(lambda hf, d: (hf / "model.safetensors.index.json").write_text(
        '{"weight_map": ["a"]}'), "field 'weight_map'"),
    "HF config heads not divisible": _hf_case(lambda hf, d: edit_json(
        hf / "config.json", lambda c: {**c, "num_key_value_heads": 3}), "must be divisible by num_key_value_heads"),
    "HF config value heads vs key heads": _hf_case(lambda hf, d: edit_json(
        hf / "config.json", lambda c: {**c, "linear_num_value_heads": 5}), "must be divisible by linear_num_key_heads"),
    "HF config hidden_size a string": _hf_case(lambda hf, d: edit_json(
        hf / "config.json", lambda c: {**c, "hidden_size": "64"}), "hidden_size ('64') must be an integer"),
    "meta.json unknown dtype": _data_case(lambda p: edit_json(p / "meta.json", lambda m: {**m, "dtype": "float7"}),
                                          "field 'dtype'"),
    "meta.json split file ../x": _data_case(lambda p: edit_json(p / "meta.json", lambda m: {
        **m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "file": "../train.bin"}}}),
        "not a relative path inside"),
    "meta.json tokenizer ../x": _data_case(lambda p: edit_json(p / "meta.json", lambda m: {
        **m, "tokenizer": "../tokenizer.json"}), "not a relative path inside"),
    "resume from a flipped bit in optimizer.safetensors": _resume_case(
        lambda r: flip_bit(r / "step_000002" / ckpt.OPTIM_FILE), "optimizer.safetensors is corrupt"),
    "resume with optimizer.json without param_groups": _resume_case(
        lambda r: (r / "step_000002" / ckpt.OPTIM_JSON).write_text('{"class": "AdamW"}'), "'param_groups'"),
    "prepare_data --tokenizer a directory": _prepare_with_tokenizer_dir,
    "prepare_data --out-dir a file": lambda w, d: (
        (d / "f").write_text("mine"),
        ["--mode", "prepare_data", "--train-data", str(w["root"] / "en.txt"), "--out-dir", str(d / "f")], [d],
        "cannot write to")[1:],
}


@pytest.mark.parametrize("name", list(CASES))
def test_corrupted_input_through_the_cli(world, tmp_path, name):
    work = tmp_path / "cwd"
    work.mkdir()
    args, guarded, message = CASES[name](world, work)
    before = [tree(g) for g in guarded]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "sakimi_next", *args], cwd=work, env=env, capture_output=True,
                       text=True, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err, err
    assert [tree(g) for g in guarded] == before  # nothing was touched
    if name == "prepare_data --tokenizer a directory":
        assert load_meta(guarded[0])["splits"]["train"]["tokens"] > 0  # still prepared
