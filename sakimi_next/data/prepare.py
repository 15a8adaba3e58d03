"""`--mode prepare_data` of plain text: sources -> documents -> train / val split -> a byte-level BPE
tokenizer trained on (a bounded sample of) the training documents -> token files, each document followed
by one end-of-text token (see `prepared` for the directory this writes).

Memory stays bounded whatever the corpus size: files are read in blocks, a document longer than
MAX_PIECE_CHARS is handled in pieces, tokens go to disk one batch at a time, and the tokenizer is
trained on a sample whose size is capped (see `tokenizer_sample_rate`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from .. import auto
from ..chat import is_chat_jsonl
from ..config import RECOMMENDED_PRESET, preset
from ..settings import DEFAULT_DATA_DIR, DEFAULT_TEXT_FIELD, DOC_SPLITS, ENCODING_ERRORS
from ..tokenizer import Tokenizer, train_tokenizer
from ..util import UserError, format_table, progress, say, sha256_file, umask
from .prepare_chat import prepare_chat_data
from .prepared import (FORMAT, check_vocab, publish_prepared, read_meta_quietly, rel_or_abs, token_dtype,
                       write_meta)
from .sources import Source, builtin_source, resolve_sources
from .split import (SAMPLE_ASCII_BYTES, SAMPLE_OTHER_BYTES, Scan, hold_out, scan_sources, tagged_pieces,
                    tokenizer_sample, tokenizer_sample_rate)

ENCODE_BATCH_BYTES = 4 << 20  # text handed to one parallel encode_batch call


class SplitWriter:
    """Appends token ids to a temporary file in the output directory; `commit` renames it into place."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype):
        self.file, self.dtype = f"{name}.bin", dtype
        self.final = out_dir / self.file
        fd, tmp = tempfile.mkstemp(prefix=f".{self.file}.", suffix=".tmp", dir=out_dir)
        self.tmp, self.f = Path(tmp), os.fdopen(fd, "wb")
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
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


