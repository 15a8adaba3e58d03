"""`--mode bench` (and `make bench`): speed figures for this project, and for transformers' own
Qwen3NextForCausalLM (its pure-PyTorch path) on identical weights when `--compare transformers`.

Every compared figure is measured in the same process, interleaved (ours, theirs, ours, theirs, ...),
as the median of >= 5 repeats after warm-up. Writes a table to stdout, `bench.json` and `bench.png`.
No figure is asserted anywhere: speed lives here, correctness in the tests.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import preset
from .model import Qwen3NextForCausalLM, active_parameters
from .train import build_optimizer, compile_layers
from .util import UserError, atomic_write_bytes, atomic_write_text, format_table


def timed(fn, repeats: int = 5, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(ours, theirs, repeats: int = 5, warmup: int = 1) -> tuple[float, float | None]:
    """Median seconds of `ours` and `theirs` (None: not compared), alternating A B A B ..."""
    for _ in range(warmup):
        ours()
        if theirs:
            theirs()
    a, b = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t)
        if theirs:
            t = time.perf_counter()
            theirs()
            b.append(time.perf_counter() - t)
    return statistics.median(a), (statistics.median(b) if b else None)


def training_step(model, optimizer, x: torch.Tensor, hf: bool):
    """forward + backward + AdamW step on x [B, T+1] (transformers shifts its labels itself)."""
    def step():
        if hf:
            loss = model(x[:, :-1], labels=x[:, :-1]).loss
        else:
            loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def forward_only(model, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            model(x)
    return run


def matmul_peak(n: int = 2048) -> float:
    """Measured float32 matmul throughput of this machine (FLOP/s), the denominator of MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = statistics.median(timed(lambda: a @ b, repeats=5))
    return 2 * n**3 / t


def training_flops_per_token(model: Qwen3NextForCausalLM, T: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward): 2 per weight in a matmul
    (every active parameter but the embedding lookup: an MoE token meets k of the E routed experts; a
    tied LM head counts once), causal attention
    (QKᵀ and PV over T/2 keys on average) and the gated delta rule's recurrence per value head
    (decay, Sᵀk, the rank-1 update and Sᵀq: ~7 dk dv)."""
    c = model.config
    matmul_params = active_parameters(c) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    n_attn = c.layer_types.count("full_attention")
    n_lin = c.num_hidden_layers - n_attn
    fwd = 2 * matmul_params
    fwd += n_attn * 2 * 2 * (T / 2) * c.num_attention_heads * c.head_dim
    fwd += n_lin * 7 * c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
    return 3 * fwd


# ---------------------------------------------------------------------------------- time breakdown
PARTS = ("projections and gates (DeltaNet)", "delta rule kernel", "causal conv", "attention layer", "MLP",
         "norms", "LM head and loss", "optimizer", "other")


@contextmanager
def _scopes(model: Qwen3NextForCausalLM):
    """Label what runs inside each part of the model with profiler scopes: module hooks, plus the two
    kernel functions wrapped in place. Restores everything afterwards."""
    from torch.autograd.profiler import record_function

    from . import model as model_module
    from .model import MLP, GatedAttention, GatedDeltaNet, RMSNorm
    from .moe import SparseMoeBlock

    stack, handles = [], []

    def enter(label):
        def pre(mod, args):
            ctx = record_function(label)
            ctx.__enter__()
            stack.append(ctx)
        return pre

    def leave(mod, args, out):
        stack.pop().__exit__(None, None, None)

    labels = {GatedDeltaNet: PARTS[0], GatedAttention: PARTS[3], MLP: PARTS[4], SparseMoeBlock: PARTS[4],
              RMSNorm: PARTS[5]}
    for m in model.modules():
        for cls, label in labels.items():
            if isinstance(m, cls) and m is not model.model.norm:
                handles += [m.register_forward_pre_hook(enter(label)), m.register_forward_hook(leave)]
    # everything after the final norm is the LM head and the loss
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: enter(PARTS[6])(m, a)))
    handles.append(model.register_forward_hook(leave))

    originals = {name: getattr(model_module, name) for name in ("gated_delta_rule", "causal_conv1d")}

    def wrap(fn, label):
        def inner(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return inner

    model_module.gated_delta_rule = wrap(originals["gated_delta_rule"], PARTS[1])
    model_module.causal_conv1d = wrap(originals["causal_conv1d"], PARTS[2])
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for name, fn in originals.items():
            setattr(model_module, name, fn)


def time_breakdown(model: Qwen3NextForCausalLM, optimizer, x: torch.Tensor) -> dict[str, float]:
    """Seconds of one training step by part, from the PyTorch profiler. Backward work is charged to the
    part whose forward created it (autograd sequence numbers link the two)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    step = training_step(model, optimizer, x, hf=False)
    step()
    with _scopes(model):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = model(x[:, :-1], x[:, 1:]).loss
            loss.backward()
            with record_function(PARTS[7]):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    events = prof.events()

    def scope_of(e):
        while e is not None:
            if e.name in PARTS:
                return e.name
            e = e.cpu_parent
        return None

    by_seq = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            by_seq.setdefault(e.sequence_nr, scope_of(e))
    totals = dict.fromkeys(PARTS, 0.0)
    for e in events:
        if e.name in PARTS or e.name.startswith("autograd::engine") or e.name.startswith("ProfilerStep"):
            continue
        part, p = None, e
        while p is not None and part is None:
            if p.name in PARTS:
                part = p.name
            elif p.name.startswith("autograd::engine::evaluate_function"):
                part = by_seq.get(p.sequence_nr)
                break
            p = p.cpu_parent
        totals[part or PARTS[-1]] += e.self_cpu_time_total / 1e6
    return totals


