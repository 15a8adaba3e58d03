"""`--mode export`: a training checkpoint -> a transformers model directory."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from . import common

HELP = "write a checkpoint as a Hugging Face transformers model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_checkpoint(p, "the checkpoint to export (a checkpoint directory or its run directory)")
    p.add_argument("--out-dir", default=None, help="where to write the model directory (required)")


@dataclass(frozen=True)
class ExportSettings:
    checkpoint: str
    out_dir: Path


def settings(args: argparse.Namespace) -> ExportSettings:
    checkpoint = common.required("--resume-from CHECKPOINT_DIR", args.resume_from, "the checkpoint to export")
    out_dir = common.required("--out-dir DIR", args.out_dir, "where to write the model")
    return ExportSettings(checkpoint, common.writable_dir("--out-dir", out_dir))


def run(s: ExportSettings) -> int:
    from ..interop import export

    out = export(s.checkpoint, s.out_dir)
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {s.checkpoint} -> {out}: {', '.join(files)}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}); "
          f"AutoTokenizer.from_pretrained({str(out)!r})")
    return 0
