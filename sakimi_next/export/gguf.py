"""`--mode export --format gguf`: one file that llama.cpp (and ollama, LM Studio, llama-cpp-python) runs as we do.

The file is written with the `gguf` package (llama.cpp's own gguf-py) and follows what llama.cpp's
converter (`convert_hf_to_gguf.py`, classes `Qwen3NextModel` and `_LinearAttentionVReorderBase`) writes
and what its loader (`src/models/qwen3next.cpp`, `src/models/qwen35.cpp`) reads:

- **Architecture.** An MoE model is `qwen3next`: its loader requires experts and a shared expert in every
  layer. A dense model is `qwen35`: the same hybrid Gated DeltaNet / Gated Attention trunk with a SwiGLU
  MLP (the qwen3next loader throws "cannot have zero experts"). A model with both dense and MoE layers
  has no llama.cpp architecture and is refused.
- **Norms.** llama.cpp's RMSNorm multiplies by the stored weight, so the zero-centred weights (decoder
  norms, final norm, q_norm, k_norm) are stored as `1 + w`. The gated DeltaNet norm already multiplies
  by `w` and is stored as is.
- **Gated DeltaNet.** `in_proj_qkvz` (grouped per key head, `[q | k | v | z]` each) is split into
  `attn_qkv` = `[q all heads | k all heads | v all heads]` (the conv's channel order) and `attn_gate` = z;
  `A_log` becomes `ssm_a = -exp(A_log)`, `dt_bias` becomes `ssm_dt.bias`, the conv kernel
  `[C, 1, K]` is stored `[C, K]`. qwen3next keeps `in_proj_ba` whole (`ssm_ba`, the same per-key-head
  grouping); qwen35 takes separate `ssm_beta`, `ssm_alpha`, and wants the value heads in *tiled* order
  (value head j of key head g at position j*Hk + g, so ggml's broadcast pairs it with key head g) in
  every tensor indexed by value head: the v rows of `attn_qkv`, `attn_gate`, beta, alpha, `ssm_a`,
  `ssm_dt`, the v channels of the conv, and the input columns of `ssm_out`.
- **Attention** keeps its tensors (`q_proj` still holds query and gate per head). Partial RoPE is
  `rope.dimension_count`. qwen35 applies interleaved multi-section RoPE; for text every section gets the
  token's position, except a 4th section whose position is 0, so `rope.dimension_sections` is chosen
  to cover every rotated pair with the first three: plain NeoX RoPE, as ours.
- **MoE.** Stacked experts `gate_up_proj [E, 2I, H]` are split into `ffn_gate_exps`, `ffn_up_exps`;
  `down_proj [E, H, I]` is `ffn_down_exps`; the router and the shared expert's gate stay float32.
- **Tokenizer.** Byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizer `qwen2`, whose
  regex in llama.cpp is ours; vocabulary, merges, and the special tokens as CONTROL tokens; no BOS is
  added. The vocabulary is padded to the model's `vocab_size` with unused tokens.
- **Not exported**: the MTP block (`mtp.*`); the file says nothing of it and the caller is told.

Weight types: `f32`; `f16` or `q8_0` for the matrices, with vectors, norms, the conv kernel and
the routers kept float32 (as the converter does). A matrix whose rows are not a multiple of q8_0's
32-value blocks is stored f16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import Config, mrope_sections
from ..pretrained import CHECKPOINT, read_model
from ..settings import GGUF_TYPES, ExportSettings
from ..tokenizer import CHAT_TEMPLATE, IM_END
from ..util import UserError, atomic_file

DENSE_ARCH, MOE_ARCH = "qwen35", "qwen3next"
EXPORT_KEY = "sakimi_next.exported_from"  # marks our files: only those may be overwritten
L2NORM_EPS = 1e-6  # the eps of our q/k l2norm; llama.cpp uses rms_norm_eps there


# ------------------------------------------------------------------------------- what llama.cpp can run
def architecture(config: Config) -> str:
    """The llama.cpp architecture for `config`, or a UserError naming what llama.cpp cannot represent."""
    def refuse(what: str, why: str):
        raise UserError(f"cannot export to GGUF: {what}; {why}")

    if config.linear_key_head_dim != config.linear_value_head_dim:
        refuse(f"linear_key_head_dim ({config.linear_key_head_dim}) != linear_value_head_dim "
               f"({config.linear_value_head_dim})", "llama.cpp's Gated DeltaNet has one head size for both")
    if config.rms_norm_eps != L2NORM_EPS:
        refuse(f"rms_norm_eps is {config.rms_norm_eps}", f"llama.cpp also uses it inside the DeltaNet's q/k "
               f"l2 norm, where this model uses {L2NORM_EPS}")
    moe = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    if not any(moe):
        return DENSE_ARCH
    if not all(moe):
        dense = [i for i, m in enumerate(moe) if not m]
        refuse(f"layers {dense} are dense and the others MoE",
               "llama.cpp's qwen3next needs experts in every layer and qwen35 in none")
    if config.shared_expert_intermediate_size == 0:
        refuse("the MoE has no shared expert", "llama.cpp's qwen3next requires one")
    if not config.norm_topk_prob and config.num_experts_per_tok < config.num_experts:
        refuse("norm_topk_prob is false", "llama.cpp's qwen3next always renormalises the top-k weights")
    return MOE_ARCH


def rope_sections(config: Config) -> list[int]:
    """qwen35's interleaved M-RoPE gives rotated pair p the section p % 3 while p < 3 * sections[p % 3],
    else the 4th section (position 0 for text): these sections cover all rotated pairs with the first 3."""
    return mrope_sections(config.rotary_dim) + [0]


# ------------------------------------------------------------------------------------ tensor conversion
@dataclass(frozen=True)
class Layout:
    """The shapes conversions need, and the value-head order of the target architecture."""
    config: Config
    tiled_v: bool  # qwen35: value heads in tiled order (see the module docstring)

    def v_order(self) -> torch.Tensor:
        Hk, Hv = self.config.linear_num_key_heads, self.config.linear_num_value_heads
        grouped = torch.arange(Hv).view(Hk, Hv // Hk)  # [key head g, j] -> our value head g*r + j
        return grouped.t().flatten() if self.tiled_v else grouped.flatten()

    def v_heads(self, t: torch.Tensor, head_size: int, dim: int = 0) -> torch.Tensor:
        """`t` with its value-head blocks of `head_size` along `dim` put in the target order."""
        idx = (self.v_order()[:, None] * head_size + torch.arange(head_size)).flatten()
        return t.index_select(dim, idx)


Convert = Callable[[torch.Tensor, Layout], list[torch.Tensor]]


def same(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    return [t]


def plus_one(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    return [t.float() + 1.0]


def flat(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    return [t.reshape(-1)]


def per_v_head(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    return [L.v_heads(t, 1)]


def neg_exp(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    return [L.v_heads(-t.float().exp(), 1)]


def qkvz_split(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    """[Hk * (q dk | k dk | v r*dv | z r*dv), H] -> qkv [2 Hk dk + Hv dv, H], z [Hv dv, H]."""
    c = L.config
    dk, dv, Hk = c.linear_key_head_dim, c.linear_value_head_dim, c.linear_num_key_heads
    rdv = c.linear_value_dim // Hk
    q, k, v, z = t.view(Hk, -1, t.shape[-1]).split([dk, dk, rdv, rdv], dim=1)
    v, z = (L.v_heads(x.reshape(-1, t.shape[-1]), dv) for x in (v, z))
    return [torch.cat([q.reshape(-1, t.shape[-1]), k.reshape(-1, t.shape[-1]), v]), z]


def ba_split(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    """[Hk * (b r | a r), H] -> beta [Hv, H], alpha [Hv, H]."""
    Hk = L.config.linear_num_key_heads
    b, a = t.view(Hk, 2, -1, t.shape[-1]).unbind(1)
    return [L.v_heads(x.reshape(-1, t.shape[-1]), 1) for x in (b, a)]


def conv_kernel(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    """[C, 1, K] -> [C, K], the v channels (after q and k) in the target head order."""
    t, qk = t.squeeze(1), 2 * L.config.linear_key_dim
    return [torch.cat([t[:qk], L.v_heads(t[qk:], L.config.linear_value_head_dim)])]


def out_columns(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    return [L.v_heads(t, L.config.linear_value_head_dim, dim=1)]


def gate_up_split(t: torch.Tensor, L: Layout) -> list[torch.Tensor]:
    return list(t.chunk(2, dim=1))


# in-memory name under `model.layers.{i}.` -> (GGUF names under `blk.{i}.`, conversion)
COMMON_LAYER_TENSORS: dict[str, tuple[tuple[str, ...], Convert]] = {
    "input_layernorm.weight": (("attn_norm.weight",), plus_one),
    "post_attention_layernorm.weight": (("post_attention_norm.weight",), plus_one),
    "self_attn.q_proj.weight": (("attn_q.weight",), same),
    "self_attn.k_proj.weight": (("attn_k.weight",), same),
    "self_attn.v_proj.weight": (("attn_v.weight",), same),
    "self_attn.o_proj.weight": (("attn_output.weight",), same),
    "self_attn.q_norm.weight": (("attn_q_norm.weight",), plus_one),
    "self_attn.k_norm.weight": (("attn_k_norm.weight",), plus_one),
    "linear_attn.in_proj_qkvz.weight": (("attn_qkv.weight", "attn_gate.weight"), qkvz_split),
    "linear_attn.conv1d.weight": (("ssm_conv1d.weight",), conv_kernel),
    "linear_attn.dt_bias": (("ssm_dt.bias",), per_v_head),
    "linear_attn.A_log": (("ssm_a",), neg_exp),
    "linear_attn.norm.weight": (("ssm_norm.weight",), same),
    "linear_attn.out_proj.weight": (("ssm_out.weight",), out_columns),
}
LAYER_TENSORS: dict[str, dict[str, tuple[tuple[str, ...], Convert]]] = {
    DENSE_ARCH: {
        **COMMON_LAYER_TENSORS,
        "linear_attn.in_proj_ba.weight": (("ssm_beta.weight", "ssm_alpha.weight"), ba_split),
        "mlp.gate_proj.weight": (("ffn_gate.weight",), same),
        "mlp.up_proj.weight": (("ffn_up.weight",), same),
        "mlp.down_proj.weight": (("ffn_down.weight",), same),
    },
    MOE_ARCH: {
        **COMMON_LAYER_TENSORS,
        "linear_attn.in_proj_ba.weight": (("ssm_ba.weight",), same),
        "mlp.gate.weight": (("ffn_gate_inp.weight",), same),
        "mlp.experts.gate_up_proj": (("ffn_gate_exps.weight", "ffn_up_exps.weight"), gate_up_split),
        "mlp.experts.down_proj": (("ffn_down_exps.weight",), same),
        "mlp.shared_expert.gate_proj.weight": (("ffn_gate_shexp.weight",), same),
        "mlp.shared_expert.up_proj.weight": (("ffn_up_shexp.weight",), same),
        "mlp.shared_expert.down_proj.weight": (("ffn_down_shexp.weight",), same),
        "mlp.shared_expert_gate.weight": (("ffn_gate_inp_shexp.weight",), flat),
    },
}
TOP_TENSORS: dict[str, tuple[tuple[str, ...], Convert]] = {
    "model.embed_tokens.weight": (("token_embd.weight",), same),
    "model.norm.weight": (("output_norm.weight",), plus_one),
    "lm_head.weight": (("output.weight",), same),
}
# kept float32 whatever the weight type (besides vectors and norms), as llama.cpp's converter does
FLOAT32_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


def gguf_tensors(config: Config, tensors: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Our tensors (without `mtp.*`) under llama.cpp's names and layouts, float32."""
    layout, table = Layout(config, tiled_v=arch == DENSE_ARCH), LAYER_TENSORS[arch]
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            targets, convert = table.get(rest, (None, None))
            prefix = f"blk.{i}."
        else:
            targets, convert = TOP_TENSORS.get(name, (None, None))
            prefix = ""
        if targets is None:
            raise UserError(f"cannot export to GGUF: llama.cpp's {arch} has no place for the tensor {name}")
        for target, value in zip(targets, convert(t.detach().float(), layout), strict=True):
            out[prefix + target] = value.contiguous()
    return out


