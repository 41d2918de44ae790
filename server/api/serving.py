"""What chat and completions share: request checks, admission, tokenization off the event
loop, one merged stream of choice events over one or more engine requests, disconnect
handling and SSE framing."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from server.api.detokenize import OutputOptions, TextTracker, TokenTexts
from server.api.errors import APIError, error_body
from server.api.limits import clipped, current_admission, mean_token_chars, prompt_char_limit
from server.api.protocol import RequestLimits, SamplingFields, StreamOptions, now
from server.engine.async_engine import AsyncEngine
from server.engine.request import SamplingParams
from server.engine.streams import EngineDeadError, EngineShuttingDownError, SequenceDelta, StreamStalledError

if TYPE_CHECKING:
    from server.engine.structured import GrammarState

logger = logging.getLogger("logquant.requests")
T = TypeVar("T")
# Deltas per sample a prompt's pump may put ahead of the consumer; past that it stops taking
# from the engine, which then pauses the request (see server.engine.streams).
MERGED_QUEUE_PER_SAMPLE = 4


@dataclass
class ServingContext:
    engine: AsyncEngine
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    max_model_len: int
    max_waiting_requests: int
    fingerprint: str  # names the KV policy, e.g. "logquant-fp192-g32"
    vocab_width: int  # token ids are in [0, vocab_width): the tokenizer's and the model's
    max_sequences: int  # per request (prompts x n); never more than max_waiting_requests
    max_response_bytes: int = 32 * 2**20  # non-streaming responses estimated larger are refused
    log_prompts: bool = False
    max_log_len: int = 1000  # characters of a logged prompt or user field
    created: int = field(default_factory=now)  # the model card's `created`: when the model loaded
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)  # from the generation config
    # one thread: tokenization and chat templates run off the event loop, one at a time
    tokenizer_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "tokenizer"))
    max_prompt_chars: int = field(init=False)  # longer text cannot fit in max_model_len tokens
    token_texts: TokenTexts = field(init=False)  # logprob text of each token id, decoded once
    mean_token_chars: float = field(init=False)  # for estimates of a response's size

    def __post_init__(self) -> None:
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, self.max_model_len)
        self.mean_token_chars = mean_token_chars(self.tokenizer)
        self.token_texts = TokenTexts(self.tokenizer)
        self.max_sequences = min(self.max_sequences, self.max_waiting_requests)

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(self.max_model_len, self.max_sequences)

    async def run_tokenizer(self, fn: Callable[..., T], *args: Any) -> T:
        """Run tokenization or chat templating in the tokenizer thread, not on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, functools.partial(fn, *args))


@dataclass
class ChoiceEvent:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict]  # {"token_id", "logprob", "top": [(id, logprob)]} for this event's tokens
    finish_reason: str | None


@dataclass
class Choice:
    """Accumulated state of one choice (a sample of one prompt)."""

    index: int
    tracker: TextTracker
    finish_reason: str | None = None

    def on_delta(self, delta: SequenceDelta) -> ChoiceEvent | None:
        if self.finish_reason is not None or delta.token_id is None:
            return None  # stopped on a stop string; the engine is aborting the rest
        text = self.tracker.add(delta.token_id, stop_token=delta.finish_reason == "stop")
        entry = [{"token_id": delta.token_id, **delta.logprob}] if delta.logprob else []
        if self.tracker.stopped:
            self.finish_reason = "stop"
        elif delta.finish_reason is not None:
            text += self.tracker.finish()
            self.finish_reason = "length" if delta.finish_reason == "length" else "stop"
        return ChoiceEvent(self.index, text, [delta.token_id], entry, self.finish_reason)


