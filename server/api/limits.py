"""Limits applied to a request: room in the waiting queue (`--max-waiting-requests`), valid
Unicode and a prompt length bound by characters (before any tokenization), the estimated size
of a non-streaming response (`--max-response-bytes`), and the length of what is logged."""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator

from transformers import PreTrainedTokenizerBase

from server.api.errors import APIError
from server.engine.async_engine import AsyncEngine
from server.engine.request import SamplingParams
from server.engine.streams import Admission, QueueFullError

# The current HTTP request's room in the waiting queue, set by the route before tokenization.
# `choice_events` hands it to the engine; the tasks it runs in inherit this context.
current_admission: contextvars.ContextVar[Admission | None] = contextvars.ContextVar("admission", default=None)
CHARS_PER_TOKEN_SLACK = 2  # normalizers may merge characters (e.g. NFC): allow twice the longest token
# JSON of one logprob entry beyond its token's text: {"token": "", "logprob": -0.123456789,
# "bytes": []} and separators; the bytes list takes about 4 characters per byte.
LOGPROB_ENTRY_BYTES = 64
BYTES_LIST_PER_CHAR = 4


def admit(engine: AsyncEngine, num_sequences: int, max_waiting: int) -> Admission:
    """Reserve room for a request's sequences in the waiting queue (a 429 if full) and make it
    the current request's admission. The caller releases what is left when the request ends."""
    try:
        admission = engine.admit(num_sequences, max_waiting)
    except QueueFullError:
        raise _queue_full() from None
    current_admission.set(admission)
    return admission


def refuse_if_full(engine: AsyncEngine, max_waiting: int) -> None:
    """A 429 before a request's body is read, when not even one more sequence could wait."""
    if engine.num_waiting >= max_waiting:
        raise _queue_full()


def _queue_full() -> APIError:
    return APIError(429, "Too many requests are waiting; retry later.", headers={"Retry-After": "1"})


def prompt_char_limit(tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> int:
    """Characters that cannot fit in `max_model_len` tokens: no token stands for more
    characters than its vocabulary entry has (bytes for byte-level BPE), times a slack."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return max_model_len * longest * CHARS_PER_TOKEN_SLACK


def mean_token_chars(tokenizer: PreTrainedTokenizerBase) -> float:
    """The mean length of the vocabulary's entries (bytes, for byte-level BPE)."""
    vocab = tokenizer.get_vocab()
    return sum(map(len, vocab)) / max(len(vocab), 1)


def check_response_size(params: list[SamplingParams], token_chars: float, max_bytes: int) -> None:
    """A 400 up front for a non-streaming request whose response could exceed `max_bytes`:
    every sample at max_tokens, each token of the mean length, with its logprob entries."""
    estimate = sum(_response_bytes(p, token_chars) for p in params)
    if estimate > max_bytes:
        raise APIError(
            400,
            f"The response to this request could take about {estimate / 2**20:.0f} MiB, more than this server's "
            f"{max_bytes / 2**20:.0f} MiB for a response that is not streamed. Set stream to true, or lower "
            "max_tokens, n or the number of logprobs.",
            param="stream",
        )


def _response_bytes(params: SamplingParams, token_chars: float) -> int:
    per_token = token_chars
    if params.logprobs is not None:
        per_entry = LOGPROB_ENTRY_BYTES + (1 + BYTES_LIST_PER_CHAR) * token_chars
        per_token += (params.logprobs + 1) * per_entry
    return int(params.n * params.max_tokens * per_token)


def clipped(value: object, max_chars: int) -> str:
    """A value for a log line: its text (JSON for lists), at most `max_chars` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= max_chars else f"{text[:max_chars]}... ({len(text)} characters)"


def text_fields(value: object, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted path, text) for every string in a JSON-like value."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from text_fields(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from text_fields(item, f"{path}.{i}" if path else str(i))


def check_unicode(body: dict) -> None:
    """A lone surrogate (JSON allows "\\ud800") is not text any tokenizer can take, nor text a
    response can echo: a 400, in a value or in a field name."""
    for path, text, is_key in _texts_and_keys(body, ""):
        if text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            code_point = f"U+{ord(text[exc.start]):04X}"
            what = f"a field name in {path or 'the body'}" if is_key else path
            raise APIError(
                400, f"{what} is not valid Unicode: it contains the lone surrogate {code_point}.", param=path or None
            ) from None


def _texts_and_keys(value: object, path: str) -> Iterator[tuple[str, str, bool]]:
    """(path, text, is a key) for every string and object key, a key before its value (so
    that the path of a reported text holds only keys already checked)."""
    if isinstance(value, str):
        yield path, value, False
    elif isinstance(value, dict):
        for key, item in value.items():
            yield path, key, True
            yield from _texts_and_keys(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _texts_and_keys(item, f"{path}.{i}" if path else str(i))


def check_prompt_chars(body: dict, prompt_field: str, max_chars: int, max_model_len: int) -> None:
    """Reject a prompt whose character count alone proves it is longer than max_model_len
    tokens. `prompt` may be a list of prompts (each is checked); `messages` is one prompt."""
    prompt = body.get(prompt_field)
    prompts = prompt if prompt_field == "prompt" and isinstance(prompt, list) else [prompt]
    for one in prompts:
        chars = sum(len(text) for _, text in text_fields(one))
        if chars > max_chars:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens, which cannot hold {chars} "
                f"characters (at most {max_chars}). Please reduce the length of the {prompt_field}.",
                param=prompt_field,
                code="context_length_exceeded",
            )
