"""A training run's record: metrics.jsonl (one JSON object a line: a step's loss, learning rate, speed, or
an evaluation's validation loss) and the loss curve drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from .util import atomic_write_bytes, is_int, new_figure, save_png


def read_metrics(path: Path, until_step: int | None = None) -> list[dict]:
    """The records of a metrics.jsonl file, those up to `until_step` when given. A line cut short by a crash,
    or anything that is not one of our records (a JSON object with an integer step), is left out, never a
    traceback."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and is_int(r.get("step")) and (until_step is None or r["step"] <= until_step):
            records.append(r)
    return records
