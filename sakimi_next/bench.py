"""`--mode bench` (and `make bench`): speed figures for this project, and for transformers' own
Qwen3NextForCausalLM (its pure-PyTorch path) on identical weights when `--compare transformers`.

Every compared figure is measured in the same process, interleaved (ours, theirs, ours, theirs, ...),
as the median of >= 5 repeats after warm-up. Writes a table to stdout, `bench.json` and `bench.png`.
No figure is asserted anywhere: speed lives here, correctness in the tests.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from .kernels.linear import StepLinear
from .model import Qwen3NextForCausalLM, active_parameters


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

    def theirs():
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    a, b = interleaved(ours, theirs if hf is not None else None, repeats=5, warmup=1)
    return new_tokens / a, (new_tokens / b if b else None)


@torch.inference_mode()
def decode_weights(model) -> list[torch.Tensor]:
    """The matrices one decoding step of a dense model multiplies by, as the step holds them (its
    `StepLinear`s): the fused inference weights (q/k/v, DeltaNet in-projections, gate/up), the output
    projections, the LM head."""
    model.decode_step(torch.zeros(1, dtype=torch.long), model.new_cache(1, capacity=1))  # builds them
    return [cached[1].weight for m in model.modules() for cached in m.__dict__.values()
            if isinstance(cached, tuple) and len(cached) == 2 and isinstance(cached[1], StepLinear)]


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
