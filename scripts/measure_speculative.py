"""MTP speculative decoding against plain greedy decoding: acceptance rate and speed-up, as in the README.

    python scripts/measure_speculative.py runs/cmp_mtp/latest

For each draft length, each prompt is decoded greedily (200 tokens) plainly and then speculatively,
alternating, and the outputs are compared token for token.
"""

import json
import sys
import time

import torch

from sakimi_next.pretrained import load_for_inference
from sakimi_next.generate import generate, speculative_generate

PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are accounted poor citizens", "KING RICHARD III:\nNow is the winter",
           "JULIET:\nO Romeo, Romeo"]
NEW_TOKENS = 200


def main(checkpoint: str) -> None:
    torch.set_flush_denormal(True)
    model, tokenizer, _ = load_for_inference(checkpoint, "cpu")
    results = {}
    for draft_len in (1, 2, 3, 4):
        plain_s = spec_s = 0.0
        accepted = drafted = 0
        identical = True
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            with torch.inference_mode():
                t = time.perf_counter()
                plain = generate(model, [ids], NEW_TOKENS)[0]
                plain_s += time.perf_counter() - t
                t = time.perf_counter()
                spec, stats = speculative_generate(model, ids, NEW_TOKENS, draft_len=draft_len)
                spec_s += time.perf_counter() - t
            identical &= plain == spec
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
        n = NEW_TOKENS * len(PROMPTS)
        results[draft_len] = {"acceptance": accepted / drafted, "plain_tok_s": n / plain_s,
                              "spec_tok_s": n / spec_s, "speedup": plain_s / spec_s, "identical": identical}
        print(draft_len, results[draft_len], flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
