"""Chat data: conversations (JSONL, {"messages": [...]} per line) -> train/val token files, loss masks that
count only the assistant replies, and meta.json (see `prepared` for the directory's format).

Streamed: the files are read a line at a time, three times over (count and check, train the tokenizer,
encode), and only the held-out choice (one bool per training conversation) stays in memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..chat import MASK_SUFFIX, encode_chat, is_chat_jsonl, marker_ids, read_conversations, render
from ..tokenizer import Tokenizer, train_tokenizer
from ..util import UserError, say
from .prepared import FORMAT, check_vocab, publish_prepared, rel_or_abs, token_dtype, write_meta
from .split import choose_val_docs

WRITE_BATCH_TOKENS = 1 << 12  # tokens gathered (as Python ints, ~60 bytes each) before a write to a split's files


def _count_conversations(sources) -> list[int]:
    """The number of conversations of each source, every record checked (a bad one is a UserError)."""
    counts = []
    for src in sources:
        if src.path is None or not is_chat_jsonl(src.path):
            raise UserError(f"{src.name} is not a chat JSONL file ({{\"messages\": [...]}} per line); "
                            "chat data and plain text cannot be prepared together")
        counts.append(sum(1 for _ in read_conversations(src.path)))
    return counts


def _conversations(sources, counts: list[int], held: np.ndarray | None) -> Iterator[tuple[str, list[dict]]]:
    """(split, conversation) of every source in order: a "val" source's go to val; a training conversation
    goes to val when `held` says so. A file that changed since it was counted is a UserError."""
    i = 0  # index over the training conversations
    for src, count in zip(sources, counts):
        n = 0
        for conv in read_conversations(src.path):
            n += 1
            if n > count:
                break
            if src.role == "val":
                yield "val", conv
            else:
                yield ("val" if held is not None and held[i] else "train"), conv
                i += 1
        if n != count:
            raise UserError(f"{src.name} changed while it was being read; run again")


class _ChatSplitWriter:
    """Appends conversations' ids (each followed by one EOT) and loss masks to a split's two files."""

    def __init__(self, directory: Path, split: str, tok: Tokenizer):
        self.split, self.tok, self.dtype = split, tok, token_dtype(tok.vocab_size)
        self.ids_file = open(directory / f"{split}.bin", "wb")
        self.mask_file = open(directory / f"{split}{MASK_SUFFIX}", "wb")
        self.ids, self.mask = [], []
        self.tokens = self.documents = self.bytes = self.target_tokens = 0

    def add(self, conv: list[dict]) -> None:
        i, m = encode_chat(self.tok, conv)
        self.ids += i + [self.tok.eot_id]
        self.mask += m + [0]
        self.documents += 1
        self.bytes += len(render(conv).encode("utf-8"))
        if len(self.ids) >= WRITE_BATCH_TOKENS:
            self.flush()

    def flush(self) -> None:
        self.ids_file.write(np.asarray(self.ids, dtype=self.dtype).tobytes())
        mask = np.asarray(self.mask, dtype=np.uint8)
        self.mask_file.write(mask.tobytes())
        self.tokens += len(self.ids)
        self.target_tokens += int(mask.sum())
        self.ids, self.mask = [], []

    def close(self) -> dict:
        """Flushes and closes the files; their meta.json entry."""
        self.flush()
        self.ids_file.close()
        self.mask_file.close()
        return {"file": f"{self.split}.bin", "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes,
                "mask": f"{self.split}{MASK_SUFFIX}", "target_tokens": self.target_tokens}


def _write_chat_splits(directory: Path, tok: Tokenizer, conversations: Iterator[tuple[str, list[dict]]]) -> dict:
    """Token files and loss masks (one uint8 per token, 1 = counted) of each split; their meta.json entries."""
    writers = {split: _ChatSplitWriter(directory, split, tok) for split in ("train", "val")}
    try:
        for split, conv in conversations:
            writers[split].add(conv)
        return {split: w.close() for split, w in writers.items()}
    finally:
        for w in writers.values():  # closed already, unless reading failed
            w.ids_file.close()
            w.mask_file.close()


def prepare_chat_data(sources, out_dir: Path, tok_path: Path, vocab_size: int, val_fraction: float, seed: int,
                      config, allow_vocab_mismatch: bool, rebuild_tokenizer: bool) -> Path:
    """Conversations (data.Source list, .jsonl) -> train/val token files, loss masks and meta.json in
    `out_dir`. Validation: the "val" sources, else a seeded `val_fraction` of the conversations. The
    tokenizer at `tok_path` is used when it exists (fine-tuning: the pretrained model's), else trained
    on the training conversations."""
    t0 = time.perf_counter()
    counts = _count_conversations(sources)
    has_val = any(n for src, n in zip(sources, counts) if src.role == "val")
    n_train = sum(n for src, n in zip(sources, counts) if src.role == "train")
    held = None if has_val else choose_val_docs(n_train, val_fraction, seed)

    def conversations():
        return _conversations(sources, counts, held)

    if tok_path.is_file() and not rebuild_tokenizer:
        tok = Tokenizer.load(tok_path)
        say(f"tokenizer: using {tok_path} ({tok.vocab_size:,} tokens)")
    else:
        say(f"tokenizer: training byte-level BPE, vocab {vocab_size:,} on the training conversations")
        tok = train_tokenizer((render(c) for split, c in conversations() if split == "train"), vocab_size)
    check_vocab(config, tok, allow_vocab_mismatch)
    marker_ids(tok)
    if out_dir.is_symlink():
        out_dir = out_dir.resolve()  # the directory is swapped where the link leads; the link stays
    files = {"train.bin", "val.bin", "meta.json", f"train{MASK_SUFFIX}", f"val{MASK_SUFFIX}"}
    with publish_prepared(out_dir, tok_path, tok, files) as tmp:  # the previous result stays complete until the swap
        splits = _write_chat_splits(tmp, tok, conversations())
        write_meta(tmp, {
            "format": FORMAT, "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size).name,
            "eot_id": tok.eot_id, "pad_id": tok.pad_id, "tokenizer": rel_or_abs(tok_path, out_dir),
            "tokenizer_sha256": tok.sha256, "splits": splits,
            "chat": {"format": "chatml", "loss": "assistant replies and their <|im_end|>"},
            "sources": [s.describe() for s in sources],
            "settings": {"chat": True, "val_fraction": val_fraction, "seed": seed, "vocab_size": vocab_size}})
    for split, s in splits.items():
        say(f"{split}: {s['documents']:,} conversations, {s['tokens']:,} tokens, "
            f"{s['target_tokens']:,} of them assistant targets")
    say(f"wrote {out_dir / 'meta.json'} (chat data, tokenizer {tok_path}) in {time.perf_counter() - t0:.1f} s")
    return out_dir
