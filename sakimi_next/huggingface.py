"""The Hugging Face format of a model directory, in two layouts, and reading one (`pretrained` loads it
for use; `export/hf.py` writes one from a checkpoint).

The in-memory parameter names are transformers' Qwen3-Next ones, so conversion is only about the files:

- the layouts (settings.HF_LAYOUTS): "qwen3_next" is `Qwen3NextForCausalLM` (dense or MoE), "qwen3_5" is
  `Qwen3_5ForCausalLM` (model_type qwen3_5_text, dense only), the same model with the DeltaNet input
  projections stored apart (`split_deltanet_projections`) and multi-section RoPE in its config; a
  directory's layout is its config.json's model_type (`hf_layout`), and reading accepts both;
- `config.json` is `Config.to_hf_dict(layout)`;
- weights are safetensors, sharded above a size with a `model.safetensors.index.json`; a tied LM head is
  not stored in the qwen3_5 layout (transformers and vLLM re-tie it) but is in the qwen3_next layout,
  whose vLLM and SGLang loaders always build a separate head (`export/hf.py` says why);
- the experts of an MoE layer live in memory as stacked tensors, `experts.gate_up_proj [E, 2I, H]` and
  `experts.down_proj [E, H, I]` (as in transformers 5), and on disk one by one, as `save_pretrained`,
  vLLM and SGLang write them: `experts.{e}.gate_proj.weight [I, H]`, `.up_proj`, `.down_proj [H, I]`;
- multi-token-prediction weights keep the released `mtp.*` names (the same in Qwen3.5); transformers
  ignores them on load;
- the tokenizer is `tokenizer.json` plus `tokenizer_config.json` and `special_tokens_map.json` for
  `AutoTokenizer`;
- our exports add `sakimi_export.json` (the files written with their sha256, the source step and its
  tokenizer's sha256), which reading verifies.
Only safetensors are read: a directory with only pickled `.bin` weights is refused. Every JSON file read
(config.json, the index) is checked field by field, and file names in the index must stay inside the
directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .util import UserError, inside, is_sha256, json_field, json_object, read_json_file, sha256_file

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
EXPORT_RECORD = "sakimi_export.json"  # marks a directory as this project's export
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SPLIT_PROJECTION = re.compile(r"^(.*\.linear_attn\.)(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a)\.weight$")



# ----------------------------------------------------------------------------- tensor name mapping
def to_hf_tensors(tensors: dict[str, torch.Tensor], config: Config | None = None,
                  layout: str = "qwen3_next") -> dict[str, torch.Tensor]:
    """In-memory names -> on-disk names: stacked experts become one tensor per expert and projection; in
    the qwen3_5 layout (`config` needed) the DeltaNet projections are split as Qwen3.5 stores them."""
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
    return split_deltanet_projections(out, config) if layout == "qwen3_5" else out


def from_hf_tensors(tensors: dict[str, torch.Tensor], config: Config | None = None,
                    layout: str = "qwen3_next") -> dict[str, torch.Tensor]:
    """On-disk names -> in-memory names (the inverse of `to_hf_tensors`); stacked names pass through."""
    if layout == "qwen3_5":
        tensors = join_deltanet_projections(tensors, config)
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


def _deltanet_widths(config: Config) -> tuple[int, int, int, int]:
    """(Hk, dk, r * dv, r): key heads, key head width, value width per key head, value heads per key head."""
    r = config.linear_num_value_heads // config.linear_num_key_heads
    return config.linear_num_key_heads, config.linear_key_head_dim, r * config.linear_value_head_dim, r


def split_deltanet_projections(tensors: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Qwen3-Next's per-key-head groups -> Qwen3.5's blocks. Ours: `in_proj_qkvz` holds, for each key head,
    [q dk | k dk | v r*dv | z r*dv] and `in_proj_ba` [b r | a r]; Qwen3.5: `in_proj_qkv` = [all q | all k |
    all v] (the conv's channel order), `in_proj_z`, `in_proj_b`, `in_proj_a` (value heads in order: value
    head j belongs to key head j // r in both). Only rows move: no value changes."""
    Hk, dk, vw, r = _deltanet_widths(config)
    out = {}
    for name, t in tensors.items():
        if name.endswith(".linear_attn.in_proj_qkvz.weight"):
            g = t.view(Hk, 2 * dk + 2 * vw, -1)
            q, k, v, z = (g[:, a:b].flatten(0, 1) for a, b in
                          ((0, dk), (dk, 2 * dk), (2 * dk, 2 * dk + vw), (2 * dk + vw, 2 * dk + 2 * vw)))
            base = name[: -len("in_proj_qkvz.weight")]
            out[base + "in_proj_qkv.weight"] = torch.cat([q, k, v]).contiguous()
            out[base + "in_proj_z.weight"] = z.contiguous()
        elif name.endswith(".linear_attn.in_proj_ba.weight"):
            g = t.view(Hk, 2 * r, -1)
            base = name[: -len("in_proj_ba.weight")]
            out[base + "in_proj_b.weight"] = g[:, :r].flatten(0, 1).contiguous()
            out[base + "in_proj_a.weight"] = g[:, r:].flatten(0, 1).contiguous()
        else:
            out[name] = t
    return out


