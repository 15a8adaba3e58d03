"""`--mode train`: turn prepared token files into a model, on one device or under torchrun.

The loop: random windows of seq_len+1 tokens from the memory-mapped train split (a pure function of
seed and step, so the sampler's state is just the step), AdamW with linear warm-up and cosine decay,
gradient accumulation and clipping, evaluation on the validation split (loss, perplexity, bits per
byte), atomic checkpoints (periodic, best, final, and on SIGINT/SIGTERM), exact resume, a metrics
JSONL file and a loss-curve PNG. Under torchrun: DistributedDataParallel (NCCL on CUDA, gloo on CPU)
or FSDP2 with `--fsdp`; only rank 0 writes.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import auto, budget
from . import checkpoint as ckpt
from .config import RECOMMENDED_PRESET, Config, fmt_count, preset
from .model import GatedDeltaNet, Qwen3NextForCausalLM, RMSNorm
from .tokenizer import Tokenizer
from .util import UserError, atomic_write_bytes, resolve_device

# Per-preset defaults for what the command line leaves out (documented in the README).
PRESET_DEFAULTS = {
    "tiny_5m": dict(batch_size=16, seq_len=256, learning_rate=2e-3, warmup_steps=100, steps=2000),
    "tiny_10m": dict(batch_size=16, seq_len=256, learning_rate=1e-3, warmup_steps=100, steps=5000),
    "tiny_10m_moe": dict(batch_size=16, seq_len=256, learning_rate=1e-3, warmup_steps=100, steps=5000),
    "small_50m": dict(batch_size=16, seq_len=512, learning_rate=6e-4, warmup_steps=500, steps=20000),
}
COMMON_DEFAULTS = dict(save_every=250, eval_every=200, eval_batches=16, grad_accum=1, weight_decay=0.1,
                       no_decay_norms=False, beta1=0.9, beta2=0.95, grad_clip=1.0, seed=0, mtp_weight=0.0,
                       document_masking=False, dropout=0.0)
# command-line values a resumed run takes from its checkpoint when they are not given again
RESUMABLE = ("steps", "learning_rate", "min_lr", "warmup_steps", "batch_size", "seq_len", "grad_accum",
             "weight_decay", "no_decay_norms", "beta1", "beta2", "grad_clip", "save_every", "eval_every",
             "eval_batches", "seed", "mtp_weight", "document_masking", "dropout")


# ------------------------------------------------------------------------------------ distributed
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> Distributed:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=resolve_device(device_name))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local, device)


# -------------------------------------------------------------------------------------- optimiser
def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    decay_norms: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and (as Qwen3-Next does) on the zero-centred norm weights,
    whose zero is the identity; none on A_log, dt_bias, biases or the gated norm's plain multiplier."""
    module = ckpt.plain_module(model)
    norm_params = {id(m.weight) for m in module.modules() if isinstance(m, RMSNorm)}
    no_decay_ids = {id(p) for m in module.modules() if isinstance(m, GatedDeltaNet) for p in (m.A_log, m.dt_bias)}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in no_decay_ids or name.endswith(".bias"):
            no_decay.append(p)
        elif id(p) in norm_params:
            (decay if decay_norms else no_decay).append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(module.parameters()).device
    # fused kernels where this torch has them for the device, else foreach; both are deterministic
    fused = device.type in ("cuda", "cpu", "mps")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_lr` at `total` (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ---------------------------------------------------------------------------------------- compile
def compile_layers(model: Qwen3NextForCausalLM) -> None:
    """torch.compile each decoder layer in place ("regional compilation", as torchtitan does): layers of
    one kind share one compiled graph, so compiling takes about half as long as for the whole model, at
    the same speed. Parameter names do not change."""
    layers = list(model.model.layers) + (list(model.mtp.layers) if hasattr(model, "mtp") else [])
    for layer in layers:
        layer.compile()



# ------------------------------------------------------------------------------------------- data
class WindowSampler:
    """Random windows of seq_len+1 tokens. The global batch of step s, micro-step m is drawn from
    numpy's generator seeded with (seed, s, m); rank r takes rows [r*B, (r+1)*B). So the sampler has no
    state besides the step, a resumed run sees the same windows, and N processes with batch B see the
    windows one process with batch N*B would."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int, world: int):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.max_start = len(tokens) - seq_len - 1

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(0, self.max_start + 1, size=self.batch_size * self.world)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


def eval_windows(n_tokens: int, seq_len: int, n_windows: int) -> np.ndarray:
    """Start offsets spread evenly over the split: the same windows at every evaluation."""
    last = max(0, n_tokens - seq_len - 1)
    return np.unique(np.linspace(0, last, n_windows).astype(np.int64))


def document_starts(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """x [B, T] -> [B, T] bool: a document starts right after each end-of-text token."""
    starts = torch.zeros_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, :-1] == eot_id
    return starts


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int, device,
             bytes_per_token: float | None, autocast, ddp: Distributed, eot_id: int | None = None) -> dict:
    """Mean validation loss over fixed windows (sharded across ranks), perplexity and bits per byte."""
    seq_len = min(seq_len, len(tokens) - 1)
    starts = eval_windows(len(tokens), seq_len, batch_size * ddp.world_size * n_batches)  # the global set
    mine = starts[ddp.rank::ddp.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, number of tokens
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), batch_size):
        rows = np.stack([tokens[s:s + seq_len + 1] for s in mine[i:i + batch_size]]).astype(np.int64)
        t = torch.from_numpy(rows).to(device)
        starts = document_starts(t[:, :-1], eot_id) if eot_id is not None else None
        with autocast:
            logits = model(t[:, :-1], doc_starts=starts).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), t[:, 1:].flatten(), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(t[:, 1:].numel(), dtype=torch.float64, device=device)])
    if ddp.enabled:
        dist.all_reduce(total)
    if hasattr(ckpt.plain_module(model), "reshard"):
        # FSDP2 keeps the root's parameters gathered after a forward without backward; shard them
        # again, or the optimiser and the checkpoint would see other parameter objects
        ckpt.plain_module(model).reshard()
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total[1].item())}
    if bytes_per_token:
        out["val_bpb"] = loss / math.log(2) / bytes_per_token
    return out


# -------------------------------------------------------------------------------------- reporting
def save_loss_curve(records: list[dict], path: Path, title: str) -> None:
    """Train loss (raw and smoothed) and validation loss against steps, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        s, l = zip(*train)
        ax.plot(s, l, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
        ema, smooth = l[0], []
        for v in l:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(s, smooth, color="tab:blue", linewidth=1.5, label="train (smoothed)")
    if val:
        s, l = zip(*val)
        ax.plot(s, l, "o-", color="tab:orange", linewidth=1.5, markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


class MetricsLog:
    """metrics.jsonl: one JSON object per line. A resumed run keeps the records up to its checkpoint's
    step (later ones belong to the lost part of the interrupted run); a fresh run starts a new file."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled, self.records = path, enabled, []
        if not enabled:
            return
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if r.get("step", 0) <= resume_step:
                    self.records.append(r)
        self._rewrite()

    def _rewrite(self):
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def add(self, record: dict):
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------- main
class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT stops at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


def _settings(args, resumed_args: dict | None, preset_name: str, auto_defaults: dict | None = None) -> dict:
    """Command line first, then the checkpoint's arguments when resuming, then the preset's defaults
    (or, with --config auto, those auto.py picks)."""
    defaults = {**COMMON_DEFAULTS, **(auto_defaults or PRESET_DEFAULTS.get(preset_name, PRESET_DEFAULTS[RECOMMENDED_PRESET]))}
    out = {}
    for name in RESUMABLE:
        value = getattr(args, name, None)
        if value is None and resumed_args and resumed_args.get(name) is not None:
            value = resumed_args[name]
        if value is None:
            value = defaults.get(name)
        out[name] = value
    if out["min_lr"] is None:
        out["min_lr"] = out["learning_rate"] / 10
    warmup_given = args.warmup_steps is not None or (resumed_args or {}).get("warmup_steps") is not None
    if not warmup_given and out["steps"] and out["warmup_steps"] > out["steps"] // 10:
        out["warmup_steps"] = out["steps"] // 10  # a short run should still reach its peak learning rate
    return out


def _validate(s: dict, config: Config, train_tokens: int) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum"):
        if s[name] is None or s[name] <= 0:
            raise UserError(f"--{name.replace('_', '-')} ({s[name]}) must be positive")
    if not s["learning_rate"] > 0:
        raise UserError(f"--learning-rate ({s['learning_rate']}) must be positive")
    if s["min_lr"] < 0 or s["min_lr"] > s["learning_rate"]:
        raise UserError(f"--min-lr ({s['min_lr']}) must be between 0 and the learning rate ({s['learning_rate']})")
    if not (s["dropout"] is not None and 0.0 <= s["dropout"] < 1.0):
        raise UserError(f"--dropout ({s['dropout']}) must be in [0, 1)")
    if s["warmup_steps"] < 0:
        raise UserError(f"--warmup-steps ({s['warmup_steps']}) must be >= 0")
    for name in ("save_every", "eval_every", "eval_batches"):
        if s[name] is not None and s[name] <= 0:
            raise UserError(f"--{name.replace('_', '-')} ({s[name]}) must be positive")
    if s["seq_len"] > config.max_position_embeddings:
        raise UserError(f"--seq-len ({s['seq_len']}) exceeds the model's max_position_embeddings "
                        f"({config.max_position_embeddings})")
    if train_tokens < s["seq_len"] + 1:
        raise UserError(f"the training split has {train_tokens} tokens, fewer than --seq-len + 1 "
                        f"({s['seq_len'] + 1}); use a shorter --seq-len or more text")


def _prepare_inputs(args, ddp: Distributed):
    """Find (or first prepare) the data directory; return (data_dir, meta, tokenizer)."""
    from .data import load_meta, load_tokenizer, prepare_data

    data_dir = Path(args.data_dir or "data")
    if args.train_data:
        if ddp.is_main:
            prepare_data(args.train_data, args.val_data, data_dir, tokenizer_path=args.tokenizer,
                         vocab_size=args.vocab_size, val_fraction=args.val_fraction, doc_split=args.doc_split,
                         encoding_errors=args.encoding_errors, rebuild_tokenizer=args.rebuild_tokenizer,
                         seed=0 if args.seed is None else args.seed,
                         config=None if args.config in (None, auto.NAME) else preset(args.config),
                         allow_vocab_mismatch=args.allow_vocab_mismatch, auto_vocab=args.config in (None, auto.NAME))
        if ddp.enabled:
            dist.barrier()
    elif not (data_dir / "meta.json").is_file():
        raise UserError(f"no prepared data in {data_dir}/ (meta.json missing): run --mode prepare_data "
                        "first, or pass --train-data")
    return data_dir, load_meta(data_dir), load_tokenizer(data_dir)


def _budget_plan(args, s: dict, state, model, train_model, optimizer, train_tokens, val_tokens, meta, tokenizer,
                 autocast, ddp: Distributed, t_launch: float, log) -> budget.Plan | None:
    """The time budget's plan (see budget.py), written into `s`; None without a budget. A resumed
    budgeted run keeps its checkpoint's plan; a fresh one measures a few throw-away steps (the model,
    optimiser and random generators stay as they were) and one evaluation first."""
    if state and state.get("budget"):
        plan = budget.Plan.from_dict(state["budget"])
    elif args.max_minutes is None or args.steps is not None or state:
        return None  # --steps given (--max-minutes then only cuts the run short), or no budget
    else:
        budget.check_minutes(args.max_minutes)
        device = ddp.device
        sampler = WindowSampler(train_tokens, s["seq_len"], s["batch_size"], s["seed"], ddp.rank, ddp.world_size)
        split = meta["splits"]["val"]
        bytes_per_token = split["bytes"] / split["tokens"] if split.get("tokens") else None
        eot = tokenizer.eot_id if s["document_masking"] else None

        def throwaway_step():
            for micro in range(s["grad_accum"]):
                x, y = (t.to(device) for t in sampler.batch(0, micro))
                with autocast:
                    loss = train_model(x, y, mtp_weight=s["mtp_weight"] or 0.0,
                                       doc_starts=document_starts(x, eot) if eot is not None else None).loss
                (loss / s["grad_accum"]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"] or float("inf"))
            optimizer.zero_grad(set_to_none=True)

        def evaluate_once():
            return evaluate(train_model, val_tokens, s["seq_len"], s["batch_size"], s["eval_batches"], device,
                            bytes_per_token, autocast, ddp, eot)

        log(f"budget: measuring the speed ({budget.WARM_STEPS + budget.TIMED_STEPS} throw-away steps, one evaluation)")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            step_s, eval_s, ev = budget.measure(throwaway_step, evaluate_once)
        save_s = 12 * model.num_parameters() / 100e6  # weights + AdamW moments, written at ~100 MB/s
        times = torch.tensor([step_s, eval_s + save_s, budget.clock() - t_launch], dtype=torch.float64)
        if ddp.enabled:  # every rank must plan the same schedule: the slowest one's
            times = times.to(device)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
        step_s, eval_s, setup_s = times.tolist()
        plan = budget.plan(args.max_minutes, setup_s, step_s, eval_s, args.warmup_steps, args.eval_every)
        log(f"eval      0: val loss {ev['val_loss']:.4f}" + (f"  bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""))
    s.update(steps=plan.steps, warmup_steps=plan.warmup_steps, eval_every=plan.eval_every)
    log(plan.describe())
    return plan


def run_train(args) -> int:
    from .data import check_vocab, open_split

    ddp = setup_distributed(args.device)
    try:
        return _train(args, ddp, check_vocab, open_split)
    finally:
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, ddp: Distributed, check_vocab, open_split) -> int:
    def log(*a, **k):
        if ddp.is_main:
            print(*a, **k)

    def say(msg: str):  # a line that does not break the progress bar
        if ddp.is_main:
            tqdm.write(msg, file=sys.stderr)
    t_launch = budget.clock()  # a time budget counts from here
    data_dir, meta, tokenizer = _prepare_inputs(args, ddp)

    # --- resume / init: where the weights and the configuration come from
    preset_name = args.config
    out_dir = Path(args.out_dir or f"runs/{preset_name or auto.NAME}")
    resume_path = None
    if args.resume_from:
        if args.resume_from == "auto":
            resume_path = ckpt.find_latest(out_dir)
            log(f"resume: {'from ' + str(resume_path) if resume_path else 'no checkpoint in ' + str(out_dir) + ', starting fresh'}")
        else:
            resume_path = ckpt.resolve_checkpoint(args.resume_from)
    state, resumed_args = None, None
    if resume_path is not None:
        state = ckpt.read_json(resume_path / ckpt.STATE_FILE)
        resumed_args = state.get("args", {})
        if preset_name and state.get("preset") and preset_name != state["preset"]:
            raise UserError(f"checkpoint {resume_path} is a {state['preset']} model, not {preset_name}")
        if state.get("tokenizer_sha256") and state["tokenizer_sha256"] != tokenizer.sha256:
            raise UserError(f"checkpoint {resume_path} was trained with another tokenizer than the one in "
                            f"{data_dir} (sha256 {state['tokenizer_sha256'][:12]} vs {tokenizer.sha256[:12]})")
        preset_name = state.get("preset") or preset_name
        config = ckpt.load_config(resume_path)
        if args.out_dir is None:
            out_dir = resume_path.parent
    elif args.init_from:
        config = ckpt.load_pretrained_config(args.init_from)
        preset_name = preset_name or "custom"
        init_dir = Path(args.init_from)
        init_tok = next((p / "tokenizer.json" for p in (init_dir, init_dir / "latest") if (p / "tokenizer.json").is_file()),
                        None)
        if init_tok is not None and Tokenizer.load(init_tok).sha256 != tokenizer.sha256:
            raise UserError(f"{data_dir} was tokenized with another tokenizer than the model at {args.init_from}; "
                            f"prepare the data with --tokenizer {init_tok}")
    elif preset_name in (None, auto.NAME):  # issue 13: --config auto, the default of a fresh run
        preset_name, config = auto.NAME, auto.model_config(tokenizer.vocab_size)
    else:
        config = preset(preset_name)
        config = check_vocab(config, tokenizer, args.allow_vocab_mismatch)
    if config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    config = config.replace(eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id)
    if getattr(args, "mtp_weight", None) and not config.mtp_num_hidden_layers:
        config = config.replace(mtp_num_hidden_layers=1)

    auto_defaults = None
    if preset_name == auto.NAME:
        auto_defaults = auto.training_defaults(meta["splits"]["train"]["tokens"], args.max_minutes, ddp.device.type)
    s = _settings(args, resumed_args, preset_name, auto_defaults)
    if auto_defaults:
        log(f"--config auto: {auto.TRUNK}'s trunk with vocab {config.vocab_size:,}; batch {s['batch_size']} x "
            f"{s['seq_len']}, lr {s['learning_rate']:g}, dropout {s['dropout']:g} (see the README's rule)")
    train_tokens = open_split(data_dir, "train")
    val_tokens = open_split(data_dir, "val")
    _validate(s, config, len(train_tokens))

    # --- model, optimiser
    torch.manual_seed(s["seed"])
    device = ddp.device
    model = Qwen3NextForCausalLM(config)
    if args.init_from and resume_path is None:
        ckpt.load_pretrained_weights(model, args.init_from)
    if resume_path is not None:
        ckpt.load_weights(model, ckpt.load_tensors(resume_path / ckpt.MODEL_FILE), resume_path)
    model.to(device)
    model.set_dropout(s["dropout"])  # issue 13: a training setting, never saved with the model
    kernel = "recurrent" if args.disable_fast_kernels else args.kernel
    try:
        kernel = model.set_kernel(kernel, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    model.train()
    n_params = model.num_parameters()  # before FSDP turns parameters into shards
    if args.fsdp and not ddp.enabled:
        raise UserError("--fsdp shards the model across processes: start it with torchrun")
    train_model = model
    if args.compile:
        compile_layers(model)
    if ddp.enabled:
        if args.fsdp:  # shard each decoder layer, then the rest; the optimiser must see the shards
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, s["learning_rate"], s["weight_decay"], (s["beta1"], s["beta2"]),
                                decay_norms=not s["no_decay_norms"])
    if resume_path is not None:
        ckpt.load_optimizer(model, optimizer, resume_path)
        ckpt.restore_rng(resume_path, state)

    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    # issue 13: with --max-minutes and no --steps, the measured speed fixes steps, warm-up, eval interval
    plan = _budget_plan(args, s, state, model, train_model, optimizer, train_tokens, val_tokens, meta, tokenizer,
                        autocast, ddp, t_launch, log)
    # --- plan
    start_step = state["step"] if state else 0
    total = s["steps"]
    tokens_per_step = s["batch_size"] * s["seq_len"] * s["grad_accum"] * ddp.world_size
    split = meta["splits"]
    bytes_per_token = (split["val"]["bytes"] / split["val"]["tokens"]) if split["val"].get("tokens") else None
    log(f"model: {preset_name}, {n_params:,} parameters ({fmt_count(n_params)})")
    log(f"device: {device}   kernel: {kernel}   dtype: {dtype}   compile: {bool(args.compile)}"
        f"{'   world size: ' + str(ddp.world_size) + (' (FSDP2)' if args.fsdp else ' (DDP)') if ddp.enabled else ''}")
    log(f"data: {data_dir} ({split['train']['tokens']:,} train / {split['val']['tokens']:,} validation tokens)")
    log(f"batch: {s['batch_size']} x {s['seq_len']} tokens x {s['grad_accum']} accumulation x {ddp.world_size} "
        f"process(es) = {tokens_per_step:,} tokens per step (global batch {s['batch_size'] * s['grad_accum'] * ddp.world_size})")
    log(f"plan: steps {start_step} -> {total}, {tokens_per_step * max(0, total - start_step):,} tokens; "
        f"lr {s['learning_rate']:g} (warm-up {s['warmup_steps']}, cosine to {s['min_lr']:g}); out: {out_dir}")
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise UserError(f"output directory {out_dir} is not writable")

    sampler = WindowSampler(train_tokens, s["seq_len"], s["batch_size"], s["seed"], ddp.rank, ddp.world_size)
    metrics = MetricsLog(out_dir / "metrics.jsonl", ddp.is_main, start_step if state else None)
    best = dict(loss=(state or {}).get("best_val_loss", math.inf), step=(state or {}).get("best_step"))
    stale_evals = (state or {}).get("evals_without_improvement", 0)
    tokens_seen = (state or {}).get("tokens_seen", 0)
    elapsed_before = (state or {}).get("elapsed_s", 0.0)
    args_record = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    args_record.update(s)
    mtp_weight = s.get("mtp_weight") or 0.0

    def trainer_state(step: int) -> dict:
        return {"preset": preset_name, "tokens_seen": tokens_seen, "best_val_loss": best["loss"],
                "best_step": best["step"], "evals_without_improvement": stale_evals,
                "elapsed_s": elapsed_before + (time.perf_counter() - t_start),
                "sampler": {"kind": "WindowSampler", "seed": s["seed"], "next_step": step},
                "scheduler": {"kind": "warmup_cosine", "learning_rate": s["learning_rate"], "min_lr": s["min_lr"],
                              "warmup_steps": s["warmup_steps"], "steps": total},
                "budget": plan.to_dict() if plan else None,
                "args": args_record, "tokenizer_sha256": tokenizer.sha256, "data_dir": str(data_dir),
                "world_size": ddp.world_size, "tokens_per_step": tokens_per_step}

    def save(step: int, reason: str) -> Path | None:
        """Rank 0 writes; a failure (full disk, ...) keeps the previous checkpoints and training goes on."""
        path = None
        gathered = ckpt.gather_state(model, optimizer) if args.fsdp or ddp.is_main else None  # FSDP: all ranks
        if ddp.is_main:
            try:
                path = ckpt.save_checkpoint(out_dir, step, model, optimizer, trainer_state(step), config,
                                            tokenizer.path, gathered)
                ckpt.prune(out_dir, args.keep_last)
                say(f"saved {reason} checkpoint: {path}")
            except OSError as e:
                prev = ckpt.find_latest(out_dir)
                say(f"warning: could not save the checkpoint at step {step} ({e.strerror or e}); "
                          f"the previous checkpoint {prev} is intact")
        if ddp.enabled:
            dist.barrier()
        return path

    stop = _StopRequest()
    stop.install()
    t_start = time.perf_counter()
    bar = tqdm(total=total, initial=start_step, disable=not ddp.is_main, unit="step", dynamic_ncols=True,
               file=sys.stderr)
    step, exit_code, last_saved = start_step, 0, start_step if state else None
    window_t, window_tokens = time.perf_counter(), 0
    try:
        while step < total:
            lr = lr_at(step, s["learning_rate"], s["min_lr"], s["warmup_steps"], total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, mtp_sum, aux_sum, finite = 0.0, 0.0, 0.0, True
            for micro in range(s["grad_accum"]):
                x, y = sampler.batch(step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = nullcontext()
                if ddp.enabled and not args.fsdp and micro < s["grad_accum"] - 1:
                    sync = train_model.no_sync()
                with sync:
                    starts = document_starts(x, tokenizer.eot_id) if s["document_masking"] else None
                    with autocast:
                        out = train_model(x, y, mtp_weight=mtp_weight, doc_starts=starts)
                    (out.loss / s["grad_accum"]).backward()  # outside autocast, as torch recommends
                value = out.loss.item()
                finite = finite and math.isfinite(value)
                loss_sum += value / s["grad_accum"]
                if out.mtp_loss is not None:
                    mtp_sum += out.mtp_loss.item() / s["grad_accum"]
                if out.aux_loss is not None:
                    aux_sum += out.aux_loss.item() / s["grad_accum"]
            if ddp.enabled:
                t = torch.tensor([loss_sum, float(not finite)], device=device)
                dist.all_reduce(t)
                loss_sum, finite = t[0].item() / ddp.world_size, t[1].item() == 0
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"] or float("inf"))
            grad_norm = float(grad_norm)
            if not (finite and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                what = f"loss {loss_sum}" if not finite else f"gradient norm {grad_norm}"
                if args.skip_nonfinite:
                    say(f"step {step}: non-finite {what}; step skipped (--skip-nonfinite)")
                    step += 1
                    bar.update(1)
                    continue
                prev = ckpt.find_latest(out_dir) if ddp.is_main else None
                log(f"error: non-finite {what} at step {step}; stopping. The last good checkpoint is "
                    f"{prev or 'none (nothing saved yet)'}. Lower --learning-rate, or --skip-nonfinite.",
                    file=sys.stderr)
                exit_code = 1
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            bar.update(1)

            now = time.perf_counter()
            tok_s = window_tokens / max(now - window_t, 1e-9)
            record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                      "tokens_per_s": round(tok_s, 1), "elapsed_s": round(elapsed_before + now - t_start, 2)}
            if mtp_weight:
                record["mtp_loss"] = mtp_sum
            if config.is_moe:
                record["aux_loss"] = aux_sum
            metrics.add(record)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if step % args.print_every == 0 or step == total:
                extra = f" mtp {mtp_sum:.4f}" if mtp_weight else ""
                extra += f" aux {aux_sum:.4f}" if config.is_moe else ""
                say(f"step {step:>6}/{total}  loss {loss_sum:.4f}{extra}  lr {lr:.2e}  "
                          f"grad {grad_norm:.2f}  {tok_s:,.0f} tok/s")
                window_t, window_tokens = now, 0

            time_up = bool(args.max_minutes and not plan and (now - t_start) / 60 >= args.max_minutes)
            if ddp.enabled:  # every rank must take the same decision, or the others wait forever
                flags = torch.tensor([stop.signal or 0, int(time_up)], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stop.signal, time_up = (int(flags[0]) or None), bool(flags[1])
            if step % s["eval_every"] == 0 or step == total or time_up:  # a run cut short is still measured
                ev = evaluate(train_model, val_tokens, s["seq_len"], s["batch_size"], s["eval_batches"], device,
                              bytes_per_token, autocast, ddp, tokenizer.eot_id if s["document_masking"] else None)
                metrics.add({"step": step, **ev})
                bpb = f"  bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
                say(f"eval {step:>6}: val loss {ev['val_loss']:.4f}  ppl {ev['val_ppl']:.2f}{bpb}")
                if ddp.is_main:
                    save_loss_curve(metrics.records, out_dir / "loss_curve.png", f"{preset_name} on {data_dir}")
                if ev["val_loss"] < best["loss"] - args.early_stop_min_delta:
                    best.update(loss=ev["val_loss"], step=step)
                    stale_evals = 0
                    path = save(step, "best")
                    last_saved = step
                    if path is not None:
                        ckpt.point(out_dir, "best", path)
                else:
                    stale_evals += 1
                    if args.early_stop_patience and stale_evals >= args.early_stop_patience:
                        log(f"early stop: no improvement for {stale_evals} evaluations (best {best['loss']:.4f} "
                            f"at step {best['step']})")
                        break
            if step % s["save_every"] == 0 and last_saved != step:
                save(step, "periodic")
                last_saved = step
            if stop.signal is not None:
                name = signal.Signals(stop.signal).name
                say(f"{name} received at step {step}: saving and stopping; resume with --resume-from auto")
                exit_code = 128 + stop.signal
                break
            if time_up:
                say(f"--max-minutes {args.max_minutes:g} reached at step {step}")
                break
        if exit_code != 1 and last_saved != step:
            save(step, "final")
            last_saved = step
    finally:
        bar.close()
        stop.restore()
    if ddp.is_main and exit_code != 1 and metrics.records:
        save_loss_curve(metrics.records, out_dir / "loss_curve.png", f"{preset_name} on {data_dir}")
        latest = ckpt.find_latest(out_dir)
        log(f"done: step {step}, {tokens_seen:,} tokens, best val loss {best['loss']:.4f} (step {best['step']}); "
            f"checkpoint {latest}; loss curve {out_dir / 'loss_curve.png'}")
    return exit_code
