"""The quality benchmark (`make quality`): what the defaults make of a book in a fixed time.

For each corpus of ../shared/data (Tiny Shakespeare, 红楼梦):
  1. split it: the first 90% of the characters (cut at a newline) to train, the last 10% held out;
  2. prepare the training text with default settings:  sakimi-next --mode prepare_data --train-data train.txt
  3. train with nothing but the data and the budget:    sakimi-next --mode train --max-minutes 20
  4. score the best checkpoint on the held-out text:      sakimi-next --mode eval --text-file heldout.txt
     (the state carried across the whole text) -> bits per byte;
  5. sample 300 tokens from it, prompted with the held-out text's first line.

Writes, under --out (default runs/quality): per corpus the split, data/, run/ (checkpoints, metrics.jsonl,
loss_curve.png) and sample.txt; and results.json. Prints a table. Every command it runs is printed first.

    python scripts/quality.py [--minutes 20] [--corpus tinyshakespeare hongloumeng] [--shared-data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = {"tinyshakespeare": "tinyshakespeare/input.txt", "hongloumeng": "zh_novels/hongloumeng.txt"}


def split_90_10(text: str) -> tuple[str, str]:
    """The first 90% of the characters, cut after the last newline before that point; the rest."""
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    return text[:cut], text[cut:]


def sakimi(*args, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "sakimi_next", *map(str, args)]
    print("$ sakimi-next " + " ".join(map(str, args)), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout if capture else ""


def run_corpus(name: str, source: Path, out: Path, minutes: float) -> dict:
    work = out / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    train, heldout = split_90_10(source.read_text(encoding="utf-8"))
    (work / "train.txt").write_text(train, encoding="utf-8")
    (work / "heldout.txt").write_text(heldout, encoding="utf-8")
    t0 = time.time()
    sakimi("--mode", "prepare_data", "--train-data", work / "train.txt", "--out-dir", work / "data")
    sakimi("--mode", "train", "--data-dir", work / "data", "--out-dir", work / "run", "--max-minutes", minutes)
    train_minutes = (time.time() - t0) / 60
    score = json.loads(sakimi("--mode", "eval", "--resume-from", work / "run" / "best", "--text-file",
                              work / "heldout.txt", "--json", capture=True))
    prompt = heldout.lstrip("\n").split("\n", 1)[0] + "\n"
    sample = sakimi("--mode", "generate", "--resume-from", work / "run" / "best", "--prompt", prompt,
                    "--max-new-tokens", 300, "--seed", 0, capture=True)
    (work / "sample.txt").write_text(sample, encoding="utf-8")
    state = json.loads((work / "run" / "best" / "trainer_state.json").read_text())
    return {"corpus": name, "heldout_bytes": len(heldout.encode()), "heldout_bpb": score["bpb"],
            "best_step": state.get("best_step"), "steps": (state.get("budget") or {}).get("steps"),
            "minutes": round(train_minutes, 1), "sample": sample, "loss_curve": str(work / "run" / "loss_curve.png")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="the training budget per corpus")
    p.add_argument("--corpus", nargs="+", choices=list(CORPORA), default=list(CORPORA))
    p.add_argument("--shared-data", type=Path,
                   default=Path(os.environ.get("SAKIMI_SHARED_DATA", ROOT.parent / "shared" / "data")))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    args = p.parse_args(argv)
    results = []
    for name in args.corpus:
        source = args.shared_data / CORPORA[name]
        if not source.is_file():
            print(f"error: {source} not found; pass --shared-data", file=sys.stderr)
            return 2
        results.append(run_corpus(name, source, args.out, args.minutes))
        (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"\n{'corpus':<16} {'held-out bits/byte':>18} {'best step':>10} {'of':>6} {'minutes':>8}")
    for r in results:
        print(f"{r['corpus']:<16} {r['heldout_bpb']:>18.4f} {r['best_step']!s:>10} {r['steps']!s:>6} {r['minutes']:>8}")
    for r in results:
        print(f"\n--- {r['corpus']}: 300 tokens from the best checkpoint ---\n{r['sample']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
