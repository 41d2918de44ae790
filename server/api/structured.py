"""A request's output constraint: `response_format`, vLLM's `structured_outputs` and `guided_*`
fields, or a forced tool call, as one StructuredSpec, compiled off the event loop (an invalid
schema, regex or grammar is a 400 naming the field) with one grammar matcher per sequence."""

from __future__ import annotations

import asyncio

from server.api.errors import APIError
from server.api.protocol import SamplingFields, StructuredOutputs
from server.api.serving import ServingContext
from server.engine.request import SamplingParamsError, StructuredSpec
from server.engine.structured import GrammarState, StructuredSpecError, grammar_states

Constraint = tuple[StructuredSpec, str]  # the spec and the request field that set it


def request_constraint(req: SamplingFields) -> Constraint | None:
    """The one constraint the request sets, if any (two or more is a 400)."""
    found = [c for c in (_response_format(req), _structured_outputs(req.structured_outputs), *_guided(req)) if c]
    if len(found) > 1:
        raise APIError(
            400, f"set one structured-output constraint, not both {found[0][1]} and {found[1][1]}", param=found[1][1]
        )
    return found[0] if found else None


def tool_constraint(schema: dict) -> Constraint:
    return _build(lambda: StructuredSpec.json_schema(schema), "tools")


async def compile_constraint(
    ctx: ServingContext, constraint: Constraint, num_sequences: int
) -> tuple[StructuredSpec, list[GrammarState]]:
    """Compile (cached by spec) and build a matcher for each of the request's sequences in a
    worker thread: the engine thread only hits the cache and fills masks."""
    spec, field = constraint
    try:
        states = await asyncio.to_thread(grammar_states, spec, ctx.tokenizer, num_sequences)
    except StructuredSpecError as exc:
        raise APIError(400, f"{field}: {exc}", param=field) from exc
    return spec, states


def _build(make: object, field: str) -> Constraint:
    try:
        return make(), field  # type: ignore[operator]
    except SamplingParamsError as exc:  # a schema given as text that is not JSON
        raise APIError(400, f"{field}: {exc}", param=field) from exc


def _response_format(req: SamplingFields) -> Constraint | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise APIError(400, "json_schema goes with type json_schema", param="response_format")
        return None
    if fmt.type == "json_object":
        return StructuredSpec.json_object(), "response_format"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format of type json_schema needs json_schema.schema", param="response_format")
    schema = fmt.json_schema.schema_
    return _build(lambda: StructuredSpec.json_schema(schema), "response_format")


def _structured_outputs(options: StructuredOutputs | None) -> Constraint | None:
    if options is None:
        return None
    given = {name: value for name, value in options.model_dump(by_alias=True).items() if value not in (None, False)}
    if len(given) != 1:
        raise APIError(
            400,
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object",
            param="structured_outputs",
        )
    (name, value), field = next(iter(given.items())), "structured_outputs"
    return _spec(name, value, field)


def _guided(req: SamplingFields) -> list[Constraint | None]:
    fields = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
    return [
        _spec(kind, getattr(req, field), field) for field, kind in fields.items() if getattr(req, field) is not None
    ]


def _spec(kind: str, value: object, field: str) -> Constraint:
    makers = {
        "json": StructuredSpec.json_schema,
        "regex": StructuredSpec.regex,
        "choice": StructuredSpec.choice,
        "grammar": StructuredSpec.grammar,
        "json_object": lambda _: StructuredSpec.json_object(),
    }
    return _build(lambda: makers[kind](value), field)
