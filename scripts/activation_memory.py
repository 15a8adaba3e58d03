"""Peak memory and step time of training with and without --activation-checkpointing.

    python scripts/activation_memory.py [--preset tiny_10m] [--seq-len 2048] [--batch-size 1] [--steps 3]
                                        [--device cpu|cuda] [--dtype fp32|bf16] [--mtp-weight 0] [--out FILE.json]

Each setting (off, on) runs in a fresh process, so that its peak is its own: the preset's seeded model, AdamW,
one warm-up step (which allocates the optimiser's moments), then --steps timed steps of forward, backward and
optimiser step on random tokens. Memory: on a CPU the process's peak resident set (getrusage's max RSS) and
what it held before the first step (model, optimiser, inputs), whose difference is mostly the activations kept
for the backward; on CUDA torch.cuda.max_memory_allocated. Time: the median step. Prints a table and the figures
as JSON. Figures are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(a: argparse.Namespace) -> dict:
    """One setting (a.checkpointing), in this process."""
    import torch

    from sakimi_next.config import preset
    from sakimi_next.model import Qwen3NextForCausalLM
    from sakimi_next.optim import build_optimizer

    device = torch.device(a.device)
    config = preset(a.preset, **({"mtp_num_hidden_layers": 1} if a.mtp_weight else {}))
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config).to(device)
    model.set_kernel("auto", device)
    model.set_activation_checkpointing(a.checkpointing)
    model.train()
    optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if a.dtype == "bf16" else nullcontext()
    x = torch.randint(0, config.vocab_size, (a.batch_size, a.seq_len + 1), device=device)
    before_mb = max_rss_mb()

    def step():
        with autocast:
            loss = model(x[:, :-1], targets=x[:, 1:], mtp_weight=a.mtp_weight).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: the optimiser's moments, the allocator's pools
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    out = {"checkpointing": a.checkpointing, "step_s": statistics.median(times),
           "tokens_per_s": a.batch_size * a.seq_len / statistics.median(times),
           "rss_before_mb": before_mb, "peak_rss_mb": max_rss_mb()}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny_10m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--mtp-weight", type=float, default=0.0, help="with an MTP block trained at this weight")
    p.add_argument("--out", default=None, help="also write the figures here as JSON")
    p.add_argument("--checkpointing", type=int, default=None, help=argparse.SUPPRESS)  # a child: one setting
    a = p.parse_args()
    if a.checkpointing is not None:
        a.checkpointing = bool(a.checkpointing)
        print(json.dumps(measure(a)))
        return
    rows = []
    for on in (0, 1):  # a fresh process each: max RSS only grows
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--checkpointing", str(on)],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    from sakimi_next.util import format_table

    memory = "cuda_peak_mb" if a.device.startswith("cuda") else "peak_rss_mb"
    table = [("on" if r["checkpointing"] else "off", f"{r[memory]:,.0f}", f"{r[memory] - r['rss_before_mb']:,.0f}"
              if memory == "peak_rss_mb" else "-", f"{r['step_s']:.2f}", f"{r['tokens_per_s']:,.0f}") for r in rows]
    print(f"{a.preset}, batch {a.batch_size} x {a.seq_len}, {a.dtype}, {a.device}, median of {a.steps} steps")
    print(format_table(table, ("checkpointing", f"peak {'CUDA allocated' if memory == 'cuda_peak_mb' else 'RSS'} MB",
                               "over the model MB", "step s", "tokens/s")))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "checkpointing"},
                                           "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
