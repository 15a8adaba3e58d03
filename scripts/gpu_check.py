"""The GPU checks, as one script for a lent or rented NVIDIA machine. It judges: every figure that has a
tolerance passes or fails, a table sums them up, and any failure makes the exit code 1.

  1. Kernel agreement: the judged kernel (`fla` on CUDA when it can run there, else `chunk`) against the
     plain recurrence in float64 on the same inputs: outputs, final states and every input gradient. The metric
     and tolerances are fla's own tests' (fla.utils.assert_close: RMS of the difference over RMS of the
     reference; a comparison whose largest difference is <= 1e-6 passes): 5e-3 for outputs and states,
     8e-3 for dq, dk, dv and the initial state's gradient, 2e-2 for dg and dbeta. fla's tests use them
     for fp16 inputs; in float32 Triton multiplies in TF32, about as precise. bfloat16 keeps three fewer
     mantissa bits than fp16: its tolerances are four times those (our choice, until measured).
     Cases: small_50m's heads (4 key, 8 value heads of 128: grouped values), equal heads, T = 1, no
     initial state, packed documents (fla's cu_seqlens), in float32 and bfloat16.
  2. End to end: tiny_10m from the same weights, a few AdamW steps on the same batches under bf16
     autocast with the judged kernel and with `chunk` (on the CPU: `chunk` and `recurrent`, float32),
     with and without document masking: the losses agree within 1e-2 (bf16) or 1e-4 (float32).
  3. Speed (reported, not judged): small_50m training tokens/s and MFU with bf16 autocast, for the judged
     kernel and for chunk, against the measured bf16 matmul peak of the same GPU.

    PYTHONPATH=. python scripts/gpu_check.py [--out gpu_check.json] [--kernel auto|fla|chunk]
                                             [--steps 10] [--batch-size 16] [--seq-len 512]

Offline, on a machine with a CUDA torch (>= 2.7) and einops but no package index, carry fla's kernels
as their pure-Python wheel, fetched once where pip works:

    pip download --no-deps fla-core==0.5.2 -d .whl
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/fla_core-0.5.2-py3-none-any.whl
    PYTHONPATH=/tmp/site:. python3 scripts/gpu_check.py --kernel fla

Meant to take under 8 minutes on one GPU, most of it Triton autotuning the first call of each new shape
(each case is announced before it starts). Without CUDA it runs the same code small on the CPU (chunk
against the recurrence, a narrowed tiny_5m), which is how tests/test_bench.py keeps it working. Writes
every figure to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sakimi_next.bench import training_flops_per_token
from sakimi_next.config import Config, preset
from sakimi_next.kernels import fla_problem, gated_delta_rule
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.util import format_table

TOLERANCES = {"o": 5e-3, "final_state": 5e-3, "dq": 8e-3, "dk": 8e-3, "dv": 8e-3, "dg": 2e-2, "dbeta": 2e-2,
              "dh0": 8e-3}
BF16_FACTOR = 4
ABS_PASS = 1e-6  # fla's assert_close: err_atol
LOSS_TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}

# name: (B, T, Hk, H, K = V, dtype, initial state, packed documents)
CUDA_CASES = {
    "grouped_heads": (2, 500, 4, 8, 128, torch.float32, True, False),
    "equal_heads": (1, 1000, 8, 8, 64, torch.float32, True, False),
    "one_step": (2, 1, 4, 8, 128, torch.float32, True, False),
    "no_initial_state": (2, 300, 4, 8, 128, torch.float32, False, False),
    "documents": (2, 400, 4, 8, 128, torch.float32, True, True),
    "grouped_heads_bf16": (2, 500, 4, 8, 128, torch.bfloat16, True, False),
    "documents_bf16": (2, 400, 4, 8, 128, torch.bfloat16, False, True),
}
CPU_CASES = {
    "grouped_heads": (2, 70, 2, 4, 32, torch.float32, True, False),
    "one_step": (2, 1, 2, 4, 32, torch.float32, True, False),
    "no_initial_state": (1, 40, 2, 2, 32, torch.float32, False, False),
    "documents": (2, 70, 2, 4, 32, torch.float32, True, True),
    "grouped_heads_bf16": (2, 70, 2, 4, 32, torch.bfloat16, True, False),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def say(message: str) -> None:
    print(message, flush=True)


def error_ratio(ref: torch.Tensor, x: torch.Tensor) -> float:
    """fla.utils.get_err_ratio: RMS(ref - x) / (RMS(ref) + 1e-8)."""
    ref, x = ref.detach().double(), x.detach().double()
    return float((ref - x).square().mean().sqrt() / (ref.square().mean().sqrt() + 1e-8))


class Judge:
    """Collects (check, quantity, value, tolerance, passed) rows."""

    def __init__(self, tolerance_scale: float = 1.0):
        self.scale = tolerance_scale
        self.rows: list[tuple[str, str, float, float | None, bool]] = []

    def compare(self, check: str, quantity: str, ref: torch.Tensor, x: torch.Tensor, tolerance: float) -> None:
        """fla's assert_close: finite, and the error ratio under the tolerance (or every difference tiny)."""
        ratio, tolerance = error_ratio(ref, x), tolerance * self.scale
        biggest = float((ref.detach().double() - x.detach().double()).abs().max())
        passed = bool(torch.isfinite(x).all()) and (biggest <= ABS_PASS or ratio < tolerance)
        self.rows.append((check, quantity, ratio, tolerance, passed))

    def record(self, check: str, quantity: str, value: float, tolerance: float | None, passed: bool) -> None:
        self.rows.append((check, quantity, value, None if tolerance is None else tolerance * self.scale, passed))

    def fail(self, check: str, error: BaseException) -> None:
        say(f"  FAILED: {type(error).__name__}: {error}")
        self.rows.append((check, f"{type(error).__name__}: {error}"[:100], None, None, False))

    @property
    def passed(self) -> bool:
        return all(row[-1] for row in self.rows)

    def table(self) -> str:
        return format_table([(c, q, "-" if v is None else f"{v:.2e}", "-" if t is None else f"{t:.1e}",
                               "ok" if p else "FAIL") for c, q, v, t, p in self.rows],
                            ("check", "quantity", "value", "tolerance", "result"))

    def summary(self) -> str:
        failed = sum(not row[-1] for row in self.rows)
        return f"{failed} of {len(self.rows)} checks FAILED" if failed else f"all {len(self.rows)} checks passed"


