"""FCFS continuous-batching scheduler with chunked prefill and preemption (pure Python).

Each step has one token budget (`max_num_batched_tokens`) shared by running sequences
(decodes and unfinished prefills, oldest first) and newly admitted prompts. A sequence that
needs a page when none is free preempts the newest running sequence: its pages are freed and
it goes back to the front of the waiting queue, to be recomputed from its tokens later.
The scheduler sees sequence ids, token ids/counts and page counts only; the KV manager owns
the pages (it grows a sequence's tables when its chunk is scheduled and frees them at once).

One step: `schedule()` picks the chunks, allocates their pages and plans the step through the
KV manager, and returns one `SchedulerOutput` for the runner; `update(output, result)` is the
one place a step's results are applied (tokens, logprobs, prompt logprobs, timings, stops,
failed rows).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from logquant.kv_manager import KVManager
from server.engine.outputs import PromptLogprobs, SampleResult, ScheduledChunk, SchedulerOutput, StepOutcome, StepResult
from server.engine.request import SequenceState, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    # Recompute a preempted sequence's generated tokens one per step, as they were first
    # computed: with a 2-bit policy that rebuilds exactly the same cache (and output).
    exact_recompute: bool = False

    @property
    def prefill_chunk_tokens(self) -> int:
        """Prefills are cut at fixed multiples of this, never where a step's budget happens
        to run out: with a 2-bit policy, earlier chunks are demoted before later chunks attend
        to them, so fixed cut points keep outputs independent of what else is batched. A full
        chunk fits next to `max_num_seqs` decodes, or half the budget if that is larger."""
        return max(1, self.max_num_batched_tokens - self.max_num_seqs, self.max_num_batched_tokens // 2)


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv_manager: KVManager, on_finish: Callable[[str], None] | None = None
    ) -> None:
        """`on_finish(seq_id)` runs when a sequence ends for any reason (stop, length, abort,
        error), after its pages are freed: owners of per-sequence state free theirs there."""
        self.config = config
        self.kv_manager = kv_manager
        self.on_finish = on_finish
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.sequences: dict[str, SequenceState] = {}
        self.num_preemptions = 0

    # ---- requests ------------------------------------------------------------------------
    def add(self, seq: SequenceState) -> None:
        final_len = min(seq.num_prompt_tokens + seq.params.max_tokens, self.config.max_model_len)
        if self.kv_manager.pages_for(final_len) > self.kv_manager.num_pages:
            raise ValueError(
                f"a sequence of {final_len} tokens needs {self.kv_manager.pages_for(final_len)} KV pages; "
                f"the cache has {self.kv_manager.num_pages}"
            )
        self.sequences[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> SequenceState | None:
        return self._end(seq_id, "abort")

    def fail(self, seq_id: str, error: str) -> SequenceState | None:
        """End a sequence whose step failed (finish_reason "error"; `seq.error` says why)."""
        seq = self._end(seq_id, "error")
        if seq is not None:
            seq.error = error
        return seq

    def set_paused(self, seq_ids: list[str], paused: bool) -> None:
        """Pause running sequences (they are not scheduled and keep their pages), or let
        paused ones run again."""
        old, new = (
            (SequenceStatus.RUNNING, SequenceStatus.PAUSED)
            if paused
            else (SequenceStatus.PAUSED, SequenceStatus.RUNNING)
        )
        for seq_id in seq_ids:
            seq = self.sequences.get(seq_id)
            if seq is not None and seq.status is old:
                seq.status = new

    def _end(self, seq_id: str, reason: str) -> SequenceState | None:
        seq = self.sequences.get(seq_id)
        if seq is None or seq.is_finished:
            return None
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, reason)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """The next step: running sequences first (oldest first, preempting the newest when
        pages run out), then waiting prompts while they fit; their pages allocated and the
        step planned (the KV manager advances their tables)."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        num_preempted = 0
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            num_new = self._next_chunk(seq)
            if num_new > budget:
                continue  # this prefill chunk waits for a step with room for all of it
            while not self.kv_manager.can_allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                num_preempted += 1
                if self._preempt_newest() is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                chunks.append(self._chunk(seq, num_new))
                budget -= num_new
        if not num_preempted:
            chunks += self._admit(budget)
        plan = self.kv_manager.plan_step([(c.seq_id, len(c.token_ids)) for c in chunks]) if chunks else None
        return SchedulerOutput(chunks, plan, num_preempted)

    def _admit(self, budget: int) -> list[ScheduledChunk]:
        """Waiting prompts, oldest first, while each one's next chunk and pages fit."""
        chunks = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = self._next_chunk(seq)
            if num_new > budget or not self.kv_manager.can_allocate(seq.seq_id, seq.num_tokens):
                break  # FCFS: the oldest waiting prompt must fit before anything else is admitted
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.timings.scheduled = seq.timings.scheduled or time.monotonic()
            self.running.append(seq)
            chunks.append(self._chunk(seq, num_new))
            budget -= num_new
        return chunks

    def _next_chunk(self, seq: SequenceState) -> int:
        """Tokens to compute next: up to the next multiple of the prefill chunk size (one
        token at a time past the prompt under `exact_recompute`)."""
        size, done = self.config.prefill_chunk_tokens, seq.num_computed_tokens
        if self.config.exact_recompute and done >= seq.num_prompt_tokens:
            return 1
        limit = seq.num_prompt_tokens if self.config.exact_recompute else seq.num_tokens
        return min(limit, (done // size + 1) * size) - done

    def _chunk(self, seq: SequenceState, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        self.kv_manager.allocate(seq.seq_id, start + num_new)
        return ScheduledChunk(
            seq=seq,
            token_ids=seq.token_ids()[start : start + num_new],
            start_position=start,
            sample=start + num_new == seq.num_tokens,
        )

    def _preempt_newest(self) -> SequenceState:
        victim = self.running.pop()
        self.kv_manager.free(victim.seq_id)
        victim.status = SequenceStatus.WAITING
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def update(self, output: SchedulerOutput, result: StepResult) -> StepOutcome:
        """Apply a step's results: end the sequences whose rows failed, record prompt logprobs,
        advance every chunk's sequence, append sampled tokens (with their logprobs and
        timings) and finish the sequences that stop."""
        now = time.monotonic()
        ended = (self.fail(seq_id, f"{type(exc).__name__}: {exc}") for seq_id, exc in result.failed.items())
        failed = [seq for seq in ended if seq is not None]
        for seq_id, computed in result.prompt_logprobs.items():
            self._record_prompt_logprobs(seq_id, computed)
        sampled, latencies = [], []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status != SequenceStatus.RUNNING:
                continue  # ended while the step ran (its row failed)
            seq.num_computed_tokens += len(chunk.token_ids)
            if not chunk.sample:
                continue
            if seq.timings.last_token is not None:
                latencies.append(now - seq.timings.last_token)
            self._append(seq, result.sampled[seq.seq_id], now)
            sampled.append(seq)
        return StepOutcome(sampled, failed, latencies, progressed=bool(output.chunks) or output.num_preempted > 0)

    def _append(self, seq: SequenceState, token: SampleResult, now: float) -> None:
        seq.output_token_ids.append(token.token_id)
        if token.logprob is not None:
            seq.output_logprobs.append({"logprob": token.logprob, "top": token.top_logprobs})
        if len(seq.output_token_ids) == 1:
            seq.timings.first_token = now
        seq.timings.last_token = now
        reason = seq.check_stop(self.config.max_model_len)
        if reason is not None:
            self.running.remove(seq)
            self._finish(seq, reason)

    def _record_prompt_logprobs(self, seq_id: str, computed: PromptLogprobs) -> None:
        seq = self.sequences.get(seq_id)
        if seq is not None:
            assert len(seq.prompt_logprobs) + 1 == computed.first_position, "prompt logprobs recorded out of order"
            seq.prompt_logprobs.extend(computed.entries)

    def _finish(self, seq: SequenceState, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.timings.finished = time.monotonic()
        self.kv_manager.free(seq.seq_id)
        del self.sequences[seq.seq_id]
        if self.on_finish is not None:
            self.on_finish(seq.seq_id)