def storage(name: str, t: np.ndarray, weight_type: str):
    """(array to write, its GGML type) of one converted tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if weight_type == "f32" or t.ndim == 1 or name.endswith(("_norm.weight", *FLOAT32_TENSORS)) \
            or not name.endswith(".weight"):
        return t.astype(np.float32), Q.F32
    if weight_type == "q8_0" and t.shape[-1] % 32 == 0:
        return quants.quantize(t, Q.Q8_0), Q.Q8_0
    return t.astype(np.float16), Q.F16


# --------------------------------------------------------------------------------------- metadata
# GGUFWriter method -> value; `{arch}.` keys, written for both architectures
HPARAMS: dict[str, Callable[[Config], object]] = {
    "add_context_length": lambda c: c.max_position_embeddings,
    "add_embedding_length": lambda c: c.hidden_size,
    "add_block_count": lambda c: c.num_hidden_layers,
    "add_feed_forward_length": lambda c: c.intermediate_size,
    "add_head_count": lambda c: c.num_attention_heads,
    "add_head_count_kv": lambda c: c.num_key_value_heads,
    "add_key_length": lambda c: c.head_dim,
    "add_value_length": lambda c: c.head_dim,
    "add_rope_freq_base": lambda c: c.rope_theta,
    "add_rope_dimension_count": lambda c: c.rotary_dim,
    "add_layer_norm_rms_eps": lambda c: c.rms_norm_eps,
    "add_ssm_conv_kernel": lambda c: c.linear_conv_kernel_dim,
    "add_ssm_state_size": lambda c: c.linear_key_head_dim,
    "add_ssm_group_count": lambda c: c.linear_num_key_heads,
    "add_ssm_time_step_rank": lambda c: c.linear_num_value_heads,
    "add_ssm_inner_size": lambda c: c.linear_value_dim,
}
MOE_HPARAMS: dict[str, Callable[[Config], object]] = {
    "add_expert_count": lambda c: c.num_experts,
    "add_expert_used_count": lambda c: c.num_experts_per_tok,
    "add_expert_feed_forward_length": lambda c: c.moe_intermediate_size,
    "add_expert_shared_feed_forward_length": lambda c: c.shared_expert_intermediate_size,
}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def write_hparams(writer, config: Config, arch: str, weight_type: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[weight_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, value in (HPARAMS | (MOE_HPARAMS if arch == MOE_ARCH else {})).items():
        getattr(writer, method)(value(config))
    # which layers are Gated DeltaNet (the key gguf-py writes with add_recurrent_layers in newer versions)
    writer.add_array(f"{arch}.attention.recurrent_layers", [t == "linear_attention" for t in config.layer_types])
    if arch == DENSE_ARCH:
        writer.add_rope_dimension_sections(rope_sections(config))


def tokenizer_vocab(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tokenizer.json this project trains; anything llama.cpp's
    `qwen2` byte-level BPE would tokenize differently is a UserError."""
    from gguf import TokenType

    from ..tokenizer import SPLIT_PATTERN

    def refuse(why: str):
        raise UserError(f"cannot export the tokenizer to GGUF: {why}; llama.cpp would split text differently")

    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        refuse(f"it is a {model.get('type')} model{' with byte fallback' if model.get('byte_fallback') else ''}, "
               "not byte-level BPE")
    if tokenizer_json.get("normalizer"):
        refuse(f"it has a normalizer ({tokenizer_json['normalizer'].get('type')})")
    steps = pre.get("pretokenizers") or []
    pattern = (steps[0].get("pattern") or {}).get("Regex") if steps else None
    if [s.get("type") for s in steps] != ["Split", "ByteLevel"] or pattern != SPLIT_PATTERN \
            or steps[0].get("behavior") != "Isolated" or steps[0].get("invert") \
            or steps[1].get("add_prefix_space") or steps[1].get("use_regex"):
        refuse("its pre-tokenizer is not this project's (Qwen2's regex, then byte-level)")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens") or []}
    vocab.update({t["content"]: i for i, t in added.items()})
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"cannot export to GGUF: the tokenizer has ids up to {max(vocab.values())} but the model "
                        f"only {vocab_size} embedding rows")
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            special = added[i].get("special", True) if i in added else False
            types.append(TokenType.NORMAL if i not in added else TokenType.CONTROL if special
                         else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, [int(t) for t in types], merges


def write_tokenizer(writer, tokenizer_json: dict, vocab_size: int, eot_id: int, pad_id: int) -> None:
    tokens, types, merges = tokenizer_vocab(tokenizer_json, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot_id)  # as Qwen's models: never added, but llama.cpp wants one
    writer.add_eos_token_id(eot_id)
    writer.add_pad_token_id(pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)  # ChatML, as in tokenizer_config.json
    im_end = next((i for i, t in enumerate(tokens) if t == IM_END), None)
    if im_end is not None:
        writer.add_eot_token_id(im_end)  # a chat turn ends there


# ------------------------------------------------------------------------------------------ export
def export(s: ExportSettings) -> list[str]:
    """`--mode export --format gguf`: what `export_gguf` wrote, and what it left out, for the user."""
    res = export_gguf(s.checkpoint, s.out_file, s.gguf_type, progress=True)
    return [f"note: {note}" for note in res.notes] + [
        f"exported {s.checkpoint} -> {res.path} (llama.cpp architecture {res.architecture}, {res.weight_type}); "
        f"run it with: llama-cli -m {res.path}"]


@dataclass
class Source:
    """A model to export: a training checkpoint or a Hugging Face directory, as loaded."""
    config: Config
    tensors: dict[str, torch.Tensor]
    tokenizer_json: dict
    eot_id: int
    pad_id: int
    name: str


def load_source(path: str | Path) -> Source:
    files = read_model(path)
    name = (files.state.get("preset") or files.path.parent.name) if files.kind == CHECKPOINT else files.path.name
    tokenizer = files.tokenizer()
    return Source(files.config, files.tensors, json.loads(tokenizer._json), tokenizer.eot_id, tokenizer.pad_id, name)


@dataclass
class GGUFExport:
    path: Path
    architecture: str
    weight_type: str
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. the MTP block left out)