def case_inputs(B, T, Hk, H, D, dtype, with_h0, documents, seed):
    """Random inputs as the model makes them (q, k l2-normalised; gates from none to strong decay; in
    bf16 q, k, v and beta are bf16, gates and states float32), and the output gradients."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, Hk, D, generator=gen), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, Hk, D, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, generator=gen).to(dtype)
    g = -torch.rand(B, T, H, generator=gen) * 4
    beta = torch.rand(B, T, H, generator=gen).to(dtype)
    h0 = torch.randn(B, H, D, D, generator=gen) * 0.1 if with_h0 else None
    starts = None
    if documents:  # a few documents per row; row 1 opens on a start, row 0 has one at its last position
        starts = torch.rand(B, T, generator=gen) < 0.01
        starts[-1, 0] = starts[0, -1] = True
    d_o, d_s = torch.randn(B, T, H, D, generator=gen).to(dtype), torch.randn(B, H, D, D, generator=gen)
    return [q, k, v, g, beta, h0], starts, d_o, d_s


def run_kernel(kernel: str, inputs, starts, d_o, d_s, device, dtype=None):
    """Outputs, final state and the gradients of every input (None for an absent initial state)."""
    leaves = [None if x is None else x.to(device, dtype or x.dtype, copy=True).requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = leaves
    starts = None if starts is None else starts.to(device)
    o, s = gated_delta_rule(kernel, q, k, v, g, beta, q.shape[-1] ** -0.5, h0, True, starts)
    torch.autograd.backward([o, s], [d_o.to(device, o.dtype), d_s.to(device, s.dtype)])
    return [o.detach(), s.detach()] + [None if x is None else x.grad for x in leaves]


def kernel_agreement(judge: Judge, kernel: str, cases: dict, device: torch.device) -> None:
    labels = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0")
    for i, (name, (B, T, Hk, H, D, dtype, with_h0, documents)) in enumerate(cases.items()):
        say(f"[{i + 1}/{len(cases)}] {kernel} against the float64 recurrence: {name} (B={B} T={T} Hk={Hk} "
            f"H={H} K=V={D} {str(dtype).removeprefix('torch.')}{', packed documents' if documents else ''})"
            f"{'; the first call of a new shape autotunes Triton kernels' if kernel == 'fla' else ''}...")
        try:
            inputs, starts, d_o, d_s = case_inputs(B, T, Hk, H, D, dtype, with_h0, documents, seed=i)
            ours = run_kernel(kernel, inputs, starts, d_o, d_s, device)
            ref = run_kernel("recurrent", inputs, starts, d_o, d_s, device, torch.float64)
            factor = BF16_FACTOR if dtype == torch.bfloat16 else 1
            first = len(judge.rows)
            for label, a, b in zip(labels, ours, ref):
                if b is not None:
                    judge.compare(name, label, b, a, TOLERANCES[label] * factor)
            worst = max(judge.rows[first:], key=lambda r: r[2] / max(r[3], 1e-30))
            say(f"  closest to its tolerance: {worst[1]} {worst[2]:.2e} (tolerance {worst[3]:.1e})"
                f"{'' if all(r[-1] for r in judge.rows[first:]) else '; FAILED'}")
        except Exception as e:  # noqa: BLE001  (one broken case must not hide the others)
            judge.fail(name, e)


def model_config(name: str, cuda: bool) -> Config:
    """The preset on CUDA; on the CPU, tiny_5m narrowed so that the script's own test stays quick."""
    if cuda:
        return preset(name)
    return preset("tiny_5m", vocab_size=512, hidden_size=64, intermediate_size=192, head_dim=32,
                  linear_key_head_dim=32, linear_value_head_dim=32)


