"""Requests and sequences as the scheduler sees them: ids, token ids and counts (no torch)."""

from __future__ import annotations

import enum
import functools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

# Temperatures below this sample greedily (vLLM's epsilon): dividing logits by a subnormal
# temperature overflows, and the distribution is a point mass on the argmax anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS = 100.0
StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
STRUCTURED_KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")


class SamplingParamsError(ValueError):
    """Invalid sampling parameters; `param` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredSpec:
    """A constraint on the output: `kind` names the language of `spec`.

    - json_object: any JSON object (`spec` is "");
    - json_schema: `spec` is the schema as JSON text;
    - regex: `spec` is a regular expression the whole output matches;
    - choice: `spec` is a JSON list of strings; the output is exactly one of them;
    - grammar: `spec` is a Lark or GBNF (llama.cpp) grammar.
    Build one with the class methods; the engine compiles and checks it (`structured.py`).
    """

    kind: StructuredKind
    spec: str = ""

    @classmethod
    def json_object(cls) -> StructuredSpec:
        return cls("json_object", "")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> StructuredSpec:
        """The schema as a dict/bool or JSON text, stored compactly (whitespace does not split cache
        entries). Key order is kept: properties are generated in the schema's order."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise SamplingParamsError(f"the JSON schema is not valid JSON: {exc}", "json_schema") from exc
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def regex(cls, pattern: str) -> StructuredSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredSpec:
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def grammar(cls, text: str) -> StructuredSpec:
        return cls("grammar", text)


@dataclass
class SamplingParams:
    """Per-request sampling settings (OpenAI names, plus vLLM's top_k/min_p/repetition_penalty)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # number of top alternatives per token; None: no logprobs
    prompt_logprobs: int | None = None  # logprob of every prompt token after the first, plus top alternatives
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many output tokens
    structured: StructuredSpec | None = None
    # What the engine derives from these settings once per request (the sampler's logit-bias
    # tensors, ...), so that a step's work does not grow with a request's lists. Not a setting.
    derived: dict[object, object] = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def stop_token_set(self) -> frozenset[int]:
        """stop_token_ids without duplicates, for O(1) checks per token."""
        return frozenset(self.stop_token_ids)

    def validate(self) -> None:
        self._validate_ranges()
        self._validate_logit_bias()
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids must be non-negative token ids", "stop_token_ids")
        if self.structured is not None and self.structured.kind not in STRUCTURED_KINDS:
            raise SamplingParamsError(f"structured output kind must be one of {STRUCTURED_KINDS}", "structured")

    def _validate_logit_bias(self) -> None:
        for token_id, bias in self.logit_bias.items():
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise SamplingParamsError(f"logit_bias key {token_id!r} is not a token id", "logit_bias")
            if not (isinstance(bias, (int, float)) and math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise SamplingParamsError(
                    f"logit_bias for token {token_id} must be between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}",
                    "logit_bias",
                )

    def _validate_ranges(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 0, "top_k", "must be -1, 0 (off) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]"),
            (1 <= self.n <= 16, "n", "must be between 1 and 16"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be between 0 and 20"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs",
                "must be between 0 and 20",
            ),
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed", "must fit in 64 bits"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be between 0 and max_tokens"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise SamplingParamsError(f"{param} {message}", param)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # running, but its client is not reading: not scheduled, pages kept
    FINISHED = "finished"


@dataclass
class SequenceTimings:
    arrival: float = field(default_factory=time.monotonic)
    scheduled: float | None = None  # first time it left the waiting queue
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass
class SequenceState:
    """One generated sample. `num_computed_tokens` tokens are in the KV cache."""

    seq_id: str
    request_id: str
    index: int  # sample index within its request (for n > 1)
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] = field(default_factory=list)  # entry i: prompt position i + 1
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None  # why a sequence ended with "error" (logged, never shown to clients)
    num_preemptions: int = 0
    timings: SequenceTimings = field(default_factory=SequenceTimings)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def check_stop(self, max_model_len: int) -> str | None:
        """Finish reason after the latest token, or None to continue."""
        last = self.output_token_ids[-1]
        if last in self.params.stop_token_set:
            return "stop"
        if not self.params.ignore_eos and last in self.eos_token_ids:
            return "stop"
        if len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None
