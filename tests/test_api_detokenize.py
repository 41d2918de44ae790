"""TextTracker output options and raw token bytes, on the byte-level test tokenizer."""

import pytest
from tiny import byte_tokenizer

from server.api.detokenize import OutputOptions, TextTracker, token_bytes

TOK = byte_tokenizer()
IM_START, IM_END = TOK.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])


def ids(text: str) -> list[int]:
    return TOK.encode(text)


def run(options: OutputOptions, tokens: list[int], last_is_stop_token: bool = False) -> tuple[str, bool]:
    tracker = TextTracker(TOK, options)
    out = ""
    for i, token in enumerate(tokens):
        out += tracker.add(token, stop_token=last_is_stop_token and i == len(tokens) - 1)
        if tracker.stopped:
            return out, True
    return out + tracker.finish(), False


@pytest.mark.parametrize(
    "options,expected",
    [
        (OutputOptions(), "abcd"),
        (OutputOptions(skip_special_tokens=False), "ab <|im_end|> <|im_start|> cd"),
        (OutputOptions(skip_special_tokens=False, spaces_between_special_tokens=False), "ab<|im_end|><|im_start|>cd"),
        (OutputOptions(spaces_between_special_tokens=False), "abcd"),
    ],
)
def test_special_tokens(options: OutputOptions, expected: str) -> None:
    assert run(options, ids("ab") + [IM_END, IM_START] + ids("cd")) == (expected, False)


def test_stop_string_excluded_or_included() -> None:
    tokens = ids("hello world, bye")
    assert run(OutputOptions(stops=("o w",)), tokens) == ("hell", True)
    assert run(OutputOptions(stops=("o w",), include_stop_str_in_output=True), tokens) == ("hello w", True)
    assert run(OutputOptions(stops=("zz", "ld"), include_stop_str_in_output=True), tokens) == ("hello world", True)


def test_included_stop_string_is_not_held_back() -> None:
    tracker = TextTracker(TOK, OutputOptions(stops=("world",), include_stop_str_in_output=True))
    assert [tracker.add(t) for t in ids("a wor")] == ["a", " ", "w", "o", "r"]
    assert tracker.add(ids("l")[0]) == "l" and tracker.add(ids("d")[0]) == "d" and tracker.stopped
    held = TextTracker(TOK, OutputOptions(stops=("world",)))
    assert "".join(held.add(t) for t in ids("a wor")) == "a"  # " wor" may start the stop string


def test_stop_token_text_dropped_unless_included() -> None:
    tokens = ids("abc")
    assert run(OutputOptions(), tokens, last_is_stop_token=True) == ("ab", False)
    assert run(OutputOptions(include_stop_str_in_output=True), tokens, last_is_stop_token=True) == ("abc", False)
    special = OutputOptions(skip_special_tokens=False, include_stop_str_in_output=True)
    assert run(special, ids("ab") + [IM_END], last_is_stop_token=True) == ("ab <|im_end|>", False)


def test_token_bytes_are_raw_bytes() -> None:
    text = "Grüße 🦊"
    tokens = ids(text)
    assert b"".join(token_bytes(TOK, t) for t in tokens) == text.encode()
    assert [token_bytes(TOK, t) for t in ids("ü")] == [b"\xc3", b"\xbc"]
    assert token_bytes(TOK, IM_END) == b"<|im_end|>"
