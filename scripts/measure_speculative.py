"""MTP speculative decoding against plain greedy decoding: acceptance, speed-up, and what it would take on
the compiled path (docs/benchmarks.md, "Speculative decoding").

    python scripts/measure_speculative.py runs/cmp_mtp/latest [--quantize int8] [--compiled-costs]

For each draft length, each prompt is decoded greedily (200 tokens) plainly (eager), plainly with the
compiled step (the default path), and speculatively (eager: drafts by the MTP block, one verification
pass), interleaved; the outputs are compared token for token.

--compiled-costs also compiles the step for 1, 2, ..., 5 tokens at a time (the verification pass of
draft lengths 1-4) and reports, per draft length, its cost in single compiled steps and the speed-up
speculative decoding would reach with every part compiled: (1 + accepted per round) / (verification +
k drafts), a draft costing what it costs eagerly relative to the eager step (its share of the work).
"""

import argparse
import json
import statistics
import time

import torch

from sakimi_next.decoder import CompiledDecoder
from sakimi_next.generate import decode_one_token, generate, speculative_generate
from sakimi_next.pretrained import load_for_inference

PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are accounted poor citizens", "KING RICHARD III:\nNow is the winter",
           "JULIET:\nO Romeo, Romeo"]
NEW_TOKENS = 200


@torch.inference_mode()
def step_seconds(model, decode, tokens: int, steps: int = 60) -> float:
    """Median CPU seconds of one call of `decode` on `tokens` new tokens (a warm cache of 64)."""
    cache = model.new_cache(1, capacity=64 + tokens * steps)
    model(torch.randint(0, model.config.vocab_size, (1, 64)), cache=cache)
    times = []
    for _ in range(steps):
        token = torch.randint(0, model.config.vocab_size, (tokens,))
        t = time.thread_time()
        decode(model, token, cache)
        times.append(time.thread_time() - t)
    return statistics.median(times[5:])


@torch.inference_mode()
def draft_share(model) -> float:
    """An MTP draft (mtp_step + its logits) in eager steps: the share of a step's work a draft is."""
    mtp = model.new_mtp_cache(1, 512)
    h = torch.randn(1, 1, model.config.hidden_size)

    def draft(m, token, c):
        m.step_logits(m.mtp_step(h, token.view(1, 1), mtp)[:, -1])
    return step_seconds(model, draft, 1) / step_seconds(model, decode_one_token, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--quantize", default="none", choices=("none", "int8"))
    p.add_argument("--compiled-costs", action="store_true")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    model, tokenizer, _ = load_for_inference(args.checkpoint, "cpu", quantize=args.quantize)
    compiled = CompiledDecoder(model, on_compile=print)
    compiled.program(1)  # compiled (or loaded) before anything is timed
    results = {}
    for draft_len in (1, 2, 3, 4):
        seconds = {"plain": 0.0, "compiled": 0.0, "speculative": 0.0}
        accepted = drafted = rounds = 0
        identical = True
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            with torch.inference_mode():
                t = time.perf_counter()
                plain = generate(model, [ids], NEW_TOKENS)[0]
                seconds["plain"] += time.perf_counter() - t
                t = time.perf_counter()
                fast = generate(model, [ids], NEW_TOKENS, decode=compiled)[0]
                seconds["compiled"] += time.perf_counter() - t
                t = time.perf_counter()
                spec, stats = speculative_generate(model, ids, NEW_TOKENS, draft_len=draft_len)
                seconds["speculative"] += time.perf_counter() - t
            identical &= plain == spec == fast
            accepted, drafted, rounds = accepted + stats.accepted, drafted + stats.drafted, rounds + stats.rounds
        n = NEW_TOKENS * len(PROMPTS)
        results[draft_len] = {"acceptance": accepted / drafted, "accepted_per_round": accepted / rounds,
                              **{f"{k}_tok_s": n / v for k, v in seconds.items()},
                              "speculative_vs_plain": seconds["plain"] / seconds["speculative"],
                              "speculative_vs_compiled": seconds["compiled"] / seconds["speculative"],
                              "identical": identical}
        print(draft_len, results[draft_len], flush=True)
    if args.compiled_costs:
        share = draft_share(model)
        one = step_seconds(model, compiled, 1)
        for k, r in results.items():
            verify = step_seconds(model, CompiledDecoder(model, tokens_per_step=k + 1, on_compile=print), k + 1) / one
            r.update(compiled_verification_in_steps=verify, draft_in_steps=share,
                     projected_compiled_speedup=(1 + r["accepted_per_round"]) / (verify + k * share))
            print(k, {key: round(v, 3) for key, v in r.items() if not isinstance(v, bool)}, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
