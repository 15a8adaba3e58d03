"""Chat data: conversations (JSONL, {"messages": [...]} per line) -> train/val token files, loss masks that
count only the assistant replies, and meta.json (see `prepared` for the directory's format)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..chat import MASK_SUFFIX, encode_chat, is_chat_jsonl, marker_ids, read_conversations, render
from ..tokenizer import Tokenizer, train_tokenizer
from ..util import UserError, say
from .prepared import FORMAT, check_vocab, publish_prepared, rel_or_abs, token_dtype, write_meta
from .split import choose_val_docs


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
    files = {"train.bin", "val.bin", "meta.json", f"train{MASK_SUFFIX}", f"val{MASK_SUFFIX}"}
    with publish_prepared(out_dir, tok_path, tok, files) as tmp:  # the previous result stays complete until the swap
        splits = _write_chat_splits(tmp, tok, convs)
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
