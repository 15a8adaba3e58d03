"""A model ready to use, from a training checkpoint or from a Hugging Face directory.

Dependencies run one way: `checkpoint` (our checkpoints) <- `interop` (the Hugging Face format, and
export from a checkpoint) <- this module, which reads either kind of directory. Every path here checks
the model and its tokenizer together (`checkpoint.check_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import interop
from .config import Config
from .util import UserError


def is_ours(path: Path) -> bool:
    return ckpt.is_checkpoint(path) or ckpt.is_checkpoint(path / "latest")


def load_pretrained_config(path: str | Path) -> Config:
    """The Config of a training checkpoint or of a Hugging Face Qwen3-Next directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model path not found: {p}")
    if is_ours(p):
        return ckpt.load_config(ckpt.resolve_checkpoint(p, verify=False))
    if interop.is_hf_dir(p):
        return interop.load_hf_config(p)
    raise UserError(f"not a checkpoint or a Hugging Face model directory: {p}")


def load_pretrained_weights(model: torch.nn.Module, path: str | Path) -> None:
    p = Path(path)
    if is_ours(p):
        c = ckpt.resolve_checkpoint(p)
        ckpt.load_weights(model, ckpt.load_tensors(c / ckpt.MODEL_FILE), c)
        return
    ckpt.load_weights(model, interop.load_hf_tensors(p), p)


def trained_context(state: dict) -> int | None:
    """The most positions a training run's attention saw (its window and the lead-in read before it),
    from trainer_state.json; None when the state does not say."""
    args = state.get("args") or {}
    return args["seq_len"] + (args.get("lead_in") or 0) if args.get("seq_len") else None


def load_for_inference(path: str | Path, device: str = "auto", kernel: str = "auto", dtype: str = "fp32",
                       attention_window: int | None = None):
    """A model ready to generate or evaluate, from a training checkpoint or a Hugging Face directory.
    dtype "bf16" keeps the weights in bfloat16 (half the memory; faster where the hardware multiplies
    bf16; the DeltaNet state stays float32). attention_window: the positions attention sees of a long
    text (`set_attention_window`); None: a checkpoint's trained context (all for a Hugging Face
    directory); 0: all. Returns (model in eval mode on the device, tokenizer, info dict)."""
    import torch

    from .model import Qwen3NextForCausalLM
    from .util import resolve_device

    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    info: dict = {"source": str(p)}
    window = attention_window
    if is_ours(p):
        config, state, tensors, tokenizer = ckpt.load_model_files(ckpt.resolve_checkpoint(p))
        info.update(kind="checkpoint", step=state.get("step"), preset=state.get("preset"),
                    seq_len=(state.get("args") or {}).get("seq_len"))
        window = trained_context(state) if window is None else window
    else:
        if not interop.is_hf_dir(p):
            raise UserError(f"not a checkpoint or a Hugging Face model directory: {p}")
        config = interop.load_hf_config(p)
        tensors = interop.load_hf_tensors(p)
        tokenizer = None  # read after the weights: a weight problem is the one to report first
        info.update(kind="huggingface")
    dev = resolve_device(device)
    model = Qwen3NextForCausalLM(config)
    ckpt.load_weights(model, tensors, p)
    if tokenizer is None:
        tokenizer = interop.load_hf_tokenizer(p, config)
    model.to(dev, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    model.set_kernel(kernel, dev)
    model.set_attention_window(window or None)
    info.update(device=str(dev), kernel=model.kernel, parameters=model.num_parameters(), dtype=dtype,
                attention_window=model.attention_window)
    return model, tokenizer, info
