"""`--mode train`: turn prepared token files into a model, on one device or under torchrun.

The loop: random windows of seq_len+1 tokens from the memory-mapped train split (a pure function of
seed and step, so the sampler's state is just the step), AdamW with linear warm-up and cosine decay,
gradient accumulation and clipping, evaluation on the validation split (loss, perplexity, bits per
byte), atomic checkpoints (periodic, best, final, and on SIGINT/SIGTERM), exact resume, a metrics
JSONL file and a loss-curve PNG. Under torchrun: DistributedDataParallel (NCCL on CUDA, gloo on CPU)
or FSDP2 with `--fsdp`; only rank 0 writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import auto, budget
from . import checkpoint as ckpt
from . import pretrained
from .average import WeightAverage
from .config import RECOMMENDED_PRESET, TRAINING_DEFAULTS, Config, fmt_count, preset
from .model import GatedDeltaNet, Qwen3NextForCausalLM, RMSNorm
from .settings import Hyperparameters, TrainSettings
from .tokenizer import Tokenizer
from .util import UserError, atomic_write_bytes, new_figure, resolve_device, save_png


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
                    decay_norms: bool = True, kind: str = "adamw") -> "torch.optim.Optimizer | MuonWithAdamW":
    """AdamW with weight decay on matrices and (as Qwen3-Next does) on the zero-centred norm weights,
    whose zero is the identity; none on A_log, dt_bias, biases or the gated norm's plain multiplier.
    kind "muon": the decoder layers' matrices (and the MTP block's) go to Muon instead (`MuonWithAdamW`)."""
    groups = _parameter_groups(ckpt.plain_module(model), weight_decay, decay_norms)
    if kind == "muon":
        return MuonWithAdamW.build(model, groups, lr, weight_decay, betas)
    return _adamw(groups, lr, betas)


def _parameter_groups(module: torch.nn.Module, weight_decay: float, decay_norms: bool) -> list[dict]:
    """[decayed, not decayed] parameter groups for AdamW."""
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
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    device = next(p for g in groups for p in g["params"]).device
    # fused kernels where this torch has them for the device, else foreach; both are deterministic
    fused = device.type in ("cuda", "cpu", "mps")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


class MuonWithAdamW:
    """Muon (Jordan et al. 2024, `torch.optim.Muon`: momentum orthogonalised by Newton-Schulz
    iterations) for the 2-D weights of the decoder layers and the MTP block, AdamW for the embedding, the
    output layer, norms, gates' vectors and the conv; one optimiser to the training loop. Muon's step is
    scaled to AdamW's update size (Moonlight's `match_rms_adamw`), so --learning-rate and --weight-decay
    mean the same for both (README "Quality in a fixed time": Tiny Shakespeare held out 2.118 -> 2.107 at
    the same weight decay, 2.087-2.101 at the decay of 2.0 it takes).
    The checkpoint holds both states (`parts`)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW):
        self.parts = (muon, adamw)

    @classmethod
    def build(cls, model: torch.nn.Module, groups: list[dict], lr: float, weight_decay: float,
              betas: tuple[float, float]) -> "MuonWithAdamW":
        if not hasattr(torch.optim, "Muon"):
            raise UserError(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is {torch.__version__}")
        module = ckpt.plain_module(model)
        layers = [module.model.layers] + ([module.mtp] if getattr(module, "mtp", None) is not None else [])
        matrices = {id(p) for part in layers for p in part.parameters() if p.ndim == 2}
        decayed = groups[0]["params"]
        muon = torch.optim.Muon([p for p in decayed if id(p) in matrices], lr=lr, weight_decay=weight_decay,
                                adjust_lr_fn="match_rms_adamw")
        rest = [{**groups[0], "params": [p for p in decayed if id(p) not in matrices]}, groups[1]]
        return cls(muon, _adamw(rest, lr, betas))

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


def tokens_per_step(h: Hyperparameters, world_size: int) -> int:
    """Tokens in one optimiser step: every micro-batch of every process."""
    return h.batch_size * h.seq_len * h.grad_accum * world_size


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_lr` at `total` (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ---------------------------------------------------------------------------------------- compile
COMPILE_MIN_MINUTES = 10.0  # compiling costs ~30 s on a CPU and saves ~15% of every step after it


def use_compile(asked: bool | None, max_minutes: float | None, steps: int | None, device: torch.device,
                lead_in: int = 0) -> bool:
    """--compile, --no-compile, or by default: compile for a time budget (no --steps) of
    COMPILE_MIN_MINUTES or more, where torch.compile has what it needs (a C++ compiler on a CPU,
    triton on CUDA), and not with a lead-in: its cache-carrying layers took ~2.5 minutes of compiling on
    a 2-core CPU for ~5% faster steps."""
    if asked is not None:
        return asked
    if max_minutes is None or steps is not None or max_minutes < COMPILE_MIN_MINUTES or lead_in:
        return False
    if device.type == "cpu":
        return shutil.which(os.environ.get("CXX", "g++")) is not None
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


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
    windows one process with batch N*B would. With `lead_in` L, every window has at least L tokens of
    text before it (`lead` returns them), so the text's first L tokens are only ever read as lead-in."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int, world: int,
                 loss_mask: np.ndarray | None = None, lead_in: int = 0):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.max_start = len(tokens) - seq_len - 1
        self.loss_mask = loss_mask  # chat data: targets where it is 0 become -100 (not in the loss)
        self.lead_in = lead_in

    def starts(self, step: int, micro: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(self.lead_in, self.max_start + 1, size=self.batch_size * self.world)
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts(step, micro)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        if self.loss_mask is not None:
            return t[:, :-1], masked_targets(t[:, 1:], [self.loss_mask[s + 1:s + self.seq_len + 1] for s in starts])
        return t[:, :-1], t[:, 1:]

    def lead(self, step: int, micro: int) -> torch.Tensor | None:
        """[B, lead_in]: the text right before each window of `batch(step, micro)` (None without lead-in)."""
        if not self.lead_in:
            return None
        rows = [self.tokens[s - self.lead_in:s] for s in self.starts(step, micro)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def read_lead_in(train_model, model: Qwen3NextForCausalLM, lead: torch.Tensor, autocast, room: int):
    """The decoding state after reading `lead` [B, L] in evaluation mode without gradient: the DeltaNet
    states and attention keys and values a training window then continues from (the window's gradient
    stops there, as in Transformer-XL), with `room` for the window's positions."""
    B, L = lead.shape
    # under autocast the keys and values are bf16; a float32 cache would hand attention mixed dtypes
    cache = model.new_cache(B, capacity=L + room,
                            dtype=autocast.fast_dtype if isinstance(autocast, torch.autocast) else None)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast:
        train_model(lead, cache=cache)
    model.train(was_training)
    reshard_fsdp(model)
    return cache


def window_loss(train_model, model, x, y, lead, h: Hyperparameters, autocast, eot_id: int | None):
    """One training micro-batch's forward pass (the backward is the caller's): with its lead-in read
    first when there is one, else with packed documents masked when `eot_id` is given."""
    cache = read_lead_in(train_model, model, lead.to(x.device), autocast, x.shape[1]) if lead is not None else None
    starts = document_starts(x, eot_id) if eot_id is not None else None
    with autocast:
        return train_model(x, y, mtp_weight=h.mtp_weight or 0.0, doc_starts=starts, cache=cache)


def masked_targets(targets: torch.Tensor, mask_rows) -> torch.Tensor:
    """targets [B, T] with -100 (cross-entropy's ignore_index) where mask_rows [B, T] is 0."""
    keep = torch.from_numpy(np.array(mask_rows, dtype=bool)).to(targets.device)  # a copy: memmaps are read-only
    return targets.masked_fill(~keep, -100)


def eval_windows(n_tokens: int, seq_len: int, n_windows: int) -> np.ndarray:
    """Start offsets spread evenly over the split: the same windows at every evaluation."""
    last = max(0, n_tokens - seq_len - 1)
    return np.unique(np.linspace(0, last, n_windows).astype(np.int64))


def document_starts(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """x [B, T] -> [B, T] bool: a document starts right after each end-of-text token."""
    starts = torch.zeros_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, :-1] == eot_id
    return starts


def reshard_fsdp(model) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward; shard them again,
    or the optimiser and the checkpoint would see other parameter objects."""
    if hasattr(ckpt.plain_module(model), "reshard"):
        ckpt.plain_module(model).reshard()


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int, device,
             bytes_per_token: float | None, autocast, ddp: Distributed, eot_id: int | None = None,
             loss_mask: np.ndarray | None = None) -> dict:
    """Mean validation loss over fixed windows (sharded across ranks), perplexity and bits per byte.
    `loss_mask` (chat data): only the targets where it is 1 count."""
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
        targets = t[:, 1:]
        if loss_mask is not None:
            targets = masked_targets(targets, [loss_mask[s + 1:s + seq_len + 1] for s in mine[i:i + batch_size]])
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100)
        total += torch.stack([loss.double(), (targets != -100).sum().to(torch.float64)])
    if ddp.enabled:
        dist.all_reduce(total)
    reshard_fsdp(model)
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total[1].item())}
    if bytes_per_token:
        out["val_bpb"] = loss / math.log(2) / bytes_per_token
    return out


# -------------------------------------------------------------------------------------- reporting
def save_loss_curve(records: list[dict], path: Path, title: str) -> None:
    """Train loss (raw and smoothed) and validation loss against steps, written atomically as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = new_figure()
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
    save_png(fig, path)


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
                if not isinstance(r, dict) or not isinstance(r.get("step", 0), int):
                    continue  # not a record of ours: left out, never a traceback
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


# --------------------------------------------------------------------------------------- settings
RESUMABLE = tuple(f.name for f in fields(Hyperparameters))


def resolve_hyperparameters(given: Hyperparameters, resumed: dict | None, preset_name: str,
                            train_tokens: int = 0, max_minutes: float | None = None,
                            device_type: str = "cpu", fsdp: bool = False) -> Hyperparameters:
    """Command line first, then the checkpoint's settings when resuming, then the preset's defaults
    (--config auto: those auto.py picks from the training tokens and the budget)."""
    if preset_name == auto.NAME:
        defaults = asdict(replace(TRAINING_DEFAULTS[auto.TRUNK],
                                  **auto.training_defaults(train_tokens, max_minutes, device_type, fsdp)))
    else:
        defaults = asdict(TRAINING_DEFAULTS.get(preset_name, TRAINING_DEFAULTS[RECOMMENDED_PRESET]))
    out = {}
    for name in RESUMABLE:
        value = getattr(given, name)
        if value is None and resumed and resumed.get(name) is not None:
            value = resumed[name]
        out[name] = defaults[name] if value is None else value
    if resumed is not None:
        trained_with = resumed.get("optimizer") or "adamw"  # checkpoints from before --optimizer: all AdamW
        if given.optimizer not in (None, trained_with):
            raise UserError(f"the checkpoint was trained with --optimizer {trained_with}; a resumed run keeps its "
                            f"optimizer (its state is that optimizer's), so --optimizer {given.optimizer} cannot apply")
        out["optimizer"] = trained_with
        if given.lead_in is None and resumed.get("lead_in") is None:
            out["lead_in"] = 0  # checkpoints from before --lead-in: cold windows
        if given.ema is None and resumed.get("ema") is None:
            out["ema"] = 0.0  # checkpoints from before --ema: the last step's weights
    if out["document_masking"] and given.lead_in is None:
        out["lead_in"] = 0  # packed documents (chat data) keep apart: no text before a window to read
    if out["min_lr"] is None:
        out["min_lr"] = out["learning_rate"] / 10
    warmup_given = given.warmup_steps is not None or (resumed or {}).get("warmup_steps") is not None
    if not warmup_given and out["steps"] and out["warmup_steps"] > out["steps"] // 10:
        out["warmup_steps"] = out["steps"] // 10  # a short run should still reach its peak learning rate
    return Hyperparameters(**out)


def _validate(h: Hyperparameters, config: Config, train_tokens: int) -> None:
    """What can only be checked once the checkpoint's settings, the model and the data are known."""
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "eval_every", "eval_batches"):
        if getattr(h, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} ({getattr(h, name)}) must be positive")
    if not h.learning_rate > 0:
        raise UserError(f"--learning-rate ({h.learning_rate}) must be positive")
    if not 0.0 <= h.dropout < 1.0:
        raise UserError(f"--dropout ({h.dropout}) must be in [0, 1)")
    if not 0.0 <= h.ema < 1.0:
        raise UserError(f"--ema ({h.ema}) must be in [0, 1) (0 = off)")
    if h.min_lr < 0 or h.min_lr > h.learning_rate:
        raise UserError(f"--min-lr ({h.min_lr}) must be between 0 and the learning rate ({h.learning_rate})")
    if h.warmup_steps < 0:
        raise UserError(f"--warmup-steps ({h.warmup_steps}) must be >= 0")
    if h.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len ({h.seq_len}) exceeds the model's max_position_embeddings "
                        f"({config.max_position_embeddings})")
    if train_tokens < h.seq_len + 1:
        raise UserError(f"the training split has {train_tokens} tokens, fewer than --seq-len + 1 "
                        f"({h.seq_len + 1}); use a shorter --seq-len or more text")
    if h.lead_in and train_tokens < h.lead_in + h.seq_len + 1:
        raise UserError(f"the training split has {train_tokens} tokens, fewer than --lead-in + --seq-len + 1 "
                        f"({h.lead_in + h.seq_len + 1}); use a shorter --lead-in (0 = none) or more text")
    if h.lead_in and h.document_masking:
        raise UserError("--lead-in reads the text before each window, --document-masking keeps packed documents "
                        "apart (chat data turns it on): use one of them")


# ------------------------------------------------------------------------------------ the inputs
@dataclass
class Console:
    """Lines for the user, from rank 0 only."""

    enabled: bool

    def log(self, *a, **k):
        if self.enabled:
            print(*a, **k)

    def say(self, msg: str):  # a line that does not break the progress bar
        if self.enabled:
            tqdm.write(msg, file=sys.stderr)


def _load_data(s: TrainSettings, ddp: Distributed, prepare: Callable[[], object] | None):
    """Prepare the data directory first when asked (rank 0); return (meta, tokenizer)."""
    from .data import load_meta, load_tokenizer

    if prepare is not None:
        if ddp.is_main:
            prepare()
        if ddp.enabled:
            dist.barrier()
    elif not (s.data_dir / "meta.json").is_file():
        raise UserError(f"no prepared data in {s.data_dir}/ (meta.json missing): run --mode prepare_data "
                        "first, or pass --train-data")
    return load_meta(s.data_dir), load_tokenizer(s.data_dir)


@dataclass
class Start:
    """Where a run starts: its model, its run directory, and the checkpoint it resumes (if any)."""

    preset: str
    config: Config
    out_dir: Path
    resume_path: Path | None = None
    state: dict | None = None


def _init_tokenizer_check(init_from: str, tokenizer: Tokenizer, data_dir: Path) -> None:
    init_dir = Path(init_from)
    init_tok = next((p / "tokenizer.json" for p in (init_dir, init_dir / "latest") if (p / "tokenizer.json").is_file()),
                    None)
    if init_tok is not None and Tokenizer.load(init_tok).sha256 != tokenizer.sha256:
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the model at {init_from}; "
                        f"prepare the data with --tokenizer {init_tok}")


def _starting_point(s: TrainSettings, tokenizer: Tokenizer, console: Console) -> Start:
    """A resumed checkpoint, --init-from weights, or a fresh preset; the model's vocabulary checked."""
    from .data import check_vocab

    preset_name = s.preset
    out_dir = s.out_dir or Path(f"runs/{preset_name or auto.NAME}")
    resume_path = None
    if s.resume_from == "auto":
        resume_path = ckpt.find_latest(out_dir, verify=True, say=console.say)  # rank 0 says it, once
        console.log(f"resume: {'from ' + str(resume_path) if resume_path else 'no checkpoint in ' + str(out_dir) + ', starting fresh'}")
    elif s.resume_from:
        resume_path = ckpt.resolve_checkpoint(s.resume_from)
    if resume_path is not None:
        state = ckpt.read_state(resume_path)
        if preset_name and state.get("preset") and preset_name != state["preset"]:
            raise UserError(f"checkpoint {resume_path} is a {state['preset']} model, not {preset_name}")
        if state.get("tokenizer_sha256") and state["tokenizer_sha256"] != tokenizer.sha256:
            raise UserError(f"checkpoint {resume_path} was trained with another tokenizer than the one in "
                            f"{s.data_dir} (sha256 {state['tokenizer_sha256'][:12]} vs {tokenizer.sha256[:12]})")
        start = Start(state.get("preset") or preset_name, ckpt.load_config(resume_path),
                      s.out_dir or resume_path.parent, resume_path, state)
    elif s.init_from:
        start = Start(preset_name or "custom", pretrained.load_pretrained_config(s.init_from), out_dir)
        _init_tokenizer_check(s.init_from, tokenizer, s.data_dir)
    elif preset_name in (None, auto.NAME):  # --config auto, the default of a fresh run
        start = Start(auto.NAME, auto.model_config(tokenizer.vocab_size), out_dir)
    else:
        start = Start(preset_name, check_vocab(preset(preset_name), tokenizer, s.allow_vocab_mismatch), out_dir)
    if start.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {start.config.vocab_size}")
    start.config = start.config.replace(eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id)
    if s.hyper.mtp_weight and not start.config.mtp_num_hidden_layers:
        start.config = start.config.replace(mtp_num_hidden_layers=1)
    return start


# ---------------------------------------------------------------------------------- model, devices
def _build_model(s: TrainSettings, start: Start, seed: int, device: torch.device, dropout: float = 0.0):
    """The model on its device with its kernel, from the checkpoint or --init-from when given.
    Returns (model, kernel, number of parameters)."""
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(start.config)
    if s.init_from and start.resume_path is None:
        pretrained.load_pretrained_weights(model, s.init_from)
    if start.resume_path is not None:
        ckpt.load_weights(model, ckpt.load_tensors(start.resume_path / ckpt.MODEL_FILE), start.resume_path)
    model.to(device)
    model.set_dropout(dropout)  # a training setting, never saved with the model
    kernel = model.set_kernel(s.kernel, device)
    model.train()
    return model, kernel, model.num_parameters()  # counted before FSDP turns parameters into shards


def _distribute(model: Qwen3NextForCausalLM, s: TrainSettings, ddp: Distributed) -> torch.nn.Module:
    """Compile (--compile), then wrap for DDP or shard with FSDP2; returns the module to train."""
    if s.fsdp and not ddp.enabled:
        raise UserError("--fsdp shards the model across processes: start it with torchrun")
    if s.compile:
        compile_layers(model)
    if not ddp.enabled:
        return model
    if s.fsdp:  # shard each decoder layer, then the rest; the optimiser must see the shards
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    device = ddp.device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware: CUDA, or a CPU with AVX512-BF16 or AMX, where
    bf16 autocast trains ~1.5x faster than fp32 (README "Quality in a fixed time"). Elsewhere bf16 is
    emulated and slower."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(check is not None and check() for check in checks)
    return False


def _autocast(dtype: str, device: torch.device) -> tuple[str, object]:
    dtype = dtype if dtype != "auto" else ("bf16" if native_bf16(device) else "fp32")
    return dtype, (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext())


# ------------------------------------------------------------------------------------------ the run
@dataclass
class StepLosses:
    loss: float = 0.0
    mtp: float = 0.0
    aux: float = 0.0
    finite: bool = True


class TrainingRun:
    """One run's state and the parts of its loop: a step, its report, evaluation, saving."""

    def __init__(self, s: TrainSettings, h: Hyperparameters, ddp: Distributed, console: Console, start: Start,
                 data_dir: Path, meta: dict, tokenizer: Tokenizer):
        self.s, self.h, self.ddp, self.console, self.start = s, h, ddp, console, start
        self.data_dir, self.tokenizer, self.out_dir = data_dir, tokenizer, start.out_dir
        state = start.state or {}
        self.start_step = state.get("step", 0) if start.state else 0
        self.tokens_per_step = tokens_per_step(h, ddp.world_size)
        val = meta["splits"]["val"]
        # a masked (chat) loss counts only some tokens: it has no bits per byte
        self.bytes_per_token = (val["bytes"] / val["tokens"]) if val.get("tokens") and "mask" not in val else None
        self.best = dict(loss=state.get("best_val_loss", math.inf), step=state.get("best_step"))
        self.stale_evals = state.get("evals_without_improvement", 0)
        self.tokens_seen = state.get("tokens_seen", 0)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.record = s.record(h)
        self.plan: budget.Plan | None = None  # the time budget's schedule, kept in every checkpoint
        self.t_start = time.perf_counter()

    def attach(self, model, train_model, optimizer, sampler: WindowSampler, val_tokens, autocast,
               val_mask: np.ndarray | None = None, average: WeightAverage | None = None) -> None:
        self.model, self.train_model, self.optimizer, self.average = model, train_model, optimizer, average
        self.sampler, self.val_tokens, self.autocast, self.val_mask = sampler, val_tokens, autocast, val_mask
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.ddp.is_main,
                                  self.start_step if self.start.state else None)

    # --- saving
    def trainer_state(self, step: int) -> dict:
        h = self.h
        return {"preset": self.start.preset, "tokens_seen": self.tokens_seen, "best_val_loss": self.best["loss"],
                "best_step": self.best["step"], "evals_without_improvement": self.stale_evals,
                "elapsed_s": self.elapsed_before + (time.perf_counter() - self.t_start),
                "sampler": {"kind": "WindowSampler", "seed": h.seed, "next_step": step},
                "scheduler": {"kind": "warmup_cosine", "learning_rate": h.learning_rate, "min_lr": h.min_lr,
                              "warmup_steps": h.warmup_steps, "steps": h.steps},
                "budget": self.plan.to_dict() if self.plan else None,
                "args": self.record, "tokenizer_sha256": self.tokenizer.sha256, "data_dir": str(self.data_dir),
                "world_size": self.ddp.world_size, "tokens_per_step": self.tokens_per_step}

    def gather(self) -> dict:
        """The checkpoint's tensors; with --ema its model is the average, and the training weights go on
        beside the optimiser's state."""
        gathered = ckpt.gather_state(self.model, self.optimizer)
        if self.average is None:
            return gathered
        with self.average.applied():
            return {**gathered, "model": ckpt.model_tensors(self.model), "training_weights": gathered["model"]}

    def save(self, step: int, reason: str) -> Path | None:
        """Rank 0 writes. A write the system refuses (a full disk, ...) stops the run, every rank, with
        one line (exit code 2): the checkpoints written before are intact, and --resume-from auto goes on
        from the last of them once there is room."""
        path = failure = None
        ddp = self.ddp
        gathered = self.gather() if self.s.fsdp or ddp.is_main else None  # FSDP: all ranks
        if ddp.is_main:
            try:
                path = ckpt.save_checkpoint(self.out_dir, step, self.model, self.optimizer, self.trainer_state(step),
                                            self.start.config, self.tokenizer.path, gathered)
                ckpt.prune(self.out_dir, self.s.keep_last)
                self.console.say(f"saved {reason} checkpoint: {path}")
            except (OSError, UserError) as e:
                last = ckpt.find_latest(self.out_dir)
                what = e if isinstance(e, UserError) else f"could not save step {step}'s checkpoint: {e.strerror or e}"
                failure = f"{what}; " + (f"the last checkpoint, {last}, is intact: continue with --resume-from auto"
                                         if last else "no checkpoint was saved")
        stop = failure is not None
        if ddp.enabled:  # every rank stops together (the all-reduce is also the barrier)
            flag = torch.tensor([int(stop)], device=ddp.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag)
        if stop:
            raise UserError(failure or f"rank 0 could not save the checkpoint of step {step}")
        return path

    # --- one optimizer step
    def forward_backward(self, step: int) -> StepLosses:
        """The micro-batches of `step`: forward, backward, and their mean losses (all ranks)."""
        h, ddp, device = self.h, self.ddp, self.ddp.device
        out_losses = StepLosses()
        for micro in range(h.grad_accum):
            x, y = self.sampler.batch(step, micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = nullcontext()
            if ddp.enabled and not self.s.fsdp and micro < h.grad_accum - 1:
                sync = self.train_model.no_sync()
            with sync:
                out = window_loss(self.train_model, self.model, x, y, self.sampler.lead(step, micro), h,
                                  self.autocast, self.tokenizer.eot_id if h.document_masking else None)
                (out.loss / h.grad_accum).backward()  # outside autocast, as torch recommends
            value = out.loss.item()
            out_losses.finite = out_losses.finite and math.isfinite(value)
            out_losses.loss += value / h.grad_accum
            if out.mtp_loss is not None:
                out_losses.mtp += out.mtp_loss.item() / h.grad_accum
            if out.aux_loss is not None:
                out_losses.aux += out.aux_loss.item() / h.grad_accum
        if ddp.enabled:
            t = torch.tensor([out_losses.loss, float(not out_losses.finite)], device=device)
            dist.all_reduce(t)
            out_losses.loss, out_losses.finite = t[0].item() / ddp.world_size, t[1].item() == 0
        return out_losses

    def report_step(self, step: int, lr: float, losses: StepLosses, grad_norm: float, bar) -> None:
        now = time.perf_counter()
        tok_s = self.window_tokens / max(now - self.window_t, 1e-9)
        record = {"step": step, "loss": losses.loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                  "tokens_per_s": round(tok_s, 1), "elapsed_s": round(self.elapsed_before + now - self.t_start, 2)}
        mtp_weight, is_moe = self.h.mtp_weight or 0.0, self.start.config.is_moe
        if mtp_weight:
            record["mtp_loss"] = losses.mtp
        if is_moe:
            record["aux_loss"] = losses.aux
        self.metrics.add(record)
        bar.set_postfix(loss=f"{losses.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % self.s.print_every == 0 or step == self.h.steps:
            extra = f" mtp {losses.mtp:.4f}" if mtp_weight else ""
            extra += f" aux {losses.aux:.4f}" if is_moe else ""
            self.console.say(f"step {step:>6}/{self.h.steps}  loss {losses.loss:.4f}{extra}  lr {lr:.2e}  "
                             f"grad {grad_norm:.2f}  {tok_s:,.0f} tok/s")
            self.window_t, self.window_tokens = now, 0

    def stop_nonfinite(self, step: int, what: str) -> None:
        prev = ckpt.find_latest(self.out_dir) if self.ddp.is_main else None
        self.console.log(f"error: non-finite {what} at step {step}; stopping. The last good checkpoint is "
                         f"{prev or 'none (nothing saved yet)'}. Lower --learning-rate, or --skip-nonfinite.",
                         file=sys.stderr)

    # --- evaluation
    def write_loss_curve(self) -> None:
        if self.ddp.is_main:
            save_loss_curve(self.metrics.records, self.out_dir / "loss_curve.png",
                            f"{self.start.preset} on {self.data_dir}")

    def evaluate(self, step: int) -> tuple[bool, bool]:
        """Validate, keep the best checkpoint. Returns (saved a checkpoint, stop early)."""
        h = self.h
        with self.average.applied() if self.average is not None else nullcontext():  # the model a checkpoint holds
            ev = evaluate(self.train_model, self.val_tokens, h.seq_len, h.batch_size, h.eval_batches,
                          self.ddp.device, self.bytes_per_token, self.autocast, self.ddp,
                          self.tokenizer.eot_id if h.document_masking else None, self.val_mask)
        self.metrics.add({"step": step, **ev})
        bpb = f"  bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
        self.console.say(f"eval {step:>6}: val loss {ev['val_loss']:.4f}  ppl {ev['val_ppl']:.2f}{bpb}")
        self.write_loss_curve()
        if ev["val_loss"] < self.best["loss"] - self.s.early_stop_min_delta:
            self.best.update(loss=ev["val_loss"], step=step)
            self.stale_evals = 0
            path = self.save(step, "best")
            if path is not None:
                ckpt.point(self.out_dir, "best", path)
            return True, False
        self.stale_evals += 1
        if self.s.early_stop_patience and self.stale_evals >= self.s.early_stop_patience:
            self.console.log(f"early stop: no improvement for {self.stale_evals} evaluations (best "
                             f"{self.best['loss']:.4f} at step {self.best['step']})")
            return False, True
        return False, False

    def time_up(self, stop: "_StopRequest") -> bool:
        """--max-minutes reached; under torchrun every rank takes the same decision (and signal), or the
        others would wait forever."""
        # a budgeted run follows its plan (so that a resumed run is the uninterrupted one); without a plan,
        # --max-minutes cuts the run short
        time_up = bool(self.s.max_minutes and self.plan is None
                       and (time.perf_counter() - self.t_start) / 60 >= self.s.max_minutes)
        if self.ddp.enabled:
            flags = torch.tensor([stop.signal or 0, int(time_up)], device=self.ddp.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop.signal, time_up = (int(flags[0]) or None), bool(flags[1])
        return time_up

    # --- the loop
    def loop(self) -> tuple[int, int]:
        """Train to the last step (or a stop). Returns (step reached, exit code)."""
        h, say = self.h, self.console.say
        stop = _StopRequest()
        stop.install()
        self.t_start = time.perf_counter()
        bar = tqdm(total=h.steps, initial=self.start_step, disable=not self.ddp.is_main, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        step, exit_code, last_saved = self.start_step, 0, self.start_step if self.start.state else None
        self.window_t, self.window_tokens = time.perf_counter(), 0
        try:
            while step < h.steps:
                lr = lr_at(step, h.learning_rate, h.min_lr, h.warmup_steps, h.steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                losses = self.forward_backward(step)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), h.grad_clip or float("inf")))
                if not (losses.finite and math.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    what = f"loss {losses.loss}" if not losses.finite else f"gradient norm {grad_norm}"
                    if self.s.skip_nonfinite:
                        say(f"step {step}: non-finite {what}; step skipped (--skip-nonfinite)")
                        step += 1
                        bar.update(1)
                        continue
                    self.stop_nonfinite(step, what)
                    exit_code = 1
                    break
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                if self.average is not None:
                    self.average.update(step)
                self.tokens_seen += self.tokens_per_step
                self.window_tokens += self.tokens_per_step
                bar.update(1)
                self.report_step(step, lr, losses, grad_norm, bar)

                time_up = self.time_up(stop)
                if step % h.eval_every == 0 or step == h.steps or time_up:  # a run cut short is still measured
                    saved, early_stop = self.evaluate(step)
                    last_saved = step if saved else last_saved
                    if early_stop:
                        break
                if step % h.save_every == 0 and last_saved != step:
                    self.save(step, "periodic")
                    last_saved = step
                if stop.signal is not None:
                    say(f"{signal.Signals(stop.signal).name} received at step {step}: saving and stopping; "
                        "resume with --resume-from auto")
                    exit_code = 128 + stop.signal
                    break
                if time_up:
                    say(f"--max-minutes {self.s.max_minutes:g} reached at step {step}")
                    break
            if exit_code != 1 and last_saved != step:
                self.save(step, "final")
        finally:
            bar.close()
            stop.restore()
        return step, exit_code


# -------------------------------------------------------------------------------------------- main
def run_training(s: TrainSettings, prepare: Callable[[], object] | None = None) -> int:
    """Train as `s` says, on one device or under torchrun; `prepare` (rank 0, first) makes the data
    directory when it is to be prepared from text. Returns the exit code."""
    ddp = setup_distributed(s.device)
    try:
        return _train(s, ddp, prepare)
    finally:
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _plan(run: TrainingRun, n_params: int, kernel: str, dtype: str, meta: dict) -> None:
    s, h, ddp, split, log = run.s, run.h, run.ddp, meta["splits"], run.console.log
    log(f"model: {run.start.preset}, {n_params:,} parameters ({fmt_count(n_params)})")
    log(f"device: {ddp.device}   kernel: {kernel}   dtype: {dtype}   compile: {bool(s.compile)}"
        f"{'   world size: ' + str(ddp.world_size) + (' (FSDP2)' if s.fsdp else ' (DDP)') if ddp.enabled else ''}")
    log(f"data: {run.data_dir} ({split['train']['tokens']:,} train / {split['val']['tokens']:,} validation tokens)")
    log(f"batch: {h.batch_size} x {h.seq_len} tokens x {h.grad_accum} accumulation x {ddp.world_size} "
        f"process(es) = {run.tokens_per_step:,} tokens per step (global batch {h.batch_size * h.grad_accum * ddp.world_size})")
    log(f"plan: steps {run.start_step} -> {h.steps}, {run.tokens_per_step * max(0, h.steps - run.start_step):,} tokens; "
        f"lr {h.learning_rate:g} (warm-up {h.warmup_steps}, cosine to {h.min_lr:g})"
        f"{f'; weights averaged (--ema {h.ema:g})' if h.ema else ''}; out: {run.out_dir}")


def forget_step(model: torch.nn.Module, optimizer, initial: dict[str, torch.Tensor]) -> None:
    """Put back the weights `initial` (a copy of the state dict) and a fresh optimiser: a throw-away
    step leaves no trace."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            value.copy_(initial[name])
    for part in ckpt.optimizer_parts(optimizer):
        part.state.clear()


def _budget_plan(s: TrainSettings, h: Hyperparameters, state: dict | None, modules: tuple, data: tuple, meta: dict,
                 tokenizer: Tokenizer, autocast, ddp: Distributed, t_launch: float, log,
                 max_steps: int | None = None) -> budget.Plan | None:
    """The time budget's plan (see budget.py); None without a budget. A resumed budgeted run keeps its
    checkpoint's plan; a fresh one measures a few throw-away steps (the model, optimiser and random
    generators stay as they were) and one evaluation first. `max_steps`: --config auto's cap."""
    if state and state.get("budget"):
        plan = budget.Plan.from_dict(state["budget"])
        log(plan.describe())
        return plan
    if s.max_minutes is None or s.hyper.steps is not None or state:
        return None  # --steps given (--max-minutes then only cuts the run short), or no budget
    model, train_model, optimizer = modules
    train_tokens, val_tokens, train_mask = data
    device = ddp.device
    sampler = WindowSampler(train_tokens, h.seq_len, h.batch_size, h.seed, ddp.rank, ddp.world_size, train_mask,
                            h.lead_in)
    split = meta["splits"]["val"]
    bytes_per_token = split["bytes"] / split["tokens"] if split.get("tokens") and "mask" not in split else None
    eot = tokenizer.eot_id if h.document_masking else None
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def throwaway_step():
        for micro in range(h.grad_accum):
            x, y = (t.to(device) for t in sampler.batch(0, micro))
            loss = window_loss(train_model, model, x, y, sampler.lead(0, micro), h, autocast, eot).loss
            (loss / h.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip or float("inf"))
        optimizer.step()  # timed too: Muon's orthogonalisation is a fair share of a step on a CPU
        optimizer.zero_grad(set_to_none=True)
        forget_step(model, optimizer, initial)

    def evaluate_once():
        return evaluate(train_model, val_tokens, h.seq_len, h.batch_size, h.eval_batches, device, bytes_per_token,
                        autocast, ddp, eot)

    log(f"budget: measuring the speed ({budget.WARM_STEPS + budget.TIMED_STEPS} throw-away steps, one evaluation)")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        step_s, eval_s, ev = budget.measure(throwaway_step, evaluate_once, compiled=bool(s.compile))
    # weights + AdamW moments (+ the training weights beside an average), written at ~100 MB/s
    save_s = (12 + 4 * bool(h.ema)) * model.num_parameters() / 100e6
    times = torch.tensor([step_s, eval_s + save_s, budget.clock() - t_launch], dtype=torch.float64)
    if ddp.enabled:  # every rank must plan the same schedule: the slowest one's
        times = times.to(device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    step_s, eval_s, setup_s = times.tolist()
    plan = budget.plan(s.max_minutes, setup_s, step_s, eval_s, s.hyper.warmup_steps, s.hyper.eval_every, max_steps)
    log(f"eval      0: val loss {ev['val_loss']:.4f}" + (f"  bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""))
    log(plan.describe())
    if max_steps is not None and plan.steps == max_steps:
        log(f"--config auto: the budget allows more than {auto.MAX_PASSES:g} passes over the training text, "
            f"and more overfit: the run stops at {max_steps:,} steps, before its budget")
    return plan


def _train(s: TrainSettings, ddp: Distributed, prepare: Callable[[], object] | None) -> int:
    from .data import open_loss_mask, open_split

    t_launch = budget.clock()  # a time budget counts from here
    console = Console(ddp.is_main)
    meta, tokenizer = _load_data(s, ddp, prepare)
    start = _starting_point(s, tokenizer, console)
    # chat data carry loss masks (only assistant replies count), and conversations packed in a window
    # do not see each other: document masking is on unless the command line says otherwise
    train_mask, val_mask = open_loss_mask(s.data_dir, meta, "train"), open_loss_mask(s.data_dir, meta, "val")
    hyper = s.hyper
    if train_mask is not None and hyper.document_masking is None:
        hyper = replace(hyper, document_masking=True)
    train_tokens, val_tokens = open_split(s.data_dir, "train"), open_split(s.data_dir, "val")
    h = resolve_hyperparameters(hyper, (start.state or {}).get("args", {}) if start.state else None, start.preset,
                                len(train_tokens), s.max_minutes, ddp.device.type, s.fsdp)
    if start.preset == auto.NAME and start.state is None:
        console.log(f"--config auto: {auto.TRUNK}'s trunk with vocab {start.config.vocab_size:,}; batch {h.batch_size} "
                    f"x {h.seq_len}, lr {h.learning_rate:g}, dropout {h.dropout:g}, weight decay {h.weight_decay:g}, "
                    f"optimizer {h.optimizer}, lead-in {h.lead_in}, ema {h.ema:g} (see the README's rule)")
    _validate(h, start.config, len(train_tokens))
    asked = s.compile if s.compile is not None else ((start.state or {}).get("args") or {}).get("compile")
    s = replace(s, compile=use_compile(asked, s.max_minutes, s.hyper.steps, ddp.device, h.lead_in))  # a resume keeps its choice

    model, kernel, n_params = _build_model(s, start, h.seed, ddp.device, h.dropout)
    train_model = _distribute(model, s, ddp)
    # the average starts from the weights the checkpoint hands out (with --ema, its average); training
    # goes on from its training weights
    average = WeightAverage(model, h.ema) if h.ema else None
    saved = ckpt.load_tensors(start.resume_path / ckpt.OPTIM_FILE) if start.resume_path is not None else None
    if saved is not None:
        ckpt.load_training_weights(model, start.resume_path, saved)
    if h.optimizer == "muon" and s.fsdp:  # a resumed Muon run
        raise UserError("this run was trained with --optimizer muon, which does not work with --fsdp (Muon needs "
                        "each matrix whole); resume it with DDP (torchrun without --fsdp)")
    optimizer = build_optimizer(model, h.learning_rate, h.weight_decay, (h.beta1, h.beta2),
                                decay_norms=not h.no_decay_norms, kind=h.optimizer)
    if saved is not None:
        ckpt.load_optimizer(model, optimizer, start.resume_path, saved)
        ckpt.restore_rng(start.resume_path, start.state, saved)
        del saved
    dtype, autocast = _autocast(s.dtype, ddp.device)
    # with --max-minutes and no --steps, the measured speed fixes steps, warm-up and evaluation interval
    cap = auto.max_steps(len(train_tokens), tokens_per_step(h, ddp.world_size)) if start.preset == auto.NAME else None
    plan = _budget_plan(s, h, start.state, (model, train_model, optimizer), (train_tokens, val_tokens, train_mask),
                        meta, tokenizer, autocast, ddp, t_launch, console.log, cap)
    if plan is not None:
        h = replace(h, steps=plan.steps, warmup_steps=plan.warmup_steps, eval_every=plan.eval_every)
    run = TrainingRun(s, h, ddp, console, start, s.data_dir, meta, tokenizer)
    run.plan = plan
    _plan(run, n_params, kernel, dtype, meta)
    if ddp.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run.out_dir, os.W_OK):
            raise UserError(f"output directory {run.out_dir} is not writable")
    sampler = WindowSampler(train_tokens, h.seq_len, h.batch_size, h.seed, ddp.rank, ddp.world_size, train_mask,
                            h.lead_in)
    run.attach(model, train_model, optimizer, sampler, val_tokens, autocast, val_mask, average)

    step, exit_code = run.loop()
    if ddp.is_main and exit_code != 1 and run.metrics.records:
        run.write_loss_curve()
        console.log(f"done: step {step}, {run.tokens_seen:,} tokens, best val loss {run.best['loss']:.4f} "
                    f"(step {run.best['step']}); checkpoint {ckpt.find_latest(run.out_dir)}; "
                    f"loss curve {run.out_dir / 'loss_curve.png'}")
    return exit_code
