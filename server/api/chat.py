"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.chat_template import render_chat
from server.api.errors import APIError
from server.api.limits import check_response_size
from server.api.protocol import ChatCompletionRequest, new_id, now
from server.api.sampling import check_stream_options, output_options, sampling_params
from server.api.serving import (
    ChoiceEvent,
    ServingContext,
    check_request,
    choice_events,
    collect_choices,
    log_request,
    stream_sse,
    until_disconnect,
    usage,
)
from server.api.stream_start import admitted
from server.api.structured import Constraint, compile_constraint, request_constraint, tool_constraint
from server.api.tools import ToolPlan, assistant_message, plan_tools


def logprob_entries(ctx: ServingContext, entries: list[dict]) -> list[dict]:
    texts = ctx.token_texts

    def one(token_id: int, logprob: float) -> dict:
        return {"token": texts.text(token_id), "logprob": logprob, "bytes": list(texts.bytes(token_id))}

    return [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]} for e in entries]


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    started = time.monotonic()
    check_stream_options(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    plan = await ctx.run_tokenizer(plan_tools, req, ctx.tokenizer)  # may render the template once
    constraint = _constraint(req, plan)
    spec, grammars = await compile_constraint(ctx, constraint, req.n) if constraint else (None, None)
    prompt = await ctx.run_tokenizer(render_chat, ctx.tokenizer, req.messages, True, False, plan.tools)
    (max_tokens,) = check_request(ctx, req, [prompt])
    params = sampling_params(ctx, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, spec)
    if not req.stream:
        check_response_size([params], ctx.mean_token_chars, ctx.max_response_bytes)
    request_id = new_id("chatcmpl")
    events = choice_events(ctx, request_id, [prompt], [params], output_options(req), grammars)
    head = {"id": request_id, "created": now(), "model": ctx.model_name, "system_fingerprint": ctx.fingerprint}
    if req.stream:
        body = _stream(ctx, req, plan, head, prompt, await admitted(raw, events), started)
        return StreamingResponse(body, media_type="text/event-stream")
    texts, logprobs, finish, generated = await until_disconnect(raw, collect_choices(events, req.n))
    choices = []
    for i in range(req.n):
        message, finish[i] = assistant_message(plan, texts[i], finish[i])
        entries = {"content": logprob_entries(ctx, logprobs[i])} if req.logprobs else None
        choices.append({"index": i, "message": message, "logprobs": entries, "finish_reason": finish[i]})
    log_request(
        ctx,
        request_id,
        "chat",
        started,
        prompt_tokens=len(prompt),
        completion_tokens=generated,
        finish_reasons=finish,
        user=req.user,
        prompt=[m.text() for m in req.messages],
    )
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage([prompt], generated)})


def _constraint(req: ChatCompletionRequest, plan: ToolPlan) -> Constraint | None:
    """The output constraint: a forced tool call's schema, or the request's own; not both."""
    constraint = request_constraint(req)
    if constraint is not None and plan.mode != "none":
        raise APIError(400, f"{constraint[1]} cannot be combined with tool calls", param=constraint[1])
    return tool_constraint(plan.schema) if plan.schema is not None else constraint


def _stream(ctx, req, plan: ToolPlan, head, prompt, events, started: float) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    parsers = [plan.stream_parser() for _ in range(req.n)]

    def choice(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def render(event: ChoiceEvent) -> list[dict]:
        parser = parsers[event.index]
        logprobs = {"content": logprob_entries(ctx, event.logprobs)} if req.logprobs else None
        deltas = parser.feed(event.text) + (parser.finish() if event.finish_reason is not None else [])
        if not deltas and logprobs:
            deltas = [{"content": ""}]
        out = [choice(event.index, delta, None, logprobs if k == 0 else None) for k, delta in enumerate(deltas)]
        if event.finish_reason is not None:
            finish = "tool_calls" if parser.calls and event.finish_reason == "stop" else event.finish_reason
            out.append(choice(event.index, {}, finish))
        return out

    opening = [choice(i, {"role": "assistant", "content": ""}) for i in range(req.n)]
    return stream_sse(
        ctx, "chat.stream", head, [prompt], events, req.stream_options, started, req.user, opening, render
    )
