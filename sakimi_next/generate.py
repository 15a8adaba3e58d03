"""`--mode generate`: decoding as small typed functions, in the style of gpt-fast.

    prefill(model, ids, mask, cache)      -> logits of each row's last prompt token   [B, V]
    decode_one_token(model, token, cache) -> logits of the next token                  [B, V]
    sample(logits, settings, generator)   -> next token                                  [B]
    generate_tokens(...)                  -> yields the new token of every row, step by step

The prompt is read once (up to STEP_PREFILL_MAX tokens through the decoding path, else the forward),
then one token at a time: DeltaNet layers carry a fixed-size state, so their cost per token does not
grow with the context. Prompts of different lengths are left padded and masked. `StreamDecoder` turns
tokens into text without ever printing half a character. `decode_one_token` is the eager reference step;
`decoder.CompiledDecoder` runs the same step compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .cache import Cache
from .model import Qwen3NextForCausalLM
from .settings import SamplingSettings
from .util import UserError


# ------------------------------------------------------------------------------------ model steps
# Unpadded prompts up to this many tokens are read through the decoding path (`decode_hidden`: fused
# products, the chunked kernel from 8 tokens on, the recurrence token by token below): its fixed cost is
# lower than the forward's. tiny_10m, 2 threads, AVX512 EPYC, both in one process: 4 tokens in 8.5 ms
# against the forward's 12.9, 32 in 15.6 against 20.8, 96 in 33.4 against 40.2, 256 in 63.3 against 60.7.
STEP_PREFILL_MAX = 128


@torch.inference_mode()
def prefill(model: Qwen3NextForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None, cache: Cache) -> torch.Tensor:
    """Run the (left-padded) prompts ids [B, T] through the model, filling `cache`. Returns [B, V]."""
    if mask is None and ids.shape[1] <= STEP_PREFILL_MAX:
        return model.step_logits(model.decode_hidden(ids, cache)[:, -1])
    return model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]


@torch.inference_mode()
def decode_one_token(model: Qwen3NextForCausalLM, token: torch.Tensor, cache: Cache) -> torch.Tensor:
    """token [B] -> logits [B, V] for the position after it."""
    return model.decode_step(token, cache)


DecodeFn = Callable[[Qwen3NextForCausalLM, torch.Tensor, Cache], torch.Tensor]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style, as transformers does: divide positive logits of seen tokens by the penalty and
    multiply negative ones. seen [B, V] bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] (float) -> next tokens [B]: temperature, then top-k, then top-p (nucleus)."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, settings), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The distribution `sample` draws from (not greedy): logits [B, V] -> probabilities [B, V]. Each
    row on its own, so a server can compute many rows at once and draw each with its own generator."""
    logits = logits.float() / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= settings.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists -> ids [B, T] and mask [B, T] (None when all prompts have the same length)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def generate_tokens(
    model: Qwen3NextForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    settings: SamplingSettings,
    pad_id: int,
    generator: torch.Generator | None = None,
    decode: DecodeFn = decode_one_token,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B], `max_new_tokens` times (or until the caller stops).
    Each prompt must hold at least one token. `decode`: decode_one_token, or a `decoder.CompiledDecoder`."""
    device = model.device
    ids, mask = left_pad(prompts, pad_id, device)
    B = ids.shape[0]
    cache = model.new_cache(B, capacity=ids.shape[1] + max_new_tokens)
    seen = None
    if settings.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool))
    logits = prefill(model, ids, mask, cache)
    for i in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
        token = sample(logits, settings, generator)
        yield token
        if i + 1 == max_new_tokens:
            break
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        logits = decode(model, token, cache)


def generate(
    model: Qwen3NextForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    seed: int | None = None,
    decode: DecodeFn = decode_one_token,
) -> list[list[int]]:
    """The new tokens of each prompt (the end-of-text token included when it stops a row)."""
    settings = settings or SamplingSettings(temperature=0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for token in generate_tokens(model, prompts, max_new_tokens, settings, pad_id, generator, decode):
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t == eos_id
        if all(done):
            break
    return out


# --------------------------------------------------------------------------- speculative decoding
@dataclass
class SpeculativeStats:
    rounds: int = 0  # main-model verification passes
    drafted: int = 0  # tokens proposed by the MTP block
    accepted: int = 0  # of which the main model agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_generate(
    model: Qwen3NextForCausalLM,
    prompt: list[int],
    max_new_tokens: int,
    draft_len: int = 3,
    eos_id: int | None = None,
    cache: Cache | None = None,
    on_token: Callable[[int], bool] | None = None,
) -> tuple[list[int], SpeculativeStats]:
    """Greedy decoding where the MTP block drafts `draft_len` tokens and the main model checks them in
    one forward pass; the longest agreeing prefix is kept, plus the main model's own next token. The
    output is plain greedy decoding's. A rejected draft leaves DeltaNet states that cannot be cropped
    like a KV cache: verification records each position's state, and the cache keeps the accepted ones.
    Batch 1. `cache` (optional, empty) lets a caller inspect the state afterwards."""
    if not hasattr(model, "mtp"):
        raise UserError("this model has no MTP block; train one with --mtp-weight to use --speculative mtp")
    device = model.device
    cap = len(prompt) + max_new_tokens + draft_len + 2
    cache = cache if cache is not None else model.new_cache(1, cap)
    mtp_cache = model.new_mtp_cache(1, cap)
    mtp_cache.next_position.fill_(1)  # the MTP pair (h_t, x_t+1) sits at the position of x_t+1
    stats = SpeculativeStats()
    out_tokens: list[int] = []

    def emit(token: int) -> bool:
        """Record a token; True when generation is over (eos, the budget, or the callback says so)."""
        out_tokens.append(token)
        stop = bool(on_token(token)) if on_token is not None else False
        return stop or token == eos_id or len(out_tokens) >= max_new_tokens

    if max_new_tokens <= 0:
        return out_tokens, stats
    ids = torch.tensor([prompt], device=device)
    out = model(ids, cache=cache, return_hidden=True)
    if len(prompt) > 1:
        model.mtp_forward(out.hidden_states[:, :-1], ids[:, 1:], cache=mtp_cache)
    h_last, token = out.hidden_states[:, -1:], out.logits[0, -1].argmax().view(1)
    if emit(int(token)):
        return out_tokens, stats
    while True:
        k = min(draft_len, max_new_tokens - len(out_tokens) - 1)
        drafts, h, t, after_first = [], h_last, token, None
        for i in range(k):
            h = model.mtp_step(h, t.view(1, 1), mtp_cache)
            t = model.step_logits(h[:, -1]).argmax(-1)
            drafts.append(t)
            if i == 0:
                after_first = mtp_cache.snapshot()  # this pair used the main model's hidden state: keep it
        seq = torch.cat([token] + drafts).view(1, k + 1)
        cache.begin_verify()
        hidden = model.decode_hidden(seq, cache)  # all k+1 positions in one pass
        best = model.step_logits(hidden[0]).argmax(-1)  # the main model's choice after each of the k+1 tokens
        a = 0
        while a < k and int(drafts[a]) == int(best[a]):
            a += 1
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += a
        cache.keep(a + 1)  # back to the state after the accepted tokens (per-position states, no re-run)
        if k:
            mtp_cache.restore(after_first)
            if a:
                model.mtp_step(hidden[:, :a], seq[:, 1:a + 1], mtp_cache)
        for t in [int(d) for d in drafts[:a]] + [int(best[a])]:
            if emit(t):
                return out_tokens, stats
        h_last, token = hidden[:, a:a + 1], best[a].view(1)
