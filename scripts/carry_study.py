"""Reading a long text past the trained length: where carried reading loses to sliding windows.

    python scripts/carry_study.py --checkpoint runs/quality/cmn/run/best heldout.txt [more.txt ...]

For each text, bits per byte of one checkpoint read in several ways (docs/generation.md, "Reading past
the trained length"):

    sliding S / S/2        eval --eval-method sliding: windows of the training length S, half overlapping
    sliding C / S          windows of the trained context C = S + lead-in, moving by S: every token is
                           read after at least the lead-in, as in training
    carry, attention all   one pass, DeltaNet states and every attention key carried (eval before the fix)
    carry, attention W     the same, attention over the last W positions only, DeltaNet states carried
    carry C, DeltaNet fresh every C   the DeltaNet states zeroed every C tokens: does their long memory hurt?
    lines alone            every line its own document: what the text's other lines are worth

and, for the carried rows, bits/byte by distance into the text (from the mean bytes per token). Slow:
one pass per row (and three for the sliding rows) over each text.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sakimi_next.cache import LinearAttentionCache
from sakimi_next.evaluate import score_sliding
from sakimi_next.pretrained import load_for_inference

DISTANCES = (0, 512, 1536, 4096, 16384)  # bucket starts, in tokens into the text


@torch.inference_mode()
def carried_nats(model, ids: torch.Tensor, chunk: int, window: int | None, fresh_deltanet: int | None = None):
    """Per-target nats [N-1] of one carried pass in `chunk`-token steps with attention over `window`
    positions (None: all); `fresh_deltanet`: zero the DeltaNet states every so many tokens."""
    model.set_attention_window(window)
    cache = model.new_cache(1, capacity=4096)
    inputs, targets = ids[:-1], ids[1:]
    out = torch.empty(len(targets))
    for start in range(0, len(inputs), chunk):
        if fresh_deltanet and start and start % fresh_deltanet < chunk:
            for layer in cache.layers:
                if isinstance(layer, LinearAttentionCache):
                    layer.conv_window.zero_()
                    layer.recurrent_state.zero_()
        logits = model(inputs[start:start + chunk][None], cache=cache).logits[0]
        out[start:start + chunk] = F.cross_entropy(logits.float(), targets[start:start + chunk], reduction="none")
    return out


@torch.inference_mode()
def lines_alone_nats(model, ids: torch.Tensor, newline_ids: torch.Tensor, row: int = 2048) -> float:
    """Total nats with every line a document of its own (attention, conv and DeltaNet restart after each
    newline), in packed rows; a row's first line is cut short, alike for every row."""
    inputs, targets = ids[:-1], ids[1:]
    total = 0.0
    for start in range(0, len(inputs), row):
        x = inputs[start:start + row][None]
        starts = torch.zeros_like(x, dtype=torch.bool)
        starts[:, 1:] = torch.isin(x[:, :-1], newline_ids)
        logits = model(x, doc_starts=starts).logits[0]
        total += F.cross_entropy(logits.float(), targets[start:start + row], reduction="sum").item()
    return total


def by_distance(nats: torch.Tensor, bytes_per_token: float) -> str:
    parts = []
    for lo, hi in zip(DISTANCES, DISTANCES[1:] + (len(nats),)):
        if lo < min(hi, len(nats)):
            part = nats[lo:hi]
            parts.append(f"{float(part.mean()) / math.log(2) / bytes_per_token:.3f}")
    return " ".join(parts)


def study(model, tokenizer, path: Path, seq_len: int, context: int, windows: list[int | None], lines: bool) -> None:
    text = path.read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer.eot_id] + tokenizer.encode(text))
    n_bytes = len(text.encode("utf-8"))
    bpt = n_bytes / (len(ids) - 1)
    bpb = lambda nats: nats / math.log(2) / n_bytes  # noqa: E731
    print(f"\n{path}: {len(ids) - 1:,} tokens, {n_bytes:,} bytes; by distance: tokens from "
          + ", ".join(map(str, DISTANCES)), flush=True)

    def row(name: str, value: float, detail: str = "") -> None:
        print(f"  {name:<50} {value:.4f}  {detail}", flush=True)

    row(f"sliding {seq_len} / {seq_len // 2}", bpb(score_sliding(model, ids, seq_len, seq_len // 2)[0]))
    if context > seq_len:
        row(f"sliding {context} / {seq_len}", bpb(score_sliding(model, ids, context, seq_len)[0]))
    for w in windows:
        nats = carried_nats(model, ids, seq_len, w)
        row(f"carry, attention {w or 'all'}", bpb(float(nats.sum())), by_distance(nats, bpt))
    nats = carried_nats(model, ids, seq_len, context, fresh_deltanet=context)
    row(f"carry, attention {context}, DeltaNet fresh every {context}", bpb(float(nats.sum())))
    if lines:
        vocab = model.config.vocab_size
        newline = torch.tensor([i for i in range(vocab) if "\n" in tokenizer.decode([i])])
        row("lines alone", bpb(lines_alone_nats(model, ids, newline)))
    model.set_attention_window(None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("texts", nargs="+", type=Path, help="UTF-8 text files, each read as one document")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (its seq_len and lead_in are read)")
    p.add_argument("--windows", type=int, nargs="*", default=None,
                   help="attention windows of the carried rows (default: S, C, 2C and all; 0 = all)")
    p.add_argument("--lines", action="store_true", help="add the 'lines alone' row")
    a = p.parse_args()
    model, tokenizer, info = load_for_inference(a.checkpoint, "cpu")
    seq_len, context = info["seq_len"], info["attention_window"]
    if not seq_len or not context:
        print("error: the checkpoint does not record its seq_len", file=sys.stderr)
        return 2
    windows = [w or None for w in a.windows] if a.windows is not None else [None, seq_len, context, 2 * context]
    print(f"{a.checkpoint}: trained on {seq_len}-token windows, attention over up to {context} positions")
    for path in a.texts:
        study(model, tokenizer, path, seq_len, context, windows, a.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
