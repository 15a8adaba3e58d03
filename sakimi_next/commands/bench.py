"""`--mode bench` (and `make bench`): the speed figures of bench.py as a table, bench.json and bench.png."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import preset
from ..settings import INFERENCE_DTYPES, QUANTIZE
from ..util import UserError, atomic_write_text, format_table, new_figure, save_png
from . import common

HELP = "speed figures (training, prefill, decoding, memory, MFU), optionally against transformers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_preset(p, "model preset to measure (default tiny_10m)")
    common.add_device(p, kernel=False)
    common.add_seed(p, "seed of the random weights")
    p.add_argument("--out-dir", default=None, help="where bench.json and bench.png go (default: here)")
    p.add_argument("--compare", choices=("transformers",), default=None,
                   help="also measure transformers' Qwen3NextForCausalLM on the same weights")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    p.add_argument("--compile", action="store_true", help="add the --compile figures (minutes of compiling)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="int8: add the decoding figures of the int8 model (see --mode generate --quantize)")
    p.add_argument("--dtype", default="fp32", choices=INFERENCE_DTYPES,
                   help="bf16: add the decoding figures in bfloat16 (where the CPU has it; see --mode generate)")


@dataclass(frozen=True)
class BenchSettings:
    preset: str
    kernel: str
    seed: int
    out_json: Path
    compare: str | None
    quick: bool
    compile: bool
    quantize: str = "none"
    dtype: str = "fp32"


def settings(args: argparse.Namespace) -> BenchSettings:
    if args.device not in ("auto", "cpu"):
        raise UserError("--mode bench measures the CPU figures; use --device cpu (or auto)")
    if args.compare and importlib.util.find_spec("transformers") is None:
        raise UserError("--compare transformers needs the transformers package (pip install transformers)")
    out_dir = common.writable_dir("--out-dir", args.out_dir or ".")
    return BenchSettings(preset=common.preset_name(args.config), kernel=common.kernel_name(args),
                         seed=common.seed(args.seed) or 0, out_json=out_dir / "bench.json", compare=args.compare,
                         quick=args.quick, compile=args.compile, quantize=args.quantize,
                         dtype=args.dtype)


class Figures:
    """The measured figures: printed as they come, then a table and bench.json."""

    def __init__(self, results: dict):
        self.results, self.rows = results, []

    def add(self, key, label, ours, theirs=None, unit="tokens/s", target=None, note=""):
        ratio = (ours / theirs if unit == "tokens/s" else theirs / ours) if theirs else None
        self.results["figures"][key] = {"label": label, "ours": ours, "transformers": theirs, "unit": unit,
                                        "ratio": ratio, "target": target, "note": note}
        fmt = (lambda v: f"{v:,.0f}") if unit == "tokens/s" else (lambda v: f"{v:.3g}")
        self.rows.append((label, fmt(ours) + f" {unit}", fmt(theirs) if theirs else "-",
                          f"{ratio:.2f}x" if ratio else "-", target or "", note))
        print(f"  {label}: {fmt(ours)} {unit}" + (f" vs {fmt(theirs)} ({ratio:.2f}x)" if ratio else ""), flush=True)


def _training(s: BenchSettings, model, hf, figs: Figures) -> float:
    """Training steps at 8 x 128 and 1 x 2048 (and compiled); returns the seconds of an 8 x 128 step."""
    import torch

    from .. import bench
    from ..distributed import compile_layers
    from ..optim import build_optimizer

    repeats = 3 if s.quick else 5
    step_seconds = None
    for B, T, target in ((8, 128, ">= 2.0x"), (1, 2048, ">= 2.0x")):
        x = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(B))
        ours = bench.training_step(model, build_optimizer(model, 1e-4, 0.0, (0.9, 0.95)), x, hf=False)
        theirs = None
        if hf is not None:
            hf.train()
            hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
            theirs = bench.training_step(hf, hopt, x, hf=True)
        a, b = bench.interleaved(ours, theirs, repeats=repeats, warmup=3)  # the first figure: fresh pages too
        figs.add(f"train_{B}x{T}", f"training step {B} x {T}", B * T / a, B * T / b if b else None, target=target)
        if (B, T) == (8, 128):
            step_seconds = a
            if s.compile:  # as `--mode train --compile` does it, on a copy (later figures are eager)
                t0 = time.perf_counter()
                twin = copy.deepcopy(model)
                compile_layers(twin)
                fast = bench.training_step(twin, build_optimizer(twin, 1e-4, 0.0, (0.9, 0.95)), x, hf=False)
                fast()
                note = f"torch.compile took {time.perf_counter() - t0:.0f} s; transformers not compiled"
                a, b = bench.interleaved(fast, theirs, repeats=repeats)
                figs.add(f"train_{B}x{T}_compiled", f"training step {B} x {T}, --compile", B * T / a,
                         B * T / b if b else None, note=note)
        if hf is not None:
            hf.eval()
    return step_seconds


def _decoding(s: BenchSettings, model, hf, figs: Figures) -> None:
    from .. import bench

    new_tokens = 64 if s.quick else 256
    target = ">= 1,000 tok/s and >= 20x"
    ours_tps, theirs_tps = bench.decode_tokens_per_s(model, 32, new_tokens, hf)
    figs.add("decode_256", f"greedy decode, {new_tokens} tokens after 32", ours_tps, theirs_tps, target=target)
    if s.compile:
        ours_tps, theirs_tps, note = _compiled_decoding(model, hf, new_tokens)
        figs.add("decode_256_compiled", f"greedy decode, {new_tokens} tokens after 32, --compile", ours_tps,
                 theirs_tps, target=target, note=note)
    lowered = _lowered(model, s)
    if lowered is not None:
        label = ", ".join([f"--dtype {s.dtype}"] * (s.dtype != "fp32")
                          + [f"--quantize {s.quantize}"] * (s.quantize != "none"))
        figs.add("decode_256_lowered", f"greedy decode, {new_tokens} tokens after 32, {label}",
                 bench.decode_tokens_per_s(lowered, 32, new_tokens)[0])
        if s.compile:
            ours_tps, _, note = _compiled_decoding(lowered, None, new_tokens)
            figs.add("decode_256_lowered_compiled", f"greedy decode, {new_tokens} tokens after 32, {label}, --compile",
                     ours_tps, note=note)
    if not model.config.num_experts:  # an MoE step's products depend on its routing
        floor = bench.decode_matmul_floor(model)
        figs.add("decode_matmul_floor", "decode: its matrix-vector products alone", 1 / floor,
                 note=f"{floor * 1e3:.2f} ms per token: the ceiling of fp32 decoding here")
    long_context = 2048 if s.quick else 8192
    lat_short, lat_long = bench.decode_latency(model, 256), bench.decode_latency(model, long_context)
    figs.add("decode_latency_ratio", f"decode latency at context {long_context} / at 256", lat_long / lat_short,
             unit="x", target="<= 1.5x", note=f"{lat_short * 1e3:.2f} ms vs {lat_long * 1e3:.2f} ms per token")


def _lowered(model, s: BenchSettings):
    """A copy of the model in the precision --dtype / --quantize ask for (None: float32 asked)."""
    import torch

    from ..quantize import quantize_int8, resolve_dtype

    dtype, note = resolve_dtype(s.dtype, model.device)
    if note:
        print(note)
    if dtype == "fp32" and s.quantize == "none":
        return None
    twin = copy.deepcopy(model)
    if s.quantize == "int8":
        quantize_int8(twin)
    return twin.to(torch.bfloat16 if dtype == "bf16" else torch.float32)


def _compiled_decoding(model, hf, new_tokens: int) -> tuple[float, float | None, str]:
    """Our tokens/s through the compiled step (and transformers' eager, when given), with a note on what
    making the step cost."""
    from .. import bench
    from ..decoder import CompiledDecoder

    decode = CompiledDecoder(model)
    decode.program(1)
    note = (f"compiled in {decode.compile_seconds:.0f} s (kept on disk)" if decode.compiled
            else f"program loaded from disk in {decode.load_seconds:.2f} s")
    ours, theirs = bench.decode_tokens_per_s(model, 32, new_tokens, hf, decode)
    return ours, theirs, note + ("; transformers not compiled" if hf is not None else "")


def _prefill(s: BenchSettings, model, hf, figs: Figures) -> float:
    """Forward 1 x 2048; returns our seconds."""
    import torch

    from .. import bench

    x = torch.randint(0, model.config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(3))
    a, b = bench.interleaved(bench.forward_only(model, x), bench.forward_only(hf, x) if hf is not None else None,
                             repeats=3 if s.quick else 5)
    figs.add("forward_1x2048", "prefill / forward 1 x 2048", 2048 / a, 2048 / b if b else None, target=">= 2.0x")
    return a


def _long_forward(s: BenchSettings, model, t2048: float, figs: Figures) -> None:
    """A long forward: peak memory (in a fresh process) and time against T=2048."""
    import torch

    from .. import bench

    long_T = 4096 if s.quick else 16384
    mem = bench.forward_peak_memory(s.preset, long_T)
    label = f"forward 1 x {long_T}: peak memory"
    if "error" in mem:
        figs.add("forward_long_memory", label, float("nan"), unit="GB", note=mem["error"])
        return
    figs.add("forward_long_memory", label, mem["peak_mb"] / 1024, unit="GB", target="<= 2 GB",
             note=f"whole process (torch, model, activations); before the forward {mem['model_mb'] / 1024:.2f} GB")
    x = torch.randint(0, model.config.vocab_size, (1, long_T))
    t_long = statistics.median(bench.timed(bench.forward_only(model, x), repeats=3, warmup=1))
    figs.add("forward_scaling", f"forward time T={long_T} / T=2048", t_long / t2048, unit="x",
             target="<= 10x" if long_T == 16384 else "", note=f"{t_long:.2f} s vs {t2048:.2f} s")


def _utilisation(s: BenchSettings, model, step_seconds: float, figs: Figures) -> dict[str, float]:
    """MFU, small_50m's training step, and where the time of a step goes (by part)."""
    import torch

    from .. import bench
    from ..model import Qwen3NextForCausalLM
    from ..optim import build_optimizer

    peak = bench.matmul_peak()
    mfu = bench.training_flops_per_token(model, 128) * 8 * 128 / step_seconds / peak
    figs.add("mfu", "MFU of the 8 x 128 training step", mfu * 100, unit="%",
             target="aim >= 60%", note=f"vs measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    if not s.quick and s.preset != "small_50m":
        big = Qwen3NextForCausalLM(preset("small_50m"))
        xb = torch.randint(0, 50304, (4, 257), generator=torch.Generator().manual_seed(5))
        step = bench.training_step(big, build_optimizer(big, 1e-4, 0.0, (0.9, 0.95)), xb, hf=False)
        t_big = statistics.median(bench.timed(step, repeats=3, warmup=1))
        figs.add("train_small_50m", "small_50m training step 4 x 256", 4 * 256 / t_big)
        del big, step
    opt = build_optimizer(model, 1e-4, 0.0, (0.9, 0.95))
    return bench.time_breakdown(model, opt, torch.randint(0, model.config.vocab_size, (8, 129),
                                                          generator=torch.Generator().manual_seed(8)))


def run(s: BenchSettings) -> int:
    import torch

    from ..model import Qwen3NextForCausalLM

    torch.set_flush_denormal(True)  # both implementations run with it (see cli.main)
    torch.manual_seed(s.seed)
    model = Qwen3NextForCausalLM(preset(s.preset))
    model.set_kernel(s.kernel, "cpu")
    hf = None
    if s.compare:
        from ..huggingface import to_transformers

        hf = to_transformers(model)
    threads = torch.get_num_threads()
    print(f"sakimi-next bench: {s.preset}, float32, CPU, {threads} threads, torch {torch.__version__}"
          + (f", against transformers {__import__('transformers').__version__}" if hf else ""), flush=True)
    figs = Figures({"preset": s.preset, "threads": threads, "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine(), "figures": {}})
    step_seconds = _training(s, model, hf, figs)
    t2048 = _prefill(s, model, hf, figs)
    _decoding(s, model, hf, figs)
    _long_forward(s, model, t2048, figs)
    split = _utilisation(s, model, step_seconds, figs)
    figs.results["time_split_8x128"] = dict(split)

    total = sum(split.values())
    print()
    print(format_table(figs.rows, ("figure", "sakimi-next", "transformers", "ratio", "target", "note")))
    print("\ntime of one 8 x 128 training step by part (PyTorch profiler, backward charged to its forward):")
    print(format_table([(k, f"{v * 1e3:.0f} ms", f"{100 * v / total:.0f}%") for k, v in split.items()]))
    atomic_write_text(s.out_json, json.dumps(figs.results, indent=1) + "\n")
    plot(figs.results, s.out_json.with_suffix(".png"))
    print(f"\nwrote {s.out_json} and {s.out_json.with_suffix('.png')}")
    return 0


def plot(results: dict, path: Path) -> None:
    """Our tokens/s against transformers' (log scale), and the time of a training step by part."""
    figs = [(f["label"], f["ours"], f["transformers"]) for f in results["figures"].values()
            if f["unit"] == "tokens/s" and f["transformers"]]
    split = results.get("time_split_8x128", {})
    fig, axes = new_figure(ncols=2, figsize=(13, 4.5))
    if figs:
        labels, ours, theirs = zip(*figs)
        ys = range(len(labels))
        axes[0].barh([y + 0.2 for y in ys], ours, height=0.4, label="sakimi-next", color="tab:orange")
        axes[0].barh([y - 0.2 for y in ys], theirs, height=0.4, label="transformers", color="tab:gray")
        axes[0].set_yticks(list(ys), labels)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("tokens/s (log scale)")
        axes[0].legend()
        axes[0].set_title(f"{results['preset']}, fp32, {results['threads']} CPU threads")
    if split:
        labels = [k if v / sum(split.values()) > 0.02 else "" for k, v in split.items()]
        axes[1].pie(list(split.values()), labels=labels, autopct=lambda p: f"{p:.0f}%" if p > 2 else "")
        axes[1].set_title("training step 8 x 128: time by part")
    save_png(fig, path, bbox_inches="tight")  # keep the pie's outer labels