def is_our_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        return EXPORT_KEY in GGUFReader(path).fields
    except Exception:  # unreadable or not GGUF at all: not ours  # noqa: BLE001
        return False


def check_target(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"--out-file {out} is a directory")
    if out.exists() and not is_our_gguf(out):
        raise UserError(f"{out} exists and is not a GGUF file exported by sakimi-next; choose another name")


def export_gguf(model_path: str | Path, out_path: str | Path, weight_type: str = "f16",
                progress: bool = False) -> GGUFExport:
    """Write `model_path` (a checkpoint or Hugging Face directory) as one GGUF file at `out_path`.

    The file is built under a temporary name beside `out_path` and renamed into place at the end; an
    existing file is only replaced when it is an earlier GGUF export of ours."""
    import gguf

    if weight_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {weight_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out_path)
    check_target(out)
    src = load_source(model_path)
    arch = architecture(src.config)
    result = GGUFExport(out, arch, weight_type)
    if any(k.startswith("mtp.") for k in src.tensors):
        result.notes.append("the multi-token-prediction block (mtp.*) is not exported: llama.cpp runs the "
                            "model without it")
    tensors = gguf_tensors(src.config, {k: v for k, v in src.tensors.items() if not k.startswith("mtp.")}, arch)
    with atomic_file(out) as tmp:  # an existing file stays whole until the new one is
        writer = gguf.GGUFWriter(tmp, arch)
        write_hparams(writer, src.config, arch, weight_type, src.name)
        write_tokenizer(writer, src.tokenizer_json, src.config.vocab_size, src.eot_id, src.pad_id)
        writer.add_string(EXPORT_KEY, str(model_path))
        fallback = []
        for name, t in tensors.items():
            data, qtype = storage(name, t.numpy(), weight_type)
            if weight_type == "q8_0" and qtype == gguf.GGMLQuantizationType.F16:
                fallback.append(name)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    if fallback:
        names = ", ".join(fallback[:3]) + (", ..." if len(fallback) > 3 else "")
        result.notes.append(f"{len(fallback)} matrices stored f16 (rows not a multiple of 32): {names}")
    return result
