"""Bytes per token of the two tokenizers of --config auto on the corpora of ../shared/data.

For each corpus: the quality benchmark's split (scripts/quality.py: the first 90% of the characters to
train, the rest held out), then a tokenizer trained on the training text as `--config auto` would train
it, byte-level BPE alone (vocabulary from the bytes) and over whole characters (plus the characters'
merges, `--whole-characters`), and, where the two sizes differ, byte-level BPE at the larger size. Prints
held-out bytes per token and the share of the held-out text's characters of several bytes that are one
token. Deterministic apart from the seconds.

    python scripts/tokenizer_table.py [--corpus hongloumeng cmn_eng ...] [--shared-data DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sakimi_next import auto  # noqa: E402
from sakimi_next.tokenizer import train_tokenizer  # noqa: E402


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "scripts" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(train: str, heldout: str) -> list[dict]:
    """One row per tokenizer: kind, vocabulary, held-out bytes/token, the share of held-out characters of
    several bytes that are a single token, training seconds."""
    n_bytes, chars = len(train.encode("utf-8")), Counter(train)
    plain, whole = auto.vocab_size(n_bytes), auto.vocab_size(n_bytes, chars)
    kinds = [("bpe", plain, False), ("whole characters", whole, True)]
    if whole != plain:
        kinds.append(("bpe at the larger vocabulary", whole, False))
    held = Counter(heldout)
    many_byte = {ch: n for ch, n in held.items() if len(ch.encode("utf-8")) > 1}
    rows = []
    for kind, vocab, whole_characters in kinds:
        t0 = time.perf_counter()
        tok = train_tokenizer([train], vocab, whole_characters)
        seconds = time.perf_counter() - t0
        ids = tok.encode(heldout)
        assert tok.decode(ids) == heldout
        single = sum(n for ch, n in many_byte.items() if len(tok.encode(ch)) == 1)
        rows.append({"kind": kind, "vocab": tok.vocab_size, "bytes_per_token": len(heldout.encode("utf-8")) / len(ids),
                     "single_token_chars": single / sum(many_byte.values()) if many_byte else None,
                     "seconds": seconds, "sha256": tok.sha256})
    return rows


def main(argv=None) -> int:
    quality = _quality()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", nargs="+", choices=list(quality.CORPORA), default=list(quality.CORPORA))
    p.add_argument("--shared-data", type=Path,
                   default=Path(os.environ.get("SAKIMI_SHARED_DATA", ROOT.parent / "shared" / "data")))
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    print(f"{'corpus':<16} {'tokenizer':<30} {'vocab':>6} {'bytes/token':>11} {'chars one token':>15} {'seconds':>8}")
    table = {}
    for name in args.corpus:
        source = args.shared_data / quality.CORPORA[name].file
        if not source.is_file():
            print(f"error: {source} not found; pass --shared-data", file=sys.stderr)
            return 2
        table[name] = measure(*quality.split_90_10(source.read_text(encoding="utf-8")))
        for r in table[name]:
            share = "-" if r["single_token_chars"] is None else f"{r['single_token_chars']:.1%}"
            print(f"{name:<16} {r['kind']:<30} {r['vocab']:>6} {r['bytes_per_token']:>11.3f} {share:>15} "
                  f"{r['seconds']:>8.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
