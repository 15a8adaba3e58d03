"""Training checkpoints: self-contained directories of safetensors and JSON, written atomically.

    runs/tiny/
      step_000250/
        model.safetensors       weights, transformers parameter names (with --ema: the averaged weights)
        optimizer.safetensors   AdamW moments and step counts (Muon: its momentum too), RNG states, and with
                                --ema the training weights themselves (`training_weights.NAME`)
        optimizer.json          param groups (hyper-parameters and parameter names)
        trainer_state.json      step, tokens, sampler state, RNG states, scheduler, best validation, arguments
        config.json             the model Config
        tokenizer.json          a copy, so generation needs nothing else
      latest -> step_000250     symlink to the newest complete checkpoint
      best   -> step_000200     symlink to the best validation checkpoint (never pruned)

A checkpoint is built in a hidden temporary directory, every file fsync'd, then swapped into place
(`util.publish_dir`): a crash or a full disk while saving leaves the previous checkpoints untouched.
trainer_state.json records the sha256 of each weight file; loading verifies them, and reads back every
JSON file field by field. Loading reads only safetensors and JSON, so it never executes code from the
file. (Loading a model from a checkpoint or a Hugging Face directory for use is in `pretrained.py`.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .config import Config, ConfigError
from .distributed import plain_module
from .optim import optimizer_parts
from .tokenizer import Tokenizer, check_same_tokenizer, write_tokenizer_config
from .util import (UserError, fsync_dir, inside, is_int, is_sha256, json_field, json_object, publish_dir,
                   read_json_file, recover_dir, save_safetensors, sha256_file)

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
REQUIRED = (MODEL_FILE, STATE_FILE, CONFIG_FILE)
WEIGHT_FILES = (MODEL_FILE, OPTIM_FILE)  # their sha256 is recorded in trainer_state.json
# optimizer.safetensors keys of the weights training goes on from, where model.safetensors holds an average
TRAINING_WEIGHTS = "training_weights."


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ------------------------------------------------------------------------------------------ saving
# Full (unsharded) state on the CPU, whether the model is plain, DDP-wrapped or sharded with FSDP2.
# Under FSDP every rank must take part in gathering; only rank 0 receives the result.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights by parameter name (collective under FSDP: call on every rank). On a CPU the
    state dict shares the parameters' memory: a copy stays as it was when the weights change (--ema)."""
    sd = get_model_state_dict(plain_module(model), options=FULL_STATE)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def optimizer_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimiser state as (tensors for safetensors, JSON description), keyed by parameter name
    (collective under FSDP: call on every rank)."""
    sd = get_optimizer_state_dict(plain_module(model), optimizer_parts(optimizer), options=FULL_STATE)
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
    `gathered` is `gather_state(model, optimizer)` when the caller already collected it (FSDP); its
    "training_weights", when given, are the weights training goes on from where "model" is their
    average (--ema). trainer_state.json records the sha256 of each weight file, which loading verifies."""
    gathered = gathered if gathered is not None else gather_state(model, optimizer)
    out_dir = Path(out_dir)
    final = out_dir / step_dir_name(step)
    with publish_dir(final) as tmp:
        save_safetensors(gathered["model"], tmp / MODEL_FILE, metadata={"format": "pt"})
        rng_tensors, rng_meta = rng_payload()
        opt_meta = gathered["optimizer_meta"]
        training = {TRAINING_WEIGHTS + k: v for k, v in gathered.get("training_weights", {}).items()}
        save_safetensors({**gathered["optimizer"], **rng_tensors, **training}, tmp / OPTIM_FILE,
                         metadata={"format": "pt"})
        if opt_meta is not None:
            _write_json(tmp / OPTIM_JSON, opt_meta)
        hashes = {f: sha256_file(tmp / f) for f in WEIGHT_FILES}
        _write_json(tmp / STATE_FILE, {**trainer_state, "step": step, "rng": rng_meta, "sha256": hashes})
        _write_json(tmp / CONFIG_FILE, config.to_dict())
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
            write_tokenizer_config(tmp, config.max_position_embeddings)  # AutoTokenizer, chat_template
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
    for p in out_dir.glob(".step_*.old"):
        recover_dir(out_dir / p.name[1:-len(".old")])
    protected = {p.resolve() for p in (out_dir / "best", out_dir / "latest") if p.exists()}
    steps = sorted(p for p in out_dir.glob("step_*") if p.is_dir())
    for p in steps[:-keep_last] if keep_last > 0 else []:
        if p.resolve() not in protected:
            shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.glob(".step_*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------- loading
def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED)


