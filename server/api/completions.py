"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.errors import APIError
from server.api.limits import check_response_size
from server.api.protocol import CompletionRequest, new_id, now
from server.api.sampling import check_stream_options, check_token_ids, output_options, sampling_params
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
from server.api.structured import compile_constraint, request_constraint


def tokenize_prompts(ctx: ServingContext, req: CompletionRequest) -> list[list[int]]:
    """Text prompts are tokenized; token-id prompts (one list, or a list of lists) are checked."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [ctx.tokenizer.encode(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [ctx.tokenizer.encode(p) for p in prompt]  # type: ignore[arg-type]
    prompts = [list(p) for p in prompt] if isinstance(prompt[0], list) else [list(prompt)]  # type: ignore[arg-type]
    for ids in prompts:
        check_token_ids(ctx, ids, "prompt")
    return prompts


def legacy_logprobs(ctx: ServingContext, entries: list[dict], offset: int) -> dict:
    text = ctx.token_texts.text
    tokens = [text(e["token_id"]) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{text(t): lp for t, lp in e["top"]} for e in entries],
        "text_offset": offsets,
    }


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request):
    started = time.monotonic()
    check_stream_options(req)
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
    prompts = await ctx.run_tokenizer(tokenize_prompts, ctx, req)
    limits = check_request(ctx, req, prompts)
    constraint = request_constraint(req)
    num = len(prompts) * req.n
    spec, grammars = await compile_constraint(ctx, constraint, num) if constraint else (None, None)
    params = [sampling_params(ctx, req, limit, req.logprobs, spec) for limit in limits]
    if not req.stream:
        check_response_size(params, ctx.mean_token_chars, ctx.max_response_bytes)
    request_id = new_id("cmpl")
    events = choice_events(ctx, request_id, prompts, params, output_options(req), grammars)
    texts = await ctx.run_tokenizer(ctx.tokenizer.batch_decode, prompts) if req.echo else [""] * len(prompts)
    echo = [text for text in texts for _ in range(req.n)]
    head = {
        "id": request_id,
        "object": "text_completion",
        "created": now(),
        "model": ctx.model_name,
        "system_fingerprint": ctx.fingerprint,
    }
    if req.stream:
        body = _stream(ctx, req, head, prompts, echo, await admitted(raw, events), started)
        return StreamingResponse(body, media_type="text/event-stream")
    texts, entries, finish, generated = await until_disconnect(raw, collect_choices(events, num))
    choices = [
        {
            "index": i,
            "text": echo[i] + texts[i],
            "logprobs": legacy_logprobs(ctx, entries[i], len(echo[i])) if req.logprobs is not None else None,
            "finish_reason": finish[i],
        }
        for i in range(num)
    ]
    log_request(
        ctx,
        request_id,
        "completions",
        started,
        prompt_tokens=sum(map(len, prompts)),
        completion_tokens=generated,
        finish_reasons=finish,
        user=req.user,
        prompt=req.prompt,
    )
    return JSONResponse({**head, "choices": choices, "usage": usage(prompts, generated)})


def _stream(ctx, req, head, prompts, echo, events, started: float) -> AsyncIterator[str]:
    offsets = [len(e) for e in echo]

    def choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def render(event: ChoiceEvent) -> list[dict]:
        logprobs = None
        if req.logprobs is not None:
            logprobs = legacy_logprobs(ctx, event.logprobs, offsets[event.index])
        offsets[event.index] += len(event.text)
        return [choice(event.index, event.text, event.finish_reason, logprobs)]

    opening = [choice(i, text, None, None) for i, text in enumerate(echo) if text]
    return stream_sse(
        ctx, "completions.stream", head, prompts, events, req.stream_options, started, req.user, opening, render
    )
