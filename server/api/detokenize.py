"""Incremental detokenization with stop strings, one tracker per generated sample.

`add(token_id)` returns the text that is safe to emit now: text that could still turn out to
be the start of a stop string, or an incomplete UTF-8 character, is held back. When a stop
string appears, the text before it (and the stop string itself with
`include_stop_str_in_output`) is final and the sample is finished ("stop"). Tokens are decoded
incrementally (tokenizers' `DecodeStream`), never by re-decoding the whole output.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from tokenizers import AddedToken
from tokenizers.decoders import DecodeStream
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
    """Stop strings and hold-back over an `IncrementalDecoder`. Each token costs time in the
    length of its own text (plus the stop window), not in the length of the output."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: OutputOptions | None = None) -> None:
        self.options = options or OutputOptions()
        self.decoder = IncrementalDecoder(tokenizer, self.options)
        self.stopped = False  # a stop string was found
        longest = max((len(s) for s in self.options.stops), default=1)
        self._lookback = longest - 1  # a stop may start this far back in emitted text
        self._holdback = 0 if self.options.include_stop_str_in_output else self._lookback
        self._tail = ""  # the last `_lookback` characters already emitted
        self._pending = ""  # decoded, not yet emitted

    def add(self, token_id: int, stop_token: bool = False) -> str:
        """Add one token; return newly emittable text. `stop_token`: the engine stopped on this
        token (EOS or stop_token_ids); its text is dropped unless include_stop_str_in_output."""
        if self.stopped or (stop_token and not self.options.include_stop_str_in_output):
            return ""
        new = self.decoder.add(token_id)
        return self._advance(new, final=False) if new else ""

    def finish(self) -> str:
        """The sample ended: emit whatever was held back (and incomplete bytes, as U+FFFD)."""
        if self.stopped:
            return ""
        return self._advance(self.decoder.flush(), final=True)

    def _advance(self, new: str, final: bool) -> str:
        self._pending += new
        window = self._tail + self._pending
        found = [(i, s) for s in self.options.stops if (i := window.find(s)) >= 0]
        if found:
            self.stopped = True
            start, stop = min(found, key=lambda hit: hit[0])
            end = start + len(stop) if self.options.include_stop_str_in_output else start
            return window[len(self._tail) : max(end, len(self._tail))]
        safe = len(self._pending) if final else max(0, len(self._pending) - self._holdback)
        out, self._pending = self._pending[:safe], self._pending[safe:]
        self._tail = (self._tail + out)[-self._lookback :] if self._lookback else ""
        return out


class IncrementalDecoder:
    """Token ids -> text one token at a time; the concatenated output (after `flush`) equals a
    decode of all ids as HF's Python tokenizers (and vLLM) do it: runs of ordinary tokens
    decoded together, added tokens as their text (special ones dropped with
    skip_special_tokens), joined by " " when spaces_between_special_tokens. Runs go through
    tokenizers' `DecodeStream` (`WindowDecodeStream` for tokenizers without a Rust backend),
    which returns text only once its UTF-8 characters are complete."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: OutputOptions) -> None:
        self.tokenizer, self.options = tokenizer, options
        self._added: dict[int, AddedToken] = dict(tokenizer.added_tokens_decoder)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._separator = " " if options.spaces_between_special_tokens else ""
        self._num_pieces = 0  # pieces (runs and shown added tokens) started so far
        self._run: list[int] = []  # ids of the current run of ordinary tokens
        self._run_text: list[str] = []  # what the stream returned for that run
        self._stream: DecodeStream | WindowDecodeStream = self._new_stream()

    def add(self, token_id: int) -> str:
        token = self._added.get(token_id)
        if token is None:
            prefix = self._start_piece() if not self._run else ""
            self._run.append(token_id)
            text = self._stream.step(self._backend or self.tokenizer, token_id) or ""
            self._run_text.append(text)
            return prefix + text
        if token.special and self.options.skip_special_tokens:
            return ""  # dropped without ending the run, as a whole decode does
        return self.flush() + self._start_piece() + token.content

    def flush(self) -> str:
        """End the current run: return the rest of its text (incomplete bytes as U+FFFD)."""
        if not self._run:
            return ""
        emitted = sum(map(len, self._run_text))
        rest = self.tokenizer.decode(self._run)[emitted:]
        self._run, self._run_text, self._stream = [], [], self._new_stream()
        return rest

    def _start_piece(self) -> str:
        self._num_pieces += 1
        return self._separator if self._num_pieces > 1 else ""

    def _new_stream(self) -> DecodeStream | WindowDecodeStream:
        return DecodeStream(skip_special_tokens=False) if self._backend is not None else WindowDecodeStream()


class WindowDecodeStream:
    """`DecodeStream`'s algorithm over any tokenizer's `decode`: decode a short window of the
    latest ids, return what it adds to the window's previous text once it ends in a complete
    character, then drop the ids the next step no longer needs."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._prefix = ""  # decode(self._ids[:self._read]) as last returned
        self._prefix_index = 0

    def step(self, tokenizer: PreTrainedTokenizerBase, token_id: int) -> str | None:
        self._ids.append(token_id)
        text = tokenizer.decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith(REPLACEMENT) or not text.startswith(self._prefix):
            return None
        new = text[len(self._prefix) :]
        next_index = len(self._ids) - self._prefix_index
        self._ids = self._ids[self._prefix_index :]
        self._prefix = tokenizer.decode(self._ids)
        self._prefix_index = next_index
        return new


class TokenTexts:
    """Each token's logprob text and bytes, decoded once per token id and kept (at most one
    entry per vocabulary id): rendering top logprobs costs lookups, not decodes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = token_text(self.tokenizer, token_id)
        return text

    def bytes(self, token_id: int) -> bytes:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = token_bytes(self.tokenizer, token_id)
        return raw


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
