"""EngineCore: the engine's one owner of a step, as nano-vllm and vLLM v1 write it:

    output = scheduler.schedule()          # chunks picked, pages allocated, the step planned
    result = runner.execute(output)        # the model over the flat batch, then sampling
    outcome = scheduler.update(output, result)   # tokens, logprobs, timings, stops, failures
    stats                                  # for metrics

It also owns the requests' structured-output matchers (`StructuredOutputManager`). The async
front (`AsyncEngine`) and the offline `LLM` talk to the core only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logquant.attention_spec import AttentionSpec, attention_spec
from logquant.kv_manager import KVManager
from logquant.layout import KVLayout
from logquant.models import load_model
from logquant.policy import make_policy
from logquant.store import PagedKVStore
from server.engine.config import EngineConfig
from server.engine.outputs import StepOutcome
from server.engine.request import SamplingParams, SequenceState
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.structured import GrammarState
from server.engine.structured_outputs import StructuredOutputManager

logger = logging.getLogger(__name__)
CPU_DEFAULT_KV_BYTES = 2**30
MIN_MODEL_LEN = 16  # below this a capped context is useless: fail instead


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    kv_bytes_by_tier: dict[str, int] = field(default_factory=dict)
    kv_capacity_bytes: int = 0
    kv_fp16_equivalent_bytes: int = 0  # what the cached tokens would take in a 16-bit cache
    num_preemptions: int = 0
    prompt_tokens: int = 0  # counters, since start
    generation_tokens: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.device, self.dtype = config.resolved_device(), config.resolved_dtype()
        policy = make_policy(config.policy, config.fp_budget, config.group_size, sink_tokens=config.sink_tokens)
        self.layout = KVLayout.for_model(
            model.config,
            policy,
            dtype_bytes=self.dtype.itemsize,
            group_size=config.group_size,
            bits=config.kv_bits,
            key_fp_channels=config.key_fp_channels,
        )
        kv_bytes = config.kv_cache_memory or self._default_kv_bytes()
        self.kv_manager = KVManager.for_budget(self.layout, kv_bytes)
        backend = decode_backend_for(attention_spec(model.config), config.decode_backend)
        self.store = PagedKVStore(
            self.layout, self.kv_manager.num_pages, self.dtype, self.device, decode_backend=backend
        )
        logger.info("decode backend: %s", self.store.decode_backend)
        self.max_model_len = self._fit_max_model_len(model)
        scheduler_config = SchedulerConfig(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            exact_recompute=policy.block_tokens > 0,
        )
        self.structured = StructuredOutputManager(tokenizer)
        self.scheduler = Scheduler(scheduler_config, self.kv_manager, on_finish=self.structured.free)
        self.runner = ModelRunner(model, self.store, self.structured)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.stats = EngineStats(kv_capacity_bytes=self.kv_manager.capacity_bytes)

    @classmethod
    def from_config(cls, config: EngineConfig) -> EngineCore:
        model, tokenizer = load_model(config.model, config.resolved_device(), config.resolved_dtype())
        return cls(config, model, tokenizer)

    def _default_kv_bytes(self) -> int:
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_BYTES
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        return max(0, int(total * self.config.gpu_memory_utilization) - used)

    def _fit_max_model_len(self, model: PreTrainedModel) -> int:
        """The model's context, or `--max-model-len`, checked against the KV budget: one
        sequence of `max_model_len` tokens must fit, so that running out of pages is only
        ever solved by preemption. An explicit length that does not fit is an error; the
        model's own length is capped with a warning."""
        model_len = model.config.get_text_config(decoder=True).max_position_embeddings
        wanted = self.config.max_model_len or model_len
        if wanted > model_len:
            raise ValueError(f"--max-model-len {wanted} exceeds the model's {model_len} positions")
        fits = self._longest_fitting_sequence(wanted)
        if fits >= wanted:
            return wanted
        if self.config.max_model_len is not None or fits < MIN_MODEL_LEN:
            raise ValueError(
                f"the KV cache ({self.kv_manager.capacity_bytes} bytes) holds one sequence of at most {fits} tokens, "
                f"less than max_model_len {wanted}: raise --kv-cache-memory or lower --max-model-len"
            )
        logger.warning("KV cache holds at most %d tokens per sequence: max_model_len capped from %d", fits, wanted)
        return fits

    def _longest_fitting_sequence(self, upper: int) -> int:
        low, high = 0, upper  # pages_for is monotonic in the length: binary search
        while low < high:
            mid = (low + high + 1) // 2
            if self.layout.pages_for(mid) <= self.kv_manager.num_pages:
                low = mid
            else:
                high = mid - 1
        return low

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        grammars: list[GrammarState] | None = None,
    ) -> list[SequenceState]:
        """Queue a request's `params.n` samples; `grammars`: their structured-output matchers
        if the caller built them (off the engine thread), else they are built here. Raises
        ValueError for a request that cannot run (bad parameters or spec, too long)."""
        params.validate()
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        matchers = self.structured.new_matchers(params, params.n, grammars)  # an invalid spec fails here
        seqs = [
            SequenceState(_seq_id(request_id, i), request_id, i, list(prompt_token_ids), params, self.eos_token_ids)
            for i in range(params.n)
        ]
        for seq in seqs:
            self.scheduler.add(seq)
        self.structured.add(seqs, matchers)
        return seqs

    def abort_request(self, request_id: str, n: int) -> list[SequenceState]:
        """Abort the request's unfinished samples; return them. Their pages are free at once."""
        aborted = [self.scheduler.abort(_seq_id(request_id, i)) for i in range(n)]
        self._update_stats()
        return [seq for seq in aborted if seq is not None]

    def abort_sample(self, request_id: str, index: int) -> SequenceState | None:
        """Abort one sample of a request (e.g. it hit a stop string); None if it had ended."""
        seq = self.scheduler.abort(_seq_id(request_id, index))
        self._update_stats()
        return seq

    def set_paused(self, request_id: str, n: int, paused: bool) -> None:
        """Pause a request's running samples (not scheduled, pages kept) or resume them."""
        self.scheduler.set_paused([_seq_id(request_id, i) for i in range(n)], paused)

    def is_done(self, request_id: str, n: int) -> bool:
        """Whether every sample of the request has ended."""
        return all(_seq_id(request_id, i) not in self.scheduler.sequences for i in range(n))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> StepOutcome:
        """Run one step: the sequences that got a new token, then those whose row failed
        (finished ones included), with the step's inter-token latencies."""
        output = self.scheduler.schedule()
        result = self.runner.execute(output)
        outcome = self.scheduler.update(output, result)
        if self.config.debug_integrity:
            self.kv_manager.check_integrity()
        self._count(outcome)
        self._update_stats()
        return outcome

    def _count(self, outcome: StepOutcome) -> None:
        self.stats.generation_tokens += len(outcome.sampled)
        self.stats.prompt_tokens += sum(s.num_prompt_tokens for s in outcome.sampled if len(s.output_token_ids) == 1)

    def _update_stats(self) -> None:
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_usage = self.kv_manager.usage
        s.kv_bytes_by_tier = self.kv_manager.bytes_by_tier()
        s.kv_fp16_equivalent_bytes = self.layout.fp16_bytes_for(self.kv_manager.num_cached_tokens())
        s.num_preemptions = self.scheduler.num_preemptions


def _seq_id(request_id: str, index: int) -> str:
    return f"{request_id}-{index}"


def decode_backend_for(spec: AttentionSpec, requested: str) -> str:
    """`requested`, unless the model's attention needs what only the torch path applies
    (softcapped logits, learned sinks): then `torch`, or an error if a fused kernel was asked for."""
    needs = [
        name
        for name, used in (("attention logit softcapping", spec.softcap), ("learned attention sinks", spec.sinks))
        if used
    ]
    if not needs:
        return requested
    if requested in ("cpu", "triton"):
        raise ValueError(
            f"--decode-backend {requested}: the fused kernels do not apply {' or '.join(needs)} "
            f"({spec.model_type}); use auto or torch"
        )
    return "torch"


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return tuple(sorted(ids))
