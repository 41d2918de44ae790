"""Tool-call parsing of whole outputs and of streamed pieces (every way of cutting the text
into pieces gives the same calls and content)."""

import json

import pytest

from server.api.tool_calls import ToolCallStream, parse_call_json, parse_hermes, parse_output

HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
    '<tool_call>{"name": "noop", "arguments": {}}</tool_call>'
)
REQUIRED = '[{"name": "a", "parameters": {"x": [1, {"y": "}\\"{"}]}}, {"name": "b", "parameters": {}}]'


def parse_required(text: str) -> list[dict] | None:
    """The oracle: the JSON list of {"name", "parameters"} objects that tool_choice "required"
    forces, parsed whole (the server parses it as a stream: `ToolCallStream`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list):
        return None
    calls = [parse_call_json(json.dumps(item), "parameters") for item in value]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


def functions(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_whole_output() -> None:
    content, calls = parse_hermes(HERMES)
    assert content == "Let me check.\n\n"
    assert functions(calls) == [("get_weather", {"city": "Zürich"}), ("noop", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize(
    "text,content,names",
    [
        ("plain answer", "plain answer", []),
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
        ('<tool_call>{"name": "f", "arguments": {"a": 1}}', None, ["f"]),  # cut before its end tag
        ('  <tool_call>{"name": "f"}</tool_call>\n', None, ["f"]),  # no arguments: {}
    ],
)
def test_hermes_edge_cases(text: str, content: str | None, names: list[str]) -> None:
    got_content, calls = parse_hermes(text)
    assert got_content == content and [c["function"]["name"] for c in calls] == names


def test_required_and_named_outputs() -> None:
    assert functions(parse_required(REQUIRED)) == [("a", {"x": [1, {"y": '}"{'}]}), ("b", {})]
    assert parse_required('[{"name": "a", "parameters": {"x": 1}}, {"name"') is None  # cut: not a list
    assert parse_output("required", "[{", None) == ("[{", [])
    content, (named,) = parse_output("named", '{"q": 1}', "search")
    assert content is None and named["function"] == {"name": "search", "arguments": '{"q": 1}'}
    assert parse_output("none", "text", None) == ("text", [])


def streamed(mode: str, text: str, step: int, name: str | None = None) -> tuple[str, list[dict]]:
    """Feed `text` in pieces of `step` characters; merge the deltas as a client would."""
    parser = ToolCallStream(mode, name)  # type: ignore[arg-type]
    deltas = [d for i in range(0, len(text), step) for d in parser.feed(text[i : i + step])] + parser.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            merged = calls.setdefault(part["index"], {"function": {"name": "", "arguments": ""}})
            merged["id"] = part.get("id", merged.get("id"))
            merged["function"]["name"] += part.get("function", {}).get("name", "")
            merged["function"]["arguments"] += part.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_stream_matches_whole_output(step: int) -> None:
    content, calls = streamed("auto", HERMES, step)
    assert content == "Let me check.\n\n" and functions(calls) == functions(parse_hermes(HERMES)[1])
    assert functions(streamed("required", REQUIRED, step)[1]) == functions(parse_required(REQUIRED))
    assert streamed("named", '{"q": [1, 2]}', step, "search")[1][0]["function"] == {
        "name": "search",
        "arguments": '{"q": [1, 2]}',
    }
    assert streamed("none", "<tool_call>x", step) == ("<tool_call>x", [])


def test_stream_holds_back_only_a_possible_tag() -> None:
    parser = ToolCallStream("auto")
    assert parser.feed("Hi <tool") == [{"content": "Hi "}]
    assert parser.feed("bar>") == [{"content": "<toolbar>"}]
    assert parser.feed("<tool_call>{") == []
    assert parser.finish() == [{"content": "<tool_call>{"}]  # an unclosed block that is no call
    assert parser.calls == 0


def test_stream_named_call_starts_with_its_name() -> None:
    parser = ToolCallStream("named", "search")
    first = parser.feed("")
    assert first[0]["tool_calls"][0]["function"] == {"name": "search", "arguments": ""}
    assert parser.feed('{"q"') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"q"'}}]}]
    assert parser.calls == 1


def test_required_stream_with_nothing_parsed_is_content() -> None:
    content, calls = streamed("required", '[{"name": "a", "param', 4)
    assert content == '[{"name": "a", "param' and calls == []


def test_auto_keeps_one_call_without_parallel_tool_calls() -> None:
    content, calls = parse_output("auto", HERMES, None, max_calls=1)
    assert content == "Let me check.\n\n" and [c["function"]["name"] for c in calls] == ["get_weather"]
    parser = ToolCallStream("auto", max_calls=1)
    deltas = parser.feed(HERMES) + parser.finish()
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["get_weather"]
    assert "".join(d.get("content", "") for d in deltas) == "Let me check.\n\n" and parser.calls == 1
