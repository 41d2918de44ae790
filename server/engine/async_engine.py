"""AsyncEngine: the asyncio front of one engine loop running in a background thread.

`generate()` submits a request and yields `SequenceDelta`s as tokens arrive; closing the
iterator early (client gone) aborts the request and frees its pages at once. Commands
(add, abort) go to the engine thread through a queue, so only that thread touches the core.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.engine.core import EngineCore, EngineStats
from server.engine.request import SamplingParams, Sequence

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


@dataclass
class _Pending:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue


class AsyncEngine:
    def __init__(self, core: EngineCore, on_step: Callable[[EngineStats, list[Sequence], list[float]], None] | None = None) -> None:
        self.core = core
        self.on_step = on_step
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Pending] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    @property
    def num_waiting(self) -> int:
        return self.core.stats.num_waiting + self._commands.qsize()

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
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[SequenceDelta]:
        if self.error is not None or self._stopping.is_set():
            raise EngineDeadError("the engine is not running")
        pending = _Pending(request_id, prompt_token_ids, params, asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", pending))
        remaining = params.n
        try:
            while remaining:
                item = await pending.out.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finish_reason is not None
                yield item
        finally:
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
                logger.exception("engine step failed; aborting all running requests")
                self._fail_all(exc)
                continue
            self._deliver(updated)
            if self.on_step is not None:
                self.on_step(self.core.stats, [s for s in updated if s.is_finished], self.core.last_step_itl)
        self._fail_all(EngineDeadError("the server is shutting down"))

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
            pending: _Pending = arg  # type: ignore[assignment]
            try:
                self.core.add_request(pending.request_id, pending.prompt_token_ids, pending.params)
            except Exception as exc:  # reported to that request (ValueError: a 400), never kills the loop
                self._send(pending, exc)
                return
            self._streams[pending.request_id] = pending
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

    def _deliver(self, updated: list[Sequence]) -> None:
        finished: dict[str, _Pending] = {}
        for seq in updated:
            pending = self._streams.get(seq.request_id)
            if pending is None:
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
