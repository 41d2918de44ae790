"""Incremental detokenization with stop strings, one tracker per generated sample.

`add(token_id)` returns the text that is safe to emit now: text that could still turn out to
be the start of a stop string, or an incomplete UTF-8 character, is held back. When a stop
string appears, the text before it is final and the sample is finished ("stop").
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class TextTracker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = stops or []
        self.token_ids: list[int] = []
        self.emitted = ""  # text already returned
        self.stopped = False  # a stop string was found
        self._holdback = max((len(s) for s in self.stops), default=1) - 1

    def text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Add one token; return newly emittable text."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self.text()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        safe = len(text) - self._holdback
        while safe > len(self.emitted) and text[safe - 1] == REPLACEMENT:
            safe -= 1  # an incomplete multi-byte character: wait for its other bytes
        return self._emit(text[: max(safe, len(self.emitted))])

    def finish(self) -> str:
        """The sample ended: emit whatever was held back."""
        if self.stopped:
            return ""
        return self._emit(self.text())

    def _first_stop(self, text: str) -> int | None:
        # a stop can only start in text not yet emitted, minus the held-back part
        start = max(0, len(self.emitted) - self._holdback)
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _emit(self, text: str) -> str:
        new = text[len(self.emitted) :]
        self.emitted = text
        return new


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token as text for logprobs: decoded, or the raw token string where it is part of a
    multi-byte character (so distinct tokens keep distinct keys)."""
    text = tokenizer.decode([token_id])
    return tokenizer.convert_ids_to_tokens(token_id) if REPLACEMENT in text else text
