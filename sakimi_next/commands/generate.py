"""`--mode generate`: prompts in, text out (streamed when there is one row), or an interactive loop."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from ..settings import SamplingSettings
from ..text import TextRow, encode_prompt
from ..util import UserError
from . import common

HELP = "generate text from a checkpoint or a Hugging Face directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_checkpoint(p, "the model: a checkpoint directory (or its run directory) or a Hugging Face directory")
    common.add_device(p)
    common.add_seed(p, "sampling seed")
    common.add_attention_window(p)
    common.add_compile(p, "by default when it is on disk already, or for runs of 10,000 tokens or more")
    common.add_precision(p)
    g = p.add_argument_group("prompts and sampling")
    g.add_argument("--prompt", default=None, help="prompt text (default: standard input, or empty)")
    g.add_argument("--prompt-file", default=None, help="one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt at most")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1]")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 makes seen tokens less likely; 1 = off")
    g.add_argument("--num-samples", type=int, default=1, help="answers per prompt")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable; \\n, \\t, \\r understood)")
    g.add_argument("--interactive", action="store_true", help="a prompt loop until EOF / Ctrl-D")
    g.add_argument("--truncate-prompt", action="store_true", help="keep the end of a prompt that is too long")
    g.add_argument("--speculative", choices=("mtp",), default=None,
                   help="speculative decoding: the MTP block drafts, the model verifies (greedy)")
    g.add_argument("--draft-len", type=int, default=3, help="tokens drafted per step with --speculative")
    c = p.add_argument_group("chat")
    c.add_argument("--chat", action="store_true",
                   help="a multi-turn chat (ChatML) read from standard input: /reset starts over, Ctrl-D quits")
    c.add_argument("--system", default=None, help="--chat: the system message")


@dataclass(frozen=True)
class GenerateSettings:
    checkpoint: str
    device: str
    kernel: str
    seed: int
    compile: str  # auto | yes | no (decoder.choose_decoder)
    sampling: SamplingSettings
    prompts: tuple[str, ...] | None  # None: standard input (read when running), or --interactive
    interactive: bool
    max_new_tokens: int
    num_samples: int
    stops: tuple[str, ...]
    truncate_prompt: bool
    speculative: str | None
    draft_len: int
    chat: bool = False
    system: str | None = None
    dtype: str = "fp32"
    quantize: str = "none"
    attention_window: int | None = None  # None: the checkpoint's; 0: all


def unescape(s: str) -> str:
    """`--stop "\\n\\n"` arrives from the shell with literal backslashes."""
    return s.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")


def _prompt_file(path: str) -> tuple[str, ...]:
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise UserError(f"cannot read --prompt-file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {path} is not UTF-8 (byte offset {e.start})") from None
    prompts = tuple(line for line in text.splitlines() if line.strip())
    if not prompts:
        raise UserError(f"--prompt-file {path} has no prompts")
    return prompts


def settings(args: argparse.Namespace) -> GenerateSettings:
    sampling = SamplingSettings(args.temperature, args.top_k, args.top_p, args.repetition_penalty).validate()
    common.count("--max-new-tokens", args.max_new_tokens)
    common.count("--num-samples", args.num_samples)
    common.count("--draft-len", args.draft_len)
    stops = common.nonempty_strings("--stop", [unescape(x) for x in args.stop or ()])
    if args.speculative:
        if not sampling.greedy:
            raise UserError("--speculative mtp decodes greedily: pass --temperature 0")
        if args.num_samples != 1:
            raise UserError("--speculative mtp decodes greedily, so --num-samples must be 1")
        if args.compile == "yes":
            raise UserError("--compile compiles the plain decoding step; it does not apply to --speculative mtp")
    if args.system is not None and not args.chat:
        raise UserError("--system is the system message of a chat: add --chat")
    if args.chat:
        for flag, given in (("--prompt", args.prompt is not None), ("--prompt-file", args.prompt_file),
                            ("--speculative", args.speculative), ("--interactive", args.interactive),
                            ("--num-samples", args.num_samples != 1), ("--stop", args.stop)):
            if given:
                raise UserError(f"{flag} does not apply to --chat (a chat reads its messages from standard input)")
    if args.prompt is not None and args.prompt_file:
        raise UserError("give --prompt or --prompt-file, not both")
    prompts = None
    if args.prompt is not None:
        prompts = (args.prompt,)
    elif args.prompt_file:
        prompts = _prompt_file(args.prompt_file)
    return GenerateSettings(
        checkpoint=common.required("--resume-from CHECKPOINT_DIR (e.g. runs/tiny_10m/latest)", args.resume_from,
                                   "the model to talk to"),
        device=args.device, kernel=common.kernel_name(args), seed=common.seed(args.seed) or 0, compile=args.compile,
        sampling=sampling, prompts=prompts, interactive=args.interactive, max_new_tokens=args.max_new_tokens,
        num_samples=args.num_samples, stops=stops, truncate_prompt=args.truncate_prompt,
        speculative=args.speculative, draft_len=args.draft_len, chat=args.chat, system=args.system,
        dtype=args.dtype, quantize=args.quantize, attention_window=common.attention_window(args))


def _stdin_prompts(s: GenerateSettings) -> list[str] | None:
    """The prompts: given, or standard input when it is not a terminal; None for the interactive loop."""
    if s.prompts is not None:
        return list(s.prompts)
    if s.interactive:
        return None
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        try:
            return [data.decode("utf-8").rstrip("\n")]
        except UnicodeDecodeError as e:
            raise UserError(f"standard input is not UTF-8 (byte offset {e.start})") from None
    return [""]


class PrintedRow(TextRow):
    """A TextRow that streams its text to stdout as it becomes final."""

    def __init__(self, tokenizer, stops, stream: bool):
        super().__init__(tokenizer, stops)
        self.stream = stream

    def add(self, token: int) -> bool:
        done = super().add(token)
        self._print()
        return done

    def finish(self) -> str:
        text = super().finish()
        self._print()
        return text

    def _print(self):
        new = self.take()
        if self.stream and new:
            sys.stdout.write(new)
            sys.stdout.flush()


class Session:
    """A loaded model answering prompts: plain (batched) or speculative decoding, with a timing line."""

    def __init__(self, s: GenerateSettings, model, tokenizer, rows: int):
        import torch

        from .. import generate

        self.s, self.model, self.tokenizer, self.lib = s, model, tokenizer, generate
        self.generator = torch.Generator(device=model.device).manual_seed(s.seed)
        self.decode = generate.decode_one_token
        if not s.speculative:
            self.decode = decoder_for(s, model, rows)

    def budget(self, rows: list[list[int]]) -> int:
        room = self.model.config.max_position_embeddings - max(len(r) for r in rows)
        max_new = min(self.s.max_new_tokens, max(room, 0))
        if max_new < self.s.max_new_tokens:
            print(f"note: generating {max_new} tokens to stay within max_position_embeddings", file=sys.stderr)
        return max_new

    def answer(self, texts: list[str], echo: bool) -> None:
        s = self.s
        ids = [encode_prompt(self.tokenizer, t, self.model.config.max_position_embeddings, s.truncate_prompt)
               for t in texts for _ in range(s.num_samples)]
        t0 = self.first_token = time.perf_counter()
        if s.speculative:
            rows, note = self._speculative(texts, ids, echo)
        else:
            rows, note = self._sampled(texts, ids, echo), ""
        sys.stdout.flush()
        seconds = time.perf_counter() - t0
        n = sum(r.tokens for r in rows)
        first = f"; first token after {1000 * (self.first_token - t0):.0f} ms" if not s.speculative and n else ""
        print(f"[{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s{first}{note}]", file=sys.stderr)

    def _speculative(self, texts: list[str], ids: list[list[int]], echo: bool) -> tuple[list[TextRow], str]:
        rows, stats = [], []
        for text, prompt in zip(texts, ids):
            if echo or len(texts) > 1:
                sys.stdout.write(text)
            row = PrintedRow(self.tokenizer, self.s.stops, stream=True)
            _, st = self.lib.speculative_generate(self.model, prompt, self.budget([prompt]), self.s.draft_len,
                                                  None, on_token=row.add)
            row.finish()
            sys.stdout.write("\n")
            rows.append(row)
            stats.append(st)
        drafted, accepted = sum(x.drafted for x in stats), sum(x.accepted for x in stats)
        rounds = sum(x.rounds for x in stats)
        return rows, (f"; MTP acceptance {accepted / max(drafted, 1):.2f} ({accepted}/{drafted} drafts), "
                      f"{sum(r.tokens for r in rows) / max(rounds, 1):.2f} tokens per verification")

    def _sampled(self, texts: list[str], ids: list[list[int]], echo: bool) -> list[TextRow]:
        stream = len(ids) == 1
        if echo and stream:
            sys.stdout.write(texts[0])
        rows = [PrintedRow(self.tokenizer, self.s.stops, stream) for _ in ids]
        for i, token in enumerate(self.lib.generate_tokens(self.model, ids, self.budget(ids), self.s.sampling,
                                                           self.tokenizer.pad_id, self.generator, self.decode)):
            if i == 0:
                self.first_token = time.perf_counter()
            finished = [row.add(t) for row, t in zip(rows, token.tolist())]
            if all(finished):
                break
        for row in rows:
            row.finish()
        if stream:
            sys.stdout.write("\n")
        else:
            for i, row in enumerate(rows):
                p, k = divmod(i, self.s.num_samples)
                label = f"prompt {p + 1}" + (f", sample {k + 1}" if self.s.num_samples > 1 else "")
                sys.stdout.write(f"--- {label} ---\n{texts[p]}{row.text}\n")
        return rows


def run(s: GenerateSettings) -> int:
    if s.chat:
        return run_chat(s)
    prompts = _stdin_prompts(s)
    model, tokenizer, info = load_model(s)
    if s.speculative and not hasattr(model, "mtp"):
        raise UserError(f"{s.checkpoint} has no MTP block; train with --mtp-weight to use --speculative mtp")
    session = Session(s, model, tokenizer, rows=len(prompts) * s.num_samples if prompts else s.num_samples)
    if prompts is not None:
        session.answer(prompts, echo=True)
        return 0
    print(f"interactive: {info['source']} ({info['parameters']:,} parameters, {info['device']}). "
          "Type a prompt and press Enter; Ctrl-D to quit.", file=sys.stderr)
    for line in _typed_lines():
        if line.strip():
            session.answer([line], echo=False)
    return 0


def load_model(s: GenerateSettings):
    """The model as the settings ask (precision included), with a note when the CPU changes the dtype."""
    from ..pretrained import load_for_inference

    model, tokenizer, info = load_for_inference(s.checkpoint, s.device, s.kernel, s.dtype, s.quantize,
                                                s.attention_window)
    if info["note"]:
        print(info["note"], file=sys.stderr)
    return model, tokenizer, info


def decoder_for(s: GenerateSettings, model, rows: int):
    """The decoding step --compile asks for (decoder.choose_decoder), saying what a first compile cost."""
    from ..decoder import CompiledDecoder, choose_decoder

    def say(message: str) -> None:
        print(message + "...", file=sys.stderr, flush=True)

    decode = choose_decoder(model, s.compile, rows * s.max_new_tokens, rows, on_compile=say)
    if isinstance(decode, CompiledDecoder) and decode.compiled:
        print(f"compiled in {decode.compile_seconds:.0f} s", file=sys.stderr, flush=True)
    return decode


def _typed_lines():
    """Lines typed at a `> ` prompt, until EOF (Ctrl-D)."""
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return


def run_chat(s: GenerateSettings) -> int:
    """`--chat`: read a message, stream the reply, until EOF (Ctrl-D); the history stays in the cache."""
    import torch

    from ..chat import ChatSession, marker_ids
    from ..text import StreamDecoder

    model, tokenizer, info = load_model(s)
    marker_ids(tokenizer)
    decode = decoder_for(s, model, rows=1)
    generator = torch.Generator(device=model.device).manual_seed(s.seed)
    session = ChatSession(model, tokenizer, s.system, s.sampling, generator, decode)
    print(f"chat: {info['source']} ({info['parameters']:,} parameters, {info['device']}). Type a message and "
          "press Enter; /reset starts over, Ctrl-D quits.", file=sys.stderr, flush=True)
    echo = not sys.stdin.isatty()  # messages piped in are shown, so the transcript reads as a conversation
    for line in _typed_lines():
        if echo:
            print(line, flush=True)
        if line.strip() == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        if not line.strip():
            continue
        t0, n = time.perf_counter(), 0
        stream = StreamDecoder(tokenizer)
        for token in session.reply(line, s.max_new_tokens):
            n += 1
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        seconds = time.perf_counter() - t0
        print(f"[{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s; prefilled "
              f"{session.prefilled[-1]} new tokens, {len(session.ids)} in the conversation]", file=sys.stderr,
              flush=True)
    return 0
