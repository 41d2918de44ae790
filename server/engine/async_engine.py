"""AsyncEngine: the asyncio front of one engine loop running in a background thread.

`generate()` submits a request and yields `SequenceDelta`s as tokens arrive; closing the
iterator early (client gone) aborts the request and frees its pages at once. Commands
(add, abort) go to the engine thread through a queue, so only that thread touches the core.

Admission: `admit()` reserves room in the waiting queue from the moment the server accepts a
request (while it is still being tokenized); `generate()` turns the reservation into a queued
request. `num_waiting` counts both, so `--max-waiting-requests` holds under a burst.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.engine.core import EngineCore, EngineStats
from server.engine.request import SamplingParams, Sequence

if TYPE_CHECKING:
    from server.engine.structured import GrammarState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceDelta:
    index: int  # sample index within the request
    token_id: int | None  # None on the delta that reports an aborted sample
    logprob: dict | None  # {"logprob": float, "top": [(id, logprob), ...]}
    finish_reason: str | None  # set on the last delta of this sample
    sequence: Sequence  # read-only view for timings and counts


class EngineDeadError(RuntimeError):
    pass


class EngineShuttingDownError(EngineDeadError):
    """The server is shutting down: the request was not (or no longer) served."""


class EngineStepError(RuntimeError):
    """A step failed for a reason internal to the server; the cause is chained and logged."""


class QueueFullError(RuntimeError):
    pass


class Admission:
    """Room reserved in the waiting queue for `held` sequences of one request. `generate`
    releases a request's share once it is queued; `release()` frees whatever is left (the
    request failed before reaching the engine). Used from the event loop only."""

    def __init__(self, engine: AsyncEngine, held: int) -> None:
        self.engine, self.held = engine, held

    def release(self, count: int | None = None) -> None:
        count = self.held if count is None else min(count, self.held)
        self.held -= count
        self.engine._admitted -= count


@dataclass
class _Pending:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    grammars: list[GrammarState] | None = None  # one matcher per sample, built off this thread


class AsyncEngine:
    def __init__(
        self, core: EngineCore, on_step: Callable[[EngineStats, list[Sequence], list[float]], None] | None = None
    ) -> None:
        self.core = core
        self.on_step = on_step
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Pending] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._admitted = 0  # sequences admitted but not yet queued (event loop side)
        self._active: dict[str, _Pending] = {}  # running generate() calls (event loop side)
        self._refusing = False  # set by end_all_requests

    @property
    def num_waiting(self) -> int:
        """Sequences admitted, queued as commands, or waiting in the scheduler."""
        return len(self.core.scheduler.waiting) + self._commands.qsize() + self._admitted

    def admit(self, num_sequences: int, limit: int) -> Admission:
        """Reserve room for a request's sequences, or raise QueueFullError if more than
        `limit` sequences would be waiting."""
        if self.num_waiting + num_sequences > limit:
            raise QueueFullError(f"more than {limit} sequences would be waiting")
        self._admitted += num_sequences
        return Admission(self, num_sequences)

    def end_all_requests(self) -> None:
        """From the event loop, past the shutdown grace period: end every running `generate()`
        now with EngineShuttingDownError (its request is then aborted), even while the engine
        thread is busy with a long step, and refuse new ones."""
        self._refusing = True
        for pending in list(self._active.values()):
            pending.out.put_nowait(EngineShuttingDownError("the server is shutting down"))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def abort_sample(self, request_id: str, index: int) -> None:
        """Stop one sample of a request (e.g. it hit a stop string); the others go on."""
        self._commands.put(("abort_sample", (request_id, index)))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- asyncio side --------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        admission: Admission | None = None,
        grammars: list[GrammarState] | None = None,
    ) -> AsyncIterator[SequenceDelta]:
        if self._refusing:
            raise EngineShuttingDownError("the server is shutting down")
        if self._stopping.is_set():
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        pending = _Pending(request_id, prompt_token_ids, params, loop, asyncio.Queue(), grammars)
        self._commands.put(("add", pending))
        if admission is not None:
            admission.release(params.n)  # now counted by the command queue
        self._active[request_id] = pending
        remaining = params.n
        try:
            while remaining:
                item = await pending.out.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finish_reason is not None
                yield item
        finally:
            self._active.pop(request_id, None)
            if remaining:
                self._commands.put(("abort", request_id))

    # ---- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._drain_commands(block=not self.core.has_work())
            if not self.core.has_work():
                continue
            try:
                updated = self.core.step()
            except Exception as exc:  # a failed step must not hang clients: fail their requests
                logger.exception("engine step failed; aborting requests %s", sorted(self._streams))
                failure = EngineStepError("engine step failed")
                failure.__cause__ = exc
                self._fail_all(failure)
                continue
            self._deliver(updated)
            if self.on_step is not None:
                self.on_step(self.core.stats, [s for s in updated if s.is_finished], self.core.last_step_itl)
        self._fail_all(EngineShuttingDownError("the server is shutting down"))

    def _drain_commands(self, block: bool) -> None:
        try:
            command, arg = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command, arg)
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: str, arg: object) -> None:
        if command == "add":
            self._add(arg)  # type: ignore[arg-type]
        elif command == "abort_sample":
            request_id, index = arg  # type: ignore[misc]
            pending = self._streams.get(request_id)
            seq = self.core.scheduler.abort(f"{request_id}-{index}") if pending else None
            if pending is not None and seq is not None:
                self._send(pending, SequenceDelta(index, None, None, "abort", seq))
                self._close_if_done(pending)
                if self.on_step is not None:
                    self.on_step(self.core.stats, [seq], [])
        elif command == "abort":
            request_id: str = arg  # type: ignore[assignment]
            pending = self._streams.pop(request_id, None)
            if pending is not None:
                aborted = self.core.abort_request(request_id, pending.params.n)
                if self.on_step is not None:
                    self.on_step(self.core.stats, aborted, [])

    def _add(self, pending: _Pending) -> None:
        """Errors go to that request only and never kill the loop: a ValueError is the
        request's fault (a 400 with its message), anything else is internal (a 500)."""
        try:
            seqs = self.core.add_request(pending.request_id, pending.prompt_token_ids, pending.params)
        except ValueError as exc:
            self._send(pending, exc)
            return
        except Exception as exc:
            logger.exception("adding request %s failed", pending.request_id)
            failure = EngineStepError("adding the request failed")
            failure.__cause__ = exc
            self._send(pending, failure)
            return
        for seq, grammar in zip(seqs, pending.grammars or ()):
            seq.grammar = grammar
        self._streams[pending.request_id] = pending

    def _deliver(self, updated: list[Sequence]) -> None:
        finished: dict[str, _Pending] = {}
        for seq in updated:
            pending = self._streams.get(seq.request_id)
            if pending is None:
                continue
            if seq.finish_reason == "error":  # only this request fails; the step's others go on
                self._fail_request(seq.request_id, pending, seq.error)
                continue
            logprob = seq.output_logprobs[-1] if seq.params.logprobs is not None else None
            self._send(pending, SequenceDelta(seq.index, seq.output_token_ids[-1], logprob, seq.finish_reason, seq))
            if seq.is_finished:
                finished[seq.request_id] = pending
        for pending in finished.values():  # after the loop: samples may finish in the same step
            self._close_if_done(pending)

    def _close_if_done(self, pending: _Pending) -> None:
        running = self.core.scheduler.sequences
        if all(f"{pending.request_id}-{i}" not in running for i in range(pending.params.n)):
            self._streams.pop(pending.request_id, None)

    def _fail_request(self, request_id: str, pending: _Pending, error: str | None) -> None:
        logger.error("request %s failed in the engine: %s", request_id, error)
        self._streams.pop(request_id, None)
        self.core.abort_request(request_id, pending.params.n)
        self._send(pending, EngineStepError("engine step failed"))

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, pending in list(self._streams.items()):
            self.core.abort_request(request_id, pending.params.n)
            self._send(pending, exc)
        self._streams.clear()

    @staticmethod
    def _send(pending: _Pending, item: object) -> None:
        try:
            pending.loop.call_soon_threadsafe(pending.out.put_nowait, item)
        except RuntimeError:
            logger.warning("request %s: its event loop is closed", pending.request_id)
