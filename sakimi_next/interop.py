"""Hugging Face interoperability: export a checkpoint as a transformers model directory, and read one.

The in-memory parameter names are transformers' own, so conversion is only about the files:

- `config.json` is `Config.to_hf_dict()` (model_type qwen3_next, Qwen3NextForCausalLM);
- weights are safetensors, sharded above `shard_bytes` with a `model.safetensors.index.json`;
  a tied LM head is not stored (transformers re-ties it);
- the experts of an MoE layer live in memory as stacked tensors, `experts.gate_up_proj [E, 2I, H]` and
  `experts.down_proj [E, H, I]` (as in transformers 5), and on disk one by one, as `save_pretrained`,
  vLLM and SGLang write them: `experts.{e}.gate_proj.weight [I, H]`, `.up_proj`, `.down_proj [H, I]`;
- multi-token-prediction weights keep the released `mtp.*` names; transformers ignores them on load;
- the tokenizer is written as `tokenizer.json` plus `tokenizer_config.json` and `special_tokens_map.json`
  for `AutoTokenizer`.
Only safetensors are read: a directory with only pickled `.bin` weights is refused. Every JSON file read
(config.json, the index) is checked field by field, and file names in the index must stay inside the
directory.

Export builds the directory beside `--out-dir` and swaps it in (`util.publish_dir`). It writes
`sakimi_export.json` (the files it wrote, the source step and its tokenizer's sha256) and replaces only
a directory holding an earlier export and nothing else; never the current directory, the source
checkpoint, or a directory that contains either.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .tokenizer import write_tokenizer_config
from .util import (UserError, inside, is_int, is_sha256, json_field, json_object, publish_dir, read_json_file,
                   save_safetensors, sha256_file)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
EXPORT_RECORD = "sakimi_export.json"  # marks a directory as this project's export
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ----------------------------------------------------------------------------- tensor name mapping
def to_hf_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory names -> on-disk names: stacked experts become one tensor per expert and projection."""
    out = {}
    for name, t in tensors.items():
        m = _STACKED.match(name)
        if not m:
            out[name] = t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
    return out


def from_hf_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk names -> in-memory names (the inverse of `to_hf_tensors`); stacked names pass through."""
    out, experts = {}, {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m:
            prefix, e, kind = m.groups()
            experts.setdefault(prefix, {}).setdefault(int(e), {})[kind] = t
        else:
            out[name] = t
    for prefix, by_expert in experts.items():
        n = len(by_expert)
        if sorted(by_expert) != list(range(n)):
            raise UserError(f"experts of {prefix} are not numbered 0..{n - 1}")
        for e, parts in by_expert.items():
            missing = {"gate_proj", "up_proj", "down_proj"} - set(parts)
            if missing:
                raise UserError(f"{prefix}.{e} lacks {sorted(missing)[0]}.weight")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_expert[e]["gate_proj"], by_expert[e]["up_proj"]], dim=0) for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([by_expert[e]["down_proj"] for e in range(n)])
    return out


# ------------------------------------------------------------------------------------------ import
def is_hf_dir(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and ((p / WEIGHTS).is_file() or (p / INDEX).is_file()
                                                             or any(p.glob("*.bin")))


def load_hf_config(path: str | Path) -> Config:
    p = Path(path) / "config.json"
    d = json_object(read_json_file(p), p)
    if d.get("model_type") != "qwen3_next":
        raise UserError(f"{p.parent} holds a {d.get('model_type')!r} model, not qwen3_next")
    try:
        return Config.from_hf_dict(d)
    except ConfigError as e:
        raise UserError(f"{p}: {e}") from None
    except (TypeError, KeyError) as e:
        raise UserError(f"{p} is not a valid Qwen3-Next config ({type(e).__name__}: {e})") from None


def weight_files(path: Path) -> list[Path]:
    p = Path(path)
    if (p / INDEX).is_file():
        index = json_object(read_json_file(p / INDEX), p / INDEX)
        weight_map = json_field(index, p / INDEX, "weight_map", lambda v: isinstance(v, dict) and v and all(
            isinstance(f, str) for f in v.values()), "an object of tensor name -> file name")
        files = [inside(p, f, p / INDEX) for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{p} lacks the weight shard {missing[0].name} listed in {INDEX}")
        return files
    if (p / WEIGHTS).is_file():
        return [p / WEIGHTS]
    if any(p.glob("*.bin")):
        raise UserError(f"{p} has only pickled .bin weights; only safetensors are read (convert them with "
                        "transformers' save_pretrained(..., safe_serialization=True))")
    raise UserError(f"no weights in {p}: neither {WEIGHTS} nor {INDEX}")


def load_hf_tensors(path: str | Path, config: Config | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory, renamed to this project's in-memory names."""
    p = Path(path)
    config = config or load_hf_config(p)
    recorded = export_record(p).get("files", {})  # our exports: verify the weights as checkpoints are
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(p):
        if f.name in recorded and sha256_file(f) != recorded[f.name]:
            raise UserError(f"{f} is corrupt or truncated: its sha256 differs from the one recorded in {EXPORT_RECORD}")
        tensors.update(ckpt.load_tensors(f))
    tensors = from_hf_tensors(tensors)
    if not config.mtp_num_hidden_layers:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def load_hf_tokenizer(path: str | Path, config: Config):
    """The tokenizer of a Hugging Face directory, checked against its model's `config` (and against
    the sha256 our export recorded, when it is one)."""
    from .tokenizer import Tokenizer

    p = Path(path) / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"{Path(path)} has no tokenizer.json; it cannot encode or decode text")
    tokenizer = Tokenizer.load(p)
    ckpt.check_tokenizer(config, tokenizer, export_record(path).get("tokenizer_sha256"), Path(path))
    return tokenizer


