"""The train / validation split of the documents, and the sample the tokenizer learns from.

Validation holds out whole documents (seeded, an exact fraction), or, for a corpus that is one document
or a handful, contiguous stretches cut at line boundaries (seeded, about the fraction of its characters).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ..util import UserError, progress, say
from .sources import Source, iter_documents

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

_NON_ASCII = bytes(range(128, 256))


@dataclass
class Scan:
    """What a first pass over the sources found (it also validates every file before work starts)."""

    docs: list[int]  # per source
    bytes: list[int]  # per source, UTF-8 bytes of its documents
    chars: list[int]  # per source, characters of its documents
    ascii_bytes: int = 0  # over the training sources
    other_bytes: int = 0
    characters: Counter | None = None  # over the training sources, when asked for


def scan_sources(sources: list[Source], doc_split: str, errors: str, count_characters: bool = False) -> Scan:
    scan = Scan([], [], [], characters=Counter() if count_characters else None)
    with progress(sum(s.text_size for s in sources), "reading", leave=False) as bar:
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


def tagged_pieces(sources, doc_split, errors, val_mask, scan: Scan,
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


def hold_out(sources, scan: Scan, n_train_docs: int, doc_split: str, errors: str, val_fraction: float,
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
