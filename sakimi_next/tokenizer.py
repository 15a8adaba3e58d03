"""The tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, saved as one `tokenizer.json`.

Design, in the order text flows through it:

- no normalizer: the text the model sees is exactly the user's text;
- special tokens (ids 0..3): end-of-text, padding and the two chat markers; they are matched in the
  input before anything else, so the literal string "<|endoftext|>" encodes to the one EOT id;
- a regex pre-tokenizer (Qwen2's, itself GPT-4's with single digits): words with their leading
  space, single digits (so numbers are spelled digit by digit and arithmetic generalises),
  punctuation runs, newline runs. Runs of CJK characters are letters, so they stay together and BPE
  learns multi-character Chinese words inside them;
- byte-level mapping of each piece (every byte is one of 256 base symbols), so any UTF-8 string is
  encodable without an unknown token and `decode(encode(x)) == x` exactly;
- BPE merges learned from the corpus; or, over whole characters, first the merges that make each
  frequent character one token, then BPE's (see "whole characters" below). The ByteLevel decoder turns
  the byte symbols back into text.

The same file loads in `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` and gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from .util import UserError, atomic_write_bytes

EOT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, PAD, IM_START, IM_END]  # ids 0, 1, 2, 3
# ChatML as Jinja, for tokenizer_config.json (apply_chat_template); chat.render is the same in Python (tested equal).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's pre-tokenization pattern: English contractions; a letter run with at most one leading
# non-letter (" the", "，贾母"); one digit; punctuation with its trailing newlines; newline runs;
# other whitespace. Every piece boundary it draws is kept, nothing is dropped.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
MIN_PAIR_COUNT = 2  # a pair seen once is a memorised string, not a pattern worth a token


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the few things this project needs.

    `vocab_size` is one more than the largest id (special tokens included), i.e. the number of
    embedding rows a model needs. `sha256` is the hash of the tokenizer.json bytes, which is how
    data directories and checkpoints recognise "the same tokenizer".
    """

    def __init__(self, tk, path: str | Path | None = None, data: bytes | None = None):
        self._tk = tk
        self._json = data if data is not None else tk.to_str(pretty=True).encode("utf-8")
        self.sha256 = hashlib.sha256(self._json).hexdigest()
        self.path = Path(path) if path is not None else None
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        eot = tk.token_to_id(EOT)
        if eot is None:
            where = f"{self.path}" if self.path else "the tokenizer"
            raise UserError(f"{where} has no {EOT} token; this project needs one to separate documents")
        self.eot_id = eot
        pad = tk.token_to_id(PAD)
        self.pad_id = eot if pad is None else pad  # a foreign tokenizer without a pad token pads with EOT

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.exists():
            raise UserError(f"tokenizer not found: {path}")
        if not path.is_file():
            raise UserError(f"{path} is not a tokenizer.json but a directory")
        data = path.read_bytes()
        try:
            tk = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception with a serde message
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} is not a tokenizer.json ({reason[:120]})") from None
        return cls(tk, path, data)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, self._json)
        self.path = Path(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, computed in parallel by `tokenizers` (without character offsets,
        which this project never uses and which cost time)."""
        encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)  # _fast: tokenizers >= 0.21
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens included, so `decode(encode(x)) == x`."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"


def _split():
    """The regex step of the pre-tokenizer: text -> pieces (words with their leading space, digits, ...)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False)


