"""Training checkpoints: self-contained directories of safetensors and JSON, written atomically.

    runs/tiny/
      step_000250/
        model.safetensors       weights, transformers parameter names
        optimizer.safetensors   AdamW moments and step counts, plus RNG states (tensors only)
        optimizer.json          param groups (hyper-parameters and parameter names)
        trainer_state.json      step, tokens, sampler state, RNG states, scheduler, best validation, arguments
        config.json             the model Config
        tokenizer.json          a copy, so generation needs nothing else
        tokenizer_config.json   with special_tokens_map.json: for AutoTokenizer, with the ChatML chat_template
      latest -> step_000250     symlink to the newest complete checkpoint
      best   -> step_000200     symlink to the best validation checkpoint (never pruned)

A checkpoint is built in a hidden temporary directory, every file fsync'd, then renamed into place:
a crash or a full disk while saving leaves the previous checkpoints untouched. Loading reads only
safetensors and JSON, so it never executes code from the file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .config import Config, ConfigError
from .util import UserError, fsync_dir, umask

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
REQUIRED = (MODEL_FILE, STATE_FILE, CONFIG_FILE)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ------------------------------------------------------------------------------------------ saving
def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """Unwrap DDP and torch.compile, whose state-dict keys carry `module.` / `_orig_mod.` prefixes."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# Full (unsharded) state on the CPU, whether the model is plain, DDP-wrapped or sharded with FSDP2.
# Under FSDP every rank must take part in gathering; only rank 0 receives the result.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights by parameter name (collective under FSDP: call on every rank)."""
    sd = get_model_state_dict(plain_module(model), options=FULL_STATE)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def optimizer_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state as (tensors for safetensors, JSON description), keyed by parameter name
    (collective under FSDP: call on every rank)."""
    sd = get_optimizer_state_dict(plain_module(model), optimizer, options=FULL_STATE)
    tensors: dict[str, torch.Tensor] = {}
    for name, state in sd.get("state", {}).items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{name}.{key}"] = t.detach().to("cpu").contiguous()
    meta = {"class": type(optimizer).__name__, "param_groups": sd.get("param_groups", [])}
    return tensors, meta


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Everything a checkpoint holds about the model and optimiser (collective under FSDP)."""
    opt_tensors, opt_meta = ({}, None) if optimizer is None else optimizer_payload(model, optimizer)
    return {"model": model_tensors(model), "optimizer": opt_tensors, "optimizer_meta": opt_meta}


def rng_payload() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, meta


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    config: Config,
    tokenizer_path: str | Path | None,
    gathered: dict | None = None,
) -> Path:
    """Write checkpoint `out_dir/step_NNNNNN` atomically, point `latest` at it, and return its path.
    `gathered` is `gather_state(model, optimizer)` when the caller already collected it (FSDP)."""
    gathered = gathered if gathered is not None else gather_state(model, optimizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=out_dir))
    try:
        save_file(gathered["model"], str(tmp / MODEL_FILE), metadata={"format": "pt"})
        rng_tensors, rng_meta = rng_payload()
        opt_meta = gathered["optimizer_meta"]
        save_file({**gathered["optimizer"], **rng_tensors}, str(tmp / OPTIM_FILE), metadata={"format": "pt"})
        if opt_meta is not None:
            _write_json(tmp / OPTIM_JSON, opt_meta)
        _write_json(tmp / STATE_FILE, {**trainer_state, "step": step, "rng": rng_meta})
        _write_json(tmp / CONFIG_FILE, config.to_dict())
        if tokenizer_path is not None:
            from .interop import tokenizer_config_files

            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
            tokenizer_config_files(tmp, config.max_position_embeddings)  # AutoTokenizer, chat_template
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask())
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes private directories
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. the end of a run that just saved)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    point(out_dir, "latest", final)
    return final


