"""Benchmark of `--mode serve`: aggregate generated tokens/s with 1, 4, 8 and 16 concurrent streaming
clients, and time to first token on an idle server.

    python scripts/bench_serve.py                      # tiny_10m, seeded weights, tokenizer of the CPython docs
    python scripts/bench_serve.py --checkpoint runs/tiny_10m/latest

The server runs as a separate process (`python -m sakimi_next --mode serve`), the clients are threads
here, each streaming its requests one after another over HTTP. Throughput does not depend on what
the weights learned, so by default a seeded tiny_10m is saved with a tokenizer trained on the
embedded CPython docs (both in a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Explain what the for statement does."


def seeded_checkpoint(folder: Path, preset_name: str) -> Path:
    import torch

    from sakimi_next.checkpoint import save_checkpoint
    from sakimi_next.config import preset
    from sakimi_next.data import builtin_topics
    from sakimi_next.model import Qwen3NextForCausalLM
    from sakimi_next.tokenizer import train_tokenizer

    config = preset(preset_name)
    tok = train_tokenizer(builtin_topics(), config.vocab_size)
    tok.save(folder / "tokenizer.json")
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config.replace(eos_token_id=tok.eot_id, pad_token_id=tok.pad_id))
    state = {"preset": preset_name, "tokens_seen": 0, "args": {}, "tokenizer_sha256": tok.sha256}
    return save_checkpoint(folder / "run", 0, model, None, state, model.config, tok.path)


SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # set from the command line


def stream_one(http, url: str, max_tokens: int, seed: int) -> tuple[float, int]:
    """One streamed chat request: (seconds to the first text, completion tokens)."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, **SAMPLING,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    t0, first, tokens = time.perf_counter(), None, 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0), tokens


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its children (Linux; the server's model runs in
    a child process): a measure the other jobs on a shared machine disturb far less than wall-clock time."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that just ended
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def throughput(url: str, clients: int, requests: int, max_tokens: int, pid: int) -> dict:
    import httpx2 as httpx

    totals = [0] * clients
    start = threading.Barrier(clients + 1)

    def client(i):
        with httpx.Client(timeout=600) as http:
            start.wait()
            for k in range(requests):
                totals[i] += stream_one(http, url, max_tokens, seed=1000 * i + k)[1]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0, c0, own0 = time.perf_counter(), cpu_seconds(pid), time.process_time()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
    return {"clients": clients, "tokens": sum(totals), "seconds": seconds, "tokens_per_s": sum(totals) / seconds,
            "server_cpu_s": cpu, "tokens_per_cpu_s": sum(totals) / max(cpu, 1e-9),
            "client_cpu_s": time.process_time() - own0}


def time_to_first_token(url: str, n: int) -> list[float]:
    import httpx2 as httpx

    with httpx.Client(timeout=600) as http:
        return [stream_one(http, url, 1, seed=i)[0] for i in range(n)]


def wait_ready(url: str, proc, seconds: float = 300) -> None:
    import httpx2 as httpx

    for _ in range(int(seconds / 0.2)):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="model to serve (default: a seeded --preset)")
    p.add_argument("--preset", default="tiny_10m")
    p.add_argument("--clients", default="1,4,8,16", help="concurrency levels")
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    p.add_argument("--ttft-samples", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3, help="runs of each level, interleaved; the best is reported")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads")
    p.add_argument("--engines", type=int, default=1, help="the server's --engines (model processes)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the server's --dtype")
    p.add_argument("--quantize", default="none", choices=("none", "int8"), help="the server's --quantize")
    p.add_argument("--compile", default="yes", choices=("yes", "no"),
                   help="yes (default): the server's default decoding step, the compiled one, made or loaded "
                        "before serving (--compile); no: the eager step (--no-compile)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    SAMPLING.update(temperature=a.temperature, top_p=a.top_p)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint or str(seeded_checkpoint(Path(tmp), a.preset))
        url = f"http://127.0.0.1:{a.port}"
        cmd = [sys.executable, "-m", "sakimi_next", "--mode", "serve", "--resume-from", ckpt, "--port", str(a.port),
               "--max-concurrent", str(max(levels)), "--device", "cpu",
               "--dtype", a.dtype, "--quantize", a.quantize, "--compile" if a.compile == "yes" else "--no-compile"]
        cmd += ["--threads", str(a.threads)] if a.threads else []
        cmd += ["--engines", str(a.engines)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_ready(url, proc, seconds=3600 if a.compile == "yes" else 300)  # compiling: minutes, once
            throughput(url, max(levels), 1, 8, proc.pid)  # warm-up
            ttft = time_to_first_token(url, a.ttft_samples)
            runs = [[throughput(url, c, a.requests, a.max_tokens, proc.pid) for c in levels] for _ in range(a.repeats)]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    best = [max((run[i] for run in runs), key=lambda r: r["tokens_per_s"]) for i in range(len(levels))]
    cpu_best = [max(run[i]["tokens_per_cpu_s"] for run in runs) for i in range(len(levels))]
    base, cpu_base = best[0]["tokens_per_s"], cpu_best[0]
    print(f"\n{a.checkpoint or a.preset + ' (seeded)'}: {a.requests} streamed requests of {a.max_tokens} tokens "
          f"per client, temperature {a.temperature}, top-p {a.top_p}, server threads {a.threads or 'default'}, "
          f"{a.engines} engine{'s' if a.engines > 1 else ''}, "
          f"{a.dtype}{', int8' if a.quantize == 'int8' else ''}, "
          f"{'compiled step' if a.compile == 'yes' else 'eager step'}; "
          f"best of {a.repeats} interleaved runs\n")
    print("| concurrent clients | aggregate tokens/s | vs 1 client | all runs (tokens/s) "
          "| tokens per server CPU-second | vs 1 client | server cores busy | client cores busy |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for i, r in enumerate(best):
        spread = ", ".join(f"{run[i]['tokens_per_s']:.0f}" for run in runs)
        print(f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {spread} "
              f"| {cpu_best[i]:.1f} | {cpu_best[i] / cpu_base:.2f}x | {r['server_cpu_s'] / r['seconds']:.2f} "
              f"| {r['client_cpu_s'] / r['seconds']:.2f} |")
    q = statistics.quantiles(ttft, n=20)
    print(f"\ntime to first token, idle server, {len(ttft)} short chat prompts: "
          f"p50 {statistics.median(ttft) * 1000:.0f} ms, p95 {q[18] * 1000:.0f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "ttft_s": ttft}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