def join_deltanet_projections(tensors: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """The inverse of `split_deltanet_projections`; a layer with some of the four parts missing is a
    UserError naming the first one."""
    Hk, dk, vw, r = _deltanet_widths(config)
    parts = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    out, layers = {}, {}
    for name, t in tensors.items():
        m = _SPLIT_PROJECTION.match(name)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            out[name] = t
    for base, got in layers.items():
        missing = [p for p in parts if p not in got]
        if missing:
            raise UserError(f"{base}{missing[0]}.weight is missing (Qwen3.5 stores the four projections apart)")
        expected = {"in_proj_qkv": 2 * Hk * dk + Hk * vw, "in_proj_z": Hk * vw, "in_proj_b": Hk * r,
                    "in_proj_a": Hk * r}
        for p, rows in expected.items():
            if got[p].ndim != 2 or got[p].shape[0] != rows:
                raise UserError(f"{base}{p}.weight has shape {tuple(got[p].shape)}, the model expects "
                                f"{rows} rows")
        q, k, v = got["in_proj_qkv"].split([Hk * dk, Hk * dk, Hk * vw])
        heads = lambda x: x.view(Hk, -1, x.shape[-1])  # noqa: E731
        out[base + "in_proj_qkvz.weight"] = torch.cat(
            [heads(q), heads(k), heads(v), heads(got["in_proj_z"])], dim=1).flatten(0, 1)
        out[base + "in_proj_ba.weight"] = torch.cat(
            [heads(got["in_proj_b"]), heads(got["in_proj_a"])], dim=1).flatten(0, 1)
    return out


# ----------------------------------------------------------------------------------------- reading
def is_hf_dir(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and ((p / WEIGHTS).is_file() or (p / INDEX).is_file()
                                                             or any(p.glob("*.bin")))


LAYOUT_OF_MODEL_TYPE = {"qwen3_next": "qwen3_next", "qwen3_5_text": "qwen3_5"}  # config.json -> settings.HF_LAYOUTS


def _config_dict(path: str | Path) -> dict:
    """config.json of a Hugging Face directory, as a dict of one of the model types read."""
    p = Path(path) / "config.json"
    d = json_object(read_json_file(p), p)
    model_type = d.get("model_type")
    if model_type in ("qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text"):
        raise UserError(f"{p.parent} holds a {model_type!r} model; of Qwen3.5 only the dense text model "
                        "(qwen3_5_text, Qwen3_5ForCausalLM) is read")
    if model_type not in LAYOUT_OF_MODEL_TYPE:
        raise UserError(f"{p.parent} holds a {model_type!r} model, not qwen3_next or qwen3_5_text")
    return d


def hf_layout(path: str | Path) -> str:
    """The layout (settings.HF_LAYOUTS) of a Hugging Face directory, from its config.json's model_type."""
    return LAYOUT_OF_MODEL_TYPE[_config_dict(path)["model_type"]]


def load_hf_config(path: str | Path) -> Config:
    p = Path(path) / "config.json"
    d = _config_dict(path)
    try:
        return Config.from_hf_dict(d)
    except ConfigError as e:
        raise UserError(f"{p}: {e}") from None
    except (TypeError, KeyError) as e:
        raise UserError(f"{p} is not a valid {d['model_type']} config ({type(e).__name__}: {e})") from None


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
    """All tensors of a Hugging Face directory (either layout), renamed to this project's in-memory names. A
    tied LM head stored anyway (our Qwen3-Next exports write it for vLLM and SGLang) is dropped: the model
    ties it to the embedding, as transformers does."""
    p = Path(path)
    config = config or load_hf_config(p)
    recorded = export_record(p).get("files", {})  # our exports: verify the weights as checkpoints are
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(p):
        if f.name in recorded and sha256_file(f) != recorded[f.name]:
            raise UserError(f"{f} is corrupt or truncated: its sha256 differs from the one recorded in {EXPORT_RECORD}")
        tensors.update(ckpt.load_tensors(f))
    tensors = from_hf_tensors(tensors, config, hf_layout(p))
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
