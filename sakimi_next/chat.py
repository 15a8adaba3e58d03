"""The chat format (ChatML), reading conversations for fine-tuning, and a multi-turn chat that keeps its cache.

    <|im_start|>system\\n{content}<|im_end|>\\n          (optional, first)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n
    ...
    <|im_start|>assistant\\n                             (the generation prompt)

`<|im_start|>` and `<|im_end|>` are special tokens of the tokenizer: matched before anything else and
never merged with their neighbours, so the text between two of them is tokenized on its own and a
conversation's ids are the concatenation of its pieces' ids. The same format is written as the Jinja
`chat_template` of every checkpoint's and export's tokenizer_config.json, so transformers'
`apply_chat_template` gives exactly these ids.

Fine-tuning data: JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line. Each
conversation becomes its ids followed by one end-of-text token (packed conversations restart attention
and DeltaNet state there, see `--document-masking`), and a loss mask that is 1 exactly on the tokens of
the assistant replies and their `<|im_end|>`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .tokenizer import EOT, IM_END, IM_START, Tokenizer
from .util import UserError, read_jsonl

ROLES = ("system", "user", "assistant")
RESERVED = (IM_START, IM_END, EOT)

GENERATION_PROMPT = f"{IM_START}assistant\n"
MASK_SUFFIX = ".mask.bin"  # train.mask.bin beside train.bin: one uint8 per token, 1 = counted in the loss


# ------------------------------------------------------------------------------------------ format
def check_messages(messages, where: str = "the conversation", need_assistant: bool = False) -> list[dict]:
    """`messages` as a list of {"role", "content"} dicts, or a UserError saying what is wrong with it.
    Roles are system, user and assistant; content is a string without the reserved markers (which
    would otherwise become special tokens and forge turns)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f'{where}: message {i + 1} is not an object with "role" and "content" strings')
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i + 1} has unknown role {m['role']!r} "
                            f"(expected {', '.join(ROLES[:-1])} or {ROLES[-1]})")
        marker = next((r for r in RESERVED if r in m["content"]), None)
        if marker is not None:
            raise UserError(f"{where}: message {i + 1} contains the reserved token {marker}")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from it")
    return out


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text (what `tokenizer.CHAT_TEMPLATE` renders)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def marker_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """The ids of <|im_start|> and <|im_end|>; a UserError for a tokenizer without them."""
    start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if start is None or end is None:
        raise UserError(f"the tokenizer has no {IM_START} / {IM_END} tokens, so it cannot encode a chat")
    return start, end


