"""Both columns from one run: this project's defaults against nanoGPT's character-level "baby" model on
the same split for the same minutes (`make compare NANOGPT=DIR`).

For each corpus of scripts/quality.py (same --corpus, --minutes, --shared-data, --extra-args):
  1. our column: quality.py's run (prepare, train --max-minutes M, eval), or one read from --ours-results;
  2. nanoGPT's data from the same split (quality.split_90_10): train.bin, val.bin and meta.pkl as its
     data/shakespeare_char/prepare.py writes them. Its vocabulary is every character of the training and
     held-out text, as that script builds it from the whole file: a character only the held-out text has
     keeps an untrained row and is scored at whatever probability the model leaves it (our byte-level
     tokens spell such a character from bytes): nothing is skipped or mapped to <unk>. Its validation split
     (for picking the checkpoint) is the end of the training text, as large as our --config auto holds out;
     the held-out text is seen by neither system before scoring;
  3. nanoGPT's speed: its train.py run for --probe-seconds (with an evaluation every 100 iterations, to time
     one), stopped;
  4. nanoGPT's training: config/train_shakespeare_char.py with the CPU settings its README gives, max_iters
     and lr_decay_iters set to what fills the minutes at that speed, so its learning rate schedule completes;
     eval_interval (the config's 250, about) divides max_iters, so the last model is evaluated too; it keeps
     its best checkpoint;
  5. the score: nanogpt_score.py, in the nanoGPT folder with its own model.py, predicts every held-out
     character once from a sliding window of block_size (64) characters moving by --stride (32): nats / ln 2 /
     held-out UTF-8 bytes = bits per byte, the measure of our column.
Nothing of nanoGPT is in this repository: the user's checkout (--nanogpt DIR) runs as it is, in its own
folder, and is not written to (no bytecode either). Python, numpy and torch of --nanogpt-python run it.

Writes under --out/TAG (default runs/compare/default): CORPUS/ (our run, as quality.py), nanogpt/CORPUS/
(data/, out/ckpt.pt, probe.log, train.log, results.json) and compare.json; prints the tables.

    python scripts/compare_nanogpt.py --nanogpt DIR [--corpus tinyshakespeare ...] [--minutes 20]
                                      [--ours-results runs/quality/default]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import quality  # beside this script: the corpora, the split, our column
import quality_table

SCRIPTS = Path(__file__).resolve().parent
SYSTEM = "nanoGPT"
CONFIG = "config/train_shakespeare_char.py"
# nanoGPT's README, "I only have a macbook": the baby model on a CPU (max_iters and lr_decay_iters are ours)
CPU_ARGS = ("--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
            "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0")
EVAL_INTERVAL = 250  # config/train_shakespeare_char.py's, about
PROBE_EVAL_INTERVAL = 100
ITER_LINE = re.compile(r"iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms")
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


class Failed(Exception):
    """One clear error line for the user."""


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Summed nats over a text -> bits per byte of its UTF-8 encoding."""
    return nats / math.log(2) / n_bytes


def split_for_nanogpt(train: str, val_fraction: float) -> tuple[str, str]:
    """nanoGPT's training and validation text: the last `val_fraction` of ours cut off at a newline."""
    cut = train.rfind("\n", 0, int(len(train) * (1 - val_fraction))) + 1 or int(len(train) * (1 - val_fraction))
    return train[:cut], train[cut:]


