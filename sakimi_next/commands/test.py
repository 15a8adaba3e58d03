"""`--mode test`: build a preset with seeded random weights, describe it, and time one forward pass."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

from ..config import Config, preset
from ..util import UserError, format_table, resolve_device
from . import common

HELP = "describe a preset and time one forward pass on random weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_preset(p)
    common.add_device(p)
    common.add_seed(p)
    p.add_argument("--batch-size", type=int, default=2, help="sequences in the forward pass")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")


@dataclass(frozen=True)
class TestSettings:
    preset: str
    device: str
    kernel: str
    seed: int
    batch_size: int
    seq_len: int


def settings(args: argparse.Namespace) -> TestSettings:
    name = common.preset_name(args.config)
    s = TestSettings(preset=name, device=args.device, kernel=common.kernel_name(args),
                     seed=common.seed(args.seed) or 0, batch_size=common.count("--batch-size", args.batch_size),
                     seq_len=common.count("--seq-len", args.seq_len))
    limit = preset(name).max_position_embeddings
    if s.seq_len > limit:
        raise UserError(f"--seq-len ({s.seq_len}) exceeds max_position_embeddings ({limit})")
    return s


def describe_config(config: Config) -> str:
    """The configuration as a two-column table (MoE fields only when experts are on)."""
    moe_fields = {"num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"}
    rows = []
    for k, v in config.to_dict().items():
        if k == "layer_types":
            n_full = v.count("full_attention")
            letters = " ".join("A" if t == "full_attention" else "L" for t in v)
            v = f"{len(v) - n_full} linear : {n_full} full  ({letters})"
        elif k in moe_fields and not config.num_experts:
            continue
        elif k == "num_experts" and not v:
            v = "0 (dense SwiGLU MLP in every layer)"
        rows.append((k, v))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def describe_parameters(model) -> str:
    from ..model import active_parameters, parameter_breakdown

    config = model.config
    total = model.num_parameters()
    table = [(part, f"{per:,}", f"x{units}", f"{per * units:,}") for part, per, units in parameter_breakdown(config)]
    table.append(("total", "", "", f"{total:,}"))
    lines = ["parameters", format_table(table, ("part", "each", "count", "total")),
             f"non-embedding: {total - config.vocab_size * config.hidden_size:,}"]
    if config.is_moe:  # a token runs only k of the E routed experts in each MoE layer
        n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        lines.append(f"active per token: {active_parameters(config):,} of {total:,} ({config.num_experts_per_tok} "
                     f"of {config.num_experts} routed experts in each of {n_moe} MoE layers)")
    return "\n".join(lines)


def run(s: TestSettings) -> int:
    import torch

    from ..model import Qwen3NextForCausalLM

    config = preset(s.preset)
    device = resolve_device(s.device)
    torch.manual_seed(s.seed)
    model = Qwen3NextForCausalLM(config).to(device)
    kernel = model.set_kernel(s.kernel, device)

    print(f"sakimi-next --mode test: preset {s.preset}\n")
    print("configuration")
    print(describe_config(config))
    print()
    print(describe_parameters(model))
    print()

    print(f"device: {device}   kernel: {kernel}   dtype: float32   threads: {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(s.seed)
    x = torch.randint(0, config.vocab_size, (s.batch_size, s.seq_len + 1), generator=gen).to(device)
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
    n_tok = s.batch_size * s.seq_len
    print(f"forward: input {tuple(x[:, :-1].shape)} -> logits {tuple(out.logits.shape)}")
    print(f"loss: {out.loss.item():.4f}   (random weights: ln(vocab) = {math.log(config.vocab_size):.4f})")
    print(f"speed: {n_tok / dt:,.0f} tokens/s ({dt * 1000:.1f} ms for {n_tok:,} tokens)")
    return 0