def point(out_dir: Path, name: str, target: Path) -> None:
    """Atomically make `out_dir/name` a relative symlink to `target`."""
    link = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, link)
    fsync_dir(out_dir)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def prune(out_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step directories, never the one `best` points to,
    and any temporary directory a crash left behind."""
    out_dir = Path(out_dir)
    protected = {p.resolve() for p in (out_dir / "best", out_dir / "latest") if p.exists()}
    steps = sorted(p for p in out_dir.glob("step_*") if p.is_dir())
    for p in steps[:-keep_last] if keep_last > 0 else []:
        if p.resolve() not in protected:
            shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------- loading
def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED)


def find_latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `out_dir` (via `latest`, else the highest step that loads)."""
    out_dir = Path(out_dir)
    candidates = []
    if (out_dir / "latest").exists():
        candidates.append((out_dir / "latest").resolve())
    candidates += sorted((p for p in out_dir.glob("step_*") if p.is_dir()), reverse=True)
    for c in candidates:
        if is_checkpoint(c):
            try:
                read_json(c / STATE_FILE)
                read_json(c / CONFIG_FILE)
                return c
            except UserError:
                continue
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if p.is_dir() and not is_checkpoint(p) and is_checkpoint(p / "latest"):
        p = p / "latest"  # a run directory: take its latest checkpoint
    if not is_checkpoint(p):
        missing = [f for f in REQUIRED if not (p / f).is_file()] if p.is_dir() else list(REQUIRED)
        raise UserError(f"not a checkpoint: {p} (missing {', '.join(missing)})")
    return p.resolve()


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def load_tensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupt file is a UserError, not a crash inside torch."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"weights file is corrupt or truncated: {path} ({str(e).splitlines()[0]})") from None


def load_config(ckpt: Path) -> Config:
    try:
        return Config.from_dict(read_json(ckpt / CONFIG_FILE))
    except (ConfigError, TypeError) as e:
        raise UserError(f"invalid config in {ckpt / CONFIG_FILE}: {e}") from None


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy `tensors` into `model`, refusing missing, unexpected or mis-shaped entries by name."""
    own = plain_module(model).state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing:
        raise UserError(f"{source} lacks weights for {len(missing)} parameters, e.g. {missing[0]}")
    if unexpected:
        raise UserError(f"{source} has {len(unexpected)} unexpected weights, e.g. {unexpected[0]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    plain_module(model).load_state_dict(tensors, strict=True)


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """Restore AdamW's moments and step counts (each rank reads the full state and keeps its shard)."""
    meta = read_json(ckpt / OPTIM_JSON)
    tensors = load_tensors(ckpt / OPTIM_FILE)
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            name, field = key[len("state."):].rsplit(".", 1)
            state.setdefault(name, {})[field] = t
    saved = sorted(n for g in meta["param_groups"] for n in g["params"])
    if saved != sorted(n for n, _ in plain_module(model).named_parameters()):
        raise UserError(f"optimizer state in {ckpt} does not match this model's parameters")
    set_optimizer_state_dict(plain_module(model), optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))


def restore_rng(ckpt: Path, state: dict) -> None:
    tensors = load_tensors(ckpt / OPTIM_FILE)
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    rng = state.get("rng") or {}
    if "numpy" in rng:
        n = rng["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if "python" in rng:
        p = rng["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------------- weights from elsewhere
def load_pretrained_config(path: str | Path) -> Config:
    """The Config of a training checkpoint or of a Hugging Face Qwen3-Next directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model path not found: {p}")
    if is_checkpoint(p) or is_checkpoint(p / "latest"):
        return load_config(resolve_checkpoint(p))
    from . import interop

    if interop.is_hf_dir(p):
        return interop.load_hf_config(p)
    raise UserError(f"not a checkpoint or a Hugging Face model directory: {p}")


def load_pretrained_weights(model: torch.nn.Module, path: str | Path) -> None:
    p = Path(path)
    if is_checkpoint(p) or is_checkpoint(p / "latest"):
        c = resolve_checkpoint(p)
        load_weights(model, load_tensors(c / MODEL_FILE), c)
        return
    from . import interop

    load_weights(model, interop.load_hf_tensors(p), p)


def load_for_inference(path: str | Path, device: str = "auto", kernel: str = "auto",
                       disable_fast_kernels: bool = False):
    """A model ready to generate or evaluate, from a training checkpoint or a Hugging Face directory.
    Returns (model in eval mode on the device, tokenizer, info dict)."""
    from .model import Qwen3NextForCausalLM
    from .tokenizer import Tokenizer
    from .util import resolve_device

    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    is_ours = is_checkpoint(p) or is_checkpoint(p / "latest")
    info: dict = {"source": str(p)}
    if is_ours:
        c = resolve_checkpoint(p)
        if not (c / TOKENIZER_FILE).is_file():
            raise UserError(f"checkpoint {c} has no {TOKENIZER_FILE}; it cannot encode or decode text")
        config = load_config(c)
        tensors = load_tensors(c / MODEL_FILE)
        tokenizer = Tokenizer.load(c / TOKENIZER_FILE)
        state = read_json(c / STATE_FILE)
        info.update(kind="checkpoint", step=state.get("step"), preset=state.get("preset"),
                    seq_len=(state.get("args") or {}).get("seq_len"))
    else:
        from . import interop

        if not interop.is_hf_dir(p):
            raise UserError(f"not a checkpoint or a Hugging Face model directory: {p}")
        config = interop.load_hf_config(p)
        tensors = interop.load_hf_tensors(p)
        tokenizer = None  # read after the weights: a weight problem is the one to report first
        info.update(kind="huggingface")
    dev = resolve_device(device)
    model = Qwen3NextForCausalLM(config)
    load_weights(model, tensors, p)
    if tokenizer is None:
        from . import interop

        tokenizer = interop.load_hf_tokenizer(p)
    model.to(dev).eval()
    try:
        model.set_kernel("recurrent" if disable_fast_kernels else kernel, dev)
    except ValueError as e:
        raise UserError(str(e)) from None
    info.update(device=str(dev), kernel=model.kernel, parameters=model.num_parameters())
    return model, tokenizer, info
