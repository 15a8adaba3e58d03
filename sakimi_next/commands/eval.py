"""`--mode eval`: loss, perplexity and bits per byte of a text file or a prepared validation split."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..util import UserError
from . import common

HELP = "loss, perplexity and bits per byte of a text file or a prepared validation split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_checkpoint(p, "the model: a checkpoint directory (or its run directory) or a Hugging Face directory")
    common.add_device(p)
    p.add_argument("--text-file", default=None, help="a UTF-8 text file to score")
    p.add_argument("--data-dir", default=None, help="a prepared data directory: score its validation split")
    p.add_argument("--seq-len", type=int, default=None, help="window in tokens (default: the checkpoint's, else 256)")
    p.add_argument("--eval-method", default="carry", choices=("carry", "sliding"),
                   help="long text: carry the state across windows, or plain sliding windows")
    common.add_attention_window(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    common.add_precision(p)


@dataclass(frozen=True)
class EvalSettings:
    checkpoint: str
    device: str
    kernel: str
    text_file: Path | None
    data_dir: Path | None
    seq_len: int | None
    method: str
    json: bool
    dtype: str = "fp32"
    quantize: str = "none"

    @property
    def lowered(self) -> bool:
        """Below float32: the text is scored in float32 too, and the difference reported."""
        return self.dtype != "fp32" or self.quantize != "none"
    attention_window: int | None = None  # None: the checkpoint's; 0: all


def settings(args: argparse.Namespace) -> EvalSettings:
    checkpoint = common.required("--resume-from CHECKPOINT_DIR", args.resume_from, "the model to evaluate")
    if bool(args.text_file) == bool(args.data_dir):
        raise UserError("give exactly one of --text-file FILE or --data-dir DIR (its validation split)")
    return EvalSettings(checkpoint=checkpoint, device=args.device, kernel=common.kernel_name(args),
                        text_file=Path(args.text_file) if args.text_file else None,
                        data_dir=Path(args.data_dir) if args.data_dir else None,
                        seq_len=common.count("--seq-len", args.seq_len), method=args.eval_method, json=args.json,
                        dtype=args.dtype, quantize=args.quantize, attention_window=common.attention_window(args))


def _text_ids(path: Path, tokenizer) -> tuple[list[int], int, str]:
    """(ids, bytes scored, source) of a text file; the text starts a document: after end-of-text."""
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
    return [tokenizer.eot_id] + body, len(raw), str(path)


def _split_ids(data_dir: Path, tokenizer):
    """(ids, bytes scored, source) of a prepared directory's validation split."""
    import numpy as np

    from ..data import load_meta, open_split
    from ..tokenizer import check_same_tokenizer

    meta = load_meta(data_dir)
    check_same_tokenizer(tokenizer, meta.get("tokenizer_sha256"),
                         f"{data_dir} was tokenized with another tokenizer than the model's")
    tokens = open_split(data_dir, "val")
    if len(tokens) < 2:
        raise UserError(f"the validation split of {data_dir} has fewer than 2 tokens")
    ids = np.asarray(tokens, dtype=np.int64)
    # every token but the first is predicted: scale the split's bytes accordingly
    n_bytes = round(meta["splits"]["val"]["bytes"] * (len(ids) - 1) / len(ids))
    return ids, n_bytes, f"{data_dir} (validation split)"


def run(s: EvalSettings) -> int:
    import numpy as np
    import torch

    from ..evaluate import score, summarize
    from ..pretrained import load_for_inference

    model, tokenizer, info = load_for_inference(s.checkpoint, s.device, s.kernel, s.dtype, s.quantize,
                                                s.attention_window)
    if info["note"]:
        print(info["note"], file=sys.stderr)
    window = min(s.seq_len or info.get("seq_len") or 256, model.config.max_position_embeddings)
    ids, n_bytes, source = _text_ids(s.text_file, tokenizer) if s.text_file else _split_ids(s.data_dir, tokenizer)
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=model.device)

    def measured(m) -> dict:
        t0 = time.perf_counter()
        nats, n = score(m, ids_t, window, s.method)
        seconds = time.perf_counter() - t0
        return {**summarize(nats, n, n_bytes), "seconds": round(seconds, 3), "tokens_per_s": round(n / seconds, 1)}

    precision = ", ".join([info["dtype"]] * (info["dtype"] != "fp32") + [s.quantize] * (s.quantize != "none")) or "fp32"
    result = {"source": source, "model": info["source"], "method": s.method, "window": window,
              "attention_window": info["attention_window"] if s.method == "carry" else None,
              "precision": precision, **measured(model)}
    if s.lowered:  # the same text in float32: what the lower precision costs
        del model
        reference, _, _ = load_for_inference(s.checkpoint, s.device, s.kernel, attention_window=s.attention_window)
        result["float32"] = measured(reference)
        result["cost"] = {k: result[k] - result["float32"][k] for k in ("loss", "bpb") if k in result}
    if s.json:
        print(json.dumps(result, indent=1))
        return 0
    keys = f"attention over {result['attention_window'] or 'all'} positions" if s.method == "carry" else ""
    print(_line(source, result, s.method, window, keys, precision if s.lowered else ""))
    if "float32" in result:
        print(_line(source, result["float32"], s.method, window, keys, "float32"))
        cost = result["cost"]
        print(f"{precision} costs {cost.get('bpb', float('nan')):+.4f} bits/byte ({cost['loss']:+.4f} nats/token) "
              "against float32 on this text")
    return 0


def _line(source: str, r: dict, method: str, window: int, *notes: str) -> str:
    bpb = f"  bits/byte {r['bpb']:.4f}" if "bpb" in r else ""
    how = ", ".join([method, f"window {window}", *filter(None, notes), f"{r['tokens_per_s']:,.0f} tokens/s"])
    return f"{source}: {r['tokens']:,} tokens, loss {r['loss']:.4f}  ppl {r['ppl']:.2f}{bpb}  ({how})"