# ---------------------------------------------------------------------------------------- decoding
def decode_tokens_per_s(model, prompt_len: int, new_tokens: int, hf=None, decode=None) -> tuple[float, float | None]:
    """Greedy decoding of `new_tokens` after a random prompt, ours (with `decode`: a compiled decoder)
    and transformers' `generate`."""
    from .generate import decode_one_token, generate

    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    def ours():
        with torch.inference_mode():
            generate(model, prompt.tolist(), new_tokens, decode=decode or decode_one_token)

    theirs = None
    if hf is not None:
        def theirs():
            with torch.inference_mode():
                hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    a, b = interleaved(ours, theirs, repeats=5, warmup=1)
    return new_tokens / a, (new_tokens / b if b else None)


@torch.inference_mode()
def decode_weights(model) -> list[torch.Tensor]:
    """The matrices one decoding step of a dense model multiplies by, as the step holds them: the fused
    inference weights (q/k/v, DeltaNet in-projections, gate/up), the output projections, the LM head."""
    model.decode_step(torch.zeros(1, dtype=torch.long), model.new_cache(1, capacity=1))  # builds them
    weights = [v[1] for m in model.model.layers.modules() for k, v in m.__dict__.items()
               if k in ("_proj", "_qkv", "_gate_up")]
    weights += [m.weight for name, m in model.model.layers.named_modules()
                if name.endswith(("out_proj", "o_proj", "down_proj"))]
    return weights + [model.lm_head_weight]


@torch.inference_mode()
def decode_matmul_floor(model) -> float:
    """Seconds per token of a decoding step's matrix-vector products alone (`decode_weights`, one after
    another, as decoding streams them): the floor under any fp32 decoder here."""
    import torch.nn.functional as F

    weights = decode_weights(model)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    return statistics.median(timed(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], repeats=50, warmup=5))