def new_bpe_tokenizer(model=None):
    """A `tokenizers.Tokenizer` with this project's pipeline (see the module docstring) around `model`
    (default: an untrained BPE)."""
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer(model if model is not None else models.BPE(unk_token=None, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        _split(),
        # use_regex=False: the split above already did the work GPT-2's built-in regex would do
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    return tk


def train_tokenizer(texts: Iterable[str], vocab_size: int, whole_characters: bool = False) -> Tokenizer:
    """Train byte-level BPE on `texts` (any iterable; streamed, only word counts are kept).

    The result has exactly `vocab_size` tokens: 4 special tokens, the 256 byte symbols and the
    merges. `whole_characters`: the first merges spell out the text's frequent characters (see
    `frequent_characters`), one token each, and BPE learns the rest on top of them; otherwise BPE learns
    all of them. A corpus that cannot supply that many merges (pairs seen at least twice) is a UserError,
    as a smaller vocabulary than asked for would silently change the model's shape. Training is
    deterministic: the same texts in the same order give a byte-identical tokenizer.json.
    """
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size ({vocab_size}) must be at least {MIN_VOCAB} "
                        f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    if whole_characters:
        tok = Tokenizer(_train_on_characters(count_pieces(texts), vocab_size - MIN_VOCAB))
    else:
        tk = new_bpe_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=MIN_PAIR_COUNT,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer)
        tok = Tokenizer(tk)
    if tok.vocab_size < vocab_size:
        raise UserError(f"the training text is too small for a vocabulary of {vocab_size:,}: BPE found only "
                        f"{tok.vocab_size:,} tokens worth learning; use --vocab-size {tok.vocab_size} or less, "
                        "or more text")
    return tok


# ---------------------------------------------------------------------------------------------------
# whole characters: a token for each frequent character before BPE learns the rest
#
# In byte-level BPE a character of n UTF-8 bytes becomes one token through n - 1 merges of its prefixes
# (byte 1 + byte 2, then that + byte 3, ...). A 3-byte CJK character needs two, but the 2-byte
# prefixes are shared: 2,781 characters of 红楼梦 (its first 90%) take 3,081 merges. Those merges come first, in the
# order of the characters' frequency; they never cross a character's edge (a pair "lead byte +
# continuation byte" only occurs at a character's start), so the encoder, which applies merges in
# their order, first spells every frequent character as one token and every other character as its
# longest prefix with a token plus single bytes (nothing is ever unknown). BPE then learns the further
# merges from the text spelled that way: `tokenizers`' trainer cannot start from given merges, so it
# trains on the pieces rewritten with one stand-in symbol per character token, and the merges it learns
# are translated back. The file is plain byte-level BPE (vocabulary and merges), loaded by transformers
# and exported to llama.cpp like any other.

# the most frequent characters that together make up this share of the text get a token, if seen at
# least MIN_CHAR_COUNT times (at 99.5%, 红楼梦's last such character appears 6 times in 2.25 MB)
CHAR_COVERAGE = 0.995
MIN_CHAR_COUNT = 4
# stand-ins for character tokens while BPE learns: characters from U+10000 on, which are neither byte
# symbols (U+0021..U+0143) nor whitespace (the trainer's pieces are separated by spaces), with room for
# a million tokens
_STAND_IN = 0x10000


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet (the ByteLevel pre-tokenizer's): the printable character for each byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # "!".."~", "¡".."¬", "®".."ÿ"
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


BYTE_SYMBOLS = _byte_symbols()


def byte_level(b: bytes) -> str:
    """`b` as ByteLevel writes it in tokens and merges."""
    return "".join(BYTE_SYMBOLS[x] for x in b)


def count_pieces(texts: Iterable[str]) -> Counter:
    """The pieces the pre-tokenizer cuts `texts` into, and how often each occurs: what BPE learns from."""
    split, counts = _split(), Counter()
    for text in texts:
        counts.update(piece for piece, _ in split.pre_tokenize_str(text))
    return counts


def character_counts(pieces: Counter) -> Counter:
    """How often each character occurs in the counted `pieces`."""
    chars = Counter()
    for piece, n in pieces.items():
        for ch, k in Counter(piece).items():
            chars[ch] += k * n
    return chars


def frequent_characters(chars: Counter) -> list[str]:
    """The characters of several bytes that get a token of their own, most frequent first: those among
    the most frequent characters that make up CHAR_COVERAGE of the text, seen at least MIN_CHAR_COUNT
    times (one-byte characters are tokens anyway)."""
    total, covered, out = sum(chars.values()), 0, []
    for ch, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered >= CHAR_COVERAGE * total or n < MIN_CHAR_COUNT:
            break
        covered += n
        if ord(ch) >= 0x80:
            out.append(ch)
    return out


def character_tokens(chars: list[str], budget: int | None = None) -> list[bytes]:
    """The tokens (UTF-8 bytes) that spell `chars` as one token each, in the order of their merges:
    each character's prefixes that no earlier character made, then the character. With a `budget` of
    merges, the characters that fit, in order."""
    tokens, seen = [], set()
    for ch in chars:
        b = ch.encode("utf-8")
        new = [b[:k] for k in range(2, len(b) + 1) if b[:k] not in seen]
        if budget is not None and len(tokens) + len(new) > budget:
            break
        tokens += new
        seen.update(new)
    return tokens


def _train_on_characters(pieces: Counter, n_merges: int):
    """A byte-level BPE (`tokenizers.Tokenizer`) with `n_merges` merges: first those of
    `character_tokens` for the pieces' frequent characters, then BPE's on top."""
    from tokenizers import AddedToken, models

    chars = character_counts(pieces)
    char_tokens = character_tokens(frequent_characters(chars), n_merges)
    merges = [(byte_level(t[:-1]), byte_level(t[-1:])) for t in char_tokens]
    merges += _learn_merges(pieces, chars, char_tokens, n_merges - len(char_tokens))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for token in sorted(BYTE_SYMBOLS) + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    tk = new_bpe_tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tk


def _learn_merges(pieces: Counter, chars: Counter, char_tokens: list[bytes], n: int) -> list[tuple[str, str]]:
    """Up to `n` BPE merges (byte-level strings) learned from `pieces` as the encoder spells them once the
    merges of `char_tokens` are done: each character as its longest prefix among `char_tokens` (one
    stand-in symbol), then its remaining bytes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    if n <= 0:
        return []
    stand_in = {t: chr(_STAND_IN + i) for i, t in enumerate(char_tokens)}

    def spelled(ch: str) -> str:
        b = ch.encode("utf-8")
        k = next((k for k in range(len(b), 1, -1) if b[:k] in stand_in), 0)
        return (stand_in[b[:k]] if k else "") + byte_level(b[k:])

    table = {ord(ch): spelled(ch) for ch in chars}
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    alphabet = BYTE_SYMBOLS + list(stand_in.values())
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + n, min_frequency=MIN_PAIR_COUNT,
                                  initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(((piece.translate(table) + " ") * count for piece, count in pieces.items()), trainer)
    back = {ord(s): byte_level(t) for t, s in stand_in.items()}
    return [(a.translate(back), b.translate(back)) for a, b in json.loads(tk.to_str())["model"]["merges"]]


def write_tokenizer_config(out_dir: Path, max_length: int) -> None:
    """tokenizer_config.json (class, special tokens, the ChatML chat_template) and special_tokens_map.json,
    beside a tokenizer.json: what AutoTokenizer and apply_chat_template read."""
    special = {"eos_token": EOT, "pad_token": PAD, "bos_token": None, "unk_token": None}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in special.items() if v is not None}, indent=2) + "\n")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_length,
           "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
           "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def check_same_tokenizer(tokenizer: Tokenizer, recorded_sha256: str | None, what: str, fix: str = "") -> None:
    """The one check that `tokenizer` is the one a model or a data directory records (by the sha256 of its
    tokenizer.json; nothing recorded, nothing to check): else a UserError, `what` went wrong, both hashes,
    and `fix`."""
    if recorded_sha256 and tokenizer.sha256 != recorded_sha256:
        raise UserError(f"{what} (sha256 {tokenizer.sha256[:12]} instead of {recorded_sha256[:12]}){fix}")
