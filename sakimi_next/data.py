"""From text to training data: `--mode prepare_data`.

    sources (.txt / .jsonl files, directories, globs; or the embedded CPython docs)
      -> documents: a .txt file exactly as written, or a JSONL record (blank-line paragraphs or lines
         only with --doc-split)
      -> train / val split: whole documents (seeded, exact fraction); a corpus that is one document
         gives contiguous stretches cut at line boundaries (seeded, about the fraction of its characters)
      -> byte-level BPE tokenizer trained on (a bounded sample of) the train documents
      -> token files, each document followed by one end-of-text token

A data directory holds:

    train.bin, val.bin   flat little-endian token ids, uint16 when the vocab fits in 65536, else uint32;
                         shape (tokens,), read with `open_split` as a memory map
    tokenizer.json       unless --tokenizer points elsewhere
    meta.json            format, vocab_size, dtype, eot_id, pad_id, tokenizer (path, relative when inside
                         the directory) and tokenizer_sha256, splits {train, val: file, tokens, documents,
                         bytes}, sources (path, size, sha256 of each input), settings; read back field
                         by field, its file names must stay inside the directory.

The whole directory is built beside the old one and swapped in at the end (`util.publish_dir`; other files
kept in it are carried over as hard links), so the previous result stays complete until the new one is.

`bytes` is the UTF-8 size of the split's document text, so bits per byte = loss / ln 2 * tokens / bytes
(tokens include one EOT per document).

Memory stays bounded whatever the corpus size: files are read in blocks, a document longer than
MAX_PIECE_CHARS is handled in pieces, tokens go to disk one batch at a time, and the tokenizer is
trained on a sample whose size is capped (see `tokenizer_sample_rate`).
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import glob
import hashlib
import itertools
import json
import os
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .chat import MASK_SUFFIX, encode_chat, is_chat_jsonl, marker_ids, read_conversations, render
from .tokenizer import Tokenizer, train_tokenizer
from .util import (UserError, carry_over, format_table, inside, is_int, is_sha256, json_field, json_object,
                   publish_dir, sha256_file)

say = functools.partial(print, flush=True)  # progress lines should show up at once in logs too

FORMAT = 1
DEFAULT_OUT_DIR = "data"
DOC_SPLITS = ("auto", "file", "blank-line", "line")
TEXT_SUFFIXES = (".txt", ".jsonl")  # what a directory or glob contributes (a file named explicitly is always read)

BLOCK_BYTES = 4 << 20  # read size; also how much of a .txt file `auto` looks at
MAX_PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces (same tokens, bounded memory)
ENCODE_BATCH_BYTES = 4 << 20  # text handed to one parallel encode_batch call
# A corpus that is one document holds out up to VAL_STRETCHES contiguous stretches for validation, each
# at least MIN_STRETCH_CHARS long when the text allows: several places of the text are measured, and
# few enough cuts that the windows the model is scored on rarely straddle one.
VAL_STRETCHES = 10
MIN_STRETCH_CHARS = 4096

# The BPE trainer keeps every distinct pre-token in memory. English words repeat, so it costs ~6 bytes of
# RAM per byte of text; a run of CJK characters between punctuation is a "word" and mostly unique, so
# Chinese costs ~90 bytes per byte (measured: 615 MB for 6.8 MB of novels). The sample is capped so that
# training stays under ~1 GB either way; compression barely depends on it (a 1 MB Chinese sample gives
# 3.69 bytes/token at vocab 4096, all 6.8 MB 3.72).
SAMPLE_ASCII_BYTES = 100_000_000
SAMPLE_OTHER_BYTES = 8_000_000

_SEPARATORS = {
    "blank-line": re.compile(r"\r?\n(?:[^\S\n]*\n)+"),  # a newline, then one or more whitespace-only lines
    "line": re.compile(r"\r?\n"),
}
_NON_ASCII = bytes(range(128, 256))


# ---------------------------------------------------------------------------------------------------
# sources


@dataclass
class Source:
    """One input: a file, or the embedded corpus (`path` None)."""

    name: str  # as shown to the user and written to meta.json
    path: Path | None
    role: str  # "train" or "val"
    size: int
    sha256: str
    kind: str  # "txt", "jsonl" or "builtin"
    doc_split: str = ""  # what a document was, once read ("auto" resolved)

    def describe(self) -> dict:
        return {"path": self.name, "role": self.role, "size": self.size, "sha256": self.sha256,
                "doc_split": self.doc_split}


def _builtin_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def builtin_source() -> Source:
    """The CPython documentation shipped with every Python (`pydoc_data.topics`, ~465 KB of English)."""
    import sys

    texts = _builtin_topics()
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    name = f"pydoc_data.topics (Python {sys.version.split()[0]})"
    return Source(name, None, "train", sum(len(t.encode("utf-8")) for t in texts), h.hexdigest(), "builtin")


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def resolve_sources(specs: list[str], role: str) -> list[Source]:
    """Files named by `specs`, in a stable order, each hashed: a file (read whatever its name); a
    directory (its .txt and .jsonl files, recursively); a glob (the files it matches, and the .txt and
    .jsonl files of the directories it matches). A missing path, an empty file, a folder without text
    or a glob without matches is a UserError; empty files found through a directory or glob are skipped."""
    found: list[tuple[str, Path, bool]] = []  # (spec, file, named explicitly)
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
            files = [f for m in matches for f in (_files_under(m) if m.is_dir() else [m])]
            if not files:
                raise UserError(f"no files match {spec}")
            found += [(spec, f, False) for f in files]
            continue
        p = Path(spec).expanduser()
        if not p.exists():
            raise UserError(f"{spec} does not exist")
        if p.is_dir():
            files = _files_under(p)
            if not files:
                raise UserError(f"directory {spec} contains no .txt or .jsonl files")
            found += [(spec, f, False) for f in files]
        else:
            found.append((spec, p, True))

    sources, seen, skipped = [], set(), {}
    for spec, f, explicit in found:
        key = f.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            size = f.stat().st_size
            if size == 0:
                if explicit:
                    raise UserError(f"{f} is empty")
                skipped.setdefault(spec, []).append(f)
                continue
            digest = sha256_file(f)
        except OSError as e:
            raise UserError(f"cannot read {f}: {e.strerror}") from None
        kind = "jsonl" if f.suffix.lower() == ".jsonl" else "txt"
        sources.append(Source(str(f), f, role, size, digest, kind))
    for spec, files in skipped.items():
        say(f"note: skipping {len(files)} empty file(s) in {spec}, e.g. {files[0]}")
    if not sources:
        raise UserError(f"every file in {' '.join(specs)} is empty")
    return sources


# ---------------------------------------------------------------------------------------------------
# reading documents


def _read_blocks(path: Path, errors: str) -> Iterator[str]:
    """The text of a UTF-8 file in blocks of about BLOCK_BYTES; a leading BOM is dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0  # bytes given to the decoder so far
    with open(path, "rb") as f:
        while True:
            raw = f.read(BLOCK_BYTES)
            held = len(decoder.getstate()[0])  # bytes of an incomplete character from the last block
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not valid UTF-8 ({e.reason} at byte offset {offset - held + e.start}); "
                                "convert it to UTF-8 or pass --encoding-errors replace") from None
            if offset == 0:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return


