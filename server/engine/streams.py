"""What flows between the asyncio side and the engine thread, per request: the deltas, the
errors, the admission reservation, and the request's stream with its flow control.

Flow control: the engine thread counts the deltas it sends to a request (`sent`), the event
loop counts those `generate()` has handed on (`taken`). A request whose consumer falls
`buffer_limit` deltas behind (a streaming client that stops reading: its socket, then the SSE
generator, then the merged choice queue fill up) has its running sequences paused; they run
again once the consumer is back under half the limit, or the request is aborted with
StreamStalledError if it stays paused for `stall_timeout` seconds. Each counter has one writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.engine.request import SamplingParams, SequenceState

if TYPE_CHECKING:
    from server.engine.core import EngineCore
    from server.engine.structured import GrammarState


@dataclass(frozen=True)
class SequenceDelta:
    index: int  # sample index within the request
    token_id: int | None  # None on the delta that reports an aborted sample
    logprob: dict | None  # {"logprob": float, "top": [(id, logprob), ...]}
    finish_reason: str | None  # set on the last delta of this sample
    sequence: SequenceState  # read-only view for timings and counts


class EngineDeadError(RuntimeError):
    pass


class EngineShuttingDownError(EngineDeadError):
    """The server is shutting down: the request was not (or no longer) served."""


class EngineStepError(RuntimeError):
    """A step failed for a reason internal to the server; the cause is chained and logged."""


class StreamStalledError(RuntimeError):
    """The client stopped reading: the request stayed paused past the stall timeout."""


class QueueFullError(RuntimeError):
    pass


class Admission:
    """Room reserved in the waiting queue for `held` sequences of one request. `generate`
    releases a request's share once it is queued; `release()` frees whatever is left (the
    request failed before reaching the engine). Used from the event loop only."""

    def __init__(self, give_back: Callable[[int], None], held: int) -> None:
        """`give_back(count)`: return `count` reserved places to the engine's count."""
        self.give_back, self.held = give_back, held

    def release(self, count: int | None = None) -> None:
        count = self.held if count is None else min(count, self.held)
        self.held -= count
        self.give_back(count)


@dataclass
class RequestStream:
    """One request between `generate()` and the engine thread."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # deltas and errors, put by the engine thread through the loop
    grammars: list[GrammarState] | None = None  # one matcher per sample, built off the engine thread
    buffer_limit: int = 0  # deltas sent and not yet taken before the request pauses; 0: never
    sent: int = 0  # deltas sent (written by the engine thread)
    taken: int = 0  # deltas handed on by generate() (written by the event loop)
    paused_since: float | None = None  # when its sequences were paused (engine thread)
    wake_asked: bool = False  # generate() asked the engine thread to look at it (event loop)

    @property
    def unread(self) -> int:
        return self.sent - self.taken

    def over_limit(self) -> bool:
        return self.buffer_limit > 0 and self.unread >= self.buffer_limit

    def drained(self) -> bool:
        """Back under half the limit: a paused request may run again."""
        return self.unread <= self.buffer_limit // 2

    def set_paused(self, core: EngineCore, paused_since: float | None) -> None:
        """Pause the request's running sequences (the scheduler skips them; they keep their
        pages), or let its paused ones run again."""
        core.set_paused(self.request_id, self.params.n, paused=paused_since is not None)
        self.paused_since, self.wake_asked = paused_since, False
