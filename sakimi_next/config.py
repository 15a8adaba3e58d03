"""Model configuration: one dataclass with the Hugging Face Qwen3-Next field names, and the presets.

The field names are exactly those of `transformers.Qwen3NextConfig`, so `Config.to_hf_dict()` is a
`config.json` that transformers reads and `Config.from_hf_dict()` reads theirs back; the dense model is
also written and read as Qwen3.5's text config (`qwen3_5_text`, the same fields without the MoE ones).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .settings import HF_LAYOUTS, Hyperparameters
from .util import atomic_write_text, json_kind

LINEAR = "linear_attention"
FULL = "full_attention"
HF_MODEL_TYPES = ("qwen3_next", "qwen3_5_text")  # the config.json model types read (from_hf_dict)
# the fields of a sparse MoE, which Qwen3.5's dense config does not have
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
              "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef")


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message names the field."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# declared field type -> (check, what it must be)
_TYPE_CHECKS = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer or null"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "list[int]": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers"),
}


def hybrid_layer_types(num_layers: int, full_attention_interval: int = 4) -> list[str]:
    """Qwen3-Next's 3:1 pattern: every `full_attention_interval`-th layer is full attention."""
    return [FULL if (i + 1) % full_attention_interval == 0 else LINEAR for i in range(num_layers)]


def full_attention_interval(layer_types: list[str]) -> int | None:
    """The interval whose `hybrid_layer_types` are `layer_types`, or None when they follow no such pattern."""
    n = len(layer_types)
    return next((k for k in range(1, n + 1) if hybrid_layer_types(n, k) == layer_types), None)


def mrope_sections(rotary_dim: int) -> list[int]:
    """Qwen3.5's three RoPE sections (time, height, width), interleaved: rotation pair p belongs to section
    p % 3, so each holds every third pair ([11, 11, 10] for the released 64 rotary dimensions, [3, 3, 2] for
    our 16). They sum to rotary_dim / 2, as vLLM asserts; with text alone every section takes the same
    position, so the split does not change the computation (the Qwen3.5 config and the GGUF file)."""
    pairs = rotary_dim // 2
    return [len(range(s, pairs, 3)) for s in range(3)]


