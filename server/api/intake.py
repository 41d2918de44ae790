"""Request intake: bodies -> protocol models off the event loop, then admission.

A body is read on the event loop (I/O only), then parsed, checked for lone surrogates,
validated and checked for prompt size in the tokenizer thread: everything that costs time in
the size of the body. Validation gets the server's `RequestLimits` as context, so token-id
lists and prompt lists are refused by their length before their elements are looked at.
FastAPI documents the body from `json_body(Model)`; `add_body_schemas` puts the models'
schemas into the OpenAPI components. `accept` then holds room in the waiting queue for the
request's sequences (at most `--max-sequences-per-request` of them) while it is handled.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from server.api.errors import APIError, validation_error
from server.api.limits import admit, check_prompt_chars, check_unicode, refuse_if_full
from server.api.protocol import RequestLimits, sequence_cap_message
from server.api.serving import ServingContext

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# A lone surrogate comes from a \uD800-\uDFFF escape, or from UTF-8-encoded surrogate bytes
# (json.loads decodes bytes with "surrogatepass"); without either the walk is skipped.
SURROGATE_SOURCE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
REF = "#/components/schemas/{model}"


async def read_request(ctx: ServingContext, raw: Request, model: type[M], prompt_fields: tuple[str, ...]) -> M:
    """The request's body as `model`: a 429 first if the waiting queue is already full (nothing
    is read or parsed then), the rest in the tokenizer thread."""
    refuse_if_full(ctx.engine, ctx.max_waiting_requests)
    body = await raw.body()
    content_type = raw.headers.get("content-type")
    limits = ctx.request_limits
    return await ctx.run_tokenizer(
        parse_request, model, body, content_type, limits, prompt_fields, ctx.max_prompt_chars
    )


async def accept(ctx: ServingContext, num_sequences: int, handle: Callable[[], Awaitable[T]]) -> T:
    """Run `handle()` with room for `num_sequences` in the waiting queue (a 400 beyond the
    per-request cap, a 429 if the queue is full), released when it ends."""
    if num_sequences > ctx.max_sequences:
        raise APIError(400, sequence_cap_message(num_sequences, ctx.max_sequences), param="n")
    admission = admit(ctx.engine, num_sequences, ctx.max_waiting_requests)
    try:
        return await handle()
    finally:
        admission.release()


def parse_request(
    model: type[M],
    body: bytes,
    content_type: str | None,
    limits: RequestLimits,
    prompt_fields: tuple[str, ...],
    max_prompt_chars: int,
) -> M:
    """JSON -> `model`, or an APIError (400) saying what is wrong. Blocking: O(body)."""
    data = _json_object(body, content_type)
    if SURROGATE_SOURCE.search(body):
        check_unicode(data)
    try:
        request = model.model_validate(data, context=limits)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None
    for field in prompt_fields:
        check_prompt_chars(data, field, max_prompt_chars, limits.max_model_len)
    return request


def _json_object(body: bytes, content_type: str | None) -> dict[str, Any]:
    if content_type is not None and not _is_json(content_type):
        raise APIError(
            400, f"The body must be JSON (Content-Type: application/json), not {content_type}.", code="invalid_json"
        )
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise APIError(400, f"Invalid JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "Invalid JSON body: the body must be a JSON object.", code="invalid_json")
    return data


def _is_json(content_type: str) -> bool:
    """application/json or application/<anything>+json, as FastAPI accepts."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that reads `model` itself."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def add_body_schemas(openapi: dict, models: list[type[BaseModel]]) -> None:
    """Put the JSON schemas of `models` (and the models they use) into the OpenAPI components."""
    _, definitions = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    openapi.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
