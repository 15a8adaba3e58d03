"""The quality benchmark (`make quality`): what the defaults make of a text in a fixed time.

For each corpus of CORPORA, read from --shared-data (default ../shared/data):
  1. split it: the first 90% of the characters (cut at a newline) to train, the last 10% held out;
  2. prepare the training text with default settings:  sakimi-next --mode prepare_data --train-data train.txt
  3. train with nothing but the data and the budget:    sakimi-next --mode train --max-minutes 20
  4. score the best checkpoint on the held-out text:    sakimi-next --mode eval --text-file heldout.txt
     twice: the state carried across the whole text (the headline figure) and in sliding windows;
  5. sample 300 tokens from it, prompted with the held-out text's first line.

--extra-args adds training flags to every run and --prepare-args data preparation flags (a rule variant:
--extra-args="--dropout 0.1"); each variant lives under its own --tag, so none overwrites another.

Writes, under --out/TAG/CORPUS (default runs/quality/default/...): train.txt, heldout.txt, data/, run/
(checkpoints, metrics.jsonl, loss_curve.png), sample.txt and results.json (everything one run needs to be
compared: bits/byte both ways, steps, minutes, tokens, vocabulary, bytes/token, the command lines, the
machine). A corpus is built in a .partial folder and swapped in when done. --out/TAG/results.json gathers
the tag's corpora. Prints a table; scripts/quality_table.py prints one from several results.json.

    python scripts/quality.py [--minutes 20] [--corpus tinyshakespeare hongloumeng ...] [--shared-data DIR]
                              [--tag NAME] [--extra-args="--dropout 0.1"] [--prepare-args="..."]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "sakimi-next"


@dataclass(frozen=True)
class Corpus:
    file: str  # inside --shared-data
    title: str  # for tables


# Kinds of text the rule is measured on (docs/benchmarks.md, "The corpora"). 三国演义 rather than 水浒传:
# a semi-classical register and a smaller file (1.8 MB), where 水浒传 is vernacular prose of 红楼梦's size;
# the King James Bible rather than WikiText-2: text as people write it and a larger file (4.2 MB, fewer passes
# in the budget), where WikiText-2's `<unk>` and " @-@ " spacing are artefacts of a word-level tokenizer.
CORPORA = {
    "tinyshakespeare": Corpus("tinyshakespeare/input.txt", "Tiny Shakespeare"),
    "hongloumeng": Corpus("zh_novels/hongloumeng.txt", "红楼梦"),
    "sanguoyanyi": Corpus("zh_novels/sanguoyanyi.txt", "三国演义"),
    "kjv": Corpus("kjv/kjv.txt", "King James Bible"),
    "cmn_eng": Corpus("cmn_eng/cmn.txt", "Tatoeba English–Chinese pairs"),
}
# Named with --corpus, not run by default: the other texts of the corpora folder
MORE_CORPORA = {
    "shuihuzhuan": Corpus("zh_novels/shuihuzhuan.txt", "水浒传"),
    "wikitext2": Corpus("wikitext2/wiki.valid.tokens", "WikiText-2 (validation split)"),
}
DEFAULT_CORPORA = list(CORPORA)
CORPORA = {**CORPORA, **MORE_CORPORA}


def split_90_10(text: str) -> tuple[str, str]:
    """The first 90% of the characters, cut after the last newline before that point; the rest."""
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    return text[:cut], text[cut:]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_split(file: str, text: str, train: str, heldout: str) -> dict:
    """What identifies a split: two runs with the same heldout_sha256 scored the same text."""
    return {"file": file, "sha256": sha256(text), "train_chars": len(train), "train_bytes": len(train.encode()),
            "heldout_chars": len(heldout), "heldout_bytes": len(heldout.encode()), "heldout_sha256": sha256(heldout)}


def read_corpus(shared_data: Path, name: str) -> tuple[str, str, dict]:
    """(training text, held-out text, the split's description) of a corpus of CORPORA."""
    corpus = CORPORA[name]
    text = (shared_data / corpus.file).read_text(encoding="utf-8")
    train, heldout = split_90_10(text)
    return train, heldout, describe_split(corpus.file, text, train, heldout)


def slug(words: list[str]) -> str:
    """A folder name for a variant's flags: ["--dropout", "0.1"] -> "dropout-0.1"."""
    return re.sub(r"[^\w.]+", "-", " ".join(words)).strip("-.") or "default"


def machine() -> dict:
    """Enough to tell later whether two runs are comparable (a busy host trains fewer steps)."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    return {"commit": commit, "torch": torch, "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


class Sakimi:
    """Runs `python -m sakimi_next` in a folder (relative paths, so the folder can be moved when done),
    printing and recording every command line."""

    def __init__(self, cwd: Path):
        self.cwd, self.commands = cwd, []

    def __call__(self, *args, capture: bool = False) -> str:
        line = "sakimi-next " + shlex.join(map(str, args))
        self.commands.append(line)
        print(f"$ (cd {self.cwd} && {line})", flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, "-m", "sakimi_next", *map(str, args)], cwd=self.cwd, env=env,
                              check=True, text=True, stdout=subprocess.PIPE if capture else None)
        return done.stdout if capture else ""


def failure(e: subprocess.CalledProcessError) -> str:
    """A failed Sakimi command as its user would have typed it (sakimi-next has printed why)."""
    return f"sakimi-next {shlex.join(map(str, e.cmd[3:]))} failed (exit {e.returncode})"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, value) -> None:
    """Written to a temporary name, then swapped in."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def train_and_score(work: Path, minutes: float, train_args: list[str], prepare_args: list[str]) -> dict:
    """Steps 2-5 in `work` (which holds train.txt and heldout.txt): the figures of one run."""
    run = Sakimi(work)
    t0 = time.perf_counter()
    run("--mode", "prepare_data", "--train-data", "train.txt", "--out-dir", "data", *prepare_args)
    t1 = time.perf_counter()
    run("--mode", "train", "--data-dir", "data", "--out-dir", "run", "--max-minutes", minutes, *train_args)
    t2 = time.perf_counter()
    scores = {method: json.loads(run("--mode", "eval", "--resume-from", "run/best", "--text-file", "heldout.txt",
                                     "--eval-method", method, "--json", capture=True))
              for method in ("carry", "sliding")}
    heldout = (work / "heldout.txt").read_text(encoding="utf-8")
    prompt = heldout.lstrip("\n").split("\n", 1)[0] + "\n"
    sample = run("--mode", "generate", "--resume-from", "run/best", "--prompt", prompt,
                 "--max-new-tokens", 300, "--seed", 0, capture=True)
    (work / "sample.txt").write_text(sample, encoding="utf-8")
    meta = read_json(work / "data" / "meta.json")
    latest = read_json(work / "run" / "latest" / "trainer_state.json")
    best = read_json(work / "run" / "best" / "trainer_state.json")
    train_split = meta["splits"]["train"]
    carry = scores["carry"]
    return {"heldout_bpb": carry["bpb"], "heldout_bpb_sliding": scores["sliding"]["bpb"],
            "eval": {m: {k: s[k] for k in ("method", "window", "loss", "tokens", "bytes", "bpb", "seconds")}
                     for m, s in scores.items()},
            "vocab_size": meta["vocab_size"], "train_tokens": train_split["tokens"],
            "train_bytes_per_token": round(train_split["bytes"] / max(1, train_split["tokens"]), 3),
            "heldout_tokens": carry["tokens"], "heldout_bytes_per_token": round(carry["bytes"] / carry["tokens"], 3),
            "steps": latest["step"], "planned_steps": (latest.get("budget") or {}).get("steps"),
            "best_step": best.get("best_step"), "tokens_seen": latest.get("tokens_seen"),
            "train_minutes": round(latest["elapsed_s"] / 60, 2), "prepare_minutes": round((t1 - t0) / 60, 2),
            "wall_minutes": round((t2 - t0) / 60, 2), "settings": latest.get("args"),
            "commands": run.commands, "sample": sample}


def run_corpus(name: str, shared_data: Path, out: Path, minutes: float, tag: str,
               train_args: list[str], prepare_args: list[str]) -> dict:
    """One corpus, built in out/.NAME.partial and swapped in as out/NAME when done; its results.json."""
    train, heldout, split = read_corpus(shared_data, name)
    final, work = out / name, out / f".{name}.partial"
    if work.exists():
        shutil.rmtree(work)  # what an interrupted run of ours left
    work.mkdir(parents=True)
    (work / "train.txt").write_text(train, encoding="utf-8")
    (work / "heldout.txt").write_text(heldout, encoding="utf-8")
    start = machine()
    figures = train_and_score(work, minutes, train_args, prepare_args)
    result = {"system": SYSTEM, "tag": tag, "corpus": name, "title": CORPORA[name].title, "split": split,
              "minutes_budget": minutes, "extra_args": train_args, "prepare_args": prepare_args, **figures,
              "machine": {**start, "load_average_end": machine()["load_average"]}}
    write_json(work / "results.json", result)
    swap_in(work, final)
    return result


def swap_in(new: Path, final: Path) -> None:
    """Replace `final` (a previous run of the same tag and corpus) with `new`, keeping it until `new` is in."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)


def gather(out: Path) -> list[dict]:
    """Every corpus's results.json under out (one tag), in CORPORA's order."""
    found = [read_json(p) for p in sorted(out.glob("*/results.json")) if not p.parent.name.startswith(".")]
    order = list(CORPORA)
    return sorted(found, key=lambda r: (order.index(r["corpus"]) if r["corpus"] in order else len(order), r["corpus"]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="the training budget per corpus (--max-minutes)")
    p.add_argument("--corpus", nargs="+", choices=list(CORPORA), default=DEFAULT_CORPORA,
                   help="a subset of the corpora")
    p.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data",
                   help="the corpora folder (docs/benchmarks.md, 'The corpora')")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality", help="results go to OUT/TAG/CORPUS")
    p.add_argument("--tag", default=None, help="the variant's name (default: 'default', or one made of its flags)")
    p.add_argument("--extra-args", default="",
                   help='training flags added to every run, written with "=": --extra-args="--dropout 0.1"')
    p.add_argument("--prepare-args", default="",
                   help='data preparation flags added to every run: --prepare-args="--vocab-size 4096"')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    train_args, prepare_args = shlex.split(args.extra_args), shlex.split(args.prepare_args)
    tag = args.tag or slug(prepare_args + train_args)
    if not (args.minutes > 0):
        print(f"error: --minutes ({args.minutes}) must be positive", file=sys.stderr)
        return 2
    for name in args.corpus:
        if not (args.shared_data / CORPORA[name].file).is_file():
            print(f"error: {args.shared_data / CORPORA[name].file} not found; pass --shared-data DIR "
                  "(docs/benchmarks.md, 'The corpora')", file=sys.stderr)
            return 2
    out = args.out / tag
    out.mkdir(parents=True, exist_ok=True)
    for name in args.corpus:
        try:
            run_corpus(name, args.shared_data, out, args.minutes, tag, train_args, prepare_args)
        except subprocess.CalledProcessError as e:  # sakimi-next has said why
            print(f"error: {failure(e)} on {name}", file=sys.stderr)
            return 1
        write_json(out / "results.json", gather(out))
    results = [r for r in gather(out) if r["corpus"] in args.corpus]
    from quality_table import details_table  # beside this script

    print("\n" + details_table(results))
    for r in results:
        print(f"\n--- {r['title']}: 300 tokens from the best checkpoint ---\n{r['sample']}")
    print(f"\nresults: {out / 'results.json'}; compare variants: python scripts/quality_table.py {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
