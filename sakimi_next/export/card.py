"""The model card (README.md) of a transformers export (export/hf.py): the front matter the Hugging Face
Hub reads (library, pipeline tag, license, languages, tags, base model), then the architecture, the
training data, the held-out figures and a command line that trains the model again.

The license is the user's call: weights follow the terms of the text they were trained on, which this
project cannot know, and its own Apache-2.0 covers the code, not what the code learns. Without --license
the card says `license: other` and explains. Languages, unless given, are read from a sample of the
training text (or, when the prepared data is gone, the tokenizer's vocabulary) by script: Han -> zh,
kana -> ja, Hangul -> ko, Latin letters -> en (an assumption: the card says so).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

from ..config import Config
from ..settings import Hyperparameters, ModelCardSettings, TrainSettings

# the architecture each layout names (Config.to_hf_dict), for the card's text and tags
ARCHITECTURES = {"qwen3_5": "Qwen3_5ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}
# Unicode script -> language, for text with no --language (see the module docstring)
_SCRIPTS = {"zh": r"[\u3400-\u4dbf\u4e00-\u9fff]", "ja": r"[\u3040-\u30ff]", "ko": r"[\uac00-\ud7af]",
            "en": r"[A-Za-z]"}
_SHARE = 0.1  # a script with at least this share of the letters names a language of the text
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")  # YAML scalars written without quotes
_YAML_WORDS = {"yes", "no", "on", "off", "true", "false", "y", "n", "null"}  # ... unless YAML reads them as such


def detect_languages(text: str) -> list[str]:
    """The languages of `text` by the scripts its letters are written in (Japanese kana make Han Japanese)."""
    counts = {lang: len(re.findall(pattern, text)) for lang, pattern in _SCRIPTS.items()}
    if counts["ja"]:
        counts["ja"], counts["zh"] = counts["ja"] + counts["zh"], 0
    total = sum(counts.values())
    return [lang for lang, n in sorted(counts.items(), key=lambda kv: -kv[1]) if total and n / total >= _SHARE]


def _scalar(value) -> str:
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def front_matter(fields: dict) -> list[str]:
    """YAML front matter: `key: value`, lists as `- item` lines; None and [] are left out."""
    lines = ["---"]
    for key, value in fields.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {_scalar(v)}" for v in value)]
        else:
            lines.append(f"{key}: {_scalar(value)}")
    return lines + ["---"]


def training_command(args: dict, planned: bool) -> str:
    """A `sakimi-next --mode train` command line with the settings a run recorded (trainer_state.json's
    "args": TrainSettings' fields and the resolved hyperparameters): every hyperparameter explicitly, the
    other settings where they differ from their defaults. `planned`: the schedule came from a --max-minutes
    budget, and is written out as the steps it planned (the time limit is left out). tests/test_model_card.py
    parses the result with the train command's own flags."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)
                if f.default is not dataclasses.MISSING}
    known = {f.name for f in (*dataclasses.fields(TrainSettings), *dataclasses.fields(Hyperparameters))}
    flags = {"preset": "--config"}
    words = ["sakimi-next", "--mode", "train"]
    for name, value in args.items():
        if value is None or name not in known or name in ("resume_from", "hyper") or (
                planned and name == "max_minutes"):
            continue
        if name in defaults and value == defaults[name]:
            continue
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if value is True:
            words.append(flag)
        elif value is False:
            if name == "compile":  # the one flag that can be turned off
                words.append("--no-compile")
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


@dataclasses.dataclass
class TrainingData:
    """What the card says about the data a checkpoint was trained on (`describe_data` in export/hf.py)."""

    sources: list[str]  # the prepared data's input files (meta.json), [] when it cannot be read
    sample: str  # some training text (or the tokenizer's vocabulary) to detect languages in
    data_dir: str | None


def _architecture(config: Config, layout: str, n_params: int) -> list[str]:
    c = config
    mlp = (f"a sparse MoE of {c.num_experts} experts ({c.num_experts_per_tok} per token, width "
           f"{c.moe_intermediate_size}) plus a shared expert of width {c.shared_expert_intermediate_size}"
           if c.is_moe else f"a SwiGLU MLP of width {c.intermediate_size}")
    full = c.layer_types.count("full_attention")
    return [
        "## Architecture", "",
        f"`{ARCHITECTURES[layout]}` ({'Qwen3.5' if layout == 'qwen3_5' else 'Qwen3-Next'} layout), "
        f"{n_params:,} parameters: {c.num_hidden_layers} layers, hidden size {c.hidden_size}, vocabulary "
        f"{c.vocab_size}, {'tied' if c.tie_word_embeddings else 'untied'} embedding and LM head.", "",
        f"- Gated DeltaNet in {c.num_hidden_layers - full} of {c.num_hidden_layers} layers "
        f"({c.linear_num_key_heads} key / {c.linear_num_value_heads} value heads of {c.linear_key_head_dim} / "
        f"{c.linear_value_head_dim}), gated attention in the others ({c.num_attention_heads} query / "
        f"{c.num_key_value_heads} key-value heads of {c.head_dim}, RoPE on {c.rotary_dim} dimensions, "
        f"theta {c.rope_theta:g})",
        f"- each followed by {mlp}",
        f"- positions up to {c.max_position_embeddings:,} (max_position_embeddings)", "",
    ]