def encode_to_files(pieces: Iterable[tuple[str, str, bool]], tok: Tokenizer, writers: dict[str, SplitWriter],
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
    def key(m):
        return [(s["role"], s["sha256"]) for s in m.get("sources", [])], m.get("settings"), m.get("tokenizer")

    if old is None or key(old) != key(meta) or not tok_path.is_file() \
            or sha256_file(tok_path) != old.get("tokenizer_sha256"):
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
    if encoding_errors not in ENCODING_ERRORS:
        raise UserError(f"--encoding-errors {encoding_errors!r} must be {' or '.join(ENCODING_ERRORS)}")
    if not val_data and val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction ({val_fraction}) must be between 0 and 1; or give --val-data")


def _training_sources(train_data: list[str] | None, text_field: str) -> list[Source]:
    if train_data:
        return resolve_sources(train_data, "train", text_field)
    source = builtin_source()
    say(f"training data: the embedded CPython documentation, {source.name}, {source.size:,} bytes "
        "(pass --train-data to use your own text)")
    return [source]


def _write_prepared(out_dir: Path, tok_path: Path, tok: Tokenizer, meta: dict, pieces, n_bytes: int):
    """Encode `pieces` into train.bin/val.bin and write meta.json (and a new tokenizer) into a directory
    built beside `out_dir` and swapped in at the end. Returns (the split writers, MB/s of encoding)."""
    dtype = token_dtype(tok.vocab_size)
    with publish_prepared(out_dir, tok_path, tok, {"train.bin", "val.bin", "meta.json"}) as tmp:
        writers = {}
        try:
            for split in ("train", "val"):
                writers[split] = SplitWriter(tmp, split, dtype)
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
        write_meta(tmp, meta)
    return writers, mb_s


def prepare_data(train_data: list[str] | None, val_data: list[str] | None, out_dir=DEFAULT_DATA_DIR,
                 tokenizer_path=None, vocab_size: int | None = None, val_fraction: float | None = None,
                 doc_split: str = "auto", encoding_errors: str = "strict", rebuild_tokenizer: bool = False,
                 seed: int = 0, config=None, allow_vocab_mismatch: bool = False, chat: bool | None = None,
                 auto_vocab: bool = False, whole_characters: bool | None = None,
                 text_field: str = DEFAULT_TEXT_FIELD) -> Path:
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
    `text_field`: the field of a JSONL record / the column of a Parquet file that holds its text.
    """
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

    sources = _training_sources(train_data, text_field)
    train_bytes = sum(s.text_size for s in sources)
    if auto_vocab and not vocab_explicit:
        vocab_size = auto.vocab_size(train_bytes)
        config = auto.model_config(vocab_size)
        if not chars_decide_vocab:  # else once the characters are counted (_prepare_text)
            say(f"--config auto: a vocabulary of {vocab_size:,} for {train_bytes:,} bytes of training text")
    if val_data:
        sources += resolve_sources(val_data, "val", text_field)
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
    if text_field != DEFAULT_TEXT_FIELD:  # only then, so that directories prepared before --text-field stay current
        settings["text_field"] = text_field
    _prepare_text(sources, out_dir, tok_path, settings, config, allow_vocab_mismatch, vocab_explicit,
                  rebuild_tokenizer, t0, chars_decide_vocab)
    return out_dir


def _prepare_text(sources: list[Source], out_dir: Path, tok_path: Path, settings: dict, config,
                  allow_vocab_mismatch: bool, vocab_explicit: bool, rebuild_tokenizer: bool, t0: float,
                  chars_decide_vocab: bool = False) -> None:
    """`prepare_data` of plain text, its `settings` settled (val_fraction None: validation sources given).
    `chars_decide_vocab` (--config auto over whole characters): the vocabulary is settled once the scan has
    counted the characters; `settings` keep the vocabulary of the bytes alone, which the sources decide too."""
    doc_split, errors, seed = settings["doc_split"], settings["encoding_errors"], settings["seed"]
    vocab_size, whole_characters = settings["vocab_size"], settings.get("whole_characters", False)
    meta = {"format": FORMAT, "tokenizer": rel_or_abs(tok_path, out_dir),
            "sources": [s.describe() for s in sources], "settings": settings}
    # 1. nothing to do?
    old = read_meta_quietly(out_dir)
    if not rebuild_tokenizer and _up_to_date(old, meta, out_dir, tok_path):
        check_vocab(config, Tokenizer.load(tok_path), allow_vocab_mismatch)
        say(f"{out_dir} is up to date (same sources, settings and tokenizer): nothing to do. "
            "--rebuild-tokenizer trains the tokenizer again.")
        return

    # 2. read everything once: validates every file and counts documents before anything is written
    scan, n_train_docs = _scan(sources, doc_split, errors, settings["val_fraction"] is None, chars_decide_vocab)
    if chars_decide_vocab:
        train_bytes = sum(s.text_size for s in sources if s.role == "train")
        vocab_size = auto.vocab_size(train_bytes, scan.characters)
        config = auto.model_config(vocab_size)
        say(f"--config auto: a vocabulary of {vocab_size:,} for {train_bytes:,} bytes of training text and its "
            f"{len(scan.characters):,} distinct characters")
    meta["sources"] = [s.describe() for s in sources]  # now with what a document was in each
    val_mask, val_cuts = (None, None) if settings["val_fraction"] is None else hold_out(
        sources, scan, n_train_docs, doc_split, errors, settings["val_fraction"], seed, meta)

    def pieces():
        return tagged_pieces(sources, doc_split, errors, val_mask, scan, val_cuts)

    def train_texts():
        rate = tokenizer_sample_rate(scan)
        return tokenizer_sample(pieces(), rate, seed, sum(scan.bytes)), (f", a {rate:.1%} sample" if rate < 1 else "")

    if out_dir.is_symlink():
        out_dir = out_dir.resolve()  # the directory is swapped where the link leads; the link stays
    with _cleanup_new_dirs(out_dir, tok_path.parent):
        _check_writable(out_dir.parent)
        _check_writable(tok_path.parent)

        # 3. the tokenizer
        fingerprint = {"sources": [s.sha256 for s in sources if s.role == "train"], "settings": settings,
                       "sample": [SAMPLE_ASCII_BYTES, SAMPLE_OTHER_BYTES]}
        tok, fingerprint = _tokenizer_for(tok_path, old, fingerprint, rebuild_tokenizer, vocab_size,
                                          vocab_explicit, train_texts, whole_characters)
        check_vocab(config, tok, allow_vocab_mismatch)

        # 4. the new directory built beside the old one, which stays complete until the swap
        meta["tokenizer_training"] = fingerprint
        writers, mb_s = _write_prepared(out_dir, tok_path, tok, meta, pieces(), sum(scan.bytes))
    _report(writers, out_dir, meta, tok_path, mb_s, t0)


def _scan(sources: list[Source], doc_split: str, errors: str, has_val: bool,
          count_characters: bool = False) -> tuple[Scan, int]:
    """The scan of every source, shown as a table; and the number of training documents (none: an error)."""
    scan = scan_sources(sources, doc_split, errors, count_characters)
    n_train_docs = sum(n for s, n in zip(sources, scan.docs) if s.role == "train")
    if n_train_docs == 0:
        raise UserError("the training data has no text (only whitespace)")
    if has_val and sum(n for s, n in zip(sources, scan.docs) if s.role == "val") == 0:
        raise UserError("the validation data has no text (only whitespace)")
    rows = [(s.name, f"{s.size:,}", s.role, s.doc_split, f"{n:,}") for s, n in zip(sources, scan.docs)]
    if len(rows) > 12:
        rows = rows[:10] + [(f"... and {len(rows) - 10} more", "", "", "", f"{sum(scan.docs[10:]):,}")]
    say(format_table(rows, ("source", "bytes", "role", "document =", "documents")))
    return scan, n_train_docs


def _report(writers: dict[str, SplitWriter], out_dir: Path, meta: dict, tok_path: Path, mb_s: float, t0: float) -> None:
    rows = [(name, f"{w.documents:,}", f"{w.tokens:,}", f"{w.bytes:,}", f"{w.bytes / max(w.tokens, 1):.2f}",
             str(out_dir / w.file)) for name, w in writers.items()]
    say(format_table(rows, ("split", "documents", "tokens", "bytes", "bytes/token", "file")))
    rss = _peak_rss_mb()
    say(f"wrote {out_dir / 'meta.json'} ({meta['dtype']} tokens, tokenizer {tok_path}) in "
        f"{time.perf_counter() - t0:.1f} s; encoding {mb_s:.2f} MB/s" + (f"; peak memory {rss:,.0f} MB" if rss else ""))
