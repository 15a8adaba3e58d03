"""`--config auto` (the default of prepare_data and of a fresh training run): sizes the run from the
corpus and the time budget, by a rule measured on this project's runs (docs/training.md, "Sized from the
text"; docs/log.md, "How `--config auto` was chosen").

    validation   prepare_data holds out 2% of a text, but at least 20 KB and at most 10% (10% up to 200 KB,
                 2% from 1 MB): every byte held out is one the model does not learn from, and 20 KB still
                 shows the curve and picks the best checkpoint. Tiny Shakespeare at 2% instead of 5% (3%
                 more training text): held out 2.055 -> 2.043, 2.044, 2.044, 2.048 (four runs); 5% instead
                 of 10%: 2.085 -> 2.065
    vocabulary   from the size of the training text: about one token type per 1,000 bytes of text,
                 as a power of two in [512, 8192] (1 MB -> 1,024), plus the merges that give each frequent
                 character a token of its own (the tokenizer learns those first, tokenizer.py;
                 WHOLE_CHARACTERS, --no-whole-characters to leave them out), rounded to a multiple of
                 256, at most 16,384 (红楼梦's 2.25 MB: 2,048 + 3,081 -> 5,120; cmn_eng: 1,024 +
                 1,916 -> 2,816). Held out, 20 minutes each on the same day: 红楼梦 1.942 -> 1.909
                 bits/byte (644 and 612 steps), cmn_eng 1.941 -> 1.874 (639 and 630). English needs few
                 or none of those merges (curly quotes: 2 to 4), which the rounding absorbs: Tiny
                 Shakespeare, the King James Bible and WikiText-2 get the same vocabulary and the very
                 same tokenizer
    model        tiny_10m's trunk (8 layers, hidden 256), its vocabulary the tokenizer's, where the budget
                 lets it read the text 5.5 times at the prior speed (or no budget is given); else 4 of
                 its layers (three Gated DeltaNet, one attention), which take ~1.9x the steps. 20 minutes,
                 the same day, 8 -> 4 layers held out: 红楼梦 1.909 -> 1.869, cmn_eng 1.874 -> 1.845,
                 Tiny Shakespeare 2.077 -> 2.061 (a 1 MB text: 8 layers read it 3.5 times here), the
                 King James Bible 1.665 -> 1.604. The 4 layers are 320 wide (MLP 960), not 256: ~1.15x
                 the time a step, and 20 minutes, held out, 256 -> 320: 红楼梦 1.837 -> 1.828, Tiny
                 Shakespeare 2.037 -> 2.028, cmn_eng 1.785 -> 1.767, the King James Bible 1.587 ->
                 1.581, 三国演义 2.087 -> 2.093 (the one loss, within what two runs of one setting differ)
    batch        2,048 tokens a step: 4 windows of 512 tokens, each after a 512-token lead-in (read
                 without gradient), where the text can spare them; 8 x 256 and no lead-in for a text under
                 ~10,000 tokens. The model is used on long texts read in one pass (eval's carried state,
                 generation): trained on windows that continue a longer text, with attention over up to
                 1,536 keys (a 1,024-token lead-in), Tiny Shakespeare read in one pass lost 0.013 bits/byte
                 to attention over more keys than it saw, against 0.024 with 8 x 256 after a 512-token
                 lead-in. A 512-token lead-in instead of 1,024 takes ~0.8x the time a step: 20 minutes,
                 4 layers, held out: 红楼梦 1.869 -> 1.846, Tiny Shakespeare 2.061 -> 2.041, Chinese-English
                 pairs 1.845 -> 1.801
    learning     2e-3 peak, cosine to 2e-4
    dropout      from the passes over the text the budget allows: 0 for one pass or less, 0.1 up to
                 four, 0.2 beyond (the 9.4M-parameter model memorises a 1 MB text after ~3 passes); the
                 half trunk 0.1 beyond one pass. 20 minutes, 4 layers, held out, 0.2 -> 0.1: 红楼梦 1.846 ->
                 1.837 (5.4 passes), Tiny Shakespeare 2.041 -> 2.037 (8.4; 0.3: 2.072), Chinese-English
                 pairs 1.801 -> 1.785 (7.7)
    weight decay 0.1 for one pass or less, 2.0 beyond: a text seen several times wants far more
                 than the usual 0.1 (on Tiny Shakespeare held out, AdamW: 0.5, 1 and 2 all beat 0.1;
                 Muon: 2 beat 1 and 4)
    optimizer    muon (Muon for the decoder layers' matrices, AdamW for the rest; adamw with torch < 2.9
                 or --fsdp): with weight decay 2, Tiny Shakespeare held out 2.118 -> 2.087 and 2.101
                 bits/byte (two runs), for ~3% more time a step
    averaging    --ema 0.1: the model handed out is the power-function average of the run's weights
                 (average.py), a step weighing half as much as one a tenth of the run later: Tiny
                 Shakespeare held out 2.066 (best single checkpoint) -> 2.055, and 0.1 scored best of
                 0.05-0.15 on the validation split (a 3e-3 run's saved weights, averaged afterwards)

    length       a time budget (--max-minutes without --steps) stops at 5.5 passes over the text: more
                 passes, a wider model or more dropout all scored worse on held-out text; 10 passes for
                 4 layers (Tiny Shakespeare: 2.086 stopped at 5.5, 2.061 at 6.8 when the 20 minutes ended)

The budget enters through the number of passes: the steps a budgeted run plans from the speed it measures
on this machine (budget.py) x the tokens of a step / training tokens (`measured_choices`). Before that
measurement (the model is built with a dropout), and for a run whose steps are given, the passes come from
the speed this rule assumes for the device (TOKENS_PER_S, a prior). Everything it picks can still be set on
the command line.
"""