def _license(card: ModelCardSettings) -> list[str]:
    if card.license != "other":
        return ["## License", "", f"{card.license} (as chosen at export).", ""]
    return ["## License", "",
            "Not chosen: the weights follow the terms of the text they learned from, which only their owner "
            "knows (the Apache-2.0 license of sakimi-next covers the code, not the weights). Export again with "
            "`--license ID` (a Hugging Face license id, e.g. apache-2.0, mit, cc-by-4.0).", ""]


def _data(state: dict, card: ModelCardSettings, data: TrainingData) -> list[str]:
    args = state.get("args") or {}
    if card.dataset_name:
        named = card.dataset_name
    elif data.sources:
        named = ", ".join(f"`{Path(s).name}`" for s in data.sources)
    elif data.data_dir:
        named = f"the prepared data in `{data.data_dir}` (not found at export time)"
    else:
        named = "data the checkpoint does not name"
    window = f" in windows of {args['seq_len']} tokens" if args.get("seq_len") else ""
    lines = ["## Training data", "", f"Trained on {named}: {state.get('tokens_seen', 0):,} tokens seen in "
             f"{state.get('step')} steps{window}."]
    if args.get("init_from"):
        lines.append(f"Fine-tuned from `{args['init_from']}`.")
    return lines + [""]


def _held_out(metrics: list[dict]) -> list[str]:
    evals = [m for m in metrics if "val_loss" in m]
    if not evals:
        return ["## Held-out figures", "", "No validation was recorded.", ""]
    last, best = evals[-1], min(evals, key=lambda m: m["val_loss"])
    lines = ["## Held-out figures", "", "On the prepared data's validation split (never trained on):", "",
             "| | step | loss (nats/token) | perplexity | bits per byte |", "|---|---|---|---|---|"]
    for label, m in (("last", last), ("best", best)):
        bpb = f"{m['val_bpb']:.4f}" if "val_bpb" in m else "-"
        lines.append(f"| {label} | {m['step']} | {m['val_loss']:.4f} | {m['val_ppl']:.2f} | {bpb} |")
    return lines + [""]


def _command(state: dict) -> list[str]:
    args = state.get("args") or {}
    if not args:
        return []
    planned = bool(state.get("budget"))
    lines = ["## How it was trained", "",
             "The run's recorded settings (trainer_state.json) as one command line, every hyperparameter "
             "written out:", "", "```sh", training_command(args, planned), "```"]
    if planned or args.get("preset") == "auto":
        lines.append("The run sized itself (`--config auto`) or planned its schedule from a time budget "
                     "(`--max-minutes`); the values above are what it decided.")
    return lines + [""]


def model_card(config: Config, state: dict, metrics: list[dict], n_params: int, layout: str,
               card: ModelCardSettings, data: TrainingData) -> str:
    """README.md of an export of the checkpoint with `config` and trainer `state`, in `layout`."""
    languages = list(card.languages) or detect_languages(data.sample)
    fields = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": card.license,
              "language": languages, "tags": [layout, "sakimi-next", "text-generation"],
              "base_model": card.base_model}
    title = state.get("preset") or "custom"
    lines = [*front_matter(fields), "", f"# {title} (trained with sakimi-next)", "",
             f"A {n_params / 1e6:.2f}M-parameter language model in the {ARCHITECTURES[layout]} layout "
             "(hybrid Gated DeltaNet / gated attention).", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained('.')", "tokenizer = AutoTokenizer.from_pretrained('.')",
             "```", ""]
    if not card.languages:
        lines += [f"Languages detected from the training text's scripts: {', '.join(languages) or 'none'} "
                  "(Latin letters are taken as English; `--language` sets them).", ""]
    lines += _architecture(config, layout, n_params) + _data(state, card, data) + _held_out(metrics)
    lines += _command(state) + _license(card)
    if config.mtp_num_hidden_layers:
        lines += ["The `mtp.*` tensors are the multi-token-prediction block used for speculative decoding by "
                  "sakimi-next; transformers ignores them.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"
