"""Sources of text and the documents in them: files, directories and globs of .txt, .jsonl and .parquet, or
the CPython documentation every Python ships with (`builtin_source`), all streamed: text in bounded blocks,
JSON Lines a line at a time, Parquet a batch of rows at a time."""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..settings import DEFAULT_TEXT_FIELD
from ..util import UserError, json_kind, read_jsonl, say, sha256_file

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")  # what a directory or glob contributes (a file named explicitly
# is always read, as text unless its name ends in .jsonl or .parquet)
BLOCK_BYTES = 4 << 20  # read size; also how much of a .txt file `auto` looks at
PARQUET_BATCH_ROWS = 1024  # rows of a Parquet file decoded at a time
PARQUET_BUFFER_BYTES = 1 << 20  # a Parquet file is read in pieces this size (not a row group at once)
MAX_PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces (same tokens, bounded memory)

_SEPARATORS = {
    "blank-line": re.compile(r"\r?\n(?:[^\S\n]*\n)+"),  # a newline, then one or more whitespace-only lines
    "line": re.compile(r"\r?\n"),
}


@dataclass
class Source:
    """One input: a file, or the embedded corpus (`path` None)."""

    name: str  # as shown to the user and written to meta.json
    path: Path | None
    role: str  # "train" or "val"
    size: int
    sha256: str
    kind: str  # "txt", "jsonl", "parquet" or "builtin"
    doc_split: str = ""  # what a document was, once read ("auto" resolved)
    text_field: str = DEFAULT_TEXT_FIELD  # of a JSONL record or a Parquet row
    text_size: int = -1  # about how many bytes of text it holds: `size`, but more for a compressed Parquet file

    def __post_init__(self):
        if self.text_size < 0:
            self.text_size = self.size

    def describe(self) -> dict:
        return {"path": self.name, "role": self.role, "size": self.size, "sha256": self.sha256,
                "doc_split": self.doc_split}


def builtin_topics() -> list[str]:
    """The texts of the CPython documentation shipped with every Python, one per topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def builtin_source() -> Source:
    """The CPython documentation shipped with every Python (`pydoc_data.topics`, ~465 KB of English)."""
    texts = builtin_topics()
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    name = f"pydoc_data.topics (Python {sys.version.split()[0]})"
    return Source(name, None, "train", sum(len(t.encode("utf-8")) for t in texts), h.hexdigest(), "builtin")


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def resolve_sources(specs: list[str], role: str, text_field: str = DEFAULT_TEXT_FIELD) -> list[Source]:
    """Files named by `specs`, in a stable order, each hashed: a file (read whatever its name); a
    directory (its .txt, .jsonl and .parquet files, recursively); a glob (the files it matches, and those
    of the directories it matches). A missing path, an empty file, a folder without text, a glob without
    matches, or a .parquet file without pyarrow is a UserError; empty files found through a directory or
    glob are skipped. `text_field`: the JSONL field / Parquet column of the text."""
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
                raise UserError(f"directory {spec} contains no .txt, .jsonl or .parquet files")
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
        kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(f.suffix.lower(), "txt")
        text_size = _parquet_text_size(f, text_field) if kind == "parquet" else size
        sources.append(Source(str(f), f, role, size, digest, kind, text_field=text_field, text_size=text_size))
    for spec, files in skipped.items():
        say(f"note: skipping {len(files)} empty file(s) in {spec}, e.g. {files[0]}")
    if not sources:
        raise UserError(f"every file in {' '.join(specs)} is empty")
    return sources


# ------------------------------------------------------------------------------------ reading documents
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


def _jsonl_records(path: Path, errors: str, field: str) -> Iterator[str]:
    """The `field` string of each line of a JSONL file, a line at a time; blank lines are skipped."""
    must = f'of a .jsonl file must be a JSON object with a "{field}" string'
    for where, record in read_jsonl(path, must, errors, hint=" or pass --encoding-errors replace"):
        if not isinstance(record, dict):
            raise UserError(f"{where}: {json_kind(record)}, not a JSON object; each line {must}")
        if field not in record:
            has = ", ".join(list(record)[:8]) + (", ..." if len(record) > 8 else "") or "nothing"
            raise UserError(f'{where}: no "{field}" field in this record (it has: {has}); '
                            "name the text field with --text-field")
        yield _text(record[field], where, field)


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise UserError(f'{where}: "{field}" is {json_kind(value)}, not a string')
    return value


def _parquet_module():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet files needs pyarrow: pip install 'sakimi-next[parquet]'") from None
    return pq


def _open_parquet(path: Path, field: str):
    """The pyarrow ParquetFile at `path`, checked to have a text column `field`."""
    pq = _parquet_module()
    import pyarrow as pa

    try:
        # pyarrow's default pre-buffers every row group asked for, the whole file for iter_batches
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e})") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise UserError(f'{path} has no column "{field}" (it has: {", ".join(schema.names)}); '
                        "name the text column with --text-field")
    kind = schema.field(field).type
    if not _is_text_type(pa, kind):
        raise UserError(f'{path}: column "{field}" holds {kind}, not strings; name the text column with --text-field')
    return parquet


def _parquet_text_size(path: Path, field: str) -> int:
    """The uncompressed size of the text column, from the file's footer (what sizes --config auto's vocabulary)."""
    meta = _open_parquet(path, field).metadata
    column = [meta.schema.column(i).path for i in range(meta.num_columns)].index(field)
    return sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))


def _parquet_records(path: Path, field: str) -> Iterator[str]:
    """The `field` column of a Parquet file, PARQUET_BATCH_ROWS rows at a time; a null is a UserError
    naming the row (counted from 1)."""
    batches = _open_parquet(path, field).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field])
    from pyarrow import ArrowException

    row = 0
    while True:
        try:
            batch = next(batches, None)
        except (ArrowException, OSError) as e:
            raise UserError(f"{path}: cannot read the rows after row {row} ({e})") from None
        if batch is None:
            return
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text(value, f"{path}, row {row}", field)


def _is_text_type(pa, kind) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


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

    `auto`: a .txt file is one document, exactly as written; a JSONL record, a Parquet row (or an
    embedded topic) is a document, as written. `file` also joins the records of a JSONL or Parquet file,
    with a blank line between.
    """
    if src.kind == "txt":
        mode = "file" if doc_split == "auto" else doc_split
        src.doc_split = mode
        yield from split_documents(_read_blocks(src.path, errors), mode)
        return
    if src.kind == "builtin":
        records = builtin_topics()
    elif src.kind == "parquet":
        records = _parquet_records(src.path, src.text_field)
    else:
        records = _jsonl_records(src.path, errors, src.text_field)
    unit = {"builtin": "topic", "parquet": "row"}.get(src.kind, "record")
    src.doc_split = unit if doc_split == "auto" else doc_split
    if doc_split == "file":
        yield from split_documents(_joined(records, "\n\n"), "file")
    else:
        for r in records:
            yield from split_documents([r], "file" if doc_split == "auto" else doc_split)

