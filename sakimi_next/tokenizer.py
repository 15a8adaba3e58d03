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
- BPE merges learned from the corpus; the ByteLevel decoder turns the byte symbols back into text.

The same file loads in `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` and gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
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


def new_bpe_tokenizer():
    """An untrained `tokenizers.Tokenizer` with this project's pipeline (see the module docstring)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        # use_regex=False: the split above already did the work GPT-2's built-in regex would do
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    return tk


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on `texts` (any iterable; streamed, only word counts are kept).

    The result has exactly `vocab_size` tokens: 4 special tokens, the 256 byte symbols and the
    merges. A corpus that cannot supply that many merges (pairs seen at least twice) is a UserError,
    as a smaller vocabulary than asked for would silently change the model's shape. Training is
    deterministic: the same texts in the same order give a byte-identical tokenizer.json.
    """
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size ({vocab_size}) must be at least {MIN_VOCAB} "
                        f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
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
