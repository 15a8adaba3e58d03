"""`--mode generate`: decoding as small typed functions, in the style of gpt-fast.

    prefill(model, ids, mask, cache)      -> logits of each row's last prompt token   [B, V]
    decode_one_token(model, token, cache) -> logits of the next token                  [B, V]
    sample(logits, settings, generator)   -> next token                                  [B]
    generate_tokens(...)                  -> yields the new token of every row, step by step

The prompt is read once (chunked kernel), then one token at a time: DeltaNet layers carry a fixed-size
state, so their cost per token does not grow with the context. Prompts of different lengths are left
padded and masked. `StreamDecoder` turns tokens into text without ever printing half a character.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import Cache
from .model import Qwen3NextForCausalLM
from .util import UserError


@dataclass
class SamplingSettings:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off

    def validate(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature ({self.temperature}) must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k ({self.top_k}) must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p ({self.top_p}) must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty ({self.repetition_penalty}) must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


# ------------------------------------------------------------------------------------ model steps
@torch.inference_mode()
def prefill(model: Qwen3NextForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None, cache: Cache) -> torch.Tensor:
    """Run the (left-padded) prompts ids [B, T] through the model, filling `cache`. Returns [B, V]."""
    return model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]


@torch.inference_mode()
def decode_one_token(model: Qwen3NextForCausalLM, token: torch.Tensor, cache: Cache) -> torch.Tensor:
    """token [B] -> logits [B, V] for the position after it."""
    return model.decode_step(token, cache)


DecodeFn = Callable[[Qwen3NextForCausalLM, torch.Tensor, Cache], torch.Tensor]


def compiled_decoder(model: Qwen3NextForCausalLM) -> DecodeFn:
    """`decode_one_token` through torch.compile (inductor with its C++ wrapper, dynamic shapes): the
    ~700 small operations of a step fused into a few kernels, about 2x the tokens/s on a CPU, after a
    compile of about a minute on first use (worth it for long generations). The fused inference weights
    are built first and compiled in as they are: make a new decoder after changing the weights."""
    with torch.inference_mode():  # one eager step on a scratch cache builds every fused weight
        model.decode_step(torch.zeros(1, dtype=torch.long, device=model.device), model.new_cache(1, capacity=1))
    step = torch.compile(model.decode_step, dynamic=True, options={"cpp_wrapper": model.device.type == "cpu"})

    @torch.inference_mode()
    def decode(model: Qwen3NextForCausalLM, token: torch.Tensor, cache: Cache) -> torch.Tensor:
        return step(token, cache)

    return decode


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
    logits = logits.float() / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= settings.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    Each prompt must hold at least one token. `decode`: decode_one_token, or a `compiled_decoder`."""
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
    head = model.lm_head_weight
    while True:
        k = min(draft_len, max_new_tokens - len(out_tokens) - 1)
        drafts, h, t, after_first = [], h_last, token, None
        for i in range(k):
            h = model.mtp_step(h, t.view(1, 1), mtp_cache)
            t = F.linear(h[:, -1], head).argmax(-1)
            drafts.append(t)
            if i == 0:
                after_first = mtp_cache.snapshot()  # this pair used the main model's hidden state: keep it
        seq = torch.cat([token] + drafts).view(1, k + 1)
        cache.begin_verify()
        hidden = model.decode_hidden(seq, cache)  # all k+1 positions in one pass
        best = F.linear(hidden[0], head).argmax(-1)  # the main model's choice after each of the k+1 tokens
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


# ------------------------------------------------------------------------------------------ text
class StreamDecoder:
    """Incremental detokenisation: `push(token)` returns the text that is now complete. A character
    split across byte-level tokens is held back until its last byte arrives."""

    def __init__(self, tokenizer, window: int = 32):
        self.tokenizer, self.window = tokenizer, window
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # the last token ends inside a multi-byte character
        new = text[len(self.emitted):]
        self.emitted = text
        if len(self.ids) >= self.window:  # the text so far is whole: start a fresh window
            self.ids, self.emitted = [], ""
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)[len(self.emitted):]
        self.ids, self.emitted = [], ""
        return text


def unescape(s: str) -> str:
    """`--stop "\\n\\n"` arrives from the shell with literal backslashes."""
    return s.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


# ------------------------------------------------------------------------------------------- CLI
def _read_prompts(args) -> list[str] | None:
    """--prompt, --prompt-file (one prompt per line), or standard input when it is not a terminal."""
    if args.prompt is not None and args.prompt_file:
        raise UserError("give --prompt or --prompt-file, not both")
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file:
        try:
            raw = open(args.prompt_file, "rb").read()
        except OSError as e:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 (byte offset {e.start})") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompt-file {args.prompt_file} has no prompts")
        return prompts
    if args.interactive:
        return None
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        try:
            return [data.decode("utf-8").rstrip("\n")]
        except UnicodeDecodeError as e:
            raise UserError(f"standard input is not UTF-8 (byte offset {e.start})") from None
    return [""]


def encode_prompt(tokenizer, text: str, max_len: int, truncate: bool) -> list[int]:
    """Prompt text -> ids, starting from end-of-text when empty; too long is an error unless truncating."""
    ids = tokenizer.encode(text) if text else []
    if not ids:
        return [tokenizer.eot_id]
    if len(ids) > max_len:
        if not truncate:
            raise UserError(f"the prompt has {len(ids)} tokens, more than max_position_embeddings ({max_len}); "
                            "shorten it or pass --truncate-prompt")
        ids = ids[-max_len:]
    return ids