def to_transformers(model, attn_implementation: str = "sdpa"):
    """A `transformers.Qwen3NextForCausalLM` holding a copy of `model`'s weights (for comparisons and
    benchmarks; transformers is imported only here). MTP weights are left out: transformers has none."""
    import warnings

    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hcfg = Qwen3NextConfig(**model.config.to_hf_dict())
        hcfg._attn_implementation = attn_implementation
        hf = Qwen3NextForCausalLM(hcfg).to(next(model.parameters()).dtype)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"weights do not match transformers: missing {missing}, unexpected {unexpected}")
    return hf.eval()


# ------------------------------------------------------------------------------------------ export
def save_tensors_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, shard_bytes: int) -> list[str]:
    """Write one `model.safetensors`, or shards plus an index when the total exceeds `shard_bytes`."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= shard_bytes:
        save_safetensors(tensors, out_dir / WEIGHTS, metadata={"format": "pt"})
        return [WEIGHTS]
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += n
    shards.append(current)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, out_dir / fname, metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def tokenizer_files(tokenizer, out_dir: Path, max_length: int) -> None:
    """tokenizer.json plus what AutoTokenizer reads to know the class and the special tokens."""
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.json")
    write_tokenizer_config(out_dir, max_length)


def model_card(config: Config, state: dict, metrics: list[dict], n_params: int) -> str:
    args = state.get("args") or {}
    evals = [m for m in metrics if "val_loss" in m]
    lines = [
        "---", "library_name: transformers", "tags: [qwen3_next, sakimi-next]", "---", "",
        f"# {state.get('preset') or 'Qwen3-Next'} (trained with sakimi-next)", "",
        f"A {n_params / 1e6:.2f}M-parameter Qwen3-Next model (hybrid Gated DeltaNet / Gated Attention, "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size}).", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('.')",
        "tokenizer = AutoTokenizer.from_pretrained('.')",
        "```", "",
        "## Training", "",
        f"- steps: {state.get('step')}, tokens seen: {state.get('tokens_seen', 0):,}",
    ]
    for key in ("batch_size", "seq_len", "grad_accum", "learning_rate", "min_lr", "warmup_steps",
                "weight_decay", "grad_clip", "seed"):
        if key in args:
            lines.append(f"- {key}: {args[key]}")
    if state.get("data_dir"):
        lines.append(f"- data: {state['data_dir']}")
    if evals:
        last, best = evals[-1], min(evals, key=lambda m: m["val_loss"])
        lines += ["", "## Validation", "", "| | step | loss | perplexity | bits per byte |", "|---|---|---|---|---|"]
        for label, m in (("last", last), ("best", best)):
            bpb = f"{m['val_bpb']:.4f}" if "val_bpb" in m else "-"
            lines.append(f"| {label} | {m['step']} | {m['val_loss']:.4f} | {m['val_ppl']:.2f} | {bpb} |")
    if config.mtp_num_hidden_layers:
        lines += ["", "The `mtp.*` tensors are the multi-token-prediction block used for speculative decoding by "
                      "sakimi-next; transformers ignores them."]
    return "\n".join(lines) + "\n"


def export_record(path: str | Path) -> dict:
    """`sakimi_export.json` of an exported directory, checked; {} when there is none."""
    p = Path(path) / EXPORT_RECORD
    if not p.is_file():
        return {}
    record = json_object(read_json_file(p), p)
    json_field(record, p, "files", lambda v: isinstance(v, dict) and all(is_sha256(h) for h in v.values()),
               "an object of file name -> sha256")
    if "tokenizer_sha256" in record:
        json_field(record, p, "tokenizer_sha256", is_sha256, "a sha256 hex digest")
    return record


def _check_out_dir(out: Path, src: Path) -> None:
    """Export replaces `out` whole: refuse anything whose loss would hurt (see the module docstring)."""
    resolved, here = out.resolve(), Path.cwd().resolve()
    for name, guarded in (("the current directory", here), ("the source checkpoint", src)):
        if resolved == guarded or guarded.is_relative_to(resolved):
            raise UserError(f"--out-dir {out} is or contains {name}; export into a new directory")
    if resolved.is_relative_to(src):
        raise UserError(f"--out-dir {out} is inside the source checkpoint {src}; export into a new directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out-dir {out} exists and is not a directory; export into a new directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / EXPORT_RECORD).is_file():
        raise UserError(f"--out-dir {out} is not empty and holds no earlier export ({EXPORT_RECORD}); "
                        "export into a new or empty directory")
    foreign = sorted({p.name for p in out.iterdir()} - set(export_record(out)["files"]) - {EXPORT_RECORD})
    if foreign:
        raise UserError(f"--out-dir {out} holds an earlier export and also {foreign[0]!r}, which export did not "
                        "write; move it away or export into a new directory")


def _metrics_until(metrics_file: Path, step: int) -> list[dict]:
    metrics = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(m, dict) and is_int(m.get("step")) and m["step"] <= step:
                metrics.append(m)
    return metrics


def export(ckpt_path: str | Path, out_dir: str | Path, shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a transformers model directory from a training checkpoint. Built in a temporary directory
    beside `out_dir` and swapped into place; `out_dir` may only hold an earlier export."""
    src = ckpt.resolve_checkpoint(ckpt_path)
    out = Path(out_dir)
    _check_out_dir(out, src)
    config, state, tensors, tokenizer = ckpt.load_model_files(src)
    metrics = _metrics_until(src.parent / "metrics.jsonl", state["step"])
    try:
        with publish_dir(out) as tmp:
            (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
            gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                   "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.8, "top_k": 50,
                   "top_p": 0.95}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            save_tensors_sharded(to_hf_tensors(tensors), tmp, shard_bytes)
            tokenizer_files(tokenizer, tmp, config.max_position_embeddings)
            n_params = sum(t.numel() for k, t in tensors.items())
            (tmp / "README.md").write_text(model_card(config, state, metrics, n_params))
            record = {"format": 1, "exported_by": "sakimi-next", "step": state["step"],
                      "tokenizer_sha256": tokenizer.sha256,
                      "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}}
            (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:  # nothing was replaced: the new directory is built beside the old one
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out