def damage(ckpt: Path, hashes: bool = True) -> str | None:
    """Why checkpoint `ckpt` cannot be trusted (unreadable metadata; with `hashes`, a weight file whose
    sha256 differs from the recorded one), or None when it is intact. Checkpoints from before hashes
    were recorded are not verified."""
    try:
        state = read_state(ckpt)
        load_config(ckpt)
        for name, expected in (state.get("sha256") or {}).items() if hashes else ():
            path = inside(ckpt, name, ckpt / STATE_FILE)
            if not path.is_file():
                return f"{path} is missing"
            if sha256_file(path) != expected:
                return f"{path} is corrupt or truncated: its sha256 differs from the one recorded in {STATE_FILE}"
    except UserError as e:
        return str(e)
    return None


def find_latest(out_dir: str | Path, verify: bool = False,
                say: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint under `out_dir` (via `latest`, else the highest step that loads).
    `verify`: also check the weight files' hashes, and say (one line; `say`, else on stderr) when a newer
    checkpoint was passed over because it is damaged."""
    out_dir = Path(out_dir)
    candidates = []
    if (out_dir / "latest").exists():
        candidates.append((out_dir / "latest").resolve())
    candidates += sorted((p for p in out_dir.glob("step_*") if p.is_dir()), reverse=True)
    passed_over = None
    for c in dict.fromkeys(candidates):
        if not is_checkpoint(c):
            continue
        problem = damage(c, hashes=verify)
        if problem is None:
            if passed_over:
                message = (f"warning: skipping {passed_over[0]} ({passed_over[1]}); using {c.name}, the newest "
                           "intact checkpoint")
                (say or partial(print, file=sys.stderr, flush=True))(message)
            return c
        passed_over = passed_over or (c, problem)
    return None


def resolve_checkpoint(path: str | Path, verify: bool = True) -> Path:
    """The checkpoint at `path` (a run directory means its `latest`), verified unless `verify` is False:
    a damaged one is a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if p.is_dir() and not is_checkpoint(p) and is_checkpoint(p / "latest"):
        p = p / "latest"  # a run directory: take its latest checkpoint
    if not is_checkpoint(p):
        missing = [f for f in REQUIRED if not (p / f).is_file()] if p.is_dir() else list(REQUIRED)
        raise UserError(f"not a checkpoint: {p} (missing {', '.join(missing)})")
    p = p.resolve()
    problem = damage(p) if verify else None
    if problem:
        raise UserError(problem)
    return p


def _is_count(v) -> bool:
    return is_int(v) and v >= 0


# trainer_state.json: the fields read back, what each must be (others are kept for the record)
STATE_FIELDS = {
    "step": (_is_count, "an integer >= 0"),
    "preset": (lambda v: v is None or isinstance(v, str), "a preset name or null"),
    "tokens_seen": (_is_count, "an integer >= 0"),
    "best_val_loss": (lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool),
                      "a number or null"),
    "best_step": (lambda v: v is None or _is_count(v), "an integer >= 0 or null"),
    "evals_without_improvement": (_is_count, "an integer >= 0"),
    "elapsed_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number >= 0"),
    "args": (lambda v: isinstance(v, dict), "an object"),
    "rng": (lambda v: isinstance(v, dict), "an object"),
    "tokenizer_sha256": (is_sha256, "a sha256 hex digest"),
    "sha256": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_sha256(h) for k, h in v.items()),
               "an object of file name -> sha256 hex digest"),
}


def read_state(ckpt: Path) -> dict:
    """trainer_state.json of `ckpt`, checked field by field."""
    path = Path(ckpt) / STATE_FILE
    state = json_object(read_json_file(path), path)
    for name, (ok, must) in STATE_FIELDS.items():
        if name in state or name == "step":
            json_field(state, path, name, ok, must)
    return state