from __future__ import annotations

from typing import Mapping

from .config import Config, preset
from .settings import AUTO_PRESET
from .tokenizer import character_tokens, frequent_characters

NAME = AUTO_PRESET
TRUNK, TRUNK_LAYERS = "tiny_10m", 8
BYTES_PER_VOCAB_ENTRY = 1000
VOCAB_RANGE = (512, 8192)
# The tokenizer of --config auto: whole characters first (tokenizer.py), or byte-level BPE alone
WHOLE_CHARACTERS = True
VOCAB_ROUNDING, MAX_VOCAB_WITH_CHARACTERS = 256, 16384
# the prior before measuring (a budgeted run then uses its own measured plan, `measured_choices`): trained
# tokens/s of the tiny_10m trunk at 2,048 a step (README "Measured": 1,480 on the 2-core CPU at 8 x 256
# without a lead-in, ~1,700 at 4 x 512 after a 1,024-token lead-in, more after 512; a GPU is far faster)
TOKENS_PER_S = {"cpu": 1500, "mps": 5000, "cuda": 100_000}
DEFAULTS = dict(learning_rate=2e-3, warmup_steps=100, steps=5000, ema=0.1)
# (batch, window, lead-in): windows that continue a longer text (LONG_CONTEXT) where the text has tokens to
# spare (10 x a window with its lead-in), cold 8 x 256 windows otherwise. Both are 2,048 tokens a step.
# A model trained on cold 256-token windows does worse on a long text read in one pass (eval's carried
# state) than on short windows: its attention never saw more than 256 keys (docs/log.md)
LONG_CONTEXT = dict(batch_size=4, seq_len=512, lead_in=512)
SHORT_CONTEXT = dict(batch_size=8, seq_len=256, lead_in=0)
TOKENS_PER_STEP = 2048
DROPOUT_BY_PASSES = ((1.0, 0.0), (4.0, 0.1), (float("inf"), 0.2))  # (passes up to, dropout)
# The half trunk (SHALLOW_LAYERS, below) learns more a step with less: measured at 5.4, 7.7 and 8.4 passes, and
# it stops at SHALLOW_MAX_PASSES (docs/benchmarks.md, "Dropout on the half trunk")
SHALLOW_DROPOUT_BY_PASSES = ((1.0, 0.0), (float("inf"), 0.1))
# AdamW's decoupled weight decay (each step shrinks the matrices by learning rate x decay): with several
# passes, far stronger than the usual 0.1 (docs/log.md)
WD_ONE_PASS, WD_MANY = 0.1, 2.0
# A budget that allows more passes over the text ends early: on Tiny Shakespeare 5.5 passes gave a
# better held-out loss than 9 or 10 (with dropout 0.2 or 0.3) or a wider model (docs/log.md)
MAX_PASSES = 5.5
# A budget too short for the whole trunk to read the text the MAX_PASSES times it stops at (at the prior
# speed) trains half of its layers (three Gated DeltaNet, one attention): they train SHALLOW_SPEEDUP x
# the tokens a second, read the text about twice as often, and stop at SHALLOW_MAX_PASSES. 20 minutes,
# held out: 红楼梦 1.909 -> 1.869, Chinese-English pairs 1.874 -> 1.845, Tiny Shakespeare 2.077 -> 2.061
# (2.086 when the half trunk also stopped at 5.5 passes; docs/benchmarks.md, "Half the trunk")
SHALLOW_LAYERS, SHALLOW_SPEEDUP, SHALLOW_MAX_PASSES = 4, 1.65, 10.0
# ... and wider than the whole trunk's 256 (its MLP 3x, as tiny_10m's): 4 layers 320 wide take ~1.15x the
# time a step of 256 wide (1.9 -> 1.65 x the whole trunk's tokens a second) and learned more from each on
# four texts of five, 0.007 bits/byte on average (docs/benchmarks.md, "The half trunk 320 wide")
SHALLOW_HIDDEN = 320


