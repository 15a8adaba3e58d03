"""The typed settings the library takes: training (`Hyperparameters`, `TrainSettings`), export
(`ExportSettings`) and sampling (`SamplingSettings`); and the names the command line and the library
share (kernels, optimizers, ...), defined here once. No torch here, so the commands check a command line
before anything heavy loads."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .util import UserError

# ------------------------------------------------------------------------- names the command line shares
KERNELS = ("auto", "chunk", "recurrent", "fla")  # gated delta rule kernels (kernels.resolve_kernel)
AUTO_PRESET = "auto"  # --config auto: the model sized from the text, the run from the budget (auto.py)
DEFAULT_DATA_DIR = "data"  # where prepare_data writes and train reads, unless --out-dir / --data-dir say
DOC_SPLITS = ("auto", "file", "blank-line", "line")  # what a document is (data.sources.iter_documents)
ENCODING_ERRORS = ("strict", "replace")  # what to do with bytes that are not UTF-8
DEFAULT_TEXT_FIELD = "text"  # the field of a JSONL record / the column of a Parquet file holding its text
GGUF_TYPES = ("f32", "f16", "q8_0")  # the weight types of a GGUF export's matrices
# --hf-layout: how a transformers export lays the model out (config.Config.to_hf_dict, huggingface.py):
# qwen3_5 = Qwen3_5ForCausalLM (dense only), qwen3_next = Qwen3NextForCausalLM (dense or MoE)
HF_LAYOUTS = ("qwen3_5", "qwen3_next")
INFERENCE_DTYPES = ("fp32", "bf16")  # --dtype of generate, eval, serve, bench (quantize.resolve_dtype)
QUANTIZE = ("none", "int8")  # --quantize: the matrices' format for inference (quantize.quantize_int8)


@dataclass(frozen=True)
class Optimizer:
    """An optimizer --optimizer can name: one entry of OPTIMIZERS, and its builder in optim.py."""

    builder: str  # the function of optim.py that builds it: (model, parameter groups, lr, weight decay, betas)
    help: str
    fsdp_problem: str | None = None  # why it cannot work on FSDP2's sharded parameters (None: it can)


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer("adamw", "AdamW"),
    "muon": Optimizer("muon_with_adamw", "Muon (orthogonalised momentum) for the decoder layers' matrices and "
                      "AdamW for the rest, with the same --learning-rate and --weight-decay",
                      fsdp_problem="Muon needs each matrix whole"),
}


# ----------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Hyperparameters:
    """The training settings a resumed run takes from its checkpoint when the command line does not give
    them again, and for which each preset has defaults (config.PRESETS). None: not given;
    `hyperparameters.resolve` fills everything in (`Resolved`)."""

    steps: int | None = None
    learning_rate: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    grad_accum: int | None = None
    weight_decay: float | None = None
    no_decay_norms: bool | None = None
    beta1: float | None = None
    beta2: float | None = None
    grad_clip: float | None = None
    save_every: int | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    seed: int | None = None
    mtp_weight: float | None = None
    document_masking: bool | None = None
    dropout: float | None = None  # a training setting only: never saved with the model
    optimizer: str | None = None  # a name in OPTIMIZERS
    lead_in: int | None = None  # tokens read (no gradient) before each training window: its context
    ema: float | None = None  # share of the run over which the averaged weights halve a step (0 = off)
    activation_checkpointing: bool | None = None  # recompute each decoder layer in the backward (same maths)


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs, already checked by the caller (the `train` command)."""

    data_dir: Path
    hyper: Hyperparameters = Hyperparameters()
    preset: str | None = None  # None: the checkpoint's, else the recommended preset
    out_dir: Path | None = None  # None: the resumed checkpoint's run directory, else runs/PRESET
    resume_from: str | None = None  # "auto" (the latest in out_dir), a checkpoint directory, or None
    init_from: str | None = None  # start from these weights (a checkpoint or a Hugging Face directory)
    allow_vocab_mismatch: bool = False
    device: str = "auto"
    kernel: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast where the hardware has bf16 (distributed.native_bf16), else fp32
    compile: bool | None = None  # None = auto: for a long enough time budget (distributed.use_compile)
    fsdp: bool = False
    keep_last: int = 3
    print_every: int = 10
    early_stop_patience: int = 0  # 0 = never
    early_stop_min_delta: float = 0.0
    skip_nonfinite: bool = False
    max_minutes: float | None = None
    tensorboard: bool = False  # also write metrics.jsonl's records as TensorBoard scalars (rank 0)
    tensorboard_dir: Path | None = None  # where; None: OUT_DIR/tensorboard

    def record(self, hyper) -> dict:
        """The settings as trainer_state.json keeps them ("args"), with the resolved hyperparameters."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hyper"}
        out = {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}
        return {**out, **asdict(hyper)}


@dataclass(frozen=True)
class ModelCardSettings:
    """What a transformers export's model card (README.md) says beyond what the checkpoint knows."""

    license: str = "other"  # a Hugging Face license id; "other" = not chosen (the weights follow their data)
    languages: tuple[str, ...] = ()  # ISO 639 codes; () = detected from the text (export/card.py)
    dataset_name: str | None = None  # how to name the training data; None = its source files (meta.json)
    base_model: str | None = None  # the Hugging Face id of the model fine-tuned from, if any


@dataclass(frozen=True)
class ExportSettings:
    """What `--mode export` writes (export.FORMATS): from `checkpoint` (a checkpoint or run directory, or for
    gguf also a Hugging Face directory) into `out_dir` (hf) or `out_file` (gguf)."""

    checkpoint: str
    out_dir: Path | None
    format: str = "hf"
    gguf_type: str = "f16"
    out_file: Path | None = None  # gguf only
    hf_layout: str | None = None  # hf only: one of HF_LAYOUTS; None = qwen3_5 when dense, qwen3_next with experts
    card: ModelCardSettings = ModelCardSettings()  # hf only


@dataclass
class SamplingSettings:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off

    def validate(self) -> "SamplingSettings":
        """Raise UserError (naming the command-line flag) unless every value is usable."""
        for flag, x in (("--temperature", self.temperature), ("--top-p", self.top_p),
                        ("--repetition-penalty", self.repetition_penalty)):
            if not math.isfinite(x):
                raise UserError(f"{flag} ({x}) must be a finite number")
        if self.temperature < 0:
            raise UserError(f"--temperature ({self.temperature}) must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k ({self.top_k}) must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p ({self.top_p}) must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty ({self.repetition_penalty}) must be positive")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