def prepare_char_data(train: str, heldout: str, out: Path, val_fraction: float) -> dict:
    """train.bin, val.bin, meta.pkl (nanoGPT's character-level format), heldout.bin (the character before
    the held-out text, then the held-out text) and unseen.json in `out`; what was written."""
    import numpy as np

    chars = sorted(set(train) | set(heldout))
    if len(chars) > 2 ** 16:
        raise Failed(f"{len(chars):,} distinct characters do not fit nanoGPT's uint16 ids")
    stoi = {c: i for i, c in enumerate(chars)}
    nano_train, nano_val = split_for_nanogpt(train, val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", nano_train), ("val", nano_val), ("heldout", train[-1:] + heldout)):
        np.array([stoi[c] for c in text], dtype=np.uint16).tofile(out / f"{name}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    seen = set(nano_train)
    unseen = sorted(set(heldout) - seen)
    (out / "unseen.json").write_text(json.dumps({"chars": "".join(unseen), "ids": [stoi[c] for c in unseen]},
                                                ensure_ascii=False), encoding="utf-8")
    return {"vocab_size": len(chars), "train_chars": len(nano_train), "val_chars": len(nano_val),
            "train_bytes": len(nano_train.encode()), "val_fraction": val_fraction, "unseen_chars": len(unseen),
            "unseen_occurrences": sum(c not in seen for c in heldout), "context": train[-1:]}


def train_command(python: str, run: Path, max_iters: int, out: str = "out", *extra: str) -> list[str]:
    return [python, "-u", "train.py", CONFIG, *CPU_ARGS, f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
            f"--dataset={run / 'data'}", f"--out_dir={run / out}", *extra]


def probe_command(python: str, run: Path) -> list[str]:
    """Training without end, an evaluation every PROBE_EVAL_INTERVAL iterations (to time one)."""
    return train_command(python, run, 10 ** 9, "probe", f"--eval_interval={PROBE_EVAL_INTERVAL}")


def nanogpt_env() -> dict:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


@dataclass(frozen=True)
class Speed:
    startup_s: float  # launch to the first iteration's line: imports, data, model, the first evaluation
    iter_s: float  # mean seconds of a training iteration, by nanoGPT's own timing
    eval_s: float  # what an evaluation (and a checkpoint) adds to its iteration
    iterations: int  # measured


def speed_from(dts: dict[int, float], startup_s: float, eval_interval: int) -> Speed:
    """A Speed from nanoGPT's per-iteration times (iteration -> seconds; an evaluation is timed within the
    iteration it precedes), the first five (settling) left out."""
    plain = [dt for i, dt in dts.items() if i >= 5 and i % eval_interval]
    evals = [dt for i, dt in dts.items() if i > 0 and i % eval_interval == 0]
    if not plain or not evals:
        raise Failed("nanoGPT's speed: too few iterations measured; raise --probe-seconds")
    iter_s = sum(plain) / len(plain)
    return Speed(startup_s, iter_s, max(0.0, sum(evals) / len(evals) - iter_s), len(plain) + len(evals))


def plan_iters(speed: Speed, budget_s: float) -> tuple[int, int]:
    """(max_iters, eval_interval) that fill `budget_s` from launch to exit, evaluations about every
    EVAL_INTERVAL iterations and one at max_iters (the last model is evaluated, and kept if best)."""
    n = int((budget_s - speed.startup_s) / (speed.iter_s + speed.eval_s / EVAL_INTERVAL))
    evaluations = max(1, round(n / EVAL_INTERVAL))
    interval = max(1, n // evaluations)
    return evaluations * interval, interval


def measure_speed(python: str, nanogpt: Path, run: Path, seconds: float) -> Speed:
    """Run nanoGPT's training for `seconds` (and at least one evaluation), then stop it."""
    cmd = probe_command(python, run)
    log = run / "probe.log"
    t0 = time.perf_counter()
    dts, startup, measured = {}, None, False
    with open(log, "w", encoding="utf-8") as f, subprocess.Popen(
            cmd, cwd=nanogpt, env=nanogpt_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        guard = threading.Timer(10 * seconds + 600, proc.kill)  # a hung nanoGPT does not hang us
        guard.start()
        try:
            for line in proc.stdout:
                f.write(line)
                if not (m := ITER_LINE.match(line)):
                    continue
                now = time.perf_counter()
                startup = startup if startup is not None else now - t0
                dts[int(m[1])] = float(m[2]) / 1000
                if now - t0 - startup >= seconds and max(dts) > PROBE_EVAL_INTERVAL:
                    measured = True
                    break
        finally:
            guard.cancel()
            proc.terminate()
    shutil.rmtree(run / "probe", ignore_errors=True)  # the probe's checkpoint
    if not measured:
        raise Failed(f"nanoGPT's train.py stopped before its speed was measured; its log, {log}:\n{tail(log)}")
    return speed_from(dts, startup, PROBE_EVAL_INTERVAL)


def train_nanogpt(python: str, nanogpt: Path, run: Path, max_iters: int, eval_interval: int, minutes: float) -> dict:
    """nanoGPT's training to max_iters, its output in train.log; the evaluations it printed."""
    cmd = train_command(python, run, max_iters, "out", f"--eval_interval={eval_interval}")
    log = run / "train.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            done = subprocess.run(cmd, cwd=nanogpt, env=nanogpt_env(), stdout=f, stderr=subprocess.STDOUT,
                                  timeout=3 * minutes * 60 + 600)
        except subprocess.TimeoutExpired:
            raise Failed(f"nanoGPT's training ran past 3x the budget; its log: {log}") from None
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise Failed(f"nanoGPT's train.py failed (exit {done.returncode}); its log, {log}:\n{tail(log)}")
    evals = [(int(s), float(t), float(v)) for s, t, v in EVAL_LINE.findall(log.read_text(encoding="utf-8"))]
    return {"wall_s": wall, "evals": evals, "command": cmd}


def score_nanogpt(python: str, nanogpt: Path, run: Path, stride: int | None) -> dict:
    ckpt = run / "out" / "ckpt.pt"
    if not ckpt.is_file():
        raise Failed(f"nanoGPT saved no checkpoint (its validation loss never improved?); see {run / 'train.log'}")
    cmd = [python, str(SCRIPTS / "nanogpt_score.py"), str(ckpt), str(run / "data")]
    cmd += ["--stride", str(stride)] if stride else []
    done = subprocess.run(cmd, cwd=nanogpt, env=nanogpt_env(), text=True, capture_output=True)
    if done.returncode != 0:
        raise Failed(f"scoring nanoGPT's checkpoint failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.splitlines()[-1]), "command": cmd}  # after what nanoGPT's model.py prints


def shown(cmd: list[str], nanogpt: Path, run: Path) -> str:
    """A command line as the user would type it, the run folder written as $RUN."""
    return f"(cd {nanogpt} && {shlex.join(cmd)})".replace(str(run), "$RUN")


def run_nanogpt(name: str, out: Path, args: argparse.Namespace) -> dict:
    """nanoGPT's column for one corpus, built in out/.NAME.partial and swapped in as out/NAME."""
    from sakimi_next import auto

    train, heldout, split = quality.read_corpus(args.shared_data, name)
    final, run = out / name, out / f".{name}.partial"
    if run.exists():
        shutil.rmtree(run)  # what an interrupted run of ours left
    run.mkdir(parents=True)
    data = prepare_char_data(train, heldout, run / "data", auto.val_fraction(len(train.encode())))
    start = quality.machine()
    speed = measure_speed(args.nanogpt_python, args.nanogpt, run, args.probe_seconds)
    max_iters, interval = plan_iters(speed, args.minutes * 60)
    print(f"nanoGPT on {name}: {1 / speed.iter_s:.1f} iterations/s, {speed.eval_s:.1f} s an evaluation, "
          f"{speed.startup_s:.0f} s to start -> max_iters {max_iters:,} (an evaluation every {interval}) "
          f"for {args.minutes:g} minutes", flush=True)
    trained = train_nanogpt(args.nanogpt_python, args.nanogpt, run, max_iters, interval, args.minutes)
    scored = score_nanogpt(args.nanogpt_python, args.nanogpt, run, args.stride)
    n_bytes, chars = split["heldout_bytes"], scored["targets"]
    bpb = bits_per_byte(scored["nats"], n_bytes)
    result = {
        "system": SYSTEM, "tag": "default", "corpus": name, "title": quality.CORPORA[name].title, "split": split,
        "minutes_budget": args.minutes, "heldout_bpb": bpb, "heldout_bpb_sliding": bpb,
        "eval": {"sliding": {"method": "sliding", "window": scored["block_size"], "stride": scored["stride"],
                             "loss": scored["nats"] / chars, "tokens": chars, "bytes": n_bytes, "bpb": bpb,
                             "context": data["context"]}},
        "unseen": {"chars": data["unseen_chars"], "occurrences": data["unseen_occurrences"],
                   "bpb_share": bits_per_byte(scored["unseen_nats"], n_bytes)},
        "vocab_size": data["vocab_size"], "train_tokens": data["train_chars"],
        "train_bytes_per_token": round(data["train_bytes"] / data["train_chars"], 3),
        "heldout_tokens": chars, "heldout_bytes_per_token": round(n_bytes / chars, 3),
        "steps": max_iters, "planned_steps": max_iters, "best_step": scored["iter_num"],
        "tokens_seen": (max_iters + 1) * 12 * 64, "train_minutes": round(trained["wall_s"] / 60, 2),
        "probe": {**asdict(speed), "seconds": args.probe_seconds}, "evals": trained["evals"],
        "settings": {"config": CONFIG, "args": list(CPU_ARGS), "validation_chars": data["val_chars"],
                     "val_fraction": data["val_fraction"], "best_val_loss": scored["best_val_loss"]},
        "commands": [shown(c, args.nanogpt, run) for c in
                     (probe_command(args.nanogpt_python, run), trained["command"], scored["command"])],
        "machine": {**start, "load_average_end": quality.machine()["load_average"]}}
    quality.write_json(run / "results.json", result)
    quality.swap_in(run, final)
    return result


def ours_from(path: Path, corpora: list[str], shared_data: Path, minutes: float) -> dict[str, dict]:
    """Our column read from an earlier quality.py run: same split (by the held-out text's sha256), same budget."""
    runs = {r["corpus"]: r for r in quality_table.load([path]) if r["system"] == quality.SYSTEM}
    problems = []
    for name in corpora:
        r = runs.get(name)
        _, _, split = quality.read_corpus(shared_data, name)
        if r is None:
            problems.append(f"{name}: no run")
        elif r["split"]["heldout_sha256"] != split["heldout_sha256"]:
            problems.append(f"{name}: another held-out text")
        elif r["minutes_budget"] != minutes:
            problems.append(f"{name}: {r['minutes_budget']:g} minutes, not {minutes:g}")
    if problems:
        raise Failed(f"--ours-results {path}: " + "; ".join(problems))
    return {name: runs[name] for name in corpora}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (github.com/karpathy/nanoGPT)")
    p.add_argument("--nanogpt-python", default=sys.executable, help="the Python (with numpy and torch) to run it")
    p.add_argument("--corpus", nargs="+", choices=list(quality.CORPORA), default=quality.DEFAULT_CORPORA)
    p.add_argument("--minutes", type=float, default=20.0, help="the training budget of each system per corpus")
    p.add_argument("--shared-data", type=Path, default=quality.ROOT.parent / "shared" / "data",
                   help="the corpora folder")
    p.add_argument("--out", type=Path, default=quality.ROOT / "runs" / "compare", help="results go to OUT/TAG")
    p.add_argument("--tag", default=None, help="our variant's name (default: from --extra-args, else 'default')")
    p.add_argument("--extra-args", default="", help='training flags added to our runs: --extra-args="--dropout 0.1"')
    p.add_argument("--prepare-args", default="", help='data preparation flags added to our runs: --prepare-args="..."')
    p.add_argument("--ours-results", type=Path, default=None,
                   help="our column from this quality.py results folder (same split and minutes), not trained again")
    p.add_argument("--probe-seconds", type=float, default=20.0, help="how long nanoGPT's speed is measured")
    p.add_argument("--stride", type=int, default=None,
                   help="nanoGPT's scoring windows move by this (default: half its block)")
    args = p.parse_args(argv)
    args.nanogpt = args.nanogpt.resolve()
    args.out = args.out.resolve()
    return args


def check(args: argparse.Namespace) -> None:
    missing = [f for f in ("train.py", "model.py", "configurator.py", CONFIG) if not (args.nanogpt / f).is_file()]
    if missing:
        raise Failed(f"--nanogpt {args.nanogpt} is not a nanoGPT checkout: no {', '.join(missing)}")
    if "=" in str(args.out):
        raise Failed(f"--out {args.out}: nanoGPT's configurator cannot take a path with '='")
    if not (args.minutes > 0):
        raise Failed(f"--minutes ({args.minutes}) must be positive")
    for name in args.corpus:
        if not (args.shared_data / quality.CORPORA[name].file).is_file():
            raise Failed(f"{args.shared_data / quality.CORPORA[name].file} not found; pass --shared-data DIR")


def main(argv=None) -> int:
    args = parse_args(argv)
    train_args, prepare_args = shlex.split(args.extra_args), shlex.split(args.prepare_args)
    tag = args.tag or quality.slug(prepare_args + train_args)
    out = args.out / tag
    try:
        check(args)
        ours = ours_from(args.ours_results, args.corpus, args.shared_data, args.minutes) if args.ours_results else {}
        results = []
        for name in args.corpus:
            if name not in ours:
                ours[name] = quality.run_corpus(name, args.shared_data, out, args.minutes, tag,
                                                train_args, prepare_args)
            results += [ours[name], run_nanogpt(name, out / "nanogpt", args)]
            quality.write_json(out / "compare.json", results)
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: {quality.failure(e)}", file=sys.stderr)
        return 1
    print("\n" + quality_table.comparison_table(results) + "\n\n" + quality_table.details_table(results))
    for r in results:
        if r["system"] == SYSTEM and r["unseen"]["chars"]:
            u = r["unseen"]
            print(f"{r['title']}: {u['chars']} characters of the held-out text ({u['occurrences']} times) never in "
                  f"nanoGPT's training text: {u['bpb_share']:.4f} of its bits/byte")
    print(f"\nresults: {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