VAL_SHARE, VAL_MIN_BYTES, VAL_MAX_SHARE = 0.02, 20_000, 0.1


def val_fraction(train_bytes: int) -> float:
    """The share of `train_bytes` of text held out for validation: VAL_SHARE, but at least VAL_MIN_BYTES
    and at most VAL_MAX_SHARE."""
    return min(VAL_MAX_SHARE, max(VAL_SHARE, VAL_MIN_BYTES / max(1, train_bytes)))


def max_steps(train_tokens: int, tokens_per_step: int, depth: int = TRUNK_LAYERS) -> int:
    """The steps of a time-budgeted run stop at MAX_PASSES over the training tokens (a trunk of fewer
    layers than TRUNK_LAYERS: SHALLOW_MAX_PASSES)."""
    cap = MAX_PASSES if depth >= TRUNK_LAYERS else SHALLOW_MAX_PASSES
    return max(1, int(cap * train_tokens / tokens_per_step))


def vocab_size(train_bytes: int, characters: Mapping[str, int] | None = None) -> int:
    """The vocabulary for `train_bytes` of training text: the power of two nearest to
    train_bytes / BYTES_PER_VOCAB_ENTRY, within VOCAB_RANGE. With the text's `characters` (how often each
    occurs; for a tokenizer over whole characters): plus the merges that give its frequent characters a
    token each, rounded to a multiple of VOCAB_ROUNDING, at most MAX_VOCAB_WITH_CHARACTERS."""
    lo, hi = VOCAB_RANGE
    target = max(1, train_bytes) / BYTES_PER_VOCAB_ENTRY
    v = lo
    while v < hi and v * 1.5 < target:  # the geometric midpoint between v and 2v is ~1.41 v
        v *= 2
    if characters:
        merges = len(character_tokens(frequent_characters(characters)))
        v = min(MAX_VOCAB_WITH_CHARACTERS, (v + merges + VOCAB_ROUNDING // 2) // VOCAB_ROUNDING * VOCAB_ROUNDING)
    return v


def model_config(vocab: int, layers: int = TRUNK_LAYERS) -> Config:
    """The trunk with `vocab` entries: all its layers, or SHALLOW_LAYERS of them SHALLOW_HIDDEN wide."""
    if layers >= TRUNK_LAYERS:
        return preset(TRUNK, vocab_size=vocab, num_hidden_layers=layers)
    return preset(TRUNK, vocab_size=vocab, num_hidden_layers=layers, hidden_size=SHALLOW_HIDDEN,
                  intermediate_size=3 * SHALLOW_HIDDEN)


def layers(train_tokens: int, minutes: float | None, device_type: str) -> int:
    """The trunk's depth: all TRUNK_LAYERS where the budget lets them read the text MAX_PASSES times
    (or without a budget: the steps are the user's), else SHALLOW_LAYERS."""
    deep_enough = not minutes or passes(train_tokens, minutes, device_type, TRUNK_LAYERS) >= MAX_PASSES
    return TRUNK_LAYERS if deep_enough else SHALLOW_LAYERS


def passes(train_tokens: int, minutes: float | None, device_type: str, depth: int | None = None) -> float:
    """The passes over the training tokens that `minutes` allow a trunk of `depth` layers (None: the one
    `layers` picks) at the prior speed TOKENS_PER_S (no budget: the default step count's)."""
    if not minutes:
        return DEFAULTS["steps"] * TOKENS_PER_STEP / max(1, train_tokens)
    depth = depth or layers(train_tokens, minutes, device_type)
    speed = TOKENS_PER_S.get(device_type, TOKENS_PER_S["cpu"]) * (SHALLOW_SPEEDUP if depth < TRUNK_LAYERS else 1)
    return minutes * 60 * speed / max(1, train_tokens)


def dropout(train_tokens: int, minutes: float | None, device_type: str) -> float:
    return dropout_for(passes(train_tokens, minutes, device_type), layers(train_tokens, minutes, device_type))


def weight_decay(train_tokens: int, minutes: float | None, device_type: str) -> float:
    return weight_decay_for(passes(train_tokens, minutes, device_type))


def dropout_for(n_passes: float, depth: int = TRUNK_LAYERS) -> float:
    bands = DROPOUT_BY_PASSES if depth >= TRUNK_LAYERS else SHALLOW_DROPOUT_BY_PASSES
    return next(p for limit, p in bands if n_passes <= limit)


def weight_decay_for(n_passes: float) -> float:
    return WD_ONE_PASS if n_passes <= 1 else WD_MANY


def measured_choices(train_tokens: int, planned_tokens: int, depth: int = TRUNK_LAYERS) -> dict:
    """Dropout and weight decay for the passes a measured budget plan makes (`planned_tokens`: its steps x
    the tokens of a step) with a trunk of `depth` layers, the machine's own speed in place of the prior
    TOKENS_PER_S."""
    n = planned_tokens / max(1, train_tokens)
    return {"dropout": dropout_for(n, depth), "weight_decay": weight_decay_for(n)}


def optimizer(fsdp: bool = False) -> str:
    """Muon where torch has it, except under FSDP (sharded matrices)."""
    import torch

    return "muon" if hasattr(torch.optim, "Muon") and not fsdp else "adamw"


def describe(h, config: Config) -> str:
    """The line a fresh --config auto run prints: what the rule chose (`h`: ResolvedHyperparameters)."""
    depth = config.num_hidden_layers
    trunk = f"{TRUNK}'s trunk" + (f" at {depth} of its {TRUNK_LAYERS} layers, {config.hidden_size} wide,"
                                  if depth != TRUNK_LAYERS else "")
    return (f"--config auto: {trunk} with vocab {config.vocab_size:,}; batch {h.batch_size} x {h.seq_len}, lr "
            f"{h.learning_rate:g}, dropout {h.dropout:g}, weight decay {h.weight_decay:g}, optimizer {h.optimizer}, "
            f"lead-in {h.lead_in}, ema {h.ema:g} (docs/training.md)")


def context(train_tokens: int) -> dict:
    """LONG_CONTEXT's batch, window and lead-in where the text is long enough that windows with that much
    text before them are most of it, else SHORT_CONTEXT's."""
    long = LONG_CONTEXT
    return long if train_tokens >= 10 * (long["lead_in"] + long["seq_len"] + 1) else SHORT_CONTEXT


def training_defaults(train_tokens: int, minutes: float | None, device_type: str, fsdp: bool = False) -> dict:
    return {**DEFAULTS, "dropout": dropout(train_tokens, minutes, device_type),
            "weight_decay": weight_decay(train_tokens, minutes, device_type), "optimizer": optimizer(fsdp),
            **context(train_tokens)}