def read_optimizer_meta(ckpt: Path) -> dict:
    path = Path(ckpt) / OPTIM_JSON
    meta = json_object(read_json_file(path), path)
    json_field(meta, path, "param_groups", lambda v: isinstance(v, list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(isinstance(n, str) for n in g["params"])
        for g in v), "a list of objects with a 'params' list of parameter names")
    return meta


def load_tensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupt file is a UserError, not a crash inside torch."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"weights file is corrupt or truncated: {path} ({str(e).splitlines()[0]})") from None


def load_config(ckpt: Path) -> Config:
    path = Path(ckpt) / CONFIG_FILE
    try:
        return Config.from_dict(read_json_file(path))
    except (ConfigError, TypeError) as e:
        raise UserError(f"invalid config in {path}: {e}") from None


def check_tokenizer(config: Config, tokenizer, trained_sha256: str | None, source: str | Path) -> None:
    """A model and its tokenizer belong together: the tokenizer fits the model's vocabulary and, when the
    model records which tokenizer it was trained with, is that one. Every loader calls this."""
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{source}: the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocab_size "
                        f"is {config.vocab_size:,}; this tokenizer does not belong to this model")
    name = tokenizer.path.name if tokenizer.path else "the tokenizer"
    check_same_tokenizer(tokenizer, trained_sha256, f"{source}: {name} is not the tokenizer the model was trained with")


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


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path,
                   tensors: dict[str, torch.Tensor]) -> None:
    """Restore the optimiser state from `tensors` (`ckpt`'s optimizer.safetensors, read once by the
    caller for this, the training weights and the RNG): moments, momentum, step counts (each rank reads
    the full state and keeps its shard)."""
    meta = read_optimizer_meta(ckpt)
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            name, field = key[len("state."):].rsplit(".", 1)
            state.setdefault(name, {})[field] = t
    saved = sorted(n for g in meta["param_groups"] for n in g["params"])
    if saved != sorted(n for n, _ in plain_module(model).named_parameters()):
        raise UserError(f"optimizer state in {ckpt} does not match this model's parameters")
    set_optimizer_state_dict(plain_module(model), optimizer_parts(optimizer),
                             {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))


def load_training_weights(model: torch.nn.Module, ckpt: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Put the weights training goes on from (in `tensors`, `ckpt`'s optimizer.safetensors) into `model`
    (plain, DDP or FSDP2-sharded) where `ckpt`'s model.safetensors holds their average (--ema); else the
    model keeps the weights it was loaded with, which are them."""
    weights = {k[len(TRAINING_WEIGHTS):]: v for k, v in tensors.items() if k.startswith(TRAINING_WEIGHTS)}
    if not weights:
        return
    if sorted(weights) != sorted(plain_module(model).state_dict()):
        raise UserError(f"the training weights in {ckpt / OPTIM_FILE} do not match this model's parameters")
    set_model_state_dict(plain_module(model), weights, options=StateDictOptions(full_state_dict=True))


def restore_rng(ckpt: Path, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The random generators as `ckpt` saved them: torch's from `tensors` (its optimizer.safetensors),
    numpy's and Python's from its trainer `state`."""
    if "rng.torch" not in tensors:
        raise UserError(f"{ckpt / OPTIM_FILE} lacks the random-number state (rng.torch)")
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    rng = state.get("rng") or {}
    try:
        if "numpy" in rng:
            n = rng["numpy"]
            np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
        if "python" in rng:
            p = rng["python"]
            random.setstate((p[0], tuple(p[1]), p[2]))
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise UserError(f"{ckpt / STATE_FILE}: field 'rng' is not a valid random-number state ({e})") from None


def load_model_files(c: Path) -> tuple[Config, dict, dict[str, torch.Tensor], Tokenizer]:
    """(config, trainer state, weights, tokenizer) of checkpoint `c`, the tokenizer checked with the model."""
    if not (c / TOKENIZER_FILE).is_file():
        raise UserError(f"checkpoint {c} has no {TOKENIZER_FILE}; it cannot encode or decode text")
    config, state = load_config(c), read_state(c)
    tensors = load_tensors(c / MODEL_FILE)
    tokenizer = Tokenizer.load(c / TOKENIZER_FILE)
    check_tokenizer(config, tokenizer, state.get("tokenizer_sha256"), c)
    return config, state, tensors, tokenizer
