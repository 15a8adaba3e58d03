"""A training run's record: metrics.jsonl (one JSON object a line: a step's loss, learning rate, speed, or
an evaluation's validation loss), the same numbers as TensorBoard scalars on request, and the loss curve
drawn from them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .util import UserError, atomic_write_bytes, is_int, new_figure, save_png


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


class MetricsLog:
    """metrics.jsonl, written as the run goes, and with a `tensorboard` directory the same records as
    TensorBoard scalars there (`TensorBoardLog`). A resumed run keeps the records up to its checkpoint's
    step (later ones belong to the lost part of the interrupted run); a fresh run starts a new file."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: Path | None = None):
        self.path, self.enabled, self.records = path, enabled, []
        self.tensorboard = None
        if not enabled:
            return
        if resume_step is not None:
            self.records = read_metrics(path, resume_step)
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())
        if tensorboard is not None:
            self.tensorboard = TensorBoardLog(tensorboard, resume_step)

    def add(self, record: dict):
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.add(record)

    def flush(self) -> None:
        """Make what was added visible to a TensorBoard watching the run (metrics.jsonl always is)."""
        if self.tensorboard is not None:
            self.tensorboard.writer.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.writer.close()
            self.tensorboard = None


def require_tensorboard() -> None:
    """A UserError unless the tensorboard package (which torch.utils.tensorboard writes with) is installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'sakimi-next[tensorboard]'")


class TensorBoardLog:
    """metrics.jsonl's records as TensorBoard scalars, written with torch.utils.tensorboard's SummaryWriter
    into `directory`: each number of a record under its own name (loss, lr, grad_norm, tokens_per_s,
    val_loss, val_bpb, ...) at the record's step, stored as float32 as TensorBoard does.

    Like metrics.jsonl, a resumed run drops what the interrupted run logged after its checkpoint, and a
    fresh run what an earlier run logged in the same directory: the event files stay, but a restart
    marker at the first step to drop (`purge_step`) hides those steps from TensorBoard's readers."""

    def __init__(self, directory: Path, resume_step: int | None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        purge_step = 0 if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def add(self, record: dict) -> None:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, global_step=record["step"])


def save_loss_curve(records: list[dict], path: Path, title: str) -> None:
    """Train loss (raw and smoothed) and validation loss against steps, written atomically as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = new_figure()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
        ema, smooth = losses[0], []
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.5, markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
