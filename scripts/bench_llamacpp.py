"""Single-stream greedy decoding, ours beside llama.cpp on the same weights, each engine in a process of its own.

    python scripts/bench_llamacpp.py [--presets tiny_10m tiny_10m_moe] [--prompt-len 32] [--new-tokens 256]
                                     [--repeats 5] [--threads N] [--engines ...] [--resume-from CHECKPOINT]
                                     [--out bench_llamacpp.json]
    make bench-llamacpp

For each preset the model is built from its seeded initialisation (or read from --resume-from), saved as a
checkpoint with a tokenizer trained on the embedded CPython docs, and exported with `--mode export
--format gguf` as f32 and q8_0. Our compiled decoding steps are compiled (or found on disk) first, so no
timed run compiles. Then every engine decodes greedily --new-tokens tokens after the same --prompt-len
token prompt, timed from the prompt to the last token:

- ours fp32 eager:   `generate` with the eager reference step (`decode_one_token`);
- ours fp32:         `generate` with the compiled step (`decoder.CompiledDecoder`): the default path;
- ours int8:         the same with `--quantize int8` (int8 weights, float32 activations in the compiled products);
- ours int8 eager:   the eager step with int8 weights (not run by default);
- llama.cpp f32 / q8_0: llama-cpp-python (`Llama.eval` of one token, argmax of its logits).

Fairness: each timed run is a fresh process (`--worker`) that loads its engine, decodes once to warm up,
then `--rounds` times timed, alone on the machine (llama.cpp's threads spin between calls; they never
share the cores with one of our runs). Every engine gets the same thread count (torch's and llama.cpp's
n_threads). The processes of all engines are interleaved (A B C ... A B C ...) `--repeats` times; the
figure is the median of all timed runs; beside it, the fastest process's median (on a shared host a
whole process can land in a slow spell). Prints the table and writes JSON. Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("ours fp32 eager", "ours fp32", "ours int8", "llama.cpp f32", "llama.cpp q8_0", "ours int8 eager")
DEFAULT_ENGINES = ENGINES[:5]


# --------------------------------------------------------------------------------- one timed process
def worker(spec: dict) -> dict:
    """Load one engine, warm it up, time `rounds` greedy generations: seconds to the first new token and
    to the last, and the tokens of the last run."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    decode = load_llama(spec) if spec["engine"].startswith("llama.cpp") else load_ours(spec)
    prompt, n = spec["prompt"], spec["new_tokens"]
    decode(prompt, n)
    firsts, totals, tokens = [], [], []
    for _ in range(spec["rounds"]):
        t0 = time.perf_counter()
        tokens, first = decode(prompt, n)
        totals.append(time.perf_counter() - t0)
        firsts.append(first - t0)
    return {"seconds": totals, "first_token_seconds": firsts, "tokens": tokens}


def load_ours(spec: dict):
    import torch

    from sakimi_next.decoder import CompiledDecoder
    from sakimi_next.generate import SamplingSettings, decode_one_token, generate_tokens
    from sakimi_next.pretrained import load_for_inference

    quantize = "int8" if "int8" in spec["engine"] else "none"
    model, tok, _ = load_for_inference(spec["checkpoint"], "cpu", quantize=quantize)
    step = decode_one_token if spec["engine"].endswith("eager") else CompiledDecoder(model)
    greedy = SamplingSettings(temperature=0)

    def run(prompt: list[int], n: int):
        out, first = [], None
        with torch.inference_mode():
            for token in generate_tokens(model, [prompt], n, greedy, tok.pad_id, decode=step):
                out.append(int(token))
                first = first or time.perf_counter()
        return out, first

    return run


def load_llama(spec: dict):
    import numpy as np
    from llama_cpp import Llama

    n_ctx = len(spec["prompt"]) + spec["new_tokens"] + 8
    llm = Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)
    n_vocab = llm.n_vocab()

    def run(prompt: list[int], n: int):
        llm.reset()
        llm.eval(prompt)
        out, first = [], None
        for _ in range(n):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            out.append(int(logits.argmax()))
            first = first or time.perf_counter()
            if len(out) < n:
                llm.eval(out[-1:])
        return out, first

    return run


# ------------------------------------------------------------------------------------- the orchestra
def checkpoint_for(name: str, work: Path, seed: int) -> Path:
    """A checkpoint of preset `name` at its seeded initialisation, with a docs-trained tokenizer."""
    import torch

    from sakimi_next.checkpoint import save_checkpoint
    from sakimi_next.config import preset
    from sakimi_next.data import builtin_topics
    from sakimi_next.model import Qwen3NextForCausalLM
    from sakimi_next.tokenizer import train_tokenizer

    torch.manual_seed(seed)
    config = preset(name)
    tok = train_tokenizer(builtin_topics(), min(config.vocab_size, 4096))
    tok.save(work / "tokenizer.json")
    model = Qwen3NextForCausalLM(config.replace(eos_token_id=tok.eot_id, pad_token_id=tok.pad_id))
    state = {"preset": name, "tokens_seen": 0, "args": {}, "tokenizer_sha256": tok.sha256}
    return save_checkpoint(work / "run", 0, model, None, state, model.config, tok.path)


def prepare(checkpoint: Path, engines: list[str], threads: int) -> dict[str, str]:
    """Compile (or find on disk) our programs, in a process of their own with the timed runs' thread
    count (part of a program's key); returns a note per engine."""
    compiled = [e for e in engines if e in ("ours fp32", "ours int8")]
    return run_worker({"prepare": compiled, "checkpoint": str(checkpoint), "threads": threads})


