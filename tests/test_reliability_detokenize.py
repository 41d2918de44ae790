"""Incremental detokenization (issue 10 item 4): one token costs one stream step, never a decode
of the whole output, and the text equals a full decode, also for multi-byte characters."""

import random

import pytest
from tiny import byte_tokenizer
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.api.detokenize import (
    IncrementalDecoder,
    OutputOptions,
    TextTracker,
    WindowDecodeStream,
)

TEXTS = [
    "Hello, world!",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 and 🦊.",
    "中文混合English文本，日本語のテキストと한국어.",
    "Grüße aus Köln — naïve café, œuvre, Ελληνικά, русский.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
]


def decode_tokens(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], options: OutputOptions, added: dict[int, AddedToken]
) -> str:
    """The oracle: decode as HF's Python tokenizers (and vLLM) do: runs of ordinary tokens decoded
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


@pytest.fixture(scope="module")
def default_tokenizer() -> PreTrainedTokenizerBase:
    from logquant.models import DEFAULT_MODEL, resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(DEFAULT_MODEL).directory))


def stream_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], options: OutputOptions | None = None) -> str:
    tracker = TextTracker(tokenizer, options or OutputOptions())
    return "".join(tracker.add(i) for i in ids) + tracker.finish()


@pytest.mark.real_model
@pytest.mark.parametrize("text", TEXTS)
def test_default_model_stream_equals_full_decode(default_tokenizer, text: str) -> None:
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    assert stream_text(default_tokenizer, ids) == default_tokenizer.decode(ids) == text


@pytest.mark.real_model
def test_default_model_random_ids_with_special_tokens(default_tokenizer) -> None:
    """Random ids split characters anywhere (invalid UTF-8 included) and mix in added tokens."""
    rng = random.Random(0)
    added = sorted(default_tokenizer.added_tokens_decoder)
    vocab = len(default_tokenizer)
    for trial in range(40):
        ids = [rng.choice(added) if rng.random() < 0.1 else rng.randrange(vocab) for _ in range(60)]
        options = OutputOptions(skip_special_tokens=trial % 2 == 0, spaces_between_special_tokens=trial % 3 != 0)
        expected = decode_tokens(default_tokenizer, ids, options, dict(default_tokenizer.added_tokens_decoder))
        assert stream_text(default_tokenizer, ids, options) == expected, ids


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_splits_characters_and_holds_them_back(text: str) -> None:
    tok = byte_tokenizer()
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok, OutputOptions())
    pieces = [decoder.add(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_no_decode_of_the_whole_output_per_token() -> None:
    tok = byte_tokenizer()
    calls = []
    original = tok.decode

    def counting_decode(ids, *args, **kwargs):
        calls.append(len(ids))
        return original(ids, *args, **kwargs)

    tok.decode = counting_decode
    ids = tok.encode("中文 and 😀 " * 50)
    assert stream_text(tok, ids) == original(ids)
    assert calls == [len(ids)]  # one decode, when the sample finishes


def test_window_stream_matches_decode() -> None:
    """The fallback for tokenizers without a Rust backend gives the same text."""
    tok = byte_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        stream = WindowDecodeStream()
        assert "".join(stream.step(tok, i) or "" for i in ids) == text


def test_multibyte_stop_string_held_back_until_decided() -> None:
    tok = byte_tokenizer()
    tracker = TextTracker(tok, OutputOptions(stops=("世界",)))
    out = [tracker.add(i) for i in tok.encode("你好世")]
    assert "".join(out) == "你好"  # "世" could still be the start of the stop: held back
    out += [tracker.add(i) for i in tok.encode("界!")]
    assert "".join(out) == "你好" and tracker.stopped
