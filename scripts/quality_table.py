"""Markdown tables from the results.json files of scripts/quality.py and scripts/compare_nanogpt.py.

    python scripts/quality_table.py runs/quality                      # every tag under it
    python scripts/quality_table.py runs/quality/default runs/quality/dropout-0.1 runs/compare/default
    python scripts/quality_table.py runs/quality --metric heldout_bpb_sliding --details

A path is a results.json (one run, or a list of runs) or a folder searched for them. The first table has
a row per text and a column per system and tag (held-out bits/byte, the lowest of a row in bold); with
--details, a second table gives each run's vocabulary, bytes per token, steps and minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = {"heldout_bpb": "held-out bits/byte (sakimi-next: state carried across the text)",
           "heldout_bpb_sliding": "held-out bits/byte (sliding windows)"}


def load(paths: list[Path]) -> list[dict]:
    """The runs of `paths`, in the order found (in a folder, shallower files first: a tag's results.json
    lists its corpora in the benchmark's order); a later copy of the same (system, tag, corpus) replaces
    an earlier one in place. Folders whose name starts with a dot (an unfinished run) are skipped."""
    files = []
    for path in paths:
        if path.is_dir():
            found = [p.relative_to(path) for p in path.rglob("results.json")]
            files += [path / p for p in sorted(found, key=lambda p: (len(p.parts), p))
                      if not any(part.startswith(".") for part in p.parts)]
        else:
            files.append(path)
    runs: dict[tuple, dict] = {}
    for file in files:
        value = json.loads(file.read_text(encoding="utf-8"))
        for run in value if isinstance(value, list) else [value]:
            runs[(run["system"], run.get("tag", "default"), run["corpus"])] = run
    return list(runs.values())


def label(run: dict) -> str:
    tag = run.get("tag", "default")
    return run["system"] if tag == "default" else f"{run['system']} `{tag}`"


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def comparison_table(runs: list[dict], metric: str = "heldout_bpb") -> str:
    """A row per text, a column per system and tag; the lowest figure of a row in bold."""
    columns = _unique(label(r) for r in runs)
    corpora = _unique(r["corpus"] for r in runs)
    titles = {r["corpus"]: r.get("title", r["corpus"]) for r in runs}
    cell = {(r["corpus"], label(r)): r.get(metric) for r in runs}
    rows = []
    for corpus in corpora:
        values = [cell.get((corpus, c)) for c in columns]
        best = min((v for v in values if v is not None), default=None)
        rows.append([titles[corpus]] + ["" if v is None else (f"**{v:.3f}**" if v == best and len(columns) > 1
                                                               else f"{v:.3f}") for v in values])
    return markdown(["text"] + columns, rows)


def _count(v) -> str:
    return "" if v is None else f"{v:,}"


def details_table(runs: list[dict]) -> str:
    """Each run's figures: both bits/byte, vocabulary, bytes per token, steps, minutes."""
    rows = []
    for r in runs:
        sliding = r.get("heldout_bpb_sliding")
        rows.append([r.get("title", r["corpus"]), label(r), f"{r['heldout_bpb']:.4f}",
                     "" if sliding is None else f"{sliding:.4f}", _count(r.get("vocab_size")),
                     f"{r.get('train_bytes_per_token', 0):.2f} / {r.get('heldout_bytes_per_token', 0):.2f}",
                     f"{_count(r.get('steps'))} (best {_count(r.get('best_step'))})",
                     f"{r.get('train_minutes', 0):.1f} of {r.get('minutes_budget', 0):g}"])
    return markdown(["text", "system", "held-out bits/byte", "sliding windows", "vocabulary",
                     "bytes/token (train / held-out)", "steps", "training minutes"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="results.json files or folders holding them")
    p.add_argument("--metric", default="heldout_bpb", choices=list(METRICS), help="the figure of the first table")
    p.add_argument("--details", action="store_true", help="also a table of each run's figures")
    args = p.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = load(args.paths)
    if not runs:
        print(f"error: no results.json under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    print(f"{METRICS[args.metric]}\n\n{comparison_table(runs, args.metric)}")
    if args.details:
        print(f"\n{details_table(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
