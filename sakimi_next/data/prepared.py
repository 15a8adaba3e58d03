"""A prepared data directory: its format, reading it, and publishing a new one.

    train.bin, val.bin   flat little-endian token ids, uint16 when the vocab fits in 65536, else uint32;
                         shape (tokens,), read with `open_split` as a memory map
    train.mask.bin, ...  chat data only: one uint8 per token, 1 = counted in the loss (`open_loss_mask`)
    tokenizer.json       unless --tokenizer points elsewhere
    meta.json            format, vocab_size, dtype, eot_id, pad_id, tokenizer (path, relative when inside
                         the directory) and tokenizer_sha256, splits {train, val: file, tokens, documents,
                         bytes}, sources (path, size, sha256 of each input), settings; read back field
                         by field, its file names must stay inside the directory.

The whole directory is built beside the old one and swapped in at the end (`publish_prepared`; other files
kept in it are carried over as hard links), so the previous result stays complete until the new one is.

`bytes` is the UTF-8 size of the split's document text, so bits per byte = loss / ln 2 * tokens / bytes
(tokens include one EOT per document).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..tokenizer import Tokenizer, check_same_tokenizer
from ..util import UserError, carry_over, inside, is_int, is_sha256, json_field, json_object, publish_dir, say

FORMAT = 1
# meta.json's keys in the order they are written (those a directory has)
META_KEYS = ("format", "vocab_size", "dtype", "eot_id", "pad_id", "tokenizer", "tokenizer_sha256", "splits",
             "val_stretches", "chat", "sources", "settings", "tokenizer_training")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def rel_or_abs(path: Path, base: Path) -> str:
    path, base = path.resolve(), base.resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def read_meta_quietly(out_dir: Path) -> dict | None:
    try:
        return load_meta(out_dir)
    except UserError:
        return None


def _is_count(v) -> bool:
    return is_int(v) and v >= 0


SPLIT_FIELDS = {"file": (lambda v: isinstance(v, str), "a file name"), "tokens": (_is_count, "an integer >= 0"),
                "documents": (_is_count, "an integer >= 0"), "bytes": (_is_count, "an integer >= 0")}


def load_meta(data_dir) -> dict:
    """meta.json of a prepared data directory, checked field by field; a UserError when the directory or
    the file is missing, unreadable or wrong."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory not found: {data_dir}; create it with --mode prepare_data")
    path = data_dir / "meta.json"
    if not path.is_file():
        raise UserError(f"{data_dir} has no meta.json (not prepared, or interrupted); run --mode prepare_data")
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); run --mode prepare_data again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a format-{FORMAT} meta.json; run --mode prepare_data again")
    vocab = json_field(meta, path, "vocab_size", lambda v: is_int(v) and v > 0, "a positive integer")
    json_field(meta, path, "dtype", lambda v: v in ("uint16", "uint32"), '"uint16" or "uint32"')
    for name in ("eot_id", "pad_id"):
        json_field(meta, path, name, lambda v: is_int(v) and 0 <= v < vocab, f"an integer in 0..{vocab - 1}")
    json_field(meta, path, "tokenizer", lambda v: isinstance(v, str) and v, "a path")
    json_field(meta, path, "tokenizer_sha256", is_sha256, "a sha256 hex digest")
    splits = json_field(meta, path, "splits", lambda v: isinstance(v, dict), "an object")
    for split, info in splits.items():
        where = f"{path} (split {split!r})"
        json_object(info, where)
        for name, (ok, must) in SPLIT_FIELDS.items():
            json_field(info, where, name, ok, must)
        inside(data_dir, info["file"], where)
    return meta


def tokenizer_path(data_dir, meta: dict | None = None) -> Path:
    """Where the tokenizer of a data directory is: meta.json's path is relative to the directory and stays
    inside it, or absolute for a tokenizer given with --tokenizer from elsewhere (verified by its sha256)."""
    meta = meta or load_meta(data_dir)
    if Path(meta["tokenizer"]).is_absolute():
        return Path(meta["tokenizer"])
    return inside(data_dir, meta["tokenizer"], Path(data_dir) / "meta.json")