class TextRow:
    """The text of one generated row: incremental decoding, stop strings, and (optionally) streaming to
    stdout, holding back what could be the start of a stop string."""

    def __init__(self, tokenizer, stops: list[str], stream: bool):
        self.decoder, self.eot_id, self.stops, self.stream = StreamDecoder(tokenizer), tokenizer.eot_id, stops, stream
        self.hold = max((len(x) for x in stops), default=1) - 1
        self.text, self.printed, self.done, self.tokens = "", 0, False, 0

    def add(self, token: int) -> bool:
        """Take one generated token; True once the row is finished (end-of-text or a stop string)."""
        if self.done:
            return True
        self.tokens += 1
        if token == self.eot_id:
            self.done = True
        else:
            self.text += self.decoder.push(token)
            self._cut()
        self._print()
        return self.done

    def finish(self) -> str:
        if not self.done:
            self.text += self.decoder.flush()
            self._cut()
            self.done = True
        self._print()
        return self.text

    def _cut(self):
        cut = first_stop(self.text, self.stops) if self.stops else None
        if cut is not None:
            self.text, self.done = self.text[:cut], True

    def _print(self):
        end = len(self.text) - (0 if self.done else self.hold)
        if self.stream and end > self.printed:
            sys.stdout.write(self.text[self.printed:end])
            sys.stdout.flush()
            self.printed = end


def run_generate(args) -> int:
    from .checkpoint import load_for_inference

    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    settings.validate()
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 0")
    if args.num_samples <= 0:
        raise UserError(f"--num-samples ({args.num_samples}) must be positive")
    if args.speculative:
        if not settings.greedy:
            raise UserError("--speculative mtp decodes greedily: pass --temperature 0")
        if args.num_samples != 1:
            raise UserError("--speculative mtp decodes greedily, so --num-samples must be 1")
        if args.compile:
            raise UserError("--compile compiles the plain decoding step; it does not apply to --speculative mtp")
        if args.draft_len <= 0:
            raise UserError(f"--draft-len ({args.draft_len}) must be positive")
    if args.chat or args.system is not None:  # issue 14 (chat): a multi-turn chat
        from .chat import run_chat_command

        if not args.chat:
            raise UserError("--system is the system message of a chat: add --chat")
        return run_chat_command(args, settings)
    prompts = _read_prompts(args)
    if not args.resume_from:
        raise UserError("pass the model to talk to: --resume-from CHECKPOINT_DIR (e.g. runs/tiny_10m/latest)")
    model, tokenizer, info = load_for_inference(args.resume_from, args.device, args.kernel,
                                                args.disable_fast_kernels)
    if args.speculative and not hasattr(model, "mtp"):
        raise UserError(f"{args.resume_from} has no MTP block; train with --mtp-weight to use --speculative mtp")
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    decode = decode_one_token
    if args.compile:
        print("compiling the decoding step (about a minute, once)...", file=sys.stderr, flush=True)
        decode = compiled_decoder(model)
    stops = [unescape(x) for x in (args.stop or [])]

    def budget(rows: list[list[int]]) -> int:
        room = model.config.max_position_embeddings - max(len(r) for r in rows)
        max_new = min(args.max_new_tokens, max(room, 0))
        if max_new < args.max_new_tokens:
            print(f"note: generating {max_new} tokens to stay within max_position_embeddings", file=sys.stderr)
        return max_new

    def answer(texts: list[str], echo: bool) -> None:
        ids = [encode_prompt(tokenizer, t, model.config.max_position_embeddings, args.truncate_prompt)
               for t in texts for _ in range(args.num_samples)]
        stream = len(ids) == 1 or bool(args.speculative)
        t0 = time.perf_counter()
        if args.speculative:
            rows, extra = [], []
            for text, prompt in zip(texts, ids):
                if echo or len(texts) > 1:
                    sys.stdout.write(text)
                row = TextRow(tokenizer, stops, stream=True)
                _, st = speculative_generate(model, prompt, budget([prompt]), args.draft_len, None, on_token=row.add)
                row.finish()
                sys.stdout.write("\n")
                rows.append(row)
                extra.append(st)
            drafted, accepted = sum(x.drafted for x in extra), sum(x.accepted for x in extra)
            rounds = sum(x.rounds for x in extra)
            note = (f"; MTP acceptance {accepted / max(drafted, 1):.2f} ({accepted}/{drafted} drafts), "
                    f"{sum(r.tokens for r in rows) / max(rounds, 1):.2f} tokens per verification")
        else:
            if echo and stream:
                sys.stdout.write(texts[0])
            rows = [TextRow(tokenizer, stops, stream) for _ in ids]
            for token in generate_tokens(model, ids, budget(ids), settings, tokenizer.pad_id, generator, decode):
                finished = [row.add(t) for row, t in zip(rows, token.tolist())]
                if all(finished):
                    break
            for row in rows:
                row.finish()
            if stream:
                sys.stdout.write("\n")
            else:
                for i, row in enumerate(rows):
                    p, k = divmod(i, args.num_samples)
                    label = f"prompt {p + 1}" + (f", sample {k + 1}" if args.num_samples > 1 else "")
                    sys.stdout.write(f"--- {label} ---\n{texts[p]}{row.text}\n")
            note = ""
        sys.stdout.flush()
        seconds = time.perf_counter() - t0
        n = sum(r.tokens for r in rows)
        print(f"[{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s{note}]", file=sys.stderr)

    if prompts is not None:
        answer(prompts, echo=True)
        return 0
    print(f"interactive: {info['source']} ({info['parameters']:,} parameters, {info['device']}). "
          "Type a prompt and press Enter; Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip():
            answer([line], echo=False)
