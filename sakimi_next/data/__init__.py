"""From text to training data (`--mode prepare_data`), and the prepared data training reads.

    sources.py       .txt / .jsonl / .parquet files, directories, globs, or the embedded CPython docs ->
                     documents, streamed: a .txt file exactly as written, or a JSONL record / Parquet row's
                     --text-field (blank-line paragraphs or lines only with --doc-split)
    split.py         train / val split: whole documents (seeded, exact fraction); a corpus that is one
                     document gives contiguous stretches cut at line boundaries; the tokenizer's sample
    prepare.py       plain text -> a byte-level BPE tokenizer and token files, each document followed by
                     one end-of-text token
    prepare_chat.py  conversations (JSONL, streamed) -> token files and loss masks (only the assistant replies
                     count)
    prepared.py      the prepared directory: its format (meta.json, train.bin, val.bin), reading it
                     (`load_meta`, `open_split`, `load_tokenizer`, `open_loss_mask`), publishing a new one
"""

from .prepare import prepare_data
from .prepare_chat import prepare_chat_data
from .prepared import (FORMAT, check_vocab, load_meta, load_tokenizer, open_loss_mask, open_split, token_dtype,
                       tokenizer_path)
from .sources import Source, builtin_source, builtin_topics, iter_documents, resolve_sources, split_documents
from .split import choose_val_docs, plan_val_stretches, snap_to_lines, tokenizer_sample_rate

__all__ = [
    "FORMAT", "Source", "builtin_source", "builtin_topics", "check_vocab", "choose_val_docs", "iter_documents",
    "load_meta", "load_tokenizer", "open_loss_mask", "open_split", "plan_val_stretches", "prepare_chat_data",
    "prepare_data", "resolve_sources", "snap_to_lines", "split_documents", "token_dtype", "tokenizer_path",
    "tokenizer_sample_rate",
]
