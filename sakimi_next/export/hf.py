"""`--mode export --format hf`: a training checkpoint -> a transformers model directory (the format and
its two layouts are in `huggingface.py`), with a model card (`card.py`) and `sakimi_export.json`.

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
from ..data import open_split
from ..data.prepared import read_meta_quietly
from ..huggingface import EXPORT_RECORD, INDEX, WEIGHTS, export_record, to_hf_tensors
from ..metrics import read_metrics
from ..pretrained import CHECKPOINT, resolve_model
from ..settings import ExportSettings, ModelCardSettings
from ..tokenizer import write_tokenizer_config
from ..util import UserError, publish_dir, save_safetensors, sha256_file
from .card import TrainingData, model_card


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


def choose_layout(config: Config, asked: str | None) -> str:
    """--hf-layout, or the default: qwen3_5 for a dense model (vLLM's and SGLang's Qwen3-Next loaders need
    experts), qwen3_next for one with experts (Qwen3.5's MoE model is another architecture)."""
    if asked is None:
        return "qwen3_next" if config.is_moe else "qwen3_5"
    if asked == "qwen3_5" and config.is_moe:
        raise UserError("--hf-layout qwen3_5 is for dense models and this one has experts; export it with "
                        "--hf-layout qwen3_next (the default for MoE models)")
    return asked


def disk_tensors(tensors: dict[str, torch.Tensor], config: Config, layout: str) -> dict[str, torch.Tensor]:
    """The tensors as the layout stores them. The qwen3_next layout also stores a tied LM head: vLLM's and
    SGLang's Qwen3NextForCausalLM always build a separate `lm_head` and load it only from the file (vLLM
    refuses a checkpoint without it, SGLang would leave it unset), whatever tie_word_embeddings says;
    transformers and this project tie it again on load. Qwen3.5's loaders tie it themselves."""
    out = to_hf_tensors(tensors, config, layout)
    if layout == "qwen3_next" and config.tie_word_embeddings:
        out["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return out


def describe_data(state: dict, tokenizer, windows: int = 64, window: int = 256) -> TrainingData:
    """The checkpoint's prepared data, for the model card: its source files and a sample of its training
    text, `windows` stretches spread evenly over it (the tokenizer's vocabulary when the data is gone)."""
    data_dir = state.get("data_dir")
    meta = read_meta_quietly(Path(data_dir)) if data_dir else None
    sample = ""
    if meta is not None:
        try:
            tokens = open_split(Path(data_dir), "train")
            starts = range(0, max(len(tokens) - window, 0) + 1, max(len(tokens) // windows, 1))
            sample = "\n".join(tokenizer.decode(tokens[i:i + window].tolist()) for i in starts)
        except UserError:
            pass
    if not sample:
        sample = "".join(tokenizer.decode([i]) for i in range(tokenizer.vocab_size))
    sources = [s["path"] for s in (meta or {}).get("sources", []) if s.get("role", "train") == "train"]
    return TrainingData(sources, sample, data_dir)


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
    out = export_hf(s.checkpoint, s.out_dir, layout=s.hf_layout, card=s.card)
    files = sorted(p.name for p in out.iterdir())
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    return [f"exported {s.checkpoint} -> {out} ({architecture}): {', '.join(files)}",
            f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}); "
            f"AutoTokenizer.from_pretrained({str(out)!r})"]


def export_hf(ckpt_path: str | Path, out_dir: str | Path, shard_bytes: int = 2 * 1024**3, layout: str | None = None,
              card: ModelCardSettings | None = None) -> Path:
    """Write a transformers model directory from a training checkpoint, in `layout` (settings.HF_LAYOUTS;
    None: `choose_layout`'s default), its model card from `card` (None: the defaults). Built in a temporary
    directory beside `out_dir` and swapped into place; `out_dir` may only hold an earlier export."""
    card = card if card is not None else ModelCardSettings()
    kind, src = resolve_model(ckpt_path)
    if kind != CHECKPOINT:
        raise UserError(f"not a checkpoint: {src} is a Hugging Face directory already; --format hf exports a "
                        "training checkpoint")
    out = Path(out_dir)
    _check_out_dir(out, src)
    config, state, tensors, tokenizer = ckpt.load_model_files(src)
    layout = choose_layout(config, layout)
    metrics = read_metrics(src.parent / "metrics.jsonl", state["step"])
    data = describe_data(state, tokenizer)
    try:
        with publish_dir(out) as tmp:
            (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(layout), indent=2) + "\n")
            gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                   "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.8, "top_k": 50,
                   "top_p": 0.95}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            save_tensors_sharded(disk_tensors(tensors, config, layout), tmp, shard_bytes)
            tokenizer_files(tokenizer, tmp, config.max_position_embeddings)
            n_params = sum(t.numel() for t in tensors.values())
            (tmp / "README.md").write_text(model_card(config, state, metrics, n_params, layout, card, data),
                                           encoding="utf-8")
            record = {"format": 1, "exported_by": "sakimi-next", "step": state["step"],
                      "tokenizer_sha256": tokenizer.sha256,
                      "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}}
            (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:  # nothing was replaced: the new directory is built beside the old one
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out