@dataclass
class Config:
    # vocabulary and trunk
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 8
    intermediate_size: int = 768  # SwiGLU width of the dense MLP
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    layer_types: list[str] = field(default_factory=list)  # empty = the 3:1 hybrid pattern
    # gated attention (every 4th layer)
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 64
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25  # RoPE on the first quarter of each head, NeoX style
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # gated deltanet (the other layers)
    linear_num_key_heads: int = 4
    linear_num_value_heads: int = 8
    linear_key_head_dim: int = 64
    linear_value_head_dim: int = 64
    linear_conv_kernel_dim: int = 4
    # sparse mixture of experts (off when num_experts == 0)
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    shared_expert_intermediate_size: int = 256
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # multi-token prediction blocks (released Qwen3-Next has one; transformers ignores them)
    mtp_num_hidden_layers: int = 0
    # special tokens (filled in from the tokenizer)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.layer_types and _is_int(self.num_hidden_layers):
            self.layer_types = hybrid_layer_types(self.num_hidden_layers)
        if isinstance(self.layer_types, tuple):
            self.layer_types = list(self.layer_types)
        if isinstance(self.mlp_only_layers, tuple):
            self.mlp_only_layers = list(self.mlp_only_layers)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the depthwise conv: q, k and v of all heads."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def is_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # ------------------------------------------------------------------ validation
    def check_types(self) -> None:
        """Each field has its declared JSON type (an int is a number; true is not an integer; numbers are
        finite), so that a hand-edited or foreign config.json fails here with the field's name."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            ok, what = _TYPE_CHECKS[f.type]
            if not ok(v):
                raise ConfigError(f"{f.name} ({v!r}) must be {what}")

    def validate(self) -> None:
        self.check_types()

        def positive(*names):
            for n in names:
                v = getattr(self, n)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ConfigError(f"{n} ({v!r}) must be a positive integer")

        positive("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
                 "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel_dim", "max_position_embeddings", "decoder_sparse_step")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act ({self.hidden_act!r}) must be 'silu'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be divisible by "
                              f"linear_num_key_heads ({self.linear_num_key_heads})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                              f"{self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {LINEAR, FULL})
        if bad:
            raise ConfigError(f"layer_types contains {bad[0]!r}; each entry must be {LINEAR!r} or {FULL!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor ({self.partial_rotary_factor}) must be in (0, 1]")
        if self.rotary_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) * partial_rotary_factor ({self.partial_rotary_factor}) "
                              f"= {self.rotary_dim} rotary dims, which must be even")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta ({self.rope_theta}) must be positive")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps ({self.rms_norm_eps}) must be positive")
        if not self.initializer_range > 0:
            raise ConfigError(f"initializer_range ({self.initializer_range}) must be positive")
        if self.attention_bias:
            raise ConfigError("attention_bias (True) is not supported; Qwen3-Next has no attention biases")
        if self.num_experts < 0:
            raise ConfigError(f"num_experts ({self.num_experts}) must be >= 0")
        if self.num_experts > 0:
            positive("num_experts_per_tok", "moe_intermediate_size")
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                                  f"num_experts ({self.num_experts})")
            if self.shared_expert_intermediate_size < 0:
                raise ConfigError(f"shared_expert_intermediate_size ({self.shared_expert_intermediate_size}) "
                                  "must be >= 0")
        for i in self.mlp_only_layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ConfigError(f"mlp_only_layers contains {i}, outside 0..{self.num_hidden_layers - 1}")
        if self.mtp_num_hidden_layers not in (0, 1):
            raise ConfigError(f"mtp_num_hidden_layers ({self.mtp_num_hidden_layers}) must be 0 or 1")
        for n in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, n)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ConfigError(f"{n} ({v}) must be in 0..{self.vocab_size - 1} (below vocab_size)")

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"the config must be a JSON object, not {json_kind(d)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field {unknown[0]!r}")
        return cls(**d)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self, layout: str = "qwen3_next") -> dict:
        """A transformers `config.json` in `layout` (settings.HF_LAYOUTS):

        - "qwen3_next": `Qwen3NextConfig` (model_type qwen3_next); a dense model has `num_experts = 0`;
        - "qwen3_5": `Qwen3_5TextConfig` (model_type qwen3_5_text, dense only: the MoE fields are left out);
          its RoPE is multi-section, written with explicit `mrope_section` (see `mrope_sections`).

        RoPE settings are written both in the old top-level form and as `rope_parameters`, so transformers
        4.57+ and 5.x read the same thing.
        """
        if layout not in HF_LAYOUTS:
            raise ConfigError(f"layout {layout!r} is not one of {', '.join(HF_LAYOUTS)}")
        d = self.to_dict()
        mtp = d.pop("mtp_num_hidden_layers")
        rope = {"rope_type": "default", "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        d.update(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], rope_parameters=rope,
                 use_cache=True, output_router_logits=False, dtype="float32")
        if layout == "qwen3_5":
            if self.is_moe:
                raise ConfigError("the qwen3_5 layout is for dense models; this model has experts")
            for name in (*MOE_FIELDS, "output_router_logits"):
                d.pop(name)
            d.update(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"],
                     rope_parameters={**rope, "mrope_section": mrope_sections(self.rotary_dim),
                                      "mrope_interleaved": True})
            interval = full_attention_interval(self.layer_types)
            if interval:
                d["full_attention_interval"] = interval  # beside layer_types, as the released configs have it
        if mtp:
            d["mtp_num_hidden_layers"] = mtp  # the name the released checkpoints use
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "Config":
        """Read a transformers `config.json` dict (qwen3_next, or the dense qwen3_5_text). Fields this
        project does not model are ignored, except those that change the computation, which are refused
        with a ConfigError. Defaults are transformers' (an untied LM head when the field is absent)."""
        if not isinstance(d, dict):
            raise ConfigError(f"the config must be a JSON object, not {json_kind(d)}")
        model_type = d.get("model_type", "qwen3_next")
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(f"model_type is {model_type!r}, not one of {', '.join(map(repr, HF_MODEL_TYPES))}")
        if model_type == "qwen3_5_text":  # no experts, whatever the file says: transformers reads none
            d = {k: v for k, v in d.items() if k not in MOE_FIELDS}
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act ({d['hidden_act']!r}) is not supported; only 'silu'")
        if d.get("attention_bias", False):
            raise ConfigError("attention_bias (True) is not supported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters ({rope!r}) must be an object")
        if not _is_int(d.get("num_hidden_layers")) or not _is_int(d.get("full_attention_interval", 4)):
            raise ConfigError("num_hidden_layers and full_attention_interval must be integers "
                              f"({d.get('num_hidden_layers')!r}, {d.get('full_attention_interval', 4)!r})")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type ({rope_type!r}) is not supported; only 'default'")
        # mrope_section is not read: with text alone every section has the same position, so any split of
        # the rotary dimensions is plain partial RoPE
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("tie_word_embeddings", False)  # transformers' default for both model types
        kw["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        kw["partial_rotary_factor"] = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
        if "layer_types" not in d or d["layer_types"] is None:
            kw["layer_types"] = hybrid_layer_types(d["num_hidden_layers"], d.get("full_attention_interval", 4))
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
        kw["mlp_only_layers"] = kw.get("mlp_only_layers") or []
        kw["mtp_num_hidden_layers"] = d.get("mtp_num_hidden_layers", d.get("num_nextn_predict_layers", 0)) or 0
        kw["num_experts"] = kw.get("num_experts") or 0
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------------
# Presets: a model and its training defaults (for what the command line leaves out: the README's table),
# together. Vocabulary, depth, width and attention heads are those of the original project's table; the
# free dimensions follow Qwen3-Next's proportions (fixed head dims, twice as many value heads as key heads
# in the DeltaNet layers, SwiGLU MLP) sized so that the true counts match the names. Every preset ties
# the LM head to the embedding, as Qwen3's small models do.
@dataclass(frozen=True)
class Preset:
    model: dict  # Config fields
    training: Hyperparameters  # every field set, but min_lr (None: learning_rate / 10)

    def __post_init__(self):
        unset = [f.name for f in dataclasses.fields(self.training)
                 if getattr(self.training, f.name) is None and f.name != "min_lr"]
        if unset:
            raise ConfigError(f"a preset's training defaults must set every hyperparameter; {unset[0]} is unset")


def _training(**values) -> Hyperparameters:
    """Training defaults: these `values` over what every preset shares. The warm-up is cut to a tenth of
    --steps for short runs (hyperparameters.resolve)."""
    shared = dict(save_every=250, eval_every=200, eval_batches=16, grad_accum=1, weight_decay=0.1,
                  no_decay_norms=False, beta1=0.9, beta2=0.95, grad_clip=1.0, seed=0, mtp_weight=0.0,
                  document_masking=False, min_lr=None, dropout=0.0, optimizer="adamw", lead_in=0, ema=0.0,
                  activation_checkpointing=False)
    return Hyperparameters(**{**shared, **values})


_TINY_10M = dict(
    vocab_size=4096, num_hidden_layers=8, hidden_size=256, intermediate_size=768,
    num_attention_heads=4, num_key_value_heads=1, head_dim=64,
    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
    max_position_embeddings=16384,
)
_TINY_10M_TRAINING = _training(batch_size=16, seq_len=256, learning_rate=1e-3, warmup_steps=100, steps=5000)

PRESETS: dict[str, Preset] = {
    # 4,456,240 parameters. At hidden 128 the model gets its size from 128-dim heads and a wide MLP.
    "tiny_5m": Preset(
        model=dict(
            vocab_size=2048, num_hidden_layers=4, hidden_size=128, intermediate_size=1536,
            num_attention_heads=4, num_key_value_heads=1, head_dim=128,
            linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128,
            max_position_embeddings=8192,
        ),
        training=_training(batch_size=16, seq_len=256, learning_rate=2e-3, warmup_steps=100, steps=2000),
    ),
    # 9,425,888 parameters (the recommended preset; the SPEC's "tiny example" shapes).
    "tiny_10m": Preset(model=_TINY_10M, training=_TINY_10M_TRAINING),
    # 31,480,800 parameters, 9,460,704 active per token: tiny_10m's trunk with a sparse MoE in every
    # layer instead of the SwiGLU MLP, in Qwen3-Next's form (routed experts as wide as the shared one).
    # Each token uses the shared expert and 2 of the 16 routed experts, all 256 wide: 768 SwiGLU
    # channels, as in tiny_10m's MLP (its intermediate_size is unused unless a layer is made dense with
    # mlp_only_layers). The name counts the active parameters.
    "tiny_10m_moe": Preset(
        model=dict(
            **_TINY_10M,
            num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256,
            norm_topk_prob=True, router_aux_loss_coef=0.001,
        ),
        training=_TINY_10M_TRAINING,
    ),
    # 78,608,912 parameters: 52,853,264 in the layers plus a 25,755,648 (tied) embedding; the name
    # counts non-embedding parameters, as the 50k vocabulary alone is half a 50M budget.
    "small_50m": Preset(
        model=dict(
            vocab_size=50304, num_hidden_layers=12, hidden_size=512, intermediate_size=1536,
            num_attention_heads=8, num_key_value_heads=2, head_dim=128,
            linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128,
            max_position_embeddings=32768,
        ),
        training=_training(batch_size=16, seq_len=512, learning_rate=6e-4, warmup_steps=500, steps=20000),
    ),
}

RECOMMENDED_PRESET = "tiny_10m"
CUSTOM = "custom"  # the preset a run from --init-from weights records: none of ours


def preset(name: str, **overrides) -> Config:
    """Build a preset's Config; `overrides` replace individual fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return Config(**{**PRESETS[name].model, **overrides})


def training_defaults(name: str | None) -> Hyperparameters:
    """The training defaults of preset `name`; a model that is no preset (CUSTOM, or a checkpoint that
    records none) takes the recommended preset's."""
    if name in (None, CUSTOM):
        name = RECOMMENDED_PRESET
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].training


def nominal_size(name: str) -> float:
    """The size the preset's name promises, in parameters (tiny_10m -> 1e7). For an MoE preset
    (tiny_10m_moe -> 1e7) that is the active (per-token) count, not the total."""
    tag = name.split("_")[1]
    return float(tag.rstrip("m")) * 1e6


def fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