@torch.inference_mode()
def decode_latency(model, context: int, steps: int = 64) -> float:
    """Seconds per decoded token after a prefill of `context` tokens (median over `steps`)."""
    cache = model.new_cache(1, capacity=context + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    for start in range(0, context, 2048):  # prefill in pieces, like eval's carried windows
        model(ids[:, start:start + 2048], cache=cache, logits_to_keep=1)
    token = torch.tensor([1])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        token = model.decode_step(token, cache).argmax(-1)
        times.append(time.perf_counter() - t)
    return statistics.median(times[8:])


def forward_peak_memory(preset_name: str, T: int) -> dict:
    """Peak resident memory of a fresh process that runs one forward of batch 1 x T (inference)."""
    # VmHWM, not ru_maxrss: the latter keeps the peak of the (large) parent from before exec
    code = (
        "import torch, json, time\n"
        "torch.set_flush_denormal(True)\n"
        "from sakimi_next.config import preset\n"
        "from sakimi_next.model import Qwen3NextForCausalLM\n"
        "def hwm():\n"
        "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "    return int(line.split()[1]) / 1024\n"
        f"m = Qwen3NextForCausalLM(preset({preset_name!r})).eval()\n"
        "base = hwm()\n"
        f"x = torch.randint(0, m.config.vocab_size, (1, {T}))\n"
        "t = time.perf_counter()\n"
        "with torch.inference_mode():\n"
        "    m(x)\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps({'peak_mb': hwm(), 'model_mb': base, 'seconds': dt}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------- main
def run_bench(args) -> int:
    torch.set_flush_denormal(True)  # both implementations run with it (see cli.main)
    name = args.config or "tiny_10m"
    compare = getattr(args, "compare", None)
    if compare not in (None, "transformers"):
        raise UserError(f"--compare {compare!r}: only 'transformers' can be compared")
    if compare:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("--compare transformers needs the transformers package (pip install transformers)") from None
    if args.device not in ("auto", "cpu"):
        raise UserError("--mode bench measures the CPU figures; use --device cpu (or auto)")
    quick = bool(getattr(args, "quick", False))
    compiled = bool(getattr(args, "compile", False))  # add the --compile figures (minutes of compiling)
    out_json = Path(args.out_dir or ".") / "bench.json"
    torch.manual_seed(args.seed)
    model = Qwen3NextForCausalLM(preset(name))
    model.set_kernel("recurrent" if args.disable_fast_kernels else "chunk", "cpu")
    hf = None
    if compare:
        from .interop import to_transformers

        hf = to_transformers(model)
    threads = torch.get_num_threads()
    print(f"sakimi-next bench: {name}, float32, CPU, {threads} threads, torch {torch.__version__}"
          + (f", against transformers {__import__('transformers').__version__}" if hf else ""), flush=True)
    rows, results = [], {"preset": name, "threads": threads, "torch": torch.__version__,
                         "machine": platform.processor() or platform.machine(), "figures": {}}

    def record(key, label, ours, theirs=None, unit="tokens/s", target=None, note=""):
        ratio = (ours / theirs if unit == "tokens/s" else theirs / ours) if theirs else None
        results["figures"][key] = {"label": label, "ours": ours, "transformers": theirs, "unit": unit,
                                   "ratio": ratio, "target": target, "note": note}
        fmt = (lambda v: f"{v:,.0f}") if unit == "tokens/s" else (lambda v: f"{v:.3g}")
        rows.append((label, fmt(ours) + f" {unit}", fmt(theirs) if theirs else "-",
                     f"{ratio:.2f}x" if ratio else "-", target or "", note))
        print(f"  {label}: {fmt(ours)} {unit}" + (f" vs {fmt(theirs)} ({ratio:.2f}x)" if ratio else ""), flush=True)

    repeats = 3 if quick else 5
    # --- training steps
    for B, T, target in ((8, 128, ">= 2.0x"), (1, 2048, ">= 2.0x")):
        x = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(B))
        opt = build_optimizer(model, 1e-4, 0.0, (0.9, 0.95))
        ours = training_step(model, opt, x, hf=False)
        theirs = None
        if hf is not None:
            hf.train()
            hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                                     fused=True)
            theirs = training_step(hf, hopt, x, hf=True)
        a, b = interleaved(ours, theirs, repeats=repeats, warmup=3)  # the first figure: fresh pages too
        record(f"train_{B}x{T}", f"training step {B} x {T}", B * T / a, B * T / b if b else None, target=target)
        if (B, T) == (8, 128):
            step_seconds = a
            if compiled:  # as `--mode train --compile` does it, on a copy (later figures are eager)
                t0 = time.perf_counter()
                twin = copy.deepcopy(model)
                compile_layers(twin)
                fast = training_step(twin, build_optimizer(twin, 1e-4, 0.0, (0.9, 0.95)), x, hf=False)
                fast()
                note = f"torch.compile took {time.perf_counter() - t0:.0f} s; transformers not compiled"
                a, b = interleaved(fast, theirs, repeats=repeats)
                record(f"train_{B}x{T}_compiled", f"training step {B} x {T}, --compile", B * T / a,
                       B * T / b if b else None, note=note)
        if hf is not None:
            hf.eval()
    # --- prefill / forward
    x = torch.randint(0, model.config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(3))
    a, b = interleaved(forward_only(model, x), forward_only(hf, x) if hf is not None else None, repeats=repeats)
    record("forward_1x2048", "prefill / forward 1 x 2048", 2048 / a, 2048 / b if b else None, target=">= 2.0x")
    t2048 = a
    # --- decoding
    new_tokens = 64 if quick else 256
    ours_tps, theirs_tps = decode_tokens_per_s(model, 32, new_tokens, hf)
    record("decode_256", f"greedy decode, {new_tokens} tokens after 32", ours_tps, theirs_tps,
           target=">= 1,000 tok/s and >= 20x")
    if compiled:
        from .generate import compiled_decoder

        t0 = time.perf_counter()
        decode = compiled_decoder(model)
        decode_tokens_per_s(model, 32, 2, decode=decode)  # compiles here
        note = f"torch.compile took {time.perf_counter() - t0:.0f} s; transformers not compiled"
        ours_tps, theirs_tps = decode_tokens_per_s(model, 32, new_tokens, hf, decode)
        record("decode_256_compiled", f"greedy decode, {new_tokens} tokens after 32, --compile", ours_tps,
               theirs_tps, target=">= 1,000 tok/s and >= 20x", note=note)
    if not model.config.num_experts:  # an MoE step's products depend on its routing
        floor = decode_matmul_floor(model)
        record("decode_matmul_floor", "decode: its matrix-vector products alone", 1 / floor,
               note=f"{floor * 1e3:.2f} ms per token: the ceiling of fp32 decoding here")
    lat_short, lat_long = decode_latency(model, 256), decode_latency(model, 2048 if quick else 8192)
    record("decode_latency_ratio", f"decode latency at context {2048 if quick else 8192} / at 256",
           lat_long / lat_short, unit="x", target="<= 1.5x",
           note=f"{lat_short * 1e3:.2f} ms vs {lat_long * 1e3:.2f} ms per token")
    # --- long context forward
    long_T = 4096 if quick else 16384
    mem = forward_peak_memory(name, long_T)
    if "error" in mem:
        record("forward_long_memory", f"forward 1 x {long_T}: peak memory", float("nan"), unit="GB",
               note=mem["error"])
    else:
        record("forward_long_memory", f"forward 1 x {long_T}: peak memory", mem["peak_mb"] / 1024, unit="GB",
               target="<= 2 GB", note=f"whole process (torch, model, activations); before the forward {mem['model_mb'] / 1024:.2f} GB")
        t_long = statistics.median(timed(forward_only(model, torch.randint(0, model.config.vocab_size, (1, long_T))),
                                         repeats=3, warmup=1))
        record("forward_scaling", f"forward time T={long_T} / T=2048", t_long / t2048, unit="x",
               target="<= 10x" if long_T == 16384 else "", note=f"{t_long:.2f} s vs {t2048:.2f} s")
    # --- model FLOPs utilisation
    peak = matmul_peak()
    mfu = training_flops_per_token(model, 128) * 8 * 128 / step_seconds / peak
    record("mfu", "MFU of the 8 x 128 training step", mfu * 100, unit="%",
           target="aim >= 60%", note=f"vs measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    # --- small_50m
    if not quick and name != "small_50m":
        big = Qwen3NextForCausalLM(preset("small_50m"))
        xb = torch.randint(0, 50304, (4, 257), generator=torch.Generator().manual_seed(5))
        ob = build_optimizer(big, 1e-4, 0.0, (0.9, 0.95))
        t_big = statistics.median(timed(training_step(big, ob, xb, hf=False), repeats=3, warmup=1))
        record("train_small_50m", "small_50m training step 4 x 256", 4 * 256 / t_big)
        del big, ob
    # --- where the time goes
    opt = build_optimizer(model, 1e-4, 0.0, (0.9, 0.95))
    split = time_breakdown(model, opt, torch.randint(0, model.config.vocab_size, (8, 129),
                                                     generator=torch.Generator().manual_seed(8)))
    total = sum(split.values())
    results["time_split_8x128"] = {k: v for k, v in split.items()}

    print()
    print(format_table(rows, ("figure", "sakimi-next", "transformers", "ratio", "target", "note")))
    print("\ntime of one 8 x 128 training step by part (PyTorch profiler, backward charged to its forward):")
    print(format_table([(k, f"{v * 1e3:.0f} ms", f"{100 * v / total:.0f}%") for k, v in split.items()]))
    atomic_write_text(out_json, json.dumps(results, indent=1) + "\n")
    _plot(results, out_json.with_suffix(".png"))
    print(f"\nwrote {out_json} and {out_json.with_suffix('.png')}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [(f["label"], f["ours"], f["transformers"]) for f in results["figures"].values()
            if f["unit"] == "tokens/s" and f["transformers"]]
    split = results.get("time_split_8x128", {})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
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
        axes[1].pie(list(split.values()), labels=[k if v / sum(split.values()) > 0.02 else "" for k, v in split.items()],
                    autopct=lambda p: f"{p:.0f}%" if p > 2 else "")
        axes[1].set_title("training step 8 x 128: time by part")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # keep the pie's outer labels
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