def train_losses(config: Config, kernel: str, device, batch: int, seq: int, steps: int, bf16: bool,
                 documents: bool) -> list[float]:
    """Losses of `steps` AdamW steps from seed-0 weights on seeded random batches."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config).to(device)
    model.set_kernel(kernel, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=gen).to(device)
        starts = (torch.rand(batch, seq, generator=gen) < 0.02).to(device) if documents else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x[:, :-1], x[:, 1:], doc_starts=starts).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def end_to_end(judge: Judge, kernel: str, reference: str, device, cuda: bool) -> dict:
    name, batch, seq, steps = ("tiny_10m", 8, 512, 5) if cuda else ("tiny_5m narrowed", 2, 48, 3)
    config = model_config(name, cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    out = {}
    for documents in (False, True):
        check = f"{name} {kernel} vs {reference}{' (documents)' if documents else ''}"
        say(f"end to end: {check}, {steps} AdamW steps of {batch} x {seq}, "
            f"{'bf16 autocast' if cuda else 'float32'}...")
        try:
            ours, ref = (train_losses(config, k, device, batch, seq, steps, cuda, documents)
                         for k in (kernel, reference))
            worst = max(abs(a - b) / abs(b) for a, b in zip(ours, ref))
            judge.record(check, "loss, relative", worst, LOSS_TOLERANCE[dtype],
                         all(map(math.isfinite, ours)) and worst < LOSS_TOLERANCE[dtype] * judge.scale)
            say(f"  losses {', '.join(f'{a:.4f}' for a in ours)} against {', '.join(f'{b:.4f}' for b in ref)}")
            out[check] = {"losses": ours, "reference_losses": ref, "max_relative_difference": worst}
        except Exception as e:  # noqa: BLE001
            judge.fail(check, e)
    return out


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


def training_speed(config: Config, kernel: str, device: torch.device, batch: int, seq: int, steps: int,
                   bf16: bool) -> dict:
    """Median tokens/s of full training steps (forward, backward, AdamW), after 3 warm-up steps."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config).to(device)
    model.set_kernel(kernel, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    times = []
    for i in range(steps + 3):
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 3:  # warm-up: Triton autotuning, the allocator
            times.append(time.perf_counter() - t)
    return {"tokens_per_s": batch * seq / statistics.median(times),
            "flops_per_token": training_flops_per_token(model, seq), "loss": loss.item()}


def speed(judge: Judge, kernel: str, device, cuda: bool, args) -> dict:
    name, batch, seq, steps = ("small_50m", args.batch_size, args.seq_len, args.steps) if cuda else \
        ("tiny_5m narrowed", 2, 64, 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak(device, dtype, 8192 if cuda else 512)
    out = {"matmul_peak_flops": peak}
    for k in dict.fromkeys((kernel, "chunk")):
        say(f"speed: {name} training, {'bf16 autocast' if cuda else 'float32'}, kernel {k}, batch {batch} x {seq}...")
        try:
            r = training_speed(model_config(name, cuda), k, device, batch, seq, steps, bf16=cuda)
        except Exception as e:  # noqa: BLE001
            judge.fail(f"speed {name} {k}", e)
            continue
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
        out[f"{name}_{k}"] = r
        say(f"  {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% of the measured "
            f"{peak / 1e12:.1f} TFLOP/s {str(dtype).removeprefix('torch.')} matmul peak")
    return out


def choose_kernel(requested: str, cuda: bool) -> str:
    if not cuda:
        return "chunk"
    problem = fla_problem()
    if requested == "fla" and problem:
        raise SystemExit(f"error: --kernel fla: {problem}")
    if requested == "auto" and problem:
        say(f"warning: not checking fla: {problem}; checking the chunk kernel instead")
    return "chunk" if requested == "chunk" or problem else "fla"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--kernel", choices=("auto", "fla", "chunk"), default="auto",
                   help="the kernel judged on CUDA (auto: fla when it can run there, else chunk; fla: required)")
    p.add_argument("--steps", type=int, default=10, help="timed small_50m training steps per kernel")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiply every tolerance (below 1: see the margins; 0 fails every inexact figure)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    kernel = choose_kernel(args.kernel, cuda)
    fla_version = getattr(sys.modules.get("fla"), "__version__", None)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "fla": fla_version, "kernel": kernel}
    say(f"device: {report['device']}, torch {torch.__version__}, fla {fla_version or '-'}: judging {kernel}")
    judge = Judge(args.tolerance_scale)
    kernel_agreement(judge, kernel, CUDA_CASES if cuda else CPU_CASES, device)
    report["end_to_end"] = end_to_end(judge, kernel, "chunk" if kernel == "fla" else "recurrent", device, cuda)
    report["training"] = speed(judge, kernel, device, cuda, args)
    report["checks"] = [dict(zip(("check", "quantity", "value", "tolerance", "passed"), r)) for r in judge.rows]
    report["passed"], report["seconds"] = judge.passed, time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    say(f"\n{judge.table()}\n\n{judge.summary()} in {report['seconds']:.0f} s; wrote {args.out}")
    return 0 if judge.passed else 1


if __name__ == "__main__":
    sys.exit(main())
