"""FCFS continuous-batching scheduler with chunked prefill and preemption (pure Python).

Each step has one token budget (`max_num_batched_tokens`) shared by running sequences
(decodes and unfinished prefills, oldest first) and newly admitted prompts. A sequence that
needs a page when none is free preempts the newest running sequence: its pages are freed and
it goes back to the front of the waiting queue, to be recomputed from its tokens later.
The scheduler sees sequence ids, token ids/counts and page counts only; the KV manager owns
the pages (it grows a sequence's tables when its chunk is scheduled and frees them at once).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from logquant.kv_manager import KVManager
from server.engine.request import Sequence, SequenceStatus


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


@dataclass(frozen=True)
class ScheduledChunk:
    seq_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_position: int  # position of token_ids[0] (== num_computed_tokens)
    sample: bool  # the chunk ends at the last known token: sample the next one


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVManager) -> None:
        self.config = config
        self.kv_manager = kv_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # ---- requests ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        final_len = min(seq.num_prompt_tokens + seq.params.max_tokens, self.config.max_model_len)
        if self.kv_manager.pages_for(final_len) > self.kv_manager.num_pages:
            raise ValueError(
                f"a sequence of {final_len} tokens needs {self.kv_manager.pages_for(final_len)} KV pages; "
                f"the cache has {self.kv_manager.num_pages}"
            )
        self.sequences[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        return self._end(seq_id, "abort")

    def fail(self, seq_id: str, error: str) -> Sequence | None:
        """End a sequence whose step failed (finish_reason "error"; `seq.error` says why)."""
        seq = self._end(seq_id, "error")
        if seq is not None:
            seq.error = error
        return seq

    def _end(self, seq_id: str, reason: str) -> Sequence | None:
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
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            num_new = self._next_chunk(seq)
            if num_new > budget:
                continue  # this prefill chunk waits for a step with room for all of it
            while not self.kv_manager.can_allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                preempted = True
                if self._preempt_newest() is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                chunks.append(self._chunk(seq, num_new))
                budget -= num_new
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
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
        return SchedulerOutput(chunks=chunks)

    def _next_chunk(self, seq: Sequence) -> int:
        """Tokens to compute next: up to the next multiple of the prefill chunk size (one
        token at a time past the prompt under `exact_recompute`)."""
        size, done = self.config.prefill_chunk_tokens, seq.num_computed_tokens
        if self.config.exact_recompute and done >= seq.num_prompt_tokens:
            return 1
        limit = seq.num_prompt_tokens if self.config.exact_recompute else seq.num_tokens
        return min(limit, (done // size + 1) * size) - done

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        self.kv_manager.allocate(seq.seq_id, start + num_new)
        return ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids()[start : start + num_new],
            start_position=start,
            sample=start + num_new == seq.num_tokens,
        )

    def _preempt_newest(self) -> Sequence:
        victim = self.running.pop()
        self.kv_manager.free(victim.seq_id)
        victim.status = SequenceStatus.WAITING
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Apply a step's results (`sampled`: seq_id -> new token id for chunks with `sample`).
        Returns the sequences that got a token this step (finished ones included)."""
        updated = []
        for chunk in output.chunks:
            seq = self.sequences.get(chunk.seq_id)
            if seq is None or seq.status != SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += len(chunk.token_ids)
            if not chunk.sample:
                continue
            seq.output_token_ids.append(sampled[chunk.seq_id])
            updated.append(seq)
            reason = seq.check_stop(self.config.max_model_len)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
        return updated

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.timings.finished = time.monotonic()
        self.kv_manager.free(seq.seq_id)
        del self.sequences[seq.seq_id]

