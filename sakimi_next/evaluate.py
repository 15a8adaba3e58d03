"""`--mode eval`: loss, perplexity and bits per byte of a text file or a prepared validation split.

Two ways to score a text longer than the model's training context:
- `carry` (default): one pass, window after window, carrying the DeltaNet states and the attention
  K/V cache across windows: exactly one forward pass over the whole text, at the cost of windows.
- `sliding`: independent windows of `window` tokens moving by `stride`, each token scored once with
  at least `window - stride` tokens of context (the usual recipe for models without a state).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import Qwen3NextForCausalLM
from .util import UserError


@torch.inference_mode()
def score_carry(model: Qwen3NextForCausalLM, ids: torch.Tensor, window: int) -> tuple[float, int]:
    """Sum of -log p(ids[t+1] | ids[:t+1]) over the whole sequence ids [N], in windows, carrying the cache.
    Returns (total nats, number of predicted tokens = N - 1)."""
    inputs, targets = ids[:-1], ids[1:]
    cache = model.new_cache(1, capacity=min(len(inputs), 4096))
    total = 0.0
    for start in range(0, len(inputs), window):
        x = inputs[start:start + window][None]
        logits = model(x, cache=cache).logits[0]
        total += F.cross_entropy(logits.float(), targets[start:start + window], reduction="sum").item()
    return total, len(targets)


@torch.inference_mode()
def score_sliding(model: Qwen3NextForCausalLM, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Sliding windows of `window` tokens advancing by `stride`; each target scored exactly once."""
    total, scored, prev_end = 0.0, 0, 0
    n = len(ids) - 1  # number of targets
    for end in range(min(window, n), n + stride, stride):
        end = min(end, n)
        if end <= prev_end:
            break
        begin = max(0, end - window)
        x = ids[begin:end][None]
        logits = model(x).logits[0]
        new = end - prev_end  # targets not scored by earlier windows: the last `new` positions
        total += F.cross_entropy(logits[-new:].float(), ids[end - new + 1:end + 1], reduction="sum").item()
        scored += new
        prev_end = end
    return total, scored


def summarize(nats: float, tokens: int, n_bytes: int | None) -> dict:
    loss = nats / tokens
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
    if n_bytes:
        out.update(bytes=n_bytes, bpb=nats / math.log(2) / n_bytes)
    return out


def run_eval(args) -> int:
    from .pretrained import load_for_inference

    if not args.resume_from:
        raise UserError("pass the model to evaluate: --resume-from CHECKPOINT_DIR")
    if bool(args.text_file) == bool(args.data_dir):
        raise UserError("give exactly one of --text-file FILE or --data-dir DIR (its validation split)")
    model, tokenizer, info = load_for_inference(args.resume_from, args.device, args.kernel, args.disable_fast_kernels)
    window = args.seq_len or info.get("seq_len") or 256
    if window <= 0:
        raise UserError(f"--seq-len ({window}) must be positive")
    window = min(window, model.config.max_position_embeddings)

    if args.text_file:
        path = Path(args.text_file)
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except OSError as e:
            raise UserError(f"cannot read --text-file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"--text-file {path} is not UTF-8 (byte offset {e.start})") from None
        body = tokenizer.encode(text)
        if not body:
            raise UserError(f"--text-file {path} is empty")
        ids = [tokenizer.eot_id] + body  # the text starts a document: condition on end-of-text
        n_bytes, source = len(raw), str(path)
    else:
        from .data import load_meta, open_split

        meta = load_meta(args.data_dir)
        if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tokenizer.sha256:
            raise UserError(f"{args.data_dir} was tokenized with another tokenizer than the model's")
        tokens = open_split(args.data_dir, "val")
        if len(tokens) < 2:
            raise UserError(f"the validation split of {args.data_dir} has fewer than 2 tokens")
        ids = np.asarray(tokens, dtype=np.int64)
        val = meta["splits"]["val"]
        # every token but the first is predicted: scale the split's bytes accordingly
        n_bytes = round(val["bytes"] * (len(ids) - 1) / len(ids))
        source = f"{args.data_dir} (validation split)"
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=model.device)

    t0 = time.perf_counter()
    if args.eval_method == "carry":
        nats, n = score_carry(model, ids_t, window)
    else:
        nats, n = score_sliding(model, ids_t, window, max(1, window // 2))
    seconds = time.perf_counter() - t0
    result = {"source": source, "model": info["source"], "method": args.eval_method, "window": window,
              **summarize(nats, n, n_bytes), "seconds": round(seconds, 3), "tokens_per_s": round(n / seconds, 1)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        bpb = f"  bits/byte {result['bpb']:.4f}" if "bpb" in result else ""
        print(f"{source}: {n:,} tokens, loss {result['loss']:.4f}  ppl {result['ppl']:.2f}{bpb}  "
              f"({args.eval_method}, window {window}, {result['tokens_per_s']:,.0f} tokens/s)")
    return 0
