"""A model ready to use, from a training checkpoint or from a Hugging Face directory.

`resolve_model` is the one place that decides which of the two a path is; every loader goes through it
(--init-from, eval, generate, serve, export). Dependencies run one way: `checkpoint` (our checkpoints)
and `huggingface` (the Hugging Face format) <- this module <- `export`. Every path here checks the model
and its tokenizer together (`checkpoint.check_tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import huggingface as hf
from .config import Config
from .tokenizer import Tokenizer
from .util import UserError

CHECKPOINT, HUGGINGFACE = "checkpoint", "huggingface"


def resolve_model(path: str | Path, verify: bool = True) -> tuple[str, Path]:
    """(CHECKPOINT, the checkpoint: a run directory means its `latest`, verified unless `verify` is False) or
    (HUGGINGFACE, the directory) for `path`; anything else is a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if ckpt.is_checkpoint(p) or ckpt.is_checkpoint(p / "latest"):
        return CHECKPOINT, ckpt.resolve_checkpoint(p, verify=verify)
    if hf.is_hf_dir(p):
        return HUGGINGFACE, p
    raise UserError(f"not a checkpoint or a Hugging Face model directory: {p}")


@dataclass
class ModelFiles:
    """What a model directory holds: its config and weights, and (`tokenizer()`) its tokenizer, checked
    against the model. A checkpoint's tokenizer is read with the rest; a Hugging Face directory's when
    asked, so that a problem with the weights is the one reported first."""

    kind: str  # CHECKPOINT or HUGGINGFACE
    path: Path  # the checkpoint (resolved) or the Hugging Face directory
    config: Config
    tensors: dict[str, torch.Tensor]
    state: dict = field(default_factory=dict)  # a checkpoint's trainer state
    _tokenizer: Tokenizer | None = None

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = hf.load_hf_tokenizer(self.path, self.config)
        return self._tokenizer


def read_model(path: str | Path) -> ModelFiles:
    """The config, weights and tokenizer of a training checkpoint or a Hugging Face directory."""
    kind, p = resolve_model(path)
    if kind == CHECKPOINT:
        config, state, tensors, tokenizer = ckpt.load_model_files(p)
        return ModelFiles(kind, p, config, tensors, state, tokenizer)
    config = hf.load_hf_config(p)
    return ModelFiles(kind, p, config, hf.load_hf_tensors(p, config))


def load_pretrained_config(path: str | Path) -> Config:
    """The Config of a training checkpoint or of a Hugging Face Qwen3-Next directory."""
    kind, p = resolve_model(path, verify=False)
    return ckpt.load_config(p) if kind == CHECKPOINT else hf.load_hf_config(p)


def load_pretrained_weights(model: torch.nn.Module, path: str | Path) -> None:
    kind, p = resolve_model(path)
    if kind == CHECKPOINT:
        ckpt.load_weights(model, ckpt.load_tensors(p / ckpt.MODEL_FILE), p)
    else:
        ckpt.load_weights(model, hf.load_hf_tensors(p), p)


def tokenizer_file(path: str | Path) -> Path | None:
    """The tokenizer.json beside the model at `path` (None when it has none)."""
    _, p = resolve_model(path, verify=False)
    return p / ckpt.TOKENIZER_FILE if (p / ckpt.TOKENIZER_FILE).is_file() else None


def trained_context(state: dict) -> int | None:
    """The most positions a training run's attention saw (its window and the lead-in read before it),
    from trainer_state.json; None when the state does not say."""
    args = state.get("args") or {}
    return args["seq_len"] + (args.get("lead_in") or 0) if args.get("seq_len") else None


def load_for_inference(path: str | Path, device: str = "auto", kernel: str = "auto", dtype: str = "fp32",
                       quantize: str = "none", attention_window: int | None = None):
    """A model ready to generate or evaluate, from a training checkpoint or a Hugging Face directory.
    dtype "bf16" keeps the weights in bfloat16 (half the memory; faster where the hardware multiplies
    bf16; the DeltaNet state stays float32), or float32 where the CPU would emulate it (info["note"]
    says so). quantize "int8": int8 weights for every matrix product (`quantize.py`). attention_window:
    the positions attention sees of a long text (`set_attention_window`); None: a checkpoint's trained
    context (all for a Hugging Face directory); 0: all. Returns (model in eval mode on the device,
    tokenizer, info dict)."""
    from .model import Qwen3NextForCausalLM
    from .quantize import quantize_int8, resolve_dtype
    from .util import resolve_device

    files = read_model(path)
    info: dict = {"source": str(Path(path)), "kind": files.kind}
    if files.kind == CHECKPOINT:
        info.update(step=files.state.get("step"), preset=files.state.get("preset"),
                    seq_len=(files.state.get("args") or {}).get("seq_len"))
    window = attention_window
    if window is None and files.kind == CHECKPOINT:
        window = trained_context(files.state)
    dev = resolve_device(device)
    model = Qwen3NextForCausalLM(files.config)
    ckpt.load_weights(model, files.tensors, path)
    tokenizer = files.tokenizer()
    dtype, note = resolve_dtype(dtype, dev)
    if quantize == "int8":
        quantize_int8(model)
    model.to(dev, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    model.set_kernel(kernel, dev)
    model.set_attention_window(window or None)
    info.update(device=str(dev), kernel=model.kernel, parameters=model.num_parameters(), dtype=dtype,
                quantize=quantize, note=note, attention_window=model.attention_window)
    return model, tokenizer, info
