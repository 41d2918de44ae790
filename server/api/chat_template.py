"""Chat messages (and tools) -> prompt token ids through the model's chat template."""

from __future__ import annotations

import json
import logging

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from server.api.errors import APIError
from server.api.protocol import ChatMessage, ToolCall
from server.api.tool_calls import CLOSE, OPEN
from server.api.tools import template_renders_tools

logger = logging.getLogger(__name__)


def template_messages(messages: list[ChatMessage], renders_tools: bool) -> list[dict]:
    """Messages as chat templates expect them: developer -> system, text parts joined, tool
    calls with their arguments as objects. A template that does not render tools sees an
    assistant's calls as Hermes `<tool_call>` text, so the conversation still reads right."""
    out = []
    for m in messages:
        message = {"role": m.role if m.role != "developer" else "system", "content": m.text()}
        message |= {"name": m.name} if m.name else {}
        message |= {"tool_call_id": m.tool_call_id} if m.tool_call_id else {}
        if m.tool_calls and renders_tools:
            message["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        elif m.tool_calls:
            message["content"] += "".join(f"{OPEN}\n{_hermes_json(c)}\n{CLOSE}" for c in m.tool_calls)
        out.append(message)
    return out


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    tokenize: bool = True,
) -> list[int] | str:
    """The conversation through the model's chat template: token ids, or the text when
    `tokenize` is False."""
    if add_generation_prompt and continue_final_message:
        raise APIError(
            400, "add_generation_prompt and continue_final_message cannot both be true", param="continue_final_message"
        )
    try:
        rendered = tokenizer.apply_chat_template(
            template_messages(messages, template_renders_tools(tokenizer)),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=tokenize,
            return_dict=False,
        )
    except TemplateError as exc:  # the template's own checks on user content (e.g. role order)
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
    except Exception as exc:  # anything else: log it, never show internals to the client
        logger.exception("chat template failed")
        raise APIError(400, "cannot apply the chat template to these messages", param="messages") from exc
    return list(rendered) if tokenize else rendered


def _arguments(call: ToolCall) -> object:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments  # passed on as the client wrote it


def _template_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": _arguments(call)}}


def _hermes_json(call: ToolCall) -> str:
    return json.dumps({"name": call.function.name, "arguments": _arguments(call)})