def _jsonl_records(path: Path, errors: str) -> Iterator[str]:
    """The `text` field of each line of a JSONL file; blank lines are skipped."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not valid UTF-8 ({e.reason} at byte offset {offset + e.start}, "
                                f"line {lineno}); convert it to UTF-8 or pass --encoding-errors replace") from None
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                reason = getattr(e, "msg", str(e))
                raise UserError(f"{path}:{lineno}: not valid JSON ({reason}); each line of a .jsonl file must be "
                                'a JSON object with a "text" field') from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f'{path}:{lineno}: no "text" string in this record; each line of a .jsonl file '
                                'must be a JSON object with a "text" field')
            yield text


def _cut_point(text: str, limit: int) -> int:
    """Where to cut `text` (longer than `limit`) so that both parts tokenize exactly as the whole.

    Right after a newline that is followed by a non-space character, the pre-tokenizer always starts a
    new piece (no pattern alternative runs from a newline into a non-space), so cutting there changes
    nothing. A single line longer than `limit` is cut before its last space (which `\\s+(?!\\S)` also
    keeps apart), or failing that at `limit`.
    """
    i = text.rfind("\n", 0, limit)
    while i >= 0:
        if not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    i = text.rfind(" ", 1, limit)
    return i if i > 0 else limit


_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+")
_TRAILING_BLANK_LINES = re.compile(r"(?:\r?\n[^\S\n]*)+\Z")


def split_documents(blocks: Iterable[str], mode: str) -> Iterator[tuple[str, bool]]:
    """Documents of a text given in blocks, as (piece, last) pairs.

    `mode`: "file" (the whole text is one document, exactly as written), "blank-line" (paragraphs
    separated by whitespace-only lines) or "line". A document is the concatenation of consecutive
    pieces up to one with `last=True`; most documents are a single piece, and none is held in memory
    whole once it exceeds MAX_PIECE_CHARS. In "blank-line" and "line" mode the separators and blank
    lines at either end of a document are dropped; in every mode a text that is only whitespace is no
    document. Where the blocks are cut does not matter.
    """
    sep = _SEPARATORS.get(mode)
    verbatim = sep is None
    trim_end = (lambda d: d) if verbatim else (lambda d: _TRAILING_BLANK_LINES.sub("", d))
    trim_start = (lambda d: d) if verbatim else (lambda d: _LEADING_BLANK_LINES.sub("", d))
    pending, started = "", False  # started: the current document already gave out a piece
    for block in blocks:
        pending += block
        if sep is not None:
            *docs, pending = sep.split(pending)
            for d in docs:
                if started:
                    yield trim_end(d), True
                    started = False
                elif d.strip():
                    yield trim_end(trim_start(d)), True
        while len(pending) > MAX_PIECE_CHARS:
            cut = _cut_point(pending, MAX_PIECE_CHARS)
            head, pending = pending[:cut], pending[cut:]
            yield (head if started else trim_start(head)), False
            started = True
    if started:
        yield trim_end(pending), True
    elif pending.strip():
        yield trim_end(trim_start(pending)), True


def _joined(records: Iterable[str], sep: str) -> Iterator[str]:
    for i, r in enumerate(records):
        if i:
            yield sep
        yield r


def iter_documents(src: Source, doc_split: str, errors: str) -> Iterator[tuple[str, bool]]:
    """(piece, last) pairs of `src`'s documents (see `split_documents`); sets `src.doc_split`.

    `auto`: a .txt file is one document, exactly as written; a JSONL record (or an embedded topic) is
    a document, as written. `file` also joins the records of a JSONL file, with a blank line between.
    """
    if src.kind == "txt":
        mode = "file" if doc_split == "auto" else doc_split
        src.doc_split = mode
        yield from split_documents(_read_blocks(src.path, errors), mode)
        return
    records = _builtin_topics() if src.kind == "builtin" else _jsonl_records(src.path, errors)
    unit = "topic" if src.kind == "builtin" else "record"
    src.doc_split = unit if doc_split == "auto" else doc_split
    if doc_split == "file":
        yield from split_documents(_joined(records, "\n\n"), "file")
    else:
        for r in records:
            yield from split_documents([r], "file" if doc_split == "auto" else doc_split)


# ---------------------------------------------------------------------------------------------------
# the split and the tokenizer sample


@dataclass
class Scan:
    """What a first pass over the sources found (it also validates every file before work starts)."""

    docs: list[int]  # per source
    bytes: list[int]  # per source, UTF-8 bytes of its documents
    chars: list[int]  # per source, characters of its documents
    ascii_bytes: int = 0  # over the training sources
    other_bytes: int = 0
    characters: Counter | None = None  # over the training sources, when asked for


def progress(total: int, desc: str, leave: bool = True):
    """A tqdm bar counting bytes (so it shows MB/s) on stderr, drawn only when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, mininterval=0.5, leave=leave)


