"""Does vLLM serve our export as we run it? For a machine with vLLM and a GPU:

    pip install vllm && pip install -e .
    python scripts/vllm_check.py runs/tiny_10m            # a run or checkpoint: exported first
    python scripts/vllm_check.py exported/ --max-tokens 64 # or a transformers directory we exported

It exports the model (`--hf-layout`: Qwen3.5 for a dense model, Qwen3-Next for MoE, as `--mode export`
does), starts `vllm serve` on a free port of 127.0.0.1, waits for /health (at most --startup-timeout
seconds), sends each prompt as token ids through the official `openai` client with greedy decoding, and
compares every completion with this project's greedy generation of the same export (loaded back through
`--mode generate`'s loader). It prints one line per prompt and the count that matched; exit code 0 when all
match, 1 on a mismatch, 2 when the server or a request fails.

--server-cmd replaces the vLLM command (placeholders {python} {model} {port} {name} {dtype} {max_len}):
tests/test_vllm_check.py runs the whole script against `--mode serve` of this project in its place.
vLLM in float32 (the default --dtype) should match token for token; in bfloat16, greedy paths may part
after near ties, and the line says after how many characters.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VLLM = ("vllm serve {model} --host 127.0.0.1 --port {port} --served-model-name {name} --dtype {dtype} "
        "--max-model-len {max_len} --enforce-eager --no-enable-prefix-caching --seed 0")
PROMPTS = ["The", "Once upon a time", "In the beginning", "1, 2, 3,", "你好，"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a run or checkpoint directory (exported first), or an exported directory")
    p.add_argument("--out-dir", default=None, help="where to export a checkpoint (default: a temporary directory)")
    p.add_argument("--hf-layout", choices=("qwen3_5", "qwen3_next"), default=None,
                   help="the export's layout (default: qwen3_5 when dense, qwen3_next with experts)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: five short ones)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--dtype", default="float32", help="the server's --dtype placeholder (float32, bfloat16)")
    p.add_argument("--device", default="auto", help="where our reference generation runs")
    p.add_argument("--server-cmd", default=VLLM, help="the server's command line (see the module docstring)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    return p.parse_args(argv)


def exported_model(model: str, out_dir: str | None, layout: str | None) -> Path:
    """`model` itself when it is a transformers directory, else its export (into `out_dir` or a temp dir)."""
    from sakimi_next.export.hf import export_hf
    from sakimi_next.pretrained import CHECKPOINT, resolve_model

    kind, path = resolve_model(model)
    if kind != CHECKPOINT:
        return path
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="vllm_check_")) / "model"
    return export_hf(path, out, layout=layout)


def reference(hf_dir: Path, prompts: list[str], max_tokens: int, device: str):
    """(prompt token ids, our greedy completion text) for each prompt, from the export read back."""
    from sakimi_next.generate import generate
    from sakimi_next.pretrained import load_for_inference

    model, tokenizer, info = load_for_inference(hf_dir, device)
    ids = [tokenizer.encode(p) for p in prompts]
    texts = []
    for prompt in ids:
        new = generate(model, [prompt], max_tokens, eos_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)[0]
        texts.append(tokenizer.decode([t for t in new if t != tokenizer.eot_id]))
    return ids, texts, model.config, info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def running_server(command: list[str], port: int, timeout: float, log: Path):
    """The server process, once GET /health answers 200 (polled at most every half second until
    `timeout`); stopped (terminate, then kill) when the block ends. Its output goes to `log`."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.5) + 1):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
            if healthy(f"http://127.0.0.1:{port}/health"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout:g} s")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the server was not ready after {timeout:g} s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served(base_url: str, name: str, prompts: list[list[int]], max_tokens: int, timeout: float) -> list[str]:
    """The server's greedy completion of each prompt (token ids), through the official openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", timeout=timeout, max_retries=0)
    out = []
    for prompt in prompts:
        r = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"skip_special_tokens": False})
        out.append(r.choices[0].text)
    return out


def compare(prompts: list[str], ours: list[str], theirs: list[str]) -> tuple[list[str], int]:
    """One line per prompt, and how many matched exactly (but for an incomplete UTF-8 character at the
    end, which one side may show as U+FFFD and the other hold back)."""
    lines, matched = [], 0
    for i, (prompt, a, b) in enumerate(zip(prompts, ours, theirs), 1):
        a, b = a.rstrip("\ufffd"), b.rstrip("\ufffd")
        head = f"[{i}/{len(prompts)}]"
        if a == b:
            matched += 1
            lines.append(f"{head} match    {prompt!r} -> {a[:60]!r}")
            continue
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        lines.append(f"{head} MISMATCH {prompt!r}: the same for {same} characters, then ours "
                     f"{a[same:same + 40]!r}, the server's {b[same:same + 40]!r}")
    return lines, matched


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = args.prompt or PROMPTS
    hf_dir = exported_model(args.model, args.out_dir, args.hf_layout)
    ids, ours, config, info = reference(hf_dir, prompts, args.max_tokens, args.device)
    port, name = free_port(), "sakimi-check"
    fields = dict(python=sys.executable, model=str(hf_dir), port=port, name=name, dtype=args.dtype,
                  max_len=min(config.max_position_embeddings, 4096))
    command = [word.format(**fields) for word in shlex.split(args.server_cmd)]
    log = Path(tempfile.mkdtemp(prefix="vllm_check_")) / "server.log"
    print(f"model: {hf_dir}; ours: greedy on {info['device']}, {info['dtype']}")
    print(f"server: {shlex.join(command)} (log: {log})", flush=True)
    try:
        with running_server(command, port, args.startup_timeout, log) as url:
            theirs = served(url, name, ids, args.max_tokens, args.request_timeout)
    except Exception as e:  # the server's own output says why: show its end
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.is_file() else []
        print("\n".join(["", *tail, f"error: {e}"]), file=sys.stderr)
        return 2
    lines, matched = compare(prompts, ours, theirs)
    print("\n".join(lines))
    print(f"matched {matched} of {len(prompts)} prompts ({args.max_tokens} greedy tokens each)")
    return 0 if matched == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
