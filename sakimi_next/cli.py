"""The command line: `sakimi-next --config tiny_10m --mode test|prepare_data|train|generate|eval|export|bench`.

Parsing and dispatch only; each mode's work lives in its own module. A bad input prints one line
(`error: ...`) and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time

from .config import PRESETS, RECOMMENDED_PRESET, ConfigError, preset
from .util import UserError, format_table, resolve_device

# mode -> (module, function); a mode is listed once it is implemented
MODES = {
    "test": ("sakimi_next.cli", "run_test"),
    "prepare_data": ("sakimi_next.data", "run_prepare_data"),
    "train": ("sakimi_next.train", "run_train"),
    "generate": ("sakimi_next.generate", "run_generate"),
    "eval": ("sakimi_next.evaluate", "run_eval"),
    "export": ("sakimi_next.interop", "run_export"),
    "bench": ("sakimi_next.bench", "run_bench"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the None/False of flags whose default the help text already explains."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sakimi-next",
        description="Qwen3-Next (Gated DeltaNet + Gated Attention) language models at small scale.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--mode", choices=list(MODES), default="test", help="what to do")
    p.add_argument("--config", default=None,
                   help=f"model preset: {', '.join(PRESETS)}; or auto (prepare_data, train: sized from the text and "
                        f"the budget, their default; other modes: {RECOMMENDED_PRESET}), or the checkpoint's")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--kernel", default="auto", choices=("auto", "chunk", "recurrent", "fla"),
                   help="gated delta rule kernel: auto = fla on CUDA when installed, else chunk")
    p.add_argument("--disable-fast-kernels", action="store_true",
                   help="use the plain recurrent kernel everywhere (same as --kernel recurrent)")
    p.add_argument("--seed", type=int, default=None, help="random seed (0; a resumed run keeps its own)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (per device)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="compute dtype: auto = bf16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile: the model (train), the decoding step (generate), both (bench)")

    d = p.add_argument_group("data (prepare_data, train, eval)")
    d.add_argument("--train-data", nargs="+", action="extend", default=None, metavar="PATH",
                   help="text: .txt/.jsonl files, directories or globs (default: the embedded CPython docs)")
    d.add_argument("--val-data", nargs="+", action="extend", default=None, metavar="PATH",
                   help="validation text (default: a held-out fraction of the training documents)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="held out for validation: documents, or stretches of a one-document corpus")
    d.add_argument("--doc-split", default="auto", choices=("auto", "file", "blank-line", "line"),
                   help="what a document is: auto = a .txt file exactly as written, or a JSONL record; "
                        "blank-line paragraphs or lines only when asked")
    d.add_argument("--encoding-errors", default="strict", choices=("strict", "replace"),
                   help="what to do with bytes that are not UTF-8")
    d.add_argument("--tokenizer", default=None, help="tokenizer.json to use or create (default DATA_DIR/tokenizer.json)")
    d.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    d.add_argument("--rebuild-tokenizer", action="store_true", help="train the tokenizer again even if it exists")
    d.add_argument("--allow-vocab-mismatch", action="store_true",
                   help="let the model's vocab_size follow the tokenizer instead of refusing")
    d.add_argument("--data-dir", default=None, help="prepared data directory (train.bin, val.bin, meta.json)")
    d.add_argument("--out-dir", default=None,
                   help="output directory (prepare_data: data/, train: runs/PRESET, export: required)")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps")
    t.add_argument("--learning-rate", "--lr", type=float, default=None, help="peak learning rate")
    t.add_argument("--min-lr", type=float, default=None, help="final learning rate of the cosine decay")
    t.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
    # training defaults are None here and filled in by train.py (preset defaults, or a resumed
    # checkpoint's own settings), so that resuming without repeating a flag keeps the original value
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay on matrices (0.1)")
    t.add_argument("--no-decay-norms", action="store_true", default=None,
                   help="exclude the zero-centred norm weights from weight decay (Qwen3-Next decays them)")
    t.add_argument("--beta1", type=float, default=None, help="AdamW beta1 (0.9)")
    t.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (0.95)")
    t.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0 = off (1.0)")
    t.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (1)")
    t.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    t.add_argument("--keep-last", type=int, default=3, help="periodic checkpoints to keep")
    t.add_argument("--eval-every", type=int, default=None, help="validate every N steps")
    t.add_argument("--eval-batches", type=int, default=None, help="validation batches per evaluation (16)")
    t.add_argument("--print-every", type=int, default=10, help="log a line every N steps")
    t.add_argument("--resume-from", "--checkpoint", dest="resume_from", default=None,
                   help="auto (latest valid checkpoint in --out-dir) or a checkpoint directory")
    t.add_argument("--init-from", default=None, help="start from these weights (checkpoint or Hugging Face dir)")
    t.add_argument("--early-stop-patience", type=int, default=0,
                   help="stop after N evaluations without improvement (0 = never)")
    t.add_argument("--early-stop-min-delta", type=float, default=0.0, help="smallest improvement that counts")
    t.add_argument("--skip-nonfinite", action="store_true", help="skip a step with a non-finite loss instead of stopping")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="a time budget: without --steps the run measures its speed and plans steps, warm-up, decay "
                        "and evaluations to end in M minutes; with --steps it stops (and saves) after M minutes")
    t.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun")
    t.add_argument("--document-masking", action="store_true", default=None,
                   help="packed documents do not see each other: attention, conv and DeltaNet state restart "
                        "after each <|endoftext|> in a training window")
    t.add_argument("--mtp-weight", type=float, default=None,
                   help="train a multi-token-prediction block with this weight on its loss (e.g. 0.3)")

    # issue 13: --dropout, read in train._settings (--config auto, the sizing rule, lives in sakimi_next/auto.py)
    r = p.add_argument_group("regularisation (train)")
    r.add_argument("--dropout", type=float, default=None,
                   help="dropout on the embedding and every residual branch while training, in [0, 1) (0; "
                        "--config auto picks one); evaluation, generation and exported models never drop")

    g = p.add_argument_group("generation and evaluation")
    g.add_argument("--prompt", default=None, help="prompt text (default: standard input, or empty)")
    g.add_argument("--prompt-file", default=None, help="one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1]")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--interactive", action="store_true", help="a prompt loop until EOF / Ctrl-D")
    g.add_argument("--truncate-prompt", action="store_true", help="keep the end of a prompt that is too long")
    g.add_argument("--speculative", choices=("mtp",), default=None,
                   help="speculative decoding: the MTP block drafts, the model verifies (greedy)")
    g.add_argument("--draft-len", type=int, default=3, help="tokens drafted per step with --speculative")
    g.add_argument("--text-file", default=None, help="eval: a UTF-8 text file to score")
    g.add_argument("--eval-method", default="carry", choices=("carry", "sliding"),
                   help="eval of long text: carry the state across windows, or plain sliding windows")
    g.add_argument("--json", action="store_true", help="eval: print JSON")

    b = p.add_argument_group("benchmark")
    b.add_argument("--compare", choices=("transformers",), default=None,
                   help="also measure transformers' Qwen3NextForCausalLM on the same weights")
    b.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed is None and args.mode != "train":  # training takes a resumed checkpoint's seed
        args.seed = 0
    import torch

    # Strongly decaying DeltaNet gates produce denormal floats (exp of -90..-100), which x86 CPUs
    # process up to 100x slower; flushing them to zero changes nothing measurable and saves ~30%.
    torch.set_flush_denormal(True)
    try:
        module, func = MODES[args.mode]
        return getattr(importlib.import_module(module), func)(args)
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def kernel_choice(args) -> str:
    return "recurrent" if args.disable_fast_kernels else args.kernel


def describe_config(config) -> str:
    """The configuration as a two-column table (MoE fields only when experts are on)."""
    moe_fields = {"num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"}
    rows = []
    for k, v in config.to_dict().items():
        if k == "layer_types":
            n_full = v.count("full_attention")
            v = f"{len(v) - n_full} linear : {n_full} full  ({' '.join('A' if t == 'full_attention' else 'L' for t in v)})"
        elif k in moe_fields and not config.num_experts:
            continue
        elif k == "num_experts" and not v:
            v = "0 (dense SwiGLU MLP in every layer)"
        rows.append((k, v))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def run_test(args) -> int:
    """Build the preset with seeded random weights, describe it, and time one forward pass."""
    import torch

    from .model import Qwen3NextForCausalLM, active_parameters, parameter_breakdown

    args.batch_size = 2 if args.batch_size is None else args.batch_size
    args.seq_len = 256 if args.seq_len is None else args.seq_len
    if args.batch_size <= 0 or args.seq_len <= 0:
        raise UserError(f"--batch-size ({args.batch_size}) and --seq-len ({args.seq_len}) must be positive")
    args.config = args.config or RECOMMENDED_PRESET
    config = preset(args.config)
    if args.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len ({args.seq_len}) exceeds max_position_embeddings ({config.max_position_embeddings})")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = Qwen3NextForCausalLM(config).to(device)
    try:
        kernel = model.set_kernel(kernel_choice(args), device)
    except ValueError as e:
        raise UserError(str(e)) from None

    print(f"sakimi-next --mode test: preset {args.config}\n")
    print("configuration")
    print(describe_config(config))
    print()

    rows = parameter_breakdown(config)
    total = model.num_parameters()
    table = [(part, f"{per:,}", f"x{units}", f"{per * units:,}") for part, per, units in rows]
    table.append(("total", "", "", f"{total:,}"))
    print("parameters")
    print(format_table(table, ("part", "each", "count", "total")))
    emb = config.vocab_size * config.hidden_size
    print(f"non-embedding: {total - emb:,}")
    if config.is_moe:  # a token runs only k of the E routed experts in each MoE layer
        n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        print(f"active per token: {active_parameters(config):,} of {total:,} "
              f"({config.num_experts_per_tok} of {config.num_experts} routed experts in each of {n_moe} MoE layers)")
    print()

    print(f"device: {device}   kernel: {kernel}   dtype: float32   threads: {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
    model.eval()
    with torch.inference_mode():
        model(x[:, :8], x[:, 1:9])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(x[:, :-1], x[:, 1:])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    n_tok = args.batch_size * args.seq_len
    print(f"forward: input {tuple(x[:, :-1].shape)} -> logits {tuple(out.logits.shape)}")
    print(f"loss: {out.loss.item():.4f}   (random weights: ln(vocab) = {math.log(config.vocab_size):.4f})")
    print(f"speed: {n_tok / dt:,.0f} tokens/s ({dt * 1000:.1f} ms for {n_tok:,} tokens)")
    return 0
