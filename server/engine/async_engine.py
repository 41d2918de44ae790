"""AsyncEngine: the asyncio front of one engine loop running in a background thread.

`generate()` submits a request and yields `SequenceDelta`s as tokens arrive; closing the
iterator early (client gone) aborts the request and frees its pages at once. Commands (add,
abort, wake) go to the engine thread through a queue, so only that thread touches the core,
and only through the core's own methods (it owns the scheduler).

Admission: `admit()` reserves room in the waiting queue from the moment the server accepts a
request (while it is still being tokenized); `generate()` turns the reservation into a queued
request. `num_waiting` counts both, so `--max-waiting-requests` holds under a burst.

Backpressure (see `streams`): a request whose consumer falls `stream_buffer_tokens` per
sample behind is paused, and aborted if it stays paused for `stall_timeout` seconds.

Watchdog: `failure()` says why the engine cannot serve (its thread died, or one step has run
for longer than `step_timeout`); the app then fails every waiting `generate()` with
EngineDeadError (`fail_all_requests`) and stops the process.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from server.engine.core import EngineCore, EngineStats
from server.engine.request import SamplingParams, SequenceState
from server.engine.streams import (
    Admission,
    EngineDeadError,
    EngineShuttingDownError,
    EngineStepError,
    QueueFullError,
    RequestStream,
    SequenceDelta,
    StreamStalledError,
)

if TYPE_CHECKING:
    from server.engine.structured import GrammarState

logger = logging.getLogger(__name__)
IDLE_WAIT_SECONDS = 0.5  # the engine thread waits this long for a command when it has nothing to run


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        on_step: Callable[[EngineStats, list[SequenceState], list[float]], None] | None = None,
        stream_buffer_tokens: int = 0,
        stall_timeout: float = 60.0,
        step_timeout: float | None = None,
    ) -> None:
        """`stream_buffer_tokens`: deltas per sample sent ahead of the consumer before its
        request pauses (0: never); `step_timeout`: seconds one step may take (None: no limit)."""
        self.core = core
        self.on_step = on_step
        self.stream_buffer_tokens = stream_buffer_tokens
        self.stall_timeout, self.step_timeout = stall_timeout, step_timeout
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # requests in the core (engine thread)
        self._paused: dict[str, RequestStream] = {}  # of those, the paused ones (engine thread)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._admitted = 0  # sequences admitted but not yet queued (event loop side)
        self._active: dict[str, RequestStream] = {}  # running generate() calls (event loop side)
        self._refusal: EngineDeadError | None = None  # set by fail_all_requests: new requests get it
        self._step_started: float | None = None  # when the step in progress began (engine thread)
        self._death: str | None = None  # why the engine thread died

    @property
    def num_waiting(self) -> int:
        """Sequences admitted, queued as commands, or waiting in the scheduler."""
        return self.core.num_waiting + self._commands.qsize() + self._admitted

    def admit(self, num_sequences: int, limit: int) -> Admission:
        """Reserve room for a request's sequences, or raise QueueFullError if more than
        `limit` sequences would be waiting."""
        if self.num_waiting + num_sequences > limit:
            raise QueueFullError(f"more than {limit} sequences would be waiting")
        self._admitted += num_sequences
        return Admission(self._give_back, num_sequences)

    def _give_back(self, count: int) -> None:
        self._admitted -= count

    def fail_all_requests(self, error: EngineDeadError) -> None:
        """From the event loop: end every running `generate()` now with `error` (its request
        is then aborted), even while the engine thread is busy or gone, and refuse new ones
        with it. Used past the shutdown grace period and by the watchdog."""
        self._refusal = error
        for stream in list(self._active.values()):
            stream.out.put_nowait(error)

    def end_all_requests(self) -> None:
        self.fail_all_requests(EngineShuttingDownError("the server is shutting down"))

    def failure(self) -> str | None:
        """Why the engine cannot serve, or None: its thread died, or a step is stalled."""
        if self._death is not None:
            return f"the engine thread died ({self._death})"
        if self._thread is not None and not self._thread.is_alive() and not self._stopping.is_set():
            return "the engine thread exited"
        started = self._step_started
        if started is not None and self.step_timeout is not None and time.monotonic() - started > self.step_timeout:
            return f"an engine step has run for more than {self.step_timeout:g} s"
        return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
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
        if self._refusal is not None:
            raise self._refusal
        if self._stopping.is_set():
            raise EngineDeadError("the engine is not running")
        loop, limit = asyncio.get_running_loop(), self.stream_buffer_tokens * params.n
        stream = RequestStream(request_id, prompt_token_ids, params, loop, asyncio.Queue(), grammars, limit)
        self._commands.put(("add", stream))
        if admission is not None:
            admission.release(params.n)  # now counted by the command queue
        self._active[request_id] = stream
        remaining = params.n
        try:
            while remaining:
                item = await stream.out.get()
                if isinstance(item, BaseException):
                    raise item
                stream.taken += 1
                if stream.paused_since is not None and not stream.wake_asked and stream.drained():
                    stream.wake_asked = True
                    self._commands.put(("wake", None))  # resume it now, not at the next idle check
                remaining -= item.finish_reason is not None
                yield item
        finally:
            self._active.pop(request_id, None)
            if remaining:
                self._commands.put(("abort", request_id))

    # ---- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        """The engine thread: the loop, and if anything outside a step kills it, the reason
        (the watchdog reports it) and an error for every request it held."""
        try:
            self._loop()
        except BaseException as exc:
            logger.critical("the engine thread died", exc_info=exc)
            self._death = f"{type(exc).__name__}: {exc}"
            for stream in list(self._streams.values()):
                self._send(stream, EngineDeadError("the engine is not running"))

    def _loop(self) -> None:
        idle = False
        while not self._stopping.is_set():
            self._drain_commands(block=idle or not self.core.has_work())
            self._check_paused()
            idle = self.core.has_work() and not self._step()
        self._fail_all(EngineShuttingDownError("the server is shutting down"))

    def _step(self) -> bool:
        """Run one step and deliver its tokens; False if nothing could run (every running
        sequence is paused, and nothing waiting fits beside them)."""
        self._step_started = time.monotonic()
        try:
            outcome = self.core.step()
        except Exception as exc:  # a failed step must not hang clients: fail their requests
            logger.exception("engine step failed; aborting requests %s", sorted(self._streams))
            failure = EngineStepError("engine step failed")
            failure.__cause__ = exc
            self._fail_all(failure)
            return True
        finally:
            self._step_started = None
        self._deliver(outcome.sequences)
        if self.on_step is not None:
            finished = [s for s in outcome.sequences if s.is_finished]
            self.on_step(self.core.stats, finished, outcome.inter_token_latencies)
        return outcome.progressed

    def _drain_commands(self, block: bool) -> None:
        try:
            command, arg = self._commands.get(timeout=IDLE_WAIT_SECONDS) if block else self._commands.get_nowait()
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
            stream = self._streams.get(request_id)
            seq = self.core.abort_sample(request_id, index) if stream else None
            if stream is not None and seq is not None:
                self._send(stream, SequenceDelta(index, None, None, "abort", seq))
                self._close_if_done(stream)
                self._report([seq])
        elif command == "abort":
            self._abort(arg)  # type: ignore[arg-type]

    def _abort(self, request_id: str) -> RequestStream | None:
        stream = self._streams.pop(request_id, None)
        self._paused.pop(request_id, None)
        if stream is not None:
            self._report(self.core.abort_request(request_id, stream.params.n))
        return stream

    def _report(self, ended: list[SequenceState]) -> None:
        if self.on_step is not None:
            self.on_step(self.core.stats, ended, [])

    def _add(self, stream: RequestStream) -> None:
        """Errors go to that request only and never kill the loop: a ValueError is the
        request's fault (a 400 with its message), anything else is internal (a 500)."""
        try:
            self.core.add_request(stream.request_id, stream.prompt_token_ids, stream.params, stream.grammars)
        except ValueError as exc:
            self._send(stream, exc)
            return
        except Exception as exc:
            logger.exception("adding request %s failed", stream.request_id)
            failure = EngineStepError("adding the request failed")
            failure.__cause__ = exc
            self._send(stream, failure)
            return
        self._streams[stream.request_id] = stream

    def _deliver(self, updated: list[SequenceState]) -> None:
        finished: dict[str, RequestStream] = {}
        for seq in updated:
            stream = self._streams.get(seq.request_id)
            if stream is None:
                continue
            if seq.finish_reason == "error":  # only this request fails; the step's others go on
                self._fail_request(seq.request_id, stream, seq.error)
                continue
            # the delta carries the token's logprobs; the sequence keeps none (memory per request)
            logprob = seq.output_logprobs.pop() if seq.params.logprobs is not None else None
            self._send(stream, SequenceDelta(seq.index, seq.output_token_ids[-1], logprob, seq.finish_reason, seq))
            stream.sent += 1
            if seq.is_finished:
                finished[seq.request_id] = stream
            elif stream.over_limit():  # (again, if preemption put a paused sequence back to work)
                if stream.paused_since is None:
                    logger.debug("request %s paused: %d deltas unread", stream.request_id, stream.unread)
                stream.set_paused(self.core, stream.paused_since or time.monotonic())
                self._paused[stream.request_id] = stream
        for stream in finished.values():  # after the loop: samples may finish in the same step
            self._close_if_done(stream)

    def _check_paused(self) -> None:
        """Resume the paused requests whose consumers caught up; abort those stalled too long."""
        now = time.monotonic()
        for request_id, stream in list(self._paused.items()):
            if stream.drained():
                stream.set_paused(self.core, None)
                del self._paused[request_id]
            elif now - (stream.paused_since or now) > self.stall_timeout:
                stalled = self.stall_timeout
                logger.warning("request %s: its client read nothing for %.0f s; aborting it", request_id, stalled)
                self._abort(request_id)
                self._send(stream, StreamStalledError("the client stopped reading the stream"))

    def _close_if_done(self, stream: RequestStream) -> None:
        if self.core.is_done(stream.request_id, stream.params.n):
            self._streams.pop(stream.request_id, None)
            self._paused.pop(stream.request_id, None)

    def _fail_request(self, request_id: str, stream: RequestStream, error: str | None) -> None:
        logger.error("request %s failed in the engine: %s", request_id, error)
        self._abort(request_id)
        self._send(stream, EngineStepError("engine step failed"))

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.core.abort_request(request_id, stream.params.n)
            self._send(stream, exc)
        self._streams.clear()
        self._paused.clear()

    @staticmethod
    def _send(stream: RequestStream, item: object) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.out.put_nowait, item)
        except RuntimeError:
            logger.warning("request %s: its event loop is closed", stream.request_id)
