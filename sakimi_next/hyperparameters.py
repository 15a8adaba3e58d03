"""A run's hyperparameters, as given and as resolved.

`settings.Hyperparameters` holds them as given, on the command line or in a resumed checkpoint: None
where not given. `resolve_hyperparameters` settles each one: the command line first, then the
checkpoint's, then the preset's defaults (config.PRESETS; --config auto: those auto.py picks from the
text and the budget), into `ResolvedHyperparameters`, where nothing is None. `validate_hyperparameters`
checks what can only be checked once the model and the data are known.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from . import auto
from .config import Config, training_defaults
from .settings import OPTIMIZERS, Hyperparameters
from .util import UserError

RESUMABLE = tuple(f.name for f in fields(Hyperparameters))


@dataclass(frozen=True)
class ResolvedHyperparameters:
    """Every training hyperparameter settled (the fields of `Hyperparameters`, in its order)."""

    steps: int
    learning_rate: float
    min_lr: float
    warmup_steps: int
    batch_size: int
    seq_len: int
    grad_accum: int
    weight_decay: float
    no_decay_norms: bool
    beta1: float
    beta2: float
    grad_clip: float  # 0 = off
    save_every: int
    eval_every: int
    eval_batches: int
    seed: int
    mtp_weight: float
    document_masking: bool
    dropout: float
    optimizer: str  # a name in settings.OPTIMIZERS
    lead_in: int
    ema: float  # 0 = off
    activation_checkpointing: bool

    @property
    def max_grad_norm(self) -> float:
        """The gradient norm clipping keeps to (infinite: --grad-clip 0, no clipping)."""
        return self.grad_clip if self.grad_clip > 0 else math.inf

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens in one optimiser step: every micro-batch of every process."""
        return self.batch_size * self.seq_len * self.grad_accum * world_size


def resolve_hyperparameters(given: Hyperparameters, resumed: dict | None, preset_name: str | None,
                            train_tokens: int = 0, max_minutes: float | None = None,
                            device_type: str = "cpu", fsdp: bool = False) -> ResolvedHyperparameters:
    """Command line first, then the checkpoint's settings when resuming (`resumed`: its "args"), then the
    preset's defaults (--config auto: those auto.py picks from the training tokens and the budget)."""
    if preset_name == auto.NAME:
        defaults = asdict(replace(training_defaults(auto.TRUNK),
                                  **auto.training_defaults(train_tokens, max_minutes, device_type, fsdp)))
    else:
        defaults = asdict(training_defaults(preset_name))
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
    return ResolvedHyperparameters(**out)


def validate_hyperparameters(h: ResolvedHyperparameters, config: Config, train_tokens: int) -> None:
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
    if h.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {h.optimizer!r} is not one of: {', '.join(OPTIMIZERS)}")
    if h.lead_in and h.document_masking:
        raise UserError("--lead-in reads the text before each window, --document-masking keeps packed documents "
                        "apart (chat data turns it on): use one of them")
