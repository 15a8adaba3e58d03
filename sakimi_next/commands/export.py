"""`--mode export`: a training checkpoint -> a transformers model directory, or one llama.cpp GGUF file."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..util import UserError
from . import common

HELP = "write a checkpoint as a Hugging Face transformers model directory, or as one GGUF file for llama.cpp"
FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_checkpoint(p, "the checkpoint to export (a checkpoint directory or its run directory)")
    p.add_argument("--out-dir", default=None, help="where to write the model directory (required for hf)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="a transformers directory (hf) or one llama.cpp GGUF file (gguf)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="GGUF weight type of the matrices (vectors and norms stay f32)")
    p.add_argument("--out-file", default=None,
                   help="--format gguf: the file to write (default OUT_DIR/model-GGUF_TYPE.gguf)")


@dataclass(frozen=True)
class ExportSettings:
    checkpoint: str
    out_dir: Path | None
    format: str = "hf"
    gguf_type: str = "f16"
    out_file: Path | None = None  # gguf only


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
    if s.format == "gguf":
        return _run_gguf(s)
    from ..interop import export

    out = export(s.checkpoint, s.out_dir)
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {s.checkpoint} -> {out}: {', '.join(files)}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}); "
          f"AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


def _run_gguf(s: ExportSettings) -> int:
    from ..gguf_export import export_gguf

    res = export_gguf(s.checkpoint, s.out_file, s.gguf_type, progress=True)
    for note in res.notes:
        print(f"note: {note}")
    print(f"exported {s.checkpoint} -> {res.path} (llama.cpp architecture {res.architecture}, "
          f"{res.weight_type}); run it with: llama-cli -m {res.path}")
    return 0
