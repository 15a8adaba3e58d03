"""The GPU checks of the speed issue, as one short script for a lent or rented NVIDIA machine:

  1. `--kernel fla` (flash-linear-attention) and `--kernel chunk` agree on CUDA: outputs, final state
     and every input gradient, as relative errors (fla's own tests use ||a - b|| / ||b|| <= ~5e-3);
  2. small_50m training tokens/s and MFU with bf16 autocast, for fla and for chunk, against the
     measured bf16 matmul peak of the same GPU.

    pip install torch flash-linear-attention && pip install -e .
    python scripts/gpu_check.py [--out gpu_check.json] [--steps 10] [--batch-size 16] [--seq-len 512]

Without CUDA it runs the same code small, on the CPU (chunk against the recurrent reference, tiny_5m),
so the script itself stays tested. Prints one line per figure and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sakimi_next.bench import training_flops_per_token
from sakimi_next.config import preset
from sakimi_next.kernels import fla_available, gated_delta_rule
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.train import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def kernel_agreement(kernel: str, reference: str, device: torch.device, B: int, T: int, Hk: int, H: int,
                     K: int = 64, V: int = 64) -> dict:
    """Outputs, final state and input gradients of `kernel` vs `reference` on the same random inputs."""
    gen = torch.Generator(device="cpu").manual_seed(T)
    q = torch.nn.functional.normalize(torch.randn(B, T, Hk, K, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, Hk, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * 4  # from no decay to strong decay
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) * 0.1
    d_o, d_s = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    results = {}
    for name in (kernel, reference):
        inputs = [x.to(device, copy=True).requires_grad_() for x in (q, k, v, g, beta, h0)]
        o, s = gated_delta_rule(name, *inputs[:5], K**-0.5, inputs[5], True)
        torch.autograd.backward([o, s], [d_o.to(device), d_s.to(device)])
        results[name] = [o.detach(), s.detach()] + [x.grad for x in inputs]
    labels = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0")
    return {lab: relative_error(a, b) for lab, a, b in zip(labels, results[kernel], results[reference])}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t)


def training_speed(name: str, kernel: str, device: torch.device, batch: int, seq: int, steps: int,
                   bf16: bool) -> dict:
    """Median tokens/s of full training steps (forward, backward, fused AdamW)."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(preset(name)).to(device)
    model.set_kernel(kernel, device)
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    times = []
    for i in range(steps + 3):
        sync(device)
        t = time.perf_counter()
        with autocast:
            loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 3:  # warm-up: Triton autotuning, allocator
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {"tokens_per_s": batch * seq / seconds, "flops_per_token": training_flops_per_token(model, seq),
            "loss": loss.item()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    kernel = "fla" if cuda and fla_available() else "chunk"
    reference = "chunk" if kernel == "fla" else "recurrent"
    if cuda and kernel != "fla":
        print("warning: CUDA without flash-linear-attention: checking chunk against the reference only")
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    print(f"device: {report['device']}, torch {torch.__version__}, {kernel} vs {reference}", flush=True)

    shapes = [(2, 300, 4, 8), (1, 1000, 8, 8)] if cuda else [(2, 70, 2, 4)]
    report["agreement"] = {}
    for B, T, Hk, H in shapes:
        errors = kernel_agreement(kernel, reference, device, B, T, Hk, H)
        report["agreement"][f"B{B}_T{T}_Hk{Hk}_H{H}"] = errors
        print(f"{kernel} vs {reference}, B={B} T={T} Hk={Hk} H={H}: max relative error "
              f"{max(errors.values()):.2e} ({', '.join(f'{k} {v:.1e}' for k, v in errors.items())})", flush=True)

    name, batch, seq, steps = (("small_50m", args.batch_size, args.seq_len, args.steps) if cuda
                               else ("tiny_5m", 2, 64, 2))
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak(device, dtype, 8192 if cuda else 512)
    report["matmul_peak_flops"] = peak
    report["training"] = {}
    for k in dict.fromkeys((kernel, "chunk")):
        r = training_speed(name, k, device, batch, seq, steps, bf16=cuda)
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
        report["training"][f"{name}_{k}"] = r
        print(f"{name} training, {'bf16 autocast' if cuda else 'fp32'}, kernel {k}, batch {batch} x {seq}: "
              f"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% of the measured "
              f"{peak / 1e12:.1f} TFLOP/s {str(dtype).removeprefix('torch.')} matmul peak", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
