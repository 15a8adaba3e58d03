"""Held-out nats of a nanoGPT character-level checkpoint, for scripts/compare_nanogpt.py.

Runs inside the user's nanoGPT checkout (the working directory), with its own model.py:

    cd NANOGPT && python SAKIMI/scripts/nanogpt_score.py RUN/out/ckpt.pt RUN/data [--stride 32]

RUN/data/heldout.bin holds uint16 character ids: the character before the held-out text (the newline the
split cut at), then the held-out text; RUN/data/unseen.json the ids that training never showed. Every
held-out character is predicted exactly once, by sliding windows of the model's block_size moving by
--stride (each character sees at least block_size - stride characters of context; the first ones fewer):
the recipe of `sakimi-next --mode eval --eval-method sliding`. Prints JSON: the nats summed over the held-out
characters, and over the unseen ones alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def sliding_windows(n_ids: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new) for ids[0:n_ids]: a window reads ids[begin:end], predicts ids[begin+1:end+1] and
    scores its last `new` predictions. Together they score each of ids[1:] exactly once."""
    n = n_ids - 1  # targets
    windows, prev_end = [], 0
    for end in range(min(block, n), n + stride, stride):
        end = min(end, n)
        if end <= prev_end:
            break
        windows.append((max(0, end - block), end, end - prev_end))
        prev_end = end
    return windows


def score(model, ids, block: int, stride: int, unseen: set[int], batch: int = 128) -> dict:
    """Summed nats over ids[1:] (and over the targets in `unseen`), windows batched by their length."""
    import torch
    import torch.nn.functional as F

    windows = sliding_windows(len(ids), block, stride)
    unseen_t = torch.tensor(sorted(unseen), dtype=torch.long)
    nats = unseen_nats = 0.0
    scored = unseen_scored = 0
    by_length: dict[int, list] = {}
    for w in windows:
        by_length.setdefault(w[1] - w[0], []).append(w)
    with torch.no_grad():
        for group in by_length.values():
            for i in range(0, len(group), batch):
                part = group[i:i + batch]
                x = torch.stack([ids[b:e] for b, e, _ in part])
                y = torch.stack([ids[b + 1:e + 1] for b, e, _ in part])
                logits, _ = model(x, y)  # with targets, nanoGPT returns every position's logits
                nll = -F.log_softmax(logits.float(), dim=-1).gather(-1, y[..., None])[..., 0]
                keep = torch.zeros_like(nll, dtype=torch.bool)
                for row, (_, _, new) in enumerate(part):
                    keep[row, -new:] = True
                is_unseen = keep & torch.isin(y, unseen_t)
                nats += nll[keep].sum().item()
                scored += int(keep.sum())
                unseen_nats += nll[is_unseen].sum().item()
                unseen_scored += int(is_unseen.sum())
    return {"nats": nats, "targets": scored, "unseen_nats": unseen_nats, "unseen_targets": unseen_scored,
            "windows": len(windows)}


def load_model(ckpt_path: Path):
    """nanoGPT's model from its own checkpoint, as its sample.py loads it."""
    import torch

    from model import GPT, GPTConfig  # the nanoGPT checkout's

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    model.load_state_dict(state)
    model.eval()
    return model, checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", type=Path, help="nanoGPT's ckpt.pt")
    p.add_argument("data", type=Path, help="the folder with heldout.bin and unseen.json")
    p.add_argument("--stride", type=int, default=None, help="window step (default: half the block)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.getcwd())  # nanoGPT's model.py
    import numpy as np
    import torch

    model, checkpoint = load_model(args.ckpt)
    block = checkpoint["model_args"]["block_size"]
    stride = args.stride or max(1, block // 2)
    ids = torch.from_numpy(np.fromfile(args.data / "heldout.bin", dtype=np.uint16).astype(np.int64))
    unseen = set(json.loads((args.data / "unseen.json").read_text(encoding="utf-8"))["ids"])
    t0 = time.perf_counter()
    result = score(model, ids, block, stride, unseen)
    best = checkpoint.get("best_val_loss")
    print(json.dumps({**result, "block_size": block, "stride": stride, "iter_num": checkpoint.get("iter_num"),
                      "best_val_loss": None if best is None else float(best), "model_args": checkpoint["model_args"],
                      "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
