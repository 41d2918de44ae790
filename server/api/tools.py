"""What a chat request's `tools` and `tool_choice` mean for one request: whether the chat
template sees the tools, how the output is parsed, and which JSON schema forces a call."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from server.api.tool_calls import Mode, ToolCallStream, parse_output

_PROBE_NAME = "logquant_probe_tool"
_PROBE = [{"type": "function", "function": {"name": _PROBE_NAME, "description": "probe", "parameters": {}}}]
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    mode: Mode  # none: plain text; auto: Hermes calls parsed; named/required: a call is forced
    tools: list[dict] | None = None  # what the chat template gets
    name: str | None = None  # the forced function (named)
    schema: dict | None = None  # the JSON schema that forces the call (named, required)
    max_calls: int | None = None  # 1 with parallel_tool_calls false

    def stream_parser(self) -> ToolCallStream:
        return ToolCallStream(self.mode, self.name, self.max_calls)


@functools.lru_cache(maxsize=8)
def template_renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template shows the model the tools it is given (a probe render)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=_PROBE, tokenize=False)
    except Exception:  # a template that cannot take tools does not render them
        return False
    return _PROBE_NAME in str(text)


def plan_tools(req: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase) -> ToolPlan:
    if not req.tools:
        if req.tool_choice not in (None, "none") or req.parallel_tool_calls is not None:
            field = "tool_choice" if req.tool_choice not in (None, "none") else "parallel_tool_calls"
            raise APIError(400, f"{field} needs tools", param=field)
        return ToolPlan("none")
    choice = req.tool_choice or "auto"
    renders = template_renders_tools(tokenizer)
    shown = [tool.model_dump(exclude_none=True) for tool in req.tools] if renders else None
    if choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        if not renders:
            raise APIError(
                400,
                'This model\'s chat template does not render tools, so tool_choice "auto" is not '
                'available; use "required", a named function or "none"',
                param="tool_choice",
            )
        return ToolPlan("auto", shown, max_calls=1 if req.parallel_tool_calls is False else None)
    if isinstance(choice, NamedToolChoice):
        tool = _find(req.tools, choice.function.name)
        return ToolPlan("named", shown, tool.function.name, tool.function.parameters or NO_ARGUMENTS)
    return ToolPlan("required", shown, schema=_required_schema(req.tools, req.parallel_tool_calls is not False))


def _find(tools: list[Tool], name: str) -> Tool:
    for tool in tools:
        if tool.function.name == name:
            return tool
    raise APIError(400, f"tool_choice names the function `{name}`, which is not in tools", param="tool_choice")


def _required_schema(tools: list[Tool], parallel: bool) -> dict:
    """A JSON list of {"name", "parameters"} objects, one of the tools each (vLLM's form)."""
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": t.function.parameters or NO_ARGUMENTS,
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    return schema | ({} if parallel else {"maxItems": 1})


def assistant_message(plan: ToolPlan, text: str, finish: str | None) -> tuple[dict, str | None]:
    """A finished choice's message (content and tool calls) and its finish reason: "tool_calls"
    when it made calls and stopped on its own."""
    content, calls = parse_output(plan.mode, text, plan.name, plan.max_calls)
    message = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})
    return message, "tool_calls" if calls and finish == "stop" else finish
