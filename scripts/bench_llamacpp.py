"""Single-stream greedy decoding: ours (eager and --compile) beside llama.cpp (f32 and q8_0), same weights.

    python scripts/bench_llamacpp.py [--presets tiny_10m tiny_10m_moe] [--prompt-len 32] [--new-tokens 256]
                                     [--repeats 5] [--no-compile] [--resume-from CHECKPOINT] [--out FILE.json]

For each preset the model is built from its seeded initialisation (or read from --resume-from), saved as
a checkpoint with a tokenizer trained on the embedded CPython docs, and exported with
`--mode export --format gguf` as f32 and q8_0. Then, on the CPU with the same thread count
(torch.get_num_threads()), greedy decoding of --new-tokens tokens after a --prompt-len token prompt,
timed from the prompt to the last token, the runs of all engines interleaved, median of --repeats:

- ours, eager: `generate` with `decode_one_token` (float32);
- ours, compiled: `generate` with `compiled_decoder` (torch.compile of the decoding step);
- llama.cpp through llama-cpp-python (`Llama.eval` of one token, argmax of its logits), f32 and q8_0.

Prints a table and writes the figures as JSON. Needs llama-cpp-python (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sakimi_next.checkpoint import save_checkpoint
from sakimi_next.pretrained import load_for_inference
from sakimi_next.config import preset
from sakimi_next.data import builtin_topics
from sakimi_next.generate import compiled_decoder, decode_one_token, generate
from sakimi_next.export.gguf import export_gguf
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.tokenizer import train_tokenizer
from sakimi_next.util import format_table


def checkpoint_for(name: str, work: Path, seed: int) -> Path:
    """A checkpoint of preset `name` at its seeded initialisation, with a docs-trained tokenizer."""
    torch.manual_seed(seed)
    config = preset(name)
    tok = train_tokenizer(builtin_topics(), min(config.vocab_size, 4096))
    tok.save(work / "tokenizer.json")
    model = Qwen3NextForCausalLM(config.replace(eos_token_id=tok.eot_id, pad_token_id=tok.pad_id))
    state = {"preset": name, "tokens_seen": 0, "args": {}, "tokenizer_sha256": tok.sha256}
    return save_checkpoint(work / "run", 0, model, None, state, model.config, tok.path)


def llama_decoder(path: Path, threads: int, n_ctx: int):
    """A function prompt -> None that decodes greedily with llama.cpp, and the llama.cpp version."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    n_vocab = llm.n_vocab()

    def run(prompt: list[int], new_tokens: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(new_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            out.append(int(logits.argmax()))
            llm.eval(out[-1:])
        return out

    return run, llama_cpp.__version__


def measure(engines: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """tokens/s of each engine: one warm-up each, then `repeats` rounds of all engines in turn."""
    times: dict[str, list[float]] = {k: [] for k in engines}
    for fn in engines.values():
        fn(prompt, new_tokens)
    for _ in range(repeats):
        for k, fn in engines.items():
            t = time.perf_counter()
            fn(prompt, new_tokens)
            times[k].append(time.perf_counter() - t)
    return {k: new_tokens / statistics.median(v) for k, v in times.items()}


def bench_preset(name: str, args, work: Path) -> dict:
    ckpt = Path(args.resume_from) if args.resume_from else checkpoint_for(name, work, args.seed)
    model, _, _ = load_for_inference(ckpt, "cpu")
    threads = torch.get_num_threads()
    n_ctx = args.prompt_len + args.new_tokens + 8
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()

    def ours(decode):
        def run(p, n):
            with torch.inference_mode():
                return generate(model, [p], n, decode=decode)[0]
        return run

    engines = {"ours eager": ours(decode_one_token)}
    if args.compile:
        engines["ours --compile"] = ours(compiled_decoder(model))
    version = None
    for wt in ("f32", "q8_0"):
        path = export_gguf(ckpt, work / f"{name}-{wt}.gguf", wt).path
        engines[f"llama.cpp {wt}"], version = llama_decoder(path, threads, n_ctx)
    same = engines["llama.cpp f32"](prompt, 32) == engines["ours eager"](prompt, 32)
    rates = measure(engines, prompt, args.new_tokens, args.repeats)
    return {"preset": name, "threads": threads, "llama_cpp_python": version, "torch": torch.__version__,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "tokens_per_s": rates,
            "f32_greedy_identical_32": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny_10m", "tiny_10m_moe"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled decoder")
    p.add_argument("--resume-from", default=None, help="a checkpoint to use instead of the seeded presets")
    p.add_argument("--out", default="bench_llamacpp.json")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ([None] if args.resume_from else args.presets):
            work = Path(tmp) / (name or "checkpoint")
            work.mkdir()
            r = bench_preset(name, args, work)
            results.append(r)
            base = r["tokens_per_s"]["llama.cpp f32"]
            for engine, rate in r["tokens_per_s"].items():
                rows.append((name or args.resume_from, engine, f"{rate:,.0f}", f"{rate / base:.2f}x"))
            print(f"{name}: f32 greedy identical to ours over 32 tokens: {r['f32_greedy_identical_32']}", flush=True)
    print(f"\ngreedy decoding, {args.prompt_len}-token prompt + {args.new_tokens} new tokens, "
          f"{results[0]['threads']} threads, llama-cpp-python {results[0]['llama_cpp_python']}, "
          f"torch {results[0]['torch']}")
    print(format_table(rows, ("model", "engine", "tokens/s", "vs llama.cpp f32")))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
