"""What one engine step hands from verb to verb (no torch): schedule -> execute -> update.

- `SchedulerOutput` (Scheduler.schedule): the scheduled chunks with their sequences and the
  step's `StepPlan`, already allocated and planned through the KV manager: everything
  `ModelRunner.execute` needs (vLLM's `SchedulerOutput`).
- `StepResult` (ModelRunner.execute): what the model produced: a token per sampled sequence,
  the rows that failed, prompt logprobs (vLLM's `ModelRunnerOutput`).
- `StepOutcome` (Scheduler.update): what the step changed, for the engine's front and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from logquant.plan import StepPlan
from server.engine.request import SequenceState


@dataclass(frozen=True)
class ScheduledChunk:
    seq: SequenceState
    token_ids: list[int]  # the tokens to compute this step
    start_position: int  # position of token_ids[0] (== num_computed_tokens)
    sample: bool  # the chunk ends at the last known token: sample the next one

    @property
    def seq_id(self) -> str:
        return self.seq.seq_id


@dataclass(frozen=True)
class SchedulerOutput:
    """One step ready to run: its chunks in step order and their KV plan (same order; None
    when nothing is scheduled)."""

    chunks: list[ScheduledChunk]
    plan: StepPlan | None = None
    num_preempted: int = 0  # sequences preempted while scheduling this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first


@dataclass(frozen=True)
class PromptLogprobs:
    """A chunk's prompt logprobs: one {"logprob", "top"} entry per position from `first_position`."""

    first_position: int
    entries: list[dict]


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, SampleResult] = field(default_factory=dict)  # seq_id -> the token sampled for it
    failed: dict[str, Exception] = field(default_factory=dict)  # seq_id -> why its row could not be sampled
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)  # seq_id -> its prompt logprobs


@dataclass(frozen=True)
class StepOutcome:
    sampled: list[SequenceState]  # got a token this step (finished ones included), in step order
    failed: list[SequenceState]  # their row failed: finished with "error" (`seq.error` says why)
    inter_token_latencies: list[float]  # seconds since the previous token, per sampled sequence that had one
    progressed: bool  # False: nothing could run (every running sequence paused, nothing waiting fits)

    @property
    def sequences(self) -> list[SequenceState]:
        return self.sampled + self.failed