def load_tokenizer(data_dir) -> Tokenizer:
    """The tokenizer a data directory was prepared with; a UserError if it changed since."""
    meta = load_meta(data_dir)
    tok = Tokenizer.load(tokenizer_path(data_dir, meta))
    check_same_tokenizer(tok, meta["tokenizer_sha256"], f"{tok.path} changed after {data_dir} was prepared",
                         "; run --mode prepare_data again")
    return tok


def open_split(data_dir, split: str) -> np.ndarray:
    """The token ids of `split` ("train" or "val") as a read-only memory map of shape (tokens,)."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise UserError(f"{data_dir} has no {split!r} split (it has: {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    path = inside(data_dir, info["file"], Path(data_dir) / "meta.json")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = info["tokens"] * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise UserError(f"{path} is missing or not {expected:,} bytes as meta.json says; run --mode prepare_data again")
    if expected == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def open_loss_mask(data_dir, meta: dict, split: str) -> np.ndarray | None:
    """The loss mask of a split of chat data (uint8 per token, memory-mapped); None for plain text."""
    info = meta["splits"][split]
    if "mask" not in info:
        return None
    path = inside(data_dir, info["mask"], Path(data_dir) / "meta.json")
    if not path.is_file() or path.stat().st_size != info["tokens"]:
        raise UserError(f"{path} is missing or not {info['tokens']:,} bytes as meta.json says; "
                        "run --mode prepare_data again")
    return np.memmap(path, dtype=np.uint8, mode="r") if info["tokens"] else np.zeros(0, np.uint8)


def check_vocab(config, tokenizer: Tokenizer, allow_mismatch: bool):
    """The model config to use with `tokenizer`, with eos/pad ids from the tokenizer.

    A tokenizer with at most `config.vocab_size` tokens fits (the extra embedding rows go unused).
    A larger one is a UserError naming both sizes, unless `allow_mismatch`: then the config follows
    the tokenizer, and this prints that it does.
    """
    if tokenizer.vocab_size > config.vocab_size:
        if not allow_mismatch:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocab_size is "
                            f"{config.vocab_size:,}; use a preset with a larger vocabulary, a smaller --vocab-size, "
                            "or --allow-vocab-mismatch to make the model follow the tokenizer")
        say(f"note: the model's vocab_size follows the tokenizer: {config.vocab_size:,} -> "
            f"{tokenizer.vocab_size:,}")
        config = config.replace(vocab_size=tokenizer.vocab_size)
    return config.replace(eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id)


# ------------------------------------------------------------------------------------------ publishing
@contextlib.contextmanager
def publish_prepared(out_dir: Path, tok_path: Path, tok: Tokenizer, files: set[str]) -> Iterator[Path]:
    """A new data directory built beside `out_dir` (a real directory, not a link) and swapped in at the end
    (`util.publish_dir`): yields the directory to write `files` into. The old directory's other files are
    carried over; a tokenizer that is not yet at `tok_path` is saved there last, just before the swap."""
    tok_is_new = tok.path is None or tok.path.resolve() != tok_path.resolve()
    tok_inside = tok_path.resolve().is_relative_to(out_dir.resolve())
    with publish_dir(out_dir) as tmp:
        written = set(files)
        if tok_is_new and tok_inside:
            written.add(tok_path.resolve().relative_to(out_dir.resolve()).parts[0])
        carry_over(out_dir, tmp, skip=written)
        yield tmp
        if tok_is_new:
            tok.save(tmp / tok_path.resolve().relative_to(out_dir.resolve()) if tok_inside else tok_path)
            tok.path = tok_path


def write_meta(directory: Path, meta: dict) -> None:
    ordered = {k: meta[k] for k in META_KEYS if k in meta}
    (directory / "meta.json").write_text(json.dumps(ordered, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
