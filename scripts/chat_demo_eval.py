"""Measure a chat fine-tuning on held-out translation requests (the numbers of `make chat-demo`).

For each model given (e.g. the pretrained checkpoint and the fine-tuned one):
- held-out assistant loss: mean cross-entropy per assistant target (reply tokens and their <|im_end|>)
  over every held-out conversation of a prepared chat data directory, each conversation seen whole;
- language: the model answers each held-out request of `val.jsonl` (greedy, prompts rendered with the
  generation prompt, stopped at <|im_end|>); a reply to an "into Chinese" request counts when it is mostly
  CJK (more CJK characters than Latin letters), one to an "into English" request when it is mostly Latin.

    python scripts/chat_demo_eval.py --model runs/chat-demo/pretrain/latest --model runs/chat-demo/sft/latest \\
        --data-dir data/chat-demo/sft --chats data/chat-demo/chats/val.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sakimi_next import chat
from sakimi_next.evaluate import assistant_loss
from sakimi_next.pretrained import load_for_inference
from sakimi_next.data import load_meta, open_loss_mask, open_split
from sakimi_next.generate import generate


def is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff"


def language(text: str) -> str | None:
    """"zh" when the text has more CJK characters than Latin letters, "en" when the reverse, else None."""
    cjk = sum(is_cjk(c) for c in text)
    latin = sum(c.isascii() and c.isalpha() for c in text)
    return "zh" if cjk > latin else "en" if latin > cjk else None


def replies(model, tokenizer, requests: list[list[dict]], max_new_tokens: int, batch: int = 32) -> list[str]:
    end = tokenizer.token_to_id(chat.IM_END)
    out = []
    for i in range(0, len(requests), batch):
        prompts = [chat.encode_chat(tokenizer, msgs, add_generation_prompt=True)[0] for msgs in requests[i:i + batch]]
        for ids in generate(model, prompts, max_new_tokens, eos_id=end, pad_id=tokenizer.pad_id):
            out.append(tokenizer.decode([t for t in ids if t not in (end, tokenizer.eot_id)]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="checkpoint (repeatable)")
    p.add_argument("--data-dir", type=Path, required=True, help="prepared chat data (its val split)")
    p.add_argument("--chats", type=Path, required=True, help="held-out conversations with a `direction`")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)

    meta = load_meta(args.data_dir)
    val, mask = open_split(args.data_dir, "val"), open_loss_mask(args.data_dir, meta, "val")
    records = [json.loads(line) for line in args.chats.read_text(encoding="utf-8").splitlines() if line.strip()]
    requests = [r["messages"][:-1] for r in records]
    results = []
    for path in args.model:
        t0 = time.perf_counter()
        model, tokenizer, _ = load_for_inference(path, "cpu")
        loss = assistant_loss(model, val, mask, tokenizer.eot_id)
        texts = replies(model, tokenizer, requests, args.max_new_tokens)
        right = {"zh": [0, 0], "en": [0, 0]}
        for r, text in zip(records, texts):
            right[r["direction"]][0] += language(text) == r["direction"]
            right[r["direction"]][1] += 1
        total = sum(v[0] for v in right.values()) / max(1, sum(v[1] for v in right.values()))
        res = {"model": str(path), "heldout_assistant_loss": round(loss, 4), "right_language": round(total, 4),
               "into_chinese": round(right["zh"][0] / max(1, right["zh"][1]), 4),
               "into_english": round(right["en"][0] / max(1, right["en"][1]), 4),
               "requests": len(records), "seconds": round(time.perf_counter() - t0, 1)}
        results.append(res)
        print(f"{path}: held-out assistant loss {loss:.4f}; reply in the requested language {total:.1%} "
              f"(into Chinese {res['into_chinese']:.1%} of {right['zh'][1]}, into English "
              f"{res['into_english']:.1%} of {right['en'][1]}); {res['seconds']} s", flush=True)
        for r, text in list(zip(records, texts))[:args.examples]:
            print(f"    {r['messages'][-2]['content']!r} -> {text!r}  (reference {r['messages'][-1]['content']!r})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
