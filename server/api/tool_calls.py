"""Tool calls in generated text: Hermes-style `<tool_call>{...}</tool_call>` blocks (tool_choice
"auto"), a forced call's arguments (a named function) or a JSON list of calls ("required"), for
whole outputs and, with `ToolCallStream`, for a stream of text pieces."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Literal

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)
Mode = Literal["none", "auto", "named", "required"]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call(name: str, arguments: str) -> dict:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_call_json(text: str, arguments_key: str = "arguments") -> dict | None:
    """{"name": ..., "arguments": {...}} -> an OpenAI tool call, or None if it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {})
    return call(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))


def parse_hermes(text: str) -> tuple[str | None, list[dict]]:
    """Content outside the tool-call blocks (None if blank) and the calls that parse."""
    calls, content, last = [], [], 0
    for match in _BLOCK.finditer(text):
        parsed = parse_call_json(match.group(1).strip())
        if parsed is None:
            continue  # not a call: it stays in the content
        content.append(text[last : match.start()])
        calls.append(parsed)
        last = match.end()
    rest = "".join(content) + text[last:]
    return (rest if rest.strip() else None), calls


def parse_output(
    mode: Mode, text: str, name: str | None, max_calls: int | None = None
) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished output. A "required" list cut short by max_tokens
    gives the calls it completed, as its stream does. Calls past `max_calls` are dropped."""
    if mode == "named":
        assert name is not None, "a named tool choice has a name"
        return None, [call(name, text)]
    if mode == "required":
        parser = ToolCallStream("required")
        deltas = parser.feed(text) + parser.finish()
        calls = [part for d in deltas for part in d.get("tool_calls", [])]
        return (None, [{k: v for k, v in c.items() if k != "index"} for c in calls]) if calls else (text, [])
    if mode == "auto":
        content, calls = parse_hermes(text)
        return content, calls[:max_calls]
    return text, []


@dataclass
class ToolCallStream:
    """Turns the text pieces of one streamed choice into OpenAI deltas: `content` pieces and
    `tool_calls` entries (a named call streams its arguments; other calls arrive whole)."""

    mode: Mode
    name: str | None = None
    max_calls: int | None = None  # auto: calls past this many are dropped (parallel_tool_calls false)
    calls: int = 0  # tool calls sent so far
    _buffer: str = ""  # auto: text that may still be (part of) a call; required: the current item
    _raw: str = ""  # required: the whole output, sent as content if it holds no call
    _depth: int = 0  # required: JSON nesting depth
    _in_string: bool = False
    _escaped: bool = False
    _started: bool = False

    def feed(self, text: str) -> list[dict]:
        if self.mode == "none":
            return [{"content": text}] if text else []
        if self.mode == "named":
            return self._named(text)
        if self.mode == "required":
            self._raw += text
            return [delta for ch in text for delta in self._required_char(ch)]
        return self._hermes(text)

    def finish(self) -> list[dict]:
        """The output ended: flush what is held back (an unclosed call is a call if it parses)."""
        if self.mode == "required":
            return [{"content": self._raw}] if self._raw and not self.calls else []
        rest, self._buffer = self._buffer, ""
        if self.mode != "auto" or not rest:
            return []
        if rest.startswith(OPEN) and (parsed := parse_call_json(rest[len(OPEN) :].strip())) is not None:
            return self._whole(parsed)
        return [{"content": rest}]

    def _named(self, text: str) -> list[dict]:
        deltas = []
        if not self._started:
            self._started, self.calls = True, 1
            deltas.append({"tool_calls": [{"index": 0, **call(self.name or "", "")}]})
        if text:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        return deltas

    def _whole(self, parsed: dict) -> list[dict]:
        if self.max_calls is not None and self.calls >= self.max_calls:
            return []
        self.calls += 1
        return [{"tool_calls": [{"index": self.calls - 1, **parsed}]}]

    def _required_char(self, ch: str) -> list[dict]:
        """Scan the JSON list; each complete top-level object is one call."""
        if self._depth >= 2 or (self._depth == 1 and ch == "{"):
            self._buffer += ch  # inside (or opening) one item of the list
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
            return []
        if ch == '"':
            self._in_string = True
        elif ch in "[{":
            self._depth += 1
        elif ch in "]}":
            self._depth -= 1
            if self._depth == 1 and ch == "}":
                item, self._buffer = self._buffer, ""
                parsed = parse_call_json(item, "parameters")
                return self._whole(parsed) if parsed is not None else []
        return []

    def _hermes(self, text: str) -> list[dict]:
        self._buffer += text
        deltas = []
        while self._buffer:
            if self._buffer.startswith(OPEN):
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break  # the call is not complete yet
                block, self._buffer = self._buffer[: end + len(CLOSE)], self._buffer[end + len(CLOSE) :]
                parsed = parse_call_json(block[len(OPEN) : -len(CLOSE)].strip())
                deltas += self._whole(parsed) if parsed is not None else [{"content": block}]
                continue
            start = self._buffer.find(OPEN)
            cut = start if start >= 0 else _safe_prefix(self._buffer)
            if cut == 0:
                break  # the buffer may be the start of "<tool_call>"
            deltas.append({"content": self._buffer[:cut]})
            self._buffer = self._buffer[cut:]
        return deltas


def _safe_prefix(text: str) -> int:
    """Length of `text` that cannot be the start of OPEN."""
    for keep in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
