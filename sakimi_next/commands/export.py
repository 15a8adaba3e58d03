"""`--mode export`: a training checkpoint -> a transformers model directory, or one llama.cpp GGUF file
(the formats: `export.FORMATS`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..export import FORMATS
from ..settings import GGUF_TYPES, ExportSettings
from ..util import UserError
from . import common

HELP = "write a checkpoint as a Hugging Face transformers model directory, or as one GGUF file for llama.cpp"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_checkpoint(p, "the checkpoint to export (a checkpoint directory or its run directory)")
    p.add_argument("--out-dir", default=None, help="where to write the model directory (required for hf)")
    p.add_argument("--format", choices=list(FORMATS), default="hf",
                   help="; ".join(f"{name}: {what}" for name, what in FORMATS.items()))
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="GGUF weight type of the matrices (vectors and norms stay f32)")
    p.add_argument("--out-file", default=None,
                   help="--format gguf: the file to write (default OUT_DIR/model-GGUF_TYPE.gguf)")


def settings(args: argparse.Namespace) -> ExportSettings:
    checkpoint = common.required("--resume-from CHECKPOINT_DIR", args.resume_from, "the checkpoint to export")
    if args.format == "gguf":
        if args.out_file:
            out_file = Path(args.out_file)
            if out_file.is_dir():
                raise UserError(f"--out-file {out_file} is a directory; give the path of a .gguf file")
            common.writable_dir("--out-file", out_file.parent)
        else:
            out_dir = common.required("--out-file FILE.gguf or --out-dir DIR", args.out_dir,
                                      "where to write the GGUF file")
            out_file = common.writable_dir("--out-dir", out_dir) / f"model-{args.gguf_type}.gguf"
        return ExportSettings(checkpoint, None, "gguf", args.gguf_type, out_file)
    if args.out_file:
        raise UserError("--out-file is for --format gguf; a transformers export takes --out-dir DIR")
    out_dir = common.required("--out-dir DIR", args.out_dir, "where to write the model")
    return ExportSettings(checkpoint, common.writable_dir("--out-dir", out_dir))


def run(s: ExportSettings) -> int:
    from ..export import export

    for line in export(s):
        print(line)
    return 0
