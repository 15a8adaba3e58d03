"""Generated tokens -> text, as it streams: whole characters only, stopped at end-of-text or at a stop
string, holding back what could still become one. No torch: a server can use it as it is."""

from __future__ import annotations

from collections.abc import Iterable

from .util import UserError


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


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


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
    """The text of one generated row (a reply, as it streams): incremental decoding, the tokens that end it
    (`stop_ids`, not part of its text: end-of-text unless told) and its stop strings. Text up to `shown_end`
    can be shown as it comes (`take`); the rest could still turn out to be the start of a stop string."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = (), stop_ids: Iterable[int] | None = None):
        self.decoder, self.stops = StreamDecoder(tokenizer), list(stops)
        self.stop_ids = frozenset(stop_ids) if stop_ids is not None else frozenset({tokenizer.eot_id})
        self.hold = max((len(x) for x in stops), default=1) - 1
        self.text, self.done, self.tokens, self.taken = "", False, 0, 0

    def add(self, token: int) -> bool:
        """Take one generated token; True once the row is finished (a stop token or a stop string)."""
        if self.done:
            return True
        self.tokens += 1
        if token in self.stop_ids:
            self.done = True
        else:
            self.text += self.decoder.push(token)
            self._cut()
        return self.done

    def finish(self) -> str:
        if not self.done:
            self.text += self.decoder.flush()
            self._cut()
            self.done = True
        return self.text

    @property
    def shown_end(self) -> int:
        return len(self.text) - (0 if self.done else self.hold)

    def take(self) -> str:
        """The text that can be shown and was not taken before (once the row is done: all the rest)."""
        end = max(self.shown_end, self.taken)
        new, self.taken = self.text[self.taken:end], end
        return new

    def _cut(self):
        cut = first_stop(self.text, self.stops) if self.stops else None
        if cut is not None:
            self.text, self.done = self.text[:cut], True