def scan_sources(sources: list[Source], doc_split: str, errors: str, count_characters: bool = False) -> Scan:
    scan = Scan([], [], [], characters=Counter() if count_characters else None)
    with progress(sum(s.size for s in sources), "reading", leave=False) as bar:
        for src in sources:
            n_docs = n_bytes = n_chars = unshown = 0
            for piece, last in iter_documents(src, doc_split, errors):
                b = piece.encode("utf-8")
                n_bytes += len(b)
                n_chars += len(piece)
                n_docs += last
                if src.role == "train":
                    ascii_ = len(b.translate(None, _NON_ASCII))
                    scan.ascii_bytes += ascii_
                    scan.other_bytes += len(b) - ascii_
                    if scan.characters is not None:
                        scan.characters.update(piece)
                unshown += len(b)
                if unshown > 1 << 20:  # a bar update per document would cost more than the work
                    bar.update(unshown)
                    unshown = 0
            bar.update(unshown)
            scan.docs.append(n_docs)
            scan.bytes.append(n_bytes)
            scan.chars.append(n_chars)
    return scan


def _stretch_cuts(sources, scan: Scan, doc_split, errors, fraction: float, seed: int) -> list[int]:
    """The validation cuts (see `plan_val_stretches`) of the training text, its documents one after another."""
    n_chars = sum(c for src, c in zip(sources, scan.chars) if src.role == "train")
    text = (piece for src in sources if src.role == "train" for piece, _ in iter_documents(src, doc_split, errors))
    cuts = snap_to_lines(text, plan_val_stretches(n_chars, fraction, seed))
    held = sum(b - a for a, b in zip(cuts[::2], cuts[1::2]))
    if held == 0 or held == n_chars:
        raise UserError("the training text has too few lines to hold out a validation split at line boundaries; "
                        "give --val-data, or more text")
    return cuts


def choose_val_docs(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """A bool mask over the `n_docs` training documents: exactly max(1, round(fraction * n_docs))
    of them, chosen uniformly with `seed`, become the validation split."""
    k = max(1, round(fraction * n_docs))
    if n_docs - k < 1:
        raise UserError(f"the training text has only {n_docs} document(s), too few to hold out a validation "
                        "split; give --val-data, or a --doc-split that makes more documents")
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_docs, size=k, replace=False)] = True
    return mask


