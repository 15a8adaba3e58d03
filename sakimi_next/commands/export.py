"""`--mode export`: a training checkpoint -> a transformers model directory (Qwen3.5 or Qwen3-Next layout,
with a model card), or one llama.cpp GGUF file (the formats: `export.FORMATS`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..export import FORMATS
from ..settings import GGUF_TYPES, HF_LAYOUTS, ExportSettings, ModelCardSettings
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
    p.add_argument("--hf-layout", choices=HF_LAYOUTS, default=None,
                   help="--format hf: qwen3_5 (Qwen3_5ForCausalLM, dense models only; the default for them) or "
                        "qwen3_next (Qwen3NextForCausalLM; the default for MoE models)")
    card = p.add_argument_group("model card (--format hf: README.md)")
    card.add_argument("--license", default="other",
                      help="the weights' license, a Hugging Face license id such as apache-2.0 or cc-by-4.0; "
                           "other = not chosen: the weights follow the terms of their training text")
    card.add_argument("--language", nargs="+", action="extend", default=None, metavar="CODE",
                      help="the languages of the model, ISO 639 codes such as en zh (default: detected from the "
                           "training text's scripts)")
    card.add_argument("--dataset-name", default=None,
                      help="how the card names the training data (default: the prepared data's source files)")
    card.add_argument("--base-model", default=None, metavar="ID",
                      help="the Hugging Face id of the model this one was fine-tuned from (front matter base_model)")


def settings(args: argparse.Namespace) -> ExportSettings:
    checkpoint = common.required("--resume-from CHECKPOINT_DIR", args.resume_from, "the checkpoint to export")
    if args.format == "gguf":
        hf_only = [flag for flag, value in (("--hf-layout", args.hf_layout), ("--language", args.language),
                                            ("--dataset-name", args.dataset_name), ("--base-model", args.base_model),
                                            ("--license", None if args.license == "other" else args.license))
                   if value is not None]
        if hf_only:
            raise UserError(f"{hf_only[0]} is for --format hf; a GGUF file has no model card or layout choice")
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
    return ExportSettings(checkpoint, common.writable_dir("--out-dir", out_dir), hf_layout=args.hf_layout,
                          card=card_settings(args))


def card_settings(args: argparse.Namespace) -> ModelCardSettings:
    """The model card flags, each checked: ids in the forms the Hugging Face Hub accepts."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", args.license):
        raise UserError(f"--license {args.license!r} is not a license id (lowercase, like apache-2.0, mit, "
                        "cc-by-4.0, other)")
    for code in args.language or ():
        if not re.fullmatch(r"[a-z]{2,3}", code):
            raise UserError(f"--language {code!r} is not an ISO 639 code (two or three lowercase letters, "
                            "like en or zh)")
    if args.base_model is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.base_model):
        raise UserError(f"--base-model {args.base_model!r} is not a Hugging Face model id (OWNER/NAME)")
    if args.dataset_name is not None and not args.dataset_name.strip():
        raise UserError("--dataset-name is empty")
    return ModelCardSettings(args.license, tuple(dict.fromkeys(args.language or ())), args.dataset_name,
                             args.base_model)


def run(s: ExportSettings) -> int:
    from ..export import export

    for line in export(s):
        print(line)
    return 0
