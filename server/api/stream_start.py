"""Start a stream only once the engine has taken the request, so that every error it reports
on admission (a prompt the KV cache can never hold, an engine that is shutting down) is an
HTTP error with its status, never an SSE error event after a 200."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from server.api.serving import ChoiceEvent, until_disconnect


async def admitted(raw: Request, events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[ChoiceEvent]:
    """Wait for the first event (raising the engine's error, or a 499 if the client leaves),
    then return an iterator over all events; closing it closes `events` (aborting the rest)."""
    try:
        first = await until_disconnect(raw, anext(events, None))
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    return _chain(first, events)


async def _chain(first: ChoiceEvent | None, events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[ChoiceEvent]:
    try:
        if first is not None:
            yield first
        async for event in events:
            yield event
    finally:
        await events.aclose()  # type: ignore[attr-defined]