def plan_val_stretches(n_chars: int, fraction: float, seed: int) -> list[int]:
    """Where to cut one document of `n_chars` characters to hold out about `fraction` of it: the sorted
    character offsets [start0, end0, start1, end1, ...] of k contiguous stretches (k <= VAL_STRETCHES,
    each of about fraction * n_chars / k characters), one at a random place (seeded) in each of k
    equal parts of the text. `snap_to_lines` then moves each offset to a line boundary."""
    val = max(1, round(fraction * n_chars))
    k = max(1, min(VAL_STRETCHES, val // MIN_STRETCH_CHARS))
    length, part = val // k, n_chars / k
    rng = np.random.default_rng(seed)
    cuts = []
    for i in range(k):
        start = int(i * part) + int(rng.integers(0, max(1, int(part) - length) + 1))
        cuts += [start, min(start + length, n_chars)]
    return cuts


def snap_to_lines(pieces: Iterable[str], cuts: list[int]) -> list[int]:
    """Each offset in `cuts` (sorted character offsets into the text the pieces make up) moved forward
    to the next line start (the offset itself if a line starts there, else right after the next
    newline; the end of the text if none follows). Stretches that become empty are dropped."""
    snapped, i, offset = [], 0, 0
    for piece in pieces:
        while i < len(cuts):
            target = max(cuts[i], snapped[-1] if snapped else 0)
            if target == 0:
                j = -1  # the text starts a line
            else:
                j = piece.find("\n", max(target - 1 - offset, 0))
                if j < 0 or target - 1 - offset >= len(piece):
                    break  # the next line start is in a later piece
            snapped.append(offset + j + 1)
            i += 1
        offset += len(piece)
    snapped += [offset] * (len(cuts) - len(snapped))
    pairs = [(a, b) for a, b in zip(snapped[::2], snapped[1::2]) if b > a]
    return [x for pair in pairs for x in pair]


def _cut_at(pieces: Iterable[tuple[str, bool]], cuts: list[int]) -> Iterator[tuple[str, str, bool]]:
    """(split, piece, last) of the documents `pieces` make, one after another, cut at `cuts` (character
    offsets from `snap_to_lines`): the stretches between cuts alternate train, val, train, ...; each
    non-empty stretch of a document is a document."""
    cut_iter = iter(cuts)
    next_cut = next(cut_iter, None)
    split, offset, filled = "train", 0, False  # filled: the current stretch has text
    for piece, last in pieces:
        while next_cut is not None and next_cut <= offset + len(piece):
            head, piece = piece[:next_cut - offset], piece[next_cut - offset:]
            offset = next_cut
            if head or filled:
                yield split, head, True
            split, filled = ("val" if split == "train" else "train"), False
            next_cut = next(cut_iter, None)
        offset += len(piece)
        if piece or (last and filled):
            yield split, piece, last
            filled = not last


def tokenizer_sample_rate(scan: Scan) -> float:
    """Fraction of training pieces the tokenizer is trained on (1.0 for all but large corpora)."""
    cost = scan.ascii_bytes / SAMPLE_ASCII_BYTES + scan.other_bytes / SAMPLE_OTHER_BYTES
    return min(1.0, 1.0 / cost) if cost > 0 else 1.0


def _as_counted(src: Source, pieces: Iterator[tuple[str, bool]], docs: int, chars: int) -> Iterator[tuple[str, bool]]:
    """`pieces` of `src`, checked to hold the documents and characters the scan counted (a source
    edited meanwhile is a UserError)."""
    n = n_chars = 0
    for piece, last in pieces:
        n += last
        n_chars += len(piece)
        if n > docs or n_chars > chars:
            break
        yield piece, last
    if (n, n_chars) != (docs, chars):
        raise UserError(f"{src.name} changed while it was being read; run again")


def _tagged_pieces(sources, doc_split, errors, val_mask, scan: Scan,
                   val_cuts: list[int] | None = None) -> Iterator[tuple[str, str, bool]]:
    """(split, piece, last) over all sources: training documents in `val_mask` go to "val"; or, with
    `val_cuts` (no --val-data), the stretches between them alternate between train and val."""
    counted = [_as_counted(src, iter_documents(src, doc_split, errors), n_docs, n_chars)
               for src, n_docs, n_chars in zip(sources, scan.docs, scan.chars)]
    if val_cuts is not None:  # every source is training text: the cuts count across all of it
        yield from _cut_at(itertools.chain.from_iterable(counted), val_cuts)
        return
    doc = 0  # index over the training sources' documents
    for src, pieces in zip(sources, counted):
        if src.role == "val":
            yield from (("val", piece, last) for piece, last in pieces)
        else:
            for piece, last in pieces:
                yield ("val" if val_mask is not None and val_mask[doc] else "train"), piece, last
                doc += last


def tokenizer_sample(pieces: Iterable[tuple[str, str, bool]], rate: float, seed: int,
                     total_bytes: int) -> Iterator[str]:
    """The training pieces the tokenizer learns from: each one with probability `rate` (seeded)."""
    rng = random.Random(seed)
    with progress(total_bytes, "tokenizer sample", leave=False) as bar:
        for split, piece, _ in pieces:
            bar.update(len(piece.encode("utf-8")))
            if split == "train" and (rate >= 1 or rng.random() < rate):
                yield piece


# ---------------------------------------------------------------------------------------------------
# writing


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class _SplitWriter:
    """Appends token ids to a temporary file in the output directory; `commit` renames it into place."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype):
        self.file, self.dtype = f"{name}.bin", dtype
        self.final = out_dir / self.file
        fd, tmp = tempfile.mkstemp(prefix=f".{self.file}.", suffix=".tmp", dir=out_dir)
        self.tmp, self.f = Path(tmp), os.fdopen(fd, "wb")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        self.tokens = self.documents = self.bytes = 0

    def write(self, ids: np.ndarray) -> None:
        self.f.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(ids)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def describe(self) -> dict:
        return {"file": self.file, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


def encode_to_files(pieces: Iterable[tuple[str, str, bool]], tok: Tokenizer, writers: dict[str, _SplitWriter],
                    total_bytes: int) -> None:
    """Tokenize (split, piece, last) triples in parallel batches and append them to their split's
    file, one EOT after each document. A tqdm bar on stderr shows MB/s (when stderr is a terminal)."""
    bar = progress(total_bytes, "encoding")
    batch: list[tuple[str, str, bool]] = []
    batch_bytes = 0

    def flush():
        ids = tok.encode_batch([p for _, p, _ in batch])
        for split, w in writers.items():
            parts = []
            for (s, _, last), x in zip(batch, ids):
                if s == split:
                    parts.append(x)
                    if last:
                        parts.append((tok.eot_id,))
            if parts:
                n = sum(len(p) for p in parts)
                w.write(np.fromiter(itertools.chain.from_iterable(parts), dtype=w.dtype, count=n))
        bar.update(batch_bytes)

    try:
        for split, piece, last in pieces:
            n = len(piece.encode("utf-8"))
            w = writers[split]
            w.bytes += n
            w.documents += last
            batch.append((split, piece, last))
            batch_bytes += n
            if batch_bytes >= ENCODE_BATCH_BYTES:
                flush()
                batch, batch_bytes = [], 0
        if batch:
            flush()
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------
# meta.json and reading prepared data


def _rel_or_abs(path: Path, base: Path) -> str:
    path, base = path.resolve(), base.resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _read_meta_quietly(out_dir: Path) -> dict | None:
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
    if tok.sha256 != meta["tokenizer_sha256"]:
        raise UserError(f"{tok.path} changed after {data_dir} was prepared; run --mode prepare_data again")
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


# ---------------------------------------------------------------------------------------------------
# prepare_data


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror or e}") from None


@contextlib.contextmanager
def _cleanup_new_dirs(*dirs: Path):
    """On failure, remove those of `dirs` that did not exist before and are still empty."""
    new = [d for d in dirs if not d.exists()]
    try:
        yield
    except BaseException:
        for d in new:
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds if empty
        raise


def _up_to_date(old: dict | None, meta: dict, out_dir: Path, tok_path: Path) -> bool:
    """Whether `old` (the directory's meta.json) describes what this run would make."""
    if old is None:
        return False
    key = lambda m: ([(s["role"], s["sha256"]) for s in m.get("sources", [])], m.get("settings"), m.get("tokenizer"))
    if key(old) != key(meta) or not tok_path.is_file() or sha256_file(tok_path) != old.get("tokenizer_sha256"):
        return False
    itemsize = np.dtype(old["dtype"]).itemsize
    return all((out_dir / s["file"]).is_file() and (out_dir / s["file"]).stat().st_size == s["tokens"] * itemsize
               for s in old["splits"].values())


def _peak_rss_mb() -> float | None:
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None


def _tokenizer_for(tok_path: Path, old: dict | None, fingerprint: dict, rebuild: bool, vocab_size: int,
                   vocab_explicit: bool, train_texts, whole_characters: bool = False) -> tuple[Tokenizer, dict | None]:
    """The tokenizer to encode with, and what it was trained from (None: made elsewhere).

    Trained (from `train_texts()`) when asked to, when missing, or when this directory's last run
    trained it from other data or settings (`fingerprint` differs); otherwise loaded as it is.
    """
    reason = None
    if rebuild:
        reason = "--rebuild-tokenizer"
    elif not tok_path.is_file():
        reason = f"{tok_path} does not exist"
    else:
        tok = Tokenizer.load(tok_path)
        ours = old is not None and old.get("tokenizer_sha256") == tok.sha256 and old.get("tokenizer_training")
        if ours and old["tokenizer_training"] != fingerprint:
            reason = "the training data or settings changed since it was trained"
        elif not ours and vocab_explicit and tok.vocab_size != vocab_size:
            raise UserError(f"{tok_path} has {tok.vocab_size:,} tokens, not the --vocab-size {vocab_size:,} asked "
                            "for; pass --rebuild-tokenizer to replace it, or use another --tokenizer or --out-dir")
        else:
            say(f"tokenizer: using {tok_path} ({tok.vocab_size:,} tokens)")
            return tok, (fingerprint if ours else None)
    texts, note = train_texts()
    kind = "byte-level BPE over whole characters" if whole_characters else "byte-level BPE"
    say(f"tokenizer: training {kind}, vocab {vocab_size:,} ({reason}{note}) ...")
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, vocab_size, whole_characters)
    say(f"tokenizer: {tok.vocab_size:,} tokens in {time.perf_counter() - t0:.1f} s")
    return tok, fingerprint


def _check_settings(doc_split: str, encoding_errors: str, val_data, val_fraction: float | None) -> None:
    if doc_split not in DOC_SPLITS:
        raise UserError(f"--doc-split {doc_split!r} is not one of: {', '.join(DOC_SPLITS)}")
    if encoding_errors not in ("strict", "replace"):
        raise UserError(f"--encoding-errors {encoding_errors!r} must be strict or replace")
    if not val_data and val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction ({val_fraction}) must be between 0 and 1; or give --val-data")


def _training_sources(train_data: list[str] | None) -> list[Source]:
    if train_data:
        return resolve_sources(train_data, "train")
    source = builtin_source()
    say(f"training data: the embedded CPython documentation, {source.name}, {source.size:,} bytes "
        "(pass --train-data to use your own text)")
    return [source]


def _hold_out(sources, scan: Scan, n_train_docs: int, doc_split: str, errors: str, val_fraction: float,
              seed: int, meta: dict) -> tuple[np.ndarray | None, list[int] | None]:
    """What validation holds out when no --val-data is given: whole documents (a mask over them), or,
    when there are too few documents for whole ones to come near `val_fraction` (one, or a handful),
    contiguous stretches of the text (cuts, also listed in meta.json)."""
    if max(1, round(val_fraction * n_train_docs)) > 2 * val_fraction * n_train_docs:
        val_cuts = _stretch_cuts(sources, scan, doc_split, errors, val_fraction, seed)
        meta["val_stretches"] = [val_cuts[i:i + 2] for i in range(0, len(val_cuts), 2)]
        held = sum(b - a for a, b in meta["val_stretches"])
        say(f"validation: {len(val_cuts) // 2} stretches of the text, {held:,} of {sum(scan.chars):,} characters, "
            f"held out at line boundaries (--val-fraction {val_fraction}, --seed {seed})")
        return None, val_cuts
    val_mask = choose_val_docs(n_train_docs, val_fraction, seed)
    say(f"validation: {int(val_mask.sum()):,} of {n_train_docs:,} documents held out "
        f"(--val-fraction {val_fraction}, --seed {seed})")
    return val_mask, None


def _write_prepared(out_dir: Path, tok_path: Path, tok: Tokenizer, meta: dict, pieces, n_bytes: int):
    """Encode `pieces` into train.bin/val.bin and write meta.json (and a new tokenizer) into a directory
    built beside `out_dir` and swapped in at the end. Returns (the split writers, MB/s of encoding)."""
    dtype = token_dtype(tok.vocab_size)
    tok_is_new = tok.path is None or tok.path.resolve() != tok_path.resolve()
    tok_inside = tok_path.resolve().is_relative_to(out_dir.resolve())
    with publish_dir(out_dir) as tmp:
        written = {"train.bin", "val.bin", "meta.json"}
        if tok_is_new and tok_inside:
            written.add(tok_path.resolve().relative_to(out_dir.resolve()).parts[0])
        carry_over(out_dir, tmp, skip=written)
        writers = {}
        try:
            for split in ("train", "val"):
                writers[split] = _SplitWriter(tmp, split, dtype)
            t1 = time.perf_counter()
            encode_to_files(pieces, tok, writers, n_bytes)
            mb_s = n_bytes / 1e6 / max(time.perf_counter() - t1, 1e-9)
            for w in writers.values():
                w.commit()
        finally:
            for w in writers.values():
                if not w.f.closed:
                    w.discard()
        meta.update({"vocab_size": tok.vocab_size, "dtype": dtype.name, "eot_id": tok.eot_id,
                     "pad_id": tok.pad_id, "tokenizer_sha256": tok.sha256,
                     "splits": {name: w.describe() for name, w in writers.items()}})
        order = ("format", "vocab_size", "dtype", "eot_id", "pad_id", "tokenizer", "tokenizer_sha256", "splits",
                 "val_stretches", "sources", "settings", "tokenizer_training")
        (tmp / "meta.json").write_text(json.dumps({k: meta[k] for k in order if k in meta}, indent=2,
                                                  ensure_ascii=False) + "\n", encoding="utf-8")
        if tok_is_new:  # a tokenizer outside the directory is written last, just before the swap
            tok.save(tmp / tok_path.resolve().relative_to(out_dir.resolve()) if tok_inside else tok_path)
            tok.path = tok_path
    return writers, mb_s


def prepare_data(train_data: list[str] | None, val_data: list[str] | None, out_dir=DEFAULT_OUT_DIR,
                 tokenizer_path=None, vocab_size: int | None = None, val_fraction: float | None = None,
                 doc_split: str = "auto", encoding_errors: str = "strict", rebuild_tokenizer: bool = False,
                 seed: int = 0, config=None, allow_vocab_mismatch: bool = False, chat: bool | None = None,
                 auto_vocab: bool = False, whole_characters: bool | None = None) -> Path:
    """Tokenize `train_data` (and `val_data`, else a held-out `val_fraction` of the training documents)
    into `out_dir`; returns `out_dir`. Unchanged inputs and settings: nothing is done.

    `train_data`/`val_data`: paths, directories or globs (None: the embedded CPython docs / a held-out
    fraction). `vocab_size` defaults to `config.vocab_size` (config: the tiny_10m preset by default).
    The tokenizer at `tokenizer_path` (default out_dir/tokenizer.json) is trained when missing, when
    `rebuild_tokenizer`, or when this directory's previous run trained it from different training data
    or settings; a tokenizer from elsewhere is used as it is. `chat`: the data are conversations (see
    prepare_chat_data); None: when a source is a JSONL file of {"messages": [...]} records. `auto_vocab`
    (--config auto): without `vocab_size`, the vocabulary follows the size of the training text (see
    auto.py), and so does `config`; so does a text corpus's `val_fraction` when it is None (else 0.1).
    `whole_characters`: the tokenizer gives each frequent character a token before it learns merges
    (tokenizer.py), and --config auto's vocabulary grows by those tokens; None: auto.WHOLE_CHARACTERS
    under `auto_vocab`, else off.
    """
    from . import auto
    from .config import RECOMMENDED_PRESET, preset

    t0 = time.perf_counter()
    config = config if config is not None else preset(RECOMMENDED_PRESET)
    vocab_explicit = vocab_size is not None
    vocab_size = vocab_size if vocab_explicit else config.vocab_size
    _check_settings(doc_split, encoding_errors, val_data, val_fraction)
    whole_characters = auto.WHOLE_CHARACTERS if whole_characters is None and auto_vocab else bool(whole_characters)
    chars_decide_vocab = auto_vocab and not vocab_explicit and whole_characters
    if auto_vocab:  # the model is sized to the tokenizer, whichever it turns out to be (a reused one too)
        config = auto.model_config(vocab_size or config.vocab_size)
        allow_vocab_mismatch = True
    if vocab_explicit and vocab_size > config.vocab_size and not allow_vocab_mismatch:
        raise UserError(f"--vocab-size ({vocab_size:,}) is larger than the model's vocab_size ({config.vocab_size:,}); "
                        "choose a larger --config, or pass --allow-vocab-mismatch to make the model follow it")
    out_dir = Path(out_dir)
    tok_path = Path(tokenizer_path) if tokenizer_path else out_dir / "tokenizer.json"
    if tok_path.is_dir():
        raise UserError(f"{tok_path} is not a tokenizer.json but a directory")

    # 1. the sources, hashed
    sources = _training_sources(train_data)
    train_bytes = sum(s.size for s in sources)
    if auto_vocab and not vocab_explicit:
        vocab_size = auto.vocab_size(train_bytes)
        config = auto.model_config(vocab_size)
        if not chars_decide_vocab:  # else once the characters are counted (3.)
            say(f"--config auto: a vocabulary of {vocab_size:,} for {train_bytes:,} bytes of training text")
    if val_data:
        sources += resolve_sources(val_data, "val")
    is_chat = chat or (chat is None and any(s.path is not None and is_chat_jsonl(s.path) for s in sources))
    if val_fraction is None:
        val_fraction = auto.val_fraction(train_bytes) if auto_vocab and not is_chat else 0.1
    if is_chat:
        return prepare_chat_data(sources, out_dir, tok_path, vocab_size, val_fraction, seed, config,
                                 allow_vocab_mismatch, rebuild_tokenizer)
    # "text": how documents are made (an older directory, whose .txt documents were paragraphs, is rebuilt)
    settings = {"doc_split": doc_split, "text": "as written", "val_fraction": None if val_data else val_fraction,
                "seed": seed, "encoding_errors": encoding_errors, "vocab_size": vocab_size,
                **({"whole_characters": True} if whole_characters else {})}
    meta = {"format": FORMAT, "tokenizer": _rel_or_abs(tok_path, out_dir),
            "sources": [s.describe() for s in sources], "settings": settings}

    # 2. nothing to do?
    old = _read_meta_quietly(out_dir)
    if not rebuild_tokenizer and _up_to_date(old, meta, out_dir, tok_path):
        check_vocab(config, Tokenizer.load(tok_path), allow_vocab_mismatch)
        say(f"{out_dir} is up to date (same sources, settings and tokenizer): nothing to do. "
            "--rebuild-tokenizer trains the tokenizer again.")
        return out_dir

    # 3. read everything once: validates every file and counts documents before anything is written
    scan = scan_sources(sources, doc_split, encoding_errors, chars_decide_vocab)
    if chars_decide_vocab:  # settings keep the vocabulary of the bytes alone, which the sources decide as well
        vocab_size = auto.vocab_size(train_bytes, scan.characters)
        config = auto.model_config(vocab_size)
        say(f"--config auto: a vocabulary of {vocab_size:,} for {train_bytes:,} bytes of training text and its "
            f"{len(scan.characters):,} distinct characters")
    meta["sources"] = [s.describe() for s in sources]  # now with what a document was in each
    n_train_docs = sum(n for s, n in zip(sources, scan.docs) if s.role == "train")
    if n_train_docs == 0:
        raise UserError("the training data has no text (only whitespace)")
    if val_data and sum(n for s, n in zip(sources, scan.docs) if s.role == "val") == 0:
        raise UserError("the validation data has no text (only whitespace)")
    rows = [(s.name, f"{s.size:,}", s.role, s.doc_split, f"{n:,}") for s, n in zip(sources, scan.docs)]
    if len(rows) > 12:
        rows = rows[:10] + [(f"... and {len(rows) - 10} more", "", "", "", f"{sum(scan.docs[10:]):,}")]
    say(format_table(rows, ("source", "bytes", "role", "document =", "documents")))
    val_mask, val_cuts = (None, None) if val_data else _hold_out(sources, scan, n_train_docs, doc_split,
                                                                 encoding_errors, val_fraction, seed, meta)

    def pieces():
        return _tagged_pieces(sources, doc_split, encoding_errors, val_mask, scan, val_cuts)

    def train_texts():
        rate = tokenizer_sample_rate(scan)
        return tokenizer_sample(pieces(), rate, seed, sum(scan.bytes)), (f", a {rate:.1%} sample" if rate < 1 else "")

    if out_dir.is_symlink():
        out_dir = out_dir.resolve()  # the directory is swapped where the link leads; the link stays
    with _cleanup_new_dirs(out_dir, tok_path.parent):
        _check_writable(out_dir.parent)
        _check_writable(tok_path.parent)

        # 4. the tokenizer
        fingerprint = {"sources": [s.sha256 for s in sources if s.role == "train"], "settings": settings,
                       "sample": [SAMPLE_ASCII_BYTES, SAMPLE_OTHER_BYTES]}
        tok, fingerprint = _tokenizer_for(tok_path, old, fingerprint, rebuild_tokenizer, vocab_size, vocab_explicit,
                                          train_texts, whole_characters)
        check_vocab(config, tok, allow_vocab_mismatch)

        # 5. the new directory built beside the old one, which stays complete until the swap
        meta["tokenizer_training"] = fingerprint
        writers, mb_s = _write_prepared(out_dir, tok_path, tok, meta, pieces(), sum(scan.bytes))

    rows = [(name, f"{w.documents:,}", f"{w.tokens:,}", f"{w.bytes:,}", f"{w.bytes / max(w.tokens, 1):.2f}",
             str(out_dir / w.file)) for name, w in writers.items()]
    say(format_table(rows, ("split", "documents", "tokens", "bytes", "bytes/token", "file")))
    rss = _peak_rss_mb()
    say(f"wrote {out_dir / 'meta.json'} ({meta['dtype']} tokens, tokenizer {tok_path}) in "
        f"{time.perf_counter() - t0:.1f} s; encoding {mb_s:.2f} MB/s" + (f"; peak memory {rss:,.0f} MB" if rss else ""))
    return out_dir


# ------------------------------------------------------------------ chat data (conversations + loss masks)
def _write_chat_splits(directory: Path, tok: Tokenizer, convs: dict[str, list]) -> dict:
    """Token files and loss masks (one uint8 per token, 1 = counted) of each split; their meta.json entries."""
    dtype, splits = token_dtype(tok.vocab_size), {}
    for split, items in convs.items():
        ids, mask, n_bytes = [np.zeros(0, dtype)], [np.zeros(0, np.uint8)], 0
        for c in items:
            i, m = encode_chat(tok, c)
            ids.append(np.asarray(i + [tok.eot_id], dtype=dtype))
            mask.append(np.asarray(m + [0], dtype=np.uint8))
            n_bytes += len(render(c).encode("utf-8"))
        ids, mask = np.concatenate(ids), np.concatenate(mask)
        (directory / f"{split}.bin").write_bytes(ids.tobytes())
        (directory / f"{split}{MASK_SUFFIX}").write_bytes(mask.tobytes())
        splits[split] = {"file": f"{split}.bin", "tokens": len(ids), "documents": len(items), "bytes": n_bytes,
                         "mask": f"{split}{MASK_SUFFIX}", "target_tokens": int(mask.sum())}
    return splits


def prepare_chat_data(sources, out_dir: Path, tok_path: Path, vocab_size: int, val_fraction: float, seed: int,
                      config, allow_vocab_mismatch: bool, rebuild_tokenizer: bool) -> Path:
    """Conversations (data.Source list, .jsonl) -> train/val token files, loss masks and meta.json in
    `out_dir`. Validation: the "val" sources, else a seeded `val_fraction` of the conversations. The
    tokenizer at `tok_path` is used when it exists (fine-tuning: the pretrained model's), else trained
    on the training conversations."""
    t0 = time.perf_counter()
    convs = {"train": [], "val": []}
    for src in sources:
        if src.path is None or not is_chat_jsonl(src.path):
            raise UserError(f"{src.name} is not a chat JSONL file ({{\"messages\": [...]}} per line); "
                            "chat data and plain text cannot be prepared together")
        convs[src.role] += list(read_conversations(src.path))
    if not convs["val"]:
        held = choose_val_docs(len(convs["train"]), val_fraction, seed)
        convs = {"train": [c for c, h in zip(convs["train"], held) if not h],
                 "val": [c for c, h in zip(convs["train"], held) if h]}
    if tok_path.is_file() and not rebuild_tokenizer:
        tok = Tokenizer.load(tok_path)
        say(f"tokenizer: using {tok_path} ({tok.vocab_size:,} tokens)")
    else:
        say(f"tokenizer: training byte-level BPE, vocab {vocab_size:,} on the training conversations")
        tok = train_tokenizer((render(c) for c in convs["train"]), vocab_size)
    check_vocab(config, tok, allow_vocab_mismatch)
    marker_ids(tok)

    if out_dir.is_symlink():
        out_dir = out_dir.resolve()  # the directory is swapped where the link leads; the link stays
    tok_is_new = tok.path is None or tok.path.resolve() != tok_path.resolve()
    tok_inside = tok_path.resolve().is_relative_to(out_dir.resolve())
    with publish_dir(out_dir) as tmp:  # the previous result stays complete until the swap
        written = {"train.bin", "val.bin", "meta.json", f"train{MASK_SUFFIX}", f"val{MASK_SUFFIX}"}
        if tok_is_new and tok_inside:
            written.add(tok_path.resolve().relative_to(out_dir.resolve()).parts[0])
        carry_over(out_dir, tmp, skip=written)
        splits = _write_chat_splits(tmp, tok, convs)
        meta = {"format": FORMAT, "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size).name, "eot_id": tok.eot_id,
                "pad_id": tok.pad_id, "tokenizer": _rel_or_abs(tok_path, out_dir), "tokenizer_sha256": tok.sha256,
                "splits": splits, "chat": {"format": "chatml", "loss": "assistant replies and their <|im_end|>"},
                "sources": [s.describe() for s in sources],
                "settings": {"chat": True, "val_fraction": val_fraction, "seed": seed, "vocab_size": vocab_size}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if tok_is_new:
            tok.save(tmp / tok_path.resolve().relative_to(out_dir.resolve()) if tok_inside else tok_path)
            tok.path = tok_path
    for split, s in splits.items():
        say(f"{split}: {s['documents']:,} conversations, {s['tokens']:,} tokens, "
              f"{s['target_tokens']:,} of them assistant targets")
    say(f"wrote {out_dir / 'meta.json'} (chat data, tokenizer {tok_path}) in {time.perf_counter() - t0:.1f} s")
    return out_dir


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
