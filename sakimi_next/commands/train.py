"""`--mode train`: flags -> `TrainSettings`, every value checked; then the training loop (train.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..metrics import require_tensorboard
from ..settings import AUTO_PRESET, DEFAULT_DATA_DIR, OPTIMIZERS, Hyperparameters, TrainSettings
from ..util import UserError
from . import common
from .prepare_data import PrepareDataSettings, add_data_arguments, data_settings, prepare

HELP = "train a model on a prepared data directory (one device, or DDP/FSDP2 under torchrun)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_preset(p, "model preset, or auto: sized from the text and the time budget (the default of a fresh "
                         "run; see docs/training.md), or the resumed checkpoint's")
    common.add_device(p)
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="compute dtype: auto = bf16 autocast where the hardware has bf16 (CUDA, CPUs with "
                        "AVX512-BF16 or AMX), fp32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each decoder layer (default: on for a --max-minutes budget of 10 or more "
                        "where a compiler is at hand; ~30 s once, then ~15%% faster steps on a CPU)")
    p.add_argument("--out-dir", default=None, help="run directory: checkpoints, metrics.jsonl, loss_curve.png "
                                                   "(default runs/PRESET, or the resumed checkpoint's)")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write the logged numbers (loss, lr, grad norm, tokens/s, validation loss and bits/byte) "
                        "as TensorBoard event files, in DIR (default OUT_DIR/tensorboard); needs tensorboard")
    common.add_checkpoint(p, "auto (latest valid checkpoint in --out-dir) or a checkpoint directory")
    p.add_argument("--init-from", default=None, help="start from these weights (checkpoint or Hugging Face dir)")
    d = p.add_argument_group("data (with --train-data, the data directory is prepared first)")
    add_data_arguments(d)

    # defaults are None here and filled in by hyperparameters.resolve_hyperparameters (the preset's defaults,
    # config.PRESETS, or a resumed checkpoint's own settings), so that resuming without repeating a flag keeps
    # its value
    t = p.add_argument_group("training (defaults: the preset's, or a resumed checkpoint's)")
    common.add_seed(t, "seed of the weights and the batches (a resumed run keeps its own)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=None, help="sequences per batch (per device)")
    t.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    t.add_argument("--learning-rate", "--lr", type=float, default=None, help="peak learning rate")
    t.add_argument("--min-lr", type=float, default=None, help="final learning rate of the cosine decay (lr/10)")
    t.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay on matrices (0.1)")
    t.add_argument("--no-decay-norms", action="store_true", default=None,
                   help="exclude the zero-centred norm weights from weight decay (Qwen3-Next decays them)")
    t.add_argument("--beta1", type=float, default=None, help="AdamW beta1 (0.9)")
    t.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (0.95)")
    t.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0 = off (1.0)")
    t.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (1)")
    t.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (250)")
    t.add_argument("--keep-last", type=int, default=3, help="periodic checkpoints to keep (0 = all)")
    t.add_argument("--eval-every", type=int, default=None, help="validate every N steps (200)")
    t.add_argument("--eval-batches", type=int, default=None, help="validation batches per evaluation (16)")
    t.add_argument("--print-every", type=int, default=10,
                   help="log a line every N steps; the steps' losses are read from the device then, not at each")
    t.add_argument("--early-stop-patience", type=int, default=0,
                   help="stop after N evaluations without improvement (0 = never)")
    t.add_argument("--early-stop-min-delta", type=float, default=0.0, help="smallest improvement that counts")
    t.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step with a non-finite loss instead of stopping (reads each step's loss "
                   "before its update: a GPU waits once a step)")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="a time budget: without --steps the run measures its speed and plans steps, warm-up, decay "
                        "and evaluations to end in M minutes; with --steps it stops (and saves) after M minutes")
    t.add_argument("--dropout", type=float, default=None,
                   help="dropout on the embedding and every residual branch while training, in [0, 1) (0; "
                        "--config auto picks one); evaluation, generation and exported models never drop")
    t.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS),
                   help="; ".join(f"{name}: {o.help}" for name, o in OPTIMIZERS.items())
                   + " (adamw; --config auto picks muon)")
    t.add_argument("--lead-in", type=int, default=None,
                   help="tokens of the text right before each training window that the model reads first, "
                        "without gradient, so that every window continues a longer text, as in generation and "
                        "in eval's carried state (0 = windows start cold; --config auto picks one)")
    t.add_argument("--ema", type=float, default=None, metavar="H",
                   help="hand out an average of the weights along the run instead of the last step's (evaluated, "
                        "kept as best and saved as the model): a power-function EMA in which a step weighs half as "
                        "much as one H of the run later; in [0, 1), 0 = off (0; --config auto picks 0.1)")
    t.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only each decoder layer's input in the forward pass and recompute the layer in the "
                        "backward: less memory for longer windows (--seq-len), ~1/3 more compute, the same "
                        "gradients; a resumed run keeps its choice unless told (off)")
    t.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun")
    t.add_argument("--document-masking", action="store_true", default=None,
                   help="packed documents do not see each other: attention, conv and DeltaNet state restart "
                        "after each <|endoftext|> in a training window")
    t.add_argument("--mtp-weight", type=float, default=None,
                   help="train a multi-token-prediction block with this weight on its loss (e.g. 0.3)")


@dataclass(frozen=True)
class TrainCommandSettings:
    training: TrainSettings
    prepare: PrepareDataSettings | None  # --train-data: prepare the data directory first


def hyperparameters(args: argparse.Namespace) -> Hyperparameters:
    """The training flags as given (None: not given), each checked on its own."""
    c, f = common.count, common.finite_float
    lr = common.positive_float("--learning-rate", args.learning_rate)
    f("--min-lr", args.min_lr, lo=0)
    if lr is not None and args.min_lr is not None and args.min_lr > lr:
        raise UserError(f"--min-lr ({args.min_lr}) must be between 0 and the learning rate ({lr})")
    for flag in ("--beta1", "--beta2"):
        f(flag, getattr(args, flag[2:]), lo=0, hi=1, hi_open=True)
    return Hyperparameters(
        steps=c("--steps", args.steps), learning_rate=lr, min_lr=args.min_lr,
        warmup_steps=c("--warmup-steps", args.warmup_steps, minimum=0),
        batch_size=c("--batch-size", args.batch_size), seq_len=c("--seq-len", args.seq_len),
        grad_accum=c("--grad-accum", args.grad_accum), weight_decay=f("--weight-decay", args.weight_decay, lo=0),
        no_decay_norms=args.no_decay_norms, beta1=args.beta1, beta2=args.beta2,
        grad_clip=f("--grad-clip", args.grad_clip, lo=0), save_every=c("--save-every", args.save_every),
        eval_every=c("--eval-every", args.eval_every), eval_batches=c("--eval-batches", args.eval_batches),
        seed=common.seed(args.seed), mtp_weight=f("--mtp-weight", args.mtp_weight, lo=0),
        document_masking=args.document_masking,
        dropout=f("--dropout", args.dropout, lo=0, hi=1, hi_open=True), optimizer=args.optimizer,
        lead_in=c("--lead-in", args.lead_in, minimum=0), ema=f("--ema", args.ema, lo=0, hi=1, hi_open=True),
        activation_checkpointing=args.activation_checkpointing)


def settings(args: argparse.Namespace) -> TrainCommandSettings:
    hyper = hyperparameters(args)
    common.count("--keep-last", args.keep_last, minimum=0, note=" (0 = keep all)")
    common.count("--print-every", args.print_every)
    common.count("--early-stop-patience", args.early_stop_patience, minimum=0, note=" (0 = never)")
    common.finite_float("--early-stop-min-delta", args.early_stop_min_delta, lo=0)
    common.positive_float("--max-minutes", args.max_minutes)
    problem = OPTIMIZERS[args.optimizer].fsdp_problem if args.optimizer else None
    if problem and args.fsdp:
        raise UserError(f"--optimizer {args.optimizer} does not work with --fsdp ({problem}); use DDP "
                        "(torchrun without --fsdp) or --optimizer adamw")
    if args.resume_from and args.init_from:
        raise UserError("give --resume-from (continue a run) or --init-from (start from weights), not both")
    data_dir = Path(args.data_dir or DEFAULT_DATA_DIR)
    out_dir = common.writable_dir("--out-dir", args.out_dir) if args.out_dir else None
    if out_dir is None and args.resume_from in (None, "auto"):
        common.writable_dir("--out-dir", f"runs/{common.preset_name(args.config, AUTO_PRESET, allow_auto=True)}")
    training = TrainSettings(
        data_dir=data_dir, hyper=hyper, preset=common.preset_name(args.config, default=None, allow_auto=True),
        out_dir=out_dir,
        resume_from=args.resume_from, init_from=args.init_from, allow_vocab_mismatch=args.allow_vocab_mismatch,
        device=args.device, kernel=common.kernel_name(args), dtype=args.dtype, compile=args.compile,
        fsdp=args.fsdp, keep_last=args.keep_last, print_every=args.print_every,
        early_stop_patience=args.early_stop_patience, early_stop_min_delta=args.early_stop_min_delta,
        skip_nonfinite=args.skip_nonfinite, max_minutes=args.max_minutes, **_tensorboard(args.tensorboard))
    prep = data_settings(args, data_dir, 0 if hyper.seed is None else hyper.seed) if args.train_data else None
    return TrainCommandSettings(training, prep)


def _tensorboard(flag: str | None) -> dict:
    """--tensorboard [DIR] as TrainSettings fields; the package missing is an error now, not after the data."""
    if flag is None:
        return {}
    require_tensorboard()
    return {"tensorboard": True, "tensorboard_dir": common.writable_dir("--tensorboard", flag) if flag else None}


def run(s: TrainCommandSettings) -> int:
    from ..train import run_training

    return run_training(s.training, partial(prepare, s.prepare) if s.prepare else None)
