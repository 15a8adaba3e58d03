"""`--mode export --format hf`: a training checkpoint -> a transformers model directory (the format is in
`huggingface.py`), with a model card and `sakimi_export.json`.

Export builds the directory beside `--out-dir` and swaps it in (`util.publish_dir`). It writes
`sakimi_export.json` (the files it wrote, the source step and its tokenizer's sha256) and replaces only
a directory holding an earlier export and nothing else; never the current directory, the source
checkpoint, or a directory that contains either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import Config
from ..huggingface import EXPORT_RECORD, INDEX, WEIGHTS, export_record, to_hf_tensors
from ..metrics import read_metrics
from ..pretrained import CHECKPOINT, resolve_model
from ..settings import ExportSettings
from ..tokenizer import write_tokenizer_config
from ..util import UserError, publish_dir, save_safetensors, sha256_file


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


def export(s: ExportSettings) -> list[str]:
    """`--mode export --format hf`: what `export_hf` wrote, for the user."""
    out = export_hf(s.checkpoint, s.out_dir)
    files = sorted(p.name for p in out.iterdir())
    return [f"exported {s.checkpoint} -> {out}: {', '.join(files)}",
            f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}); "
            f"AutoTokenizer.from_pretrained({str(out)!r})"]


def export_hf(ckpt_path: str | Path, out_dir: str | Path, shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a transformers model directory from a training checkpoint. Built in a temporary directory
    beside `out_dir` and swapped into place; `out_dir` may only hold an earlier export."""
    kind, src = resolve_model(ckpt_path)
    if kind != CHECKPOINT:
        raise UserError(f"not a checkpoint: {src} is a Hugging Face directory already; --format hf exports a "
                        "training checkpoint")
    out = Path(out_dir)
    _check_out_dir(out, src)
    config, state, tensors, tokenizer = ckpt.load_model_files(src)
    metrics = read_metrics(src.parent / "metrics.jsonl", state["step"])
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