def check_request(ctx: ServingContext, req: SamplingFields, prompts: list[list[int]]) -> list[int]:
    """Model and context length checks; returns max_tokens per prompt."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.model != ctx.model_name:
        raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
    limits = []
    for ids in prompts:
        if not ids:
            raise APIError(400, "The prompt is empty after tokenization.", param="prompt")
        requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
        max_tokens = requested or ctx.max_model_len - len(ids)
        if len(ids) + max_tokens > ctx.max_model_len or max_tokens < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx.max_model_len} tokens. However, you requested "
                f"{len(ids) + max(max_tokens, 0)} tokens ({len(ids)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages" if hasattr(req, "messages") else "prompt",
                code="context_length_exceeded",
            )
        limits.append(max_tokens)
    return limits


async def choice_events(
    ctx: ServingContext,
    request_id: str,
    prompts: list[list[int]],
    params: list[SamplingParams],
    output: OutputOptions,
    grammars: list[GrammarState] | None = None,
) -> AsyncIterator[ChoiceEvent]:
    """Run every prompt (n samples each) and yield choice events as tokens arrive; `grammars`:
    the matchers of a structured request, n per prompt. Closing this iterator aborts whatever
    is still running."""
    n = params[0].n
    choices = [Choice(i, TextTracker(ctx.tokenizer, output)) for i in range(len(prompts) * n)]
    queue: asyncio.Queue = asyncio.Queue(maxsize=MERGED_QUEUE_PER_SAMPLE * n)  # bounded: backpressure
    admission = current_admission.get()

    async def pump(i: int) -> None:
        try:
            states = grammars[i * n : (i + 1) * n] if grammars else None
            async for delta in ctx.engine.generate(f"{request_id}-p{i}", prompts[i], params[i], admission, states):
                await queue.put((i, delta))
        except Exception as exc:  # forwarded to the consumer, which raises it
            await queue.put((i, exc))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    try:
        done = 0
        while done < len(tasks):
            i, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, Exception):
                raise _as_api_error(item, request_id)
            else:
                choice = choices[i * n + item.index]
                event = choice.on_delta(item)
                if event is not None and choice.tracker.stopped and item.finish_reason is None:
                    ctx.engine.abort_sample(f"{request_id}-p{i}", item.index)
                if event is not None:
                    yield event
    finally:
        for task in tasks:
            task.cancel()


async def collect_choices(
    events: AsyncIterator[ChoiceEvent], num: int
) -> tuple[list[str], list[list[dict]], list, int]:
    """Non-streaming: run `events` to the end; per choice text, logprob entries and finish
    reason, plus the number of generated tokens."""
    texts, entries, finish, generated = [""] * num, [[] for _ in range(num)], [None] * num, 0
    async for event in events:
        texts[event.index] += event.text
        entries[event.index] += event.logprobs
        finish[event.index] = event.finish_reason or finish[event.index]
        generated += len(event.token_ids)
    return texts, entries, finish, generated


def _as_api_error(exc: Exception, request_id: str) -> APIError:
    """The client's view of an engine error: our own messages for its request's faults and
    for shutdown; for anything internal a generic message with the request id, whose
    traceback is in the log."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineShuttingDownError):
        return APIError(503, "The server is shutting down; retry on another instance.", code="server_shutting_down")
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine is not running.", code="engine_dead")
    if isinstance(exc, StreamStalledError):
        return APIError(408, "The client read nothing for too long; the request was aborted.", code="stream_stalled")
    if isinstance(exc, ValueError):  # raised by the engine on admission for this request
        return APIError(400, str(exc))
    logger.error("request %s failed", request_id, exc_info=exc)
    return APIError(
        500, f"The server had an error while processing your request (request id {request_id}).", code="internal_error"
    )


async def until_disconnect(raw: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await raw.is_disconnected():
                raise APIError(499, "client disconnected")
    finally:
        task.cancel()


def log_request(ctx: ServingContext, request_id: str, kind: str, started: float, **fields: object) -> None:
    """One log line per request; the prompt (with --log-prompts) and user at most --max-log-len characters."""
    record = {"request_id": request_id, "endpoint": kind, "duration_s": round(time.monotonic() - started, 4)}
    for key, value in fields.items():
        if key in ("prompt", "user"):
            if value is not None and (key == "user" or ctx.log_prompts):
                record[key] = clipped(value, ctx.max_log_len)
        else:
            record[key] = value
    logger.info("request done", extra={"fields": record})


def usage(prompts: list[list[int]], num_generated: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": num_generated,
        "total_tokens": prompt_tokens + num_generated,
    }


async def stream_sse(
    ctx: ServingContext,
    endpoint: str,
    head: dict,
    prompts: list[list[int]],
    events: AsyncIterator[ChoiceEvent],
    stream_options: StreamOptions | None,
    started: float,
    user: str | None,
    opening: list[dict],
    render: Callable[[ChoiceEvent], list[dict]],
) -> AsyncIterator[str]:
    """SSE framing shared by chat and completions: the `opening` choices, then `render(event)`
    choices per event, the usage chunk if asked, an error event on failure, `[DONE]`."""
    include_usage = stream_options is not None and stream_options.include_usage
    continuous = include_usage and stream_options.continuous_usage_stats  # type: ignore[union-attr]
    generated = 0

    def usage_field() -> dict:  # usage so far on every chunk with continuous_usage_stats
        return {"usage": usage(prompts, generated) if continuous else None} if include_usage else {}

    try:
        for choice in opening:
            yield sse({**head, "choices": [choice], **usage_field()})
        async for event in events:
            generated += len(event.token_ids)
            for choice in render(event):
                yield sse({**head, "choices": [choice], **usage_field()})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompts, generated)})
    except APIError as err:
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        await events.aclose()
        log_request(
            ctx,
            head["id"],
            endpoint,
            started,
            prompt_tokens=sum(map(len, prompts)),
            completion_tokens=generated,
            user=user,
        )
    yield sse("[DONE]")


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