def prepare_programs(spec: dict) -> dict[str, str]:
    import torch

    from sakimi_next.decoder import CompiledDecoder
    from sakimi_next.pretrained import load_for_inference

    torch.set_num_threads(spec["threads"])
    notes = {}
    for engine in spec["prepare"]:
        quantize = "int8" if "int8" in engine else "none"
        model, _, _ = load_for_inference(spec["checkpoint"], "cpu", quantize=quantize)
        decoder = CompiledDecoder(model, on_compile=lambda m: print(m, file=sys.stderr, flush=True))
        decoder.program(1)
        notes[engine] = (f"compiled in {decoder.compile_seconds:.0f} s" if decoder.compiled
                         else "program found on disk")
    return notes


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_worker(spec: dict) -> dict:
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], cwd=ROOT,
                       capture_output=True, text=True, env=_env(), timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{spec.get('engine', 'compiling our decoding step')} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_preset(name: str | None, args, work: Path) -> dict:
    import torch

    from sakimi_next.export.gguf import export_gguf
    from sakimi_next.pretrained import load_pretrained_config

    ckpt = Path(args.resume_from) if args.resume_from else checkpoint_for(name, work, args.seed)
    vocab = load_pretrained_config(ckpt).vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    ggufs = {wt: str(export_gguf(ckpt, work / f"model-{wt}.gguf", wt).path) for wt in ("f32", "q8_0")}
    print(f"{name or ckpt}: our compiled decoding steps, compiled now or found on disk (minutes, once)...", flush=True)
    notes = prepare(ckpt, args.engines, args.threads)
    runs = {e: {"seconds": [], "first_token_seconds": []} for e in args.engines}
    tokens = {}
    for r in range(args.repeats):
        for engine in args.engines:
            spec = {"engine": engine, "checkpoint": str(ckpt), "gguf": ggufs.get(engine.split()[-1], ""),
                    "threads": args.threads, "prompt": prompt, "new_tokens": args.new_tokens, "rounds": args.rounds}
            out = run_worker(spec)
            runs[engine]["seconds"] += out["seconds"]
            runs[engine]["first_token_seconds"] += out["first_token_seconds"]
            tokens[engine] = out["tokens"]
            print(f"  {name or ckpt} round {r + 1}/{args.repeats}: {engine} "
                  f"{args.new_tokens / statistics.median(out['seconds']):,.0f} tokens/s", flush=True)
    rates = {e: args.new_tokens / statistics.median(v["seconds"]) for e, v in runs.items()}
    # on a shared host a whole process can land in a slow spell: the fastest process shows the engine's pace
    fastest = {e: max(args.new_tokens / statistics.median(v["seconds"][i:i + args.rounds])
                      for i in range(0, len(v["seconds"]), args.rounds)) for e, v in runs.items()}
    same = {}
    for ours, theirs in (("ours fp32", "llama.cpp f32"), ("ours fp32 eager", "llama.cpp f32"),
                         ("ours int8", "llama.cpp q8_0"), ("ours int8 eager", "llama.cpp q8_0")):
        if ours in tokens and theirs in tokens:
            same[f"{ours} = {theirs}"] = sum(a == b for a, b in zip(tokens[ours], tokens[theirs]))
    import llama_cpp

    return {"preset": name, "checkpoint": None if name else str(ckpt), "threads": args.threads,
            "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "tokens_per_s": rates, "fastest_process_tokens_per_s": fastest,
            "first_token_ms": {e: 1000 * statistics.median(v["first_token_seconds"]) for e, v in runs.items()},
            "runs": runs, "same_greedy_tokens": same, "notes": notes}


def table(results: list[dict]) -> list[tuple]:
    rows = []
    for r in results:
        rates = r["tokens_per_s"]
        for engine, rate in rates.items():
            base = rates.get("llama.cpp q8_0" if "int8" in engine or "q8_0" in engine else "llama.cpp f32")
            fast = r["fastest_process_tokens_per_s"]
            fast_base = fast.get("llama.cpp q8_0" if "int8" in engine or "q8_0" in engine else "llama.cpp f32")
            rows.append((r["preset"] or r["checkpoint"], engine, f"{rate:,.0f}",
                         f"{rate / base:.2f}x" if base else "-", f"{fast[engine]:,.0f}",
                         f"{fast[engine] / fast_base:.2f}x" if fast_base else "-",
                         f"{r['first_token_ms'][engine]:.1f}", r["notes"].get(engine, "")))
    return rows


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny_10m", "tiny_10m_moe"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="processes per engine, interleaved")
    p.add_argument("--rounds", type=int, default=3, help="timed generations per process (after one warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for every engine")
    p.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES), choices=ENGINES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume-from", default=None, help="a checkpoint to use instead of the seeded presets")
    p.add_argument("--out", default="bench_llamacpp.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(prepare_programs(spec) if "prepare" in spec else worker(spec)))
        return
    from sakimi_next.util import format_table

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ([None] if args.resume_from else args.presets):
            work = Path(tmp) / (name or "checkpoint")
            work.mkdir()
            results.append(bench_preset(name, args, work))
    r0 = results[0]
    print(f"\ngreedy decoding, batch 1, {args.prompt_len}-token prompt + {args.new_tokens} new tokens, "
          f"{args.threads} threads for every engine, each run in a process of its own, median of "
          f"{args.repeats} x {args.rounds} runs; llama-cpp-python {r0['llama_cpp_python']}, torch {r0['torch']}")
    print(format_table(table(results), ("model", "engine", "tokens/s", "vs llama.cpp (same precision)",
                                        "fastest process", "vs llama.cpp", "first token ms", "note")))
    for r in results:
        print(f"{r['preset'] or r['checkpoint']}: greedy tokens in common (of {args.new_tokens}): "
              + ", ".join(f"{k}: {v}" for k, v in r["same_greedy_tokens"].items()))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