def encode_chat(tokenizer: Tokenizer, messages: list[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a conversation: ids == tokenizer.encode(render(messages, ...)); the mask is 1
    on the tokens of each assistant reply and its <|im_end|>, 0 elsewhere.

    The text between two special tokens is tokenized on its own, so each message is encoded as
    <|im_start|>, "role\\ncontent", <|im_end|>, "\\n". Within "assistant\\ncontent" a reply starting with
    a newline may merge with the header's; such a token carries reply text and counts as reply."""
    start, end = marker_ids(tokenizer)
    ids, mask = [], []
    for m in messages:
        body = tokenizer.encode(f"{m['role']}\n{m['content']}")
        first = 0
        if m["role"] == "assistant":
            header = tokenizer.encode("assistant\n")
            while first < min(len(header), len(body)) and body[first] == header[first]:
                first += 1
        newline = tokenizer.encode("\n")
        ids += [start, *body, end, *newline]
        reply = int(m["role"] == "assistant")
        mask += [0] * (1 + first) + [reply] * (len(body) - first + 1) + [0] * len(newline)
    if add_generation_prompt:
        prompt = [start, *tokenizer.encode("assistant\n")]
        ids += prompt
        mask += [0] * len(prompt)
    return ids, mask


# ------------------------------------------------------------------------------------- chat data
def is_chat_jsonl(path: Path) -> bool:
    """Whether the first record of a .jsonl file is a conversation (has "messages")."""
    if path.suffix.lower() != ".jsonl":
        return False
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    record = json.loads(raw.decode("utf-8", "replace").removeprefix("\ufeff"))
                except ValueError:
                    return False
                return isinstance(record, dict) and "messages" in record
    return False


def read_conversations(path: Path) -> Iterator[list[dict]]:
    """The conversations of a JSONL file, each checked; a bad line is a UserError naming file and line."""
    must = 'must be {"messages": [{"role": ..., "content": ...}, ...]}'
    for where, record in read_jsonl(path, must):
        if not isinstance(record, dict) or "messages" not in record:
            raise UserError(f'{where}: no "messages" in this record; each line {must}')
        yield check_messages(record["messages"], where, need_assistant=True)


def conversations_of(tokens: np.ndarray, eot_id: int) -> list[tuple[int, int]]:
    """(start, end) of each conversation in a split, its end-of-text token excluded."""
    ends = np.flatnonzero(np.asarray(tokens) == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
    return list(zip(starts.tolist(), ends.tolist()))


class ChatSession:
    """A multi-turn conversation held in one decoding cache: each turn runs only its new tokens (the end
    of the previous reply and the new user message) through the model, never the history again.

    `ids` is the whole conversation as the model sees it: the generated reply tokens as they were
    sampled, each reply closed with <|im_end|> and a newline. `fed` of them are in the cache; the last
    sampled token of a reply is only fed at the start of the next turn. `prefilled` counts the tokens
    each turn ran through the model before its first new token."""

    def __init__(self, model, tokenizer: Tokenizer, system: str | None = None, settings=None, generator=None,
                 decode=None):
        from .generate import SamplingSettings, decode_one_token

        self.model, self.tokenizer = model, tokenizer
        self.system = check_messages([{"role": "system", "content": system}])[0] if system else None
        self.settings = settings or SamplingSettings(temperature=0)
        self.generator, self.decode = generator, decode or decode_one_token
        self.start_id, self.end_id = marker_ids(tokenizer)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.cache = self.model.new_cache(1, capacity=256)
        self.ids: list[int] = []
        self.fed = 0
        self.prefilled: list[int] = []
        self.logits = None  # the model's last logits [V]

    def _close_reply(self, reply: list[int]) -> None:
        self.ids += reply
        if not reply or reply[-1] != self.end_id:
            self.ids.append(self.end_id)  # a reply cut short by the token budget is closed here
        self.ids += self.tokenizer.encode("\n")

    def reply(self, user: str, max_new_tokens: int) -> Iterator[int]:
        """Yield the assistant's reply to `user`, token by token, until <|im_end|> (not yielded) or
        `max_new_tokens`. The reply stays in the conversation, also when the caller stops early."""
        import torch

        from .generate import apply_repetition_penalty, prefill, sample

        first = not self.ids
        turn = ([self.system] if first and self.system else []) + [{"role": "user", "content": user}]
        new = encode_chat(self.tokenizer, check_messages(turn), add_generation_prompt=True)[0]
        limit = self.model.config.max_position_embeddings
        if len(self.ids) + len(new) + max_new_tokens > limit:
            raise UserError(f"the conversation would exceed max_position_embeddings ({limit}); /reset to start over")
        self.ids += new
        todo = torch.tensor([self.ids[self.fed:]], device=self.model.device)
        self.prefilled.append(todo.shape[1])
        self.logits = prefill(self.model, todo, None, self.cache)[0]
        self.fed = len(self.ids)
        reply: list[int] = []
        penalty = self.settings.repetition_penalty
        seen = None
        if penalty != 1.0:
            seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.model.device)
            seen[0, torch.tensor(self.ids, device=seen.device)] = True
        try:
            while len(reply) < max_new_tokens:
                logits = self.logits[None]
                if seen is not None:
                    logits = apply_repetition_penalty(logits, seen, penalty)
                token = sample(logits, self.settings, self.generator)
                reply.append(int(token))
                if reply[-1] == self.end_id:
                    break
                yield reply[-1]
                if len(reply) == max_new_tokens:
                    break
                if seen is not None:
                    seen[0, token] = True
                self.logits = self.decode(self.model, token, self.cache)[0]
                self.fed += 1
        finally:
            self._close_reply(reply)
