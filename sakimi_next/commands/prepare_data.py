"""`--mode prepare_data`: text files -> a tokenizer and token files (train.bin, val.bin, meta.json)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..auto import WHOLE_CHARACTERS
from ..config import preset
from ..data import prepare_data
from ..settings import AUTO_PRESET, DEFAULT_DATA_DIR, DEFAULT_TEXT_FIELD, DOC_SPLITS, ENCODING_ERRORS
from ..tokenizer import CHAR_COVERAGE, MIN_CHAR_COUNT, MIN_VOCAB, SPECIAL_TOKENS
from ..util import UserError, say
from . import common

HELP = "tokenize text into a prepared data directory (tokenizer, train.bin, val.bin, meta.json)"
MAX_VOCAB = 1 << 24


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of data preparation (train takes them too, to prepare first with --train-data)."""
    p.add_argument("--train-data", nargs="+", action="extend", default=None, metavar="PATH",
                   help="text: .txt/.jsonl/.parquet files, directories or globs (default: the embedded CPython docs)")
    p.add_argument("--val-data", nargs="+", action="extend", default=None, metavar="PATH",
                   help="validation text (default: a held-out fraction of the training documents)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="the part of the training text held out for validation (0.1; --config auto: 0.02 of "
                        "the text, but at least 20 KB and at most 0.1)")
    p.add_argument("--doc-split", default="auto", choices=DOC_SPLITS,
                   help="what a document is: auto = a .txt file exactly as written, a JSONL record or Parquet row; "
                        "file also joins a JSONL or Parquet file's records; blank-line paragraphs or lines on request")
    p.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, metavar="NAME",
                   help="the field of each JSONL record / the column of a Parquet file that holds the text (text)")
    p.add_argument("--encoding-errors", default="strict", choices=ENCODING_ERRORS,
                   help="what to do with bytes that are not UTF-8")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json to use or create (default DATA_DIR/tokenizer.json)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    p.add_argument("--whole-characters", action=argparse.BooleanOptionalAction, default=None,
                   help="the tokenizer first gives each frequent character a token of its own (those that make up "
                        f"{CHAR_COVERAGE * 100:g}%% of the text, seen {MIN_CHAR_COUNT} times or more), then learns "
                        "merges: for Chinese and other scripts of many-byte characters; --config auto adds those "
                        "tokens to its vocabulary "
                        f"(default: {'on' if WHOLE_CHARACTERS else 'off'} with --config auto, off with a preset)")
    p.add_argument("--rebuild-tokenizer", action="store_true", help="train the tokenizer again even if it exists")
    p.add_argument("--allow-vocab-mismatch", action="store_true",
                   help="let the model's vocab_size follow the tokenizer instead of refusing")
    p.add_argument("--data-dir", default=None, help="prepared data directory (train.bin, val.bin, meta.json)")
    p.add_argument("--chat", action="store_true", default=None,
                   help='the data are conversations, JSONL {"messages": [...]} (detected by itself when omitted): '
                        "token files plus loss masks that count only the assistant replies")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_preset(p, "model preset whose vocabulary the tokenizer gets, or auto (the default): a vocabulary "
                         "from the size of the text")
    common.add_seed(p, "seed of the validation split and the tokenizer sample")
    add_data_arguments(p)
    p.add_argument("--out-dir", default=None, help=f"where to write (default: --data-dir, else {DEFAULT_DATA_DIR}/)")


@dataclass(frozen=True)
class PrepareDataSettings:
    preset: str
    out_dir: Path
    train_data: tuple[str, ...] | None
    val_data: tuple[str, ...] | None
    tokenizer: str | None
    vocab_size: int | None
    val_fraction: float | None  # None: --config auto's, else 0.1
    doc_split: str
    encoding_errors: str
    rebuild_tokenizer: bool
    seed: int
    allow_vocab_mismatch: bool
    chat: bool | None = None  # None: detect JSONL conversations
    whole_characters: bool | None = None  # None: --config auto's choice (auto.WHOLE_CHARACTERS), else off
    text_field: str = DEFAULT_TEXT_FIELD


def data_settings(args: argparse.Namespace, out_dir: str | Path, seed: int) -> PrepareDataSettings:
    """The checked data flags (shared with train's --train-data)."""
    if args.vocab_size is not None and not MIN_VOCAB <= args.vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab-size ({args.vocab_size}) must be at least {MIN_VOCAB} (256 byte tokens + "
                        f"{len(SPECIAL_TOKENS)} special tokens) and at most {MAX_VOCAB:,}")
    common.finite_float("--val-fraction", args.val_fraction, lo=0, hi=1, hi_open=True)
    if args.tokenizer is not None and Path(args.tokenizer).is_dir():
        raise UserError(f"--tokenizer {args.tokenizer} is a directory; give the path of a tokenizer.json")
    if args.tokenizer is not None:
        common.writable_dir("--tokenizer", Path(args.tokenizer).parent)
    if not args.text_field:
        raise UserError("--text-field must name a field (the default is text)")
    return PrepareDataSettings(
        preset=common.preset_name(args.config, AUTO_PRESET, allow_auto=True),
        out_dir=common.writable_dir("--out-dir", out_dir),
        train_data=tuple(args.train_data) if args.train_data else None,
        val_data=tuple(args.val_data) if args.val_data else None,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
        doc_split=args.doc_split, encoding_errors=args.encoding_errors, rebuild_tokenizer=args.rebuild_tokenizer,
        seed=seed, allow_vocab_mismatch=args.allow_vocab_mismatch, chat=args.chat,
        whole_characters=args.whole_characters, text_field=args.text_field)


def settings(args: argparse.Namespace) -> PrepareDataSettings:
    if args.out_dir and args.data_dir and Path(args.out_dir) != Path(args.data_dir):
        raise UserError(f"--out-dir ({args.out_dir}) and --data-dir ({args.data_dir}) differ; "
                        "prepare_data writes one directory")
    seed = common.seed(args.seed)
    return data_settings(args, args.out_dir or args.data_dir or DEFAULT_DATA_DIR, 0 if seed is None else seed)


def prepare(s: PrepareDataSettings) -> Path:
    auto = s.preset == AUTO_PRESET
    return prepare_data(list(s.train_data or ()) or None, list(s.val_data or ()) or None, s.out_dir,
                        tokenizer_path=s.tokenizer, vocab_size=s.vocab_size, val_fraction=s.val_fraction,
                        doc_split=s.doc_split, encoding_errors=s.encoding_errors,
                        rebuild_tokenizer=s.rebuild_tokenizer, seed=s.seed,
                        config=_auto_config(s.vocab_size) if auto else preset(s.preset),
                        allow_vocab_mismatch=s.allow_vocab_mismatch, chat=s.chat, auto_vocab=auto,
                        whole_characters=s.whole_characters, text_field=s.text_field)


def _auto_config(vocab_size: int | None):
    from ..auto import model_config

    return model_config(vocab_size or 4096)


def run(s: PrepareDataSettings) -> int:
    if s.preset == AUTO_PRESET:
        vocab = f"vocab_size {s.vocab_size:,}" if s.vocab_size else "the vocabulary from the text's size"
    else:
        vocab = f"vocab_size {preset(s.preset).vocab_size:,}"
    say(f"sakimi-next --mode prepare_data: preset {s.preset} ({vocab}) -> {s.out_dir}")
    prepare(s)
    return 0
