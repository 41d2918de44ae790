"""Incremental detokenization with stop strings, one tracker per generated sample.

`add(token_id)` returns the text that is safe to emit now: text that could still turn out to
be the start of a stop string, or an incomplete UTF-8 character, is held back. When a stop
string appears, the text before it (and the stop string itself with
`include_stop_str_in_output`) is final and the sample is finished ("stop").
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class OutputOptions:
    """How generated tokens become text (vLLM's names)."""

    stops: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # keep the stop string / stop token's text
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # " " around added tokens that are shown


class TextTracker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: OutputOptions | None = None) -> None:
        self.tokenizer = tokenizer
        self.options = options or OutputOptions()
        self.token_ids: list[int] = []
        self.emitted = ""  # text already returned
        self.stopped = False  # a stop string was found
        longest = max((len(s) for s in self.options.stops), default=1)
        self._lookback = longest - 1  # a stop may start this far back in emitted text
        self._holdback = 0 if self.options.include_stop_str_in_output else self._lookback
        self._added: dict[int, AddedToken] = dict(tokenizer.added_tokens_decoder)

    def text(self) -> str:
        return decode_tokens(self.tokenizer, self.token_ids, self.options, self._added)

    def add(self, token_id: int, stop_token: bool = False) -> str:
        """Add one token; return newly emittable text. `stop_token`: the engine stopped on this
        token (EOS or stop_token_ids); its text is dropped unless include_stop_str_in_output."""
        if self.stopped:
            return ""
        if stop_token and not self.options.include_stop_str_in_output:
            return ""
        self.token_ids.append(token_id)
        text = self.text()
        found = self._first_stop(text)
        if found is not None:
            self.stopped = True
            cut, stop = found
            return self._emit(text[: cut + len(stop) if self.options.include_stop_str_in_output else cut])
        safe = len(text) - self._holdback
        while safe > len(self.emitted) and text[safe - 1] == REPLACEMENT:
            safe -= 1  # an incomplete multi-byte character: wait for its other bytes
        return self._emit(text[: max(safe, len(self.emitted))])

    def finish(self) -> str:
        """The sample ended: emit whatever was held back."""
        if self.stopped:
            return ""
        return self._emit(self.text())

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        # a stop can only start in text not yet emitted, minus the part it may overlap
        start = max(0, len(self.emitted) - self._lookback)
        found = [(i, s) for s in self.options.stops if (i := text.find(s, start)) >= 0]
        return min(found, key=lambda hit: hit[0]) if found else None

    def _emit(self, text: str) -> str:
        new = text[len(self.emitted) :]
        self.emitted = text
        return new


def decode_tokens(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], options: OutputOptions, added: dict[int, AddedToken]
) -> str:
    """Decode as HF's Python tokenizers (and vLLM) do: runs of ordinary tokens decoded
    together, added tokens as their text (special ones dropped with skip_special_tokens),
    joined by " " when spaces_between_special_tokens."""
    if not any(i in added for i in ids):
        return tokenizer.decode(ids)
    pieces: list[str] = []
    run: list[int] = []
    for token_id in ids:
        token = added.get(token_id)
        if token is None:
            run.append(token_id)
        elif not (token.special and options.skip_special_tokens):
            pieces += [tokenizer.decode(run)] if run else []
            pieces.append(token.content)
            run = []
    pieces += [tokenizer.decode(run)] if run else []
    return (" " if options.spaces_between_special_tokens else "").join(pieces)


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token as text for logprobs: decoded, or the raw token string where it is part of a
    multi-byte character (so distinct tokens keep distinct keys)."""
    text = tokenizer.decode([token_id])
    return tokenizer.convert_ids_to_tokens(token_id) if REPLACEMENT in text else text


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The raw bytes a token stands for (part of a UTF-8 character, for some tokens)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if _is_byte_level(tokenizer) and all(ch in _BYTE_DECODER for ch in token):
        return bytes(_BYTE_DECODER[ch] for ch in token)
    if match := _BYTE_TOKEN.fullmatch(token):  # SentencePiece byte fallback
        return bytes([int(match.group(1), 16)])
    if "\u2581" in token:  # SentencePiece word boundary
        return token.replace("\u2581", " ").encode()
    return tokenizer.decode([token_id]).encode()


_BYTE_DECODER = {ch: byte for byte, ch in bytes_to_unicode().items()}


@functools.lru_cache(maxsize=8)
def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))
