"""EngineCore: one step = schedule -> run -> postprocess, plus statistics for metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logquant.attention_spec import AttentionSpec, attention_spec
from logquant.models import load_model
from logquant.kv_manager import KVManager
from logquant.policy import make_policy
from logquant.store import PagedKVStore
from server.engine.config import EngineConfig
from server.engine.request import SamplingParams, Sequence
from server.engine.runner import ModelRunner, layout_for
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.structured import compile_structured

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
        self.layout = layout_for(model, policy, self.dtype, config.group_size, config.key_fp_channels, config.kv_bits)
        kv_bytes = config.kv_cache_memory or self._default_kv_bytes()
        self.kv_manager = KVManager.for_budget(self.layout, kv_bytes)
        backend = decode_backend_for(attention_spec(model.config), config.decode_backend)
        self.store = PagedKVStore(self.layout, self.kv_manager.num_pages, self.dtype, self.device, decode_backend=backend)
        logger.info("decode backend: %s", self.store.decode_backend)
        self.max_model_len = self._fit_max_model_len(model)
        scheduler_config = SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, exact_recompute=policy.block_tokens > 0
        )
        self.scheduler = Scheduler(scheduler_config, self.kv_manager)
        self.runner = ModelRunner(model, self.store, tokenizer)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.stats = EngineStats(kv_capacity_bytes=self.kv_manager.capacity_bytes)
        self.last_step_itl: list[float] = []  # inter-token latencies observed by the last step

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
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> list[Sequence]:
        params.validate()
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if params.structured is not None:  # an invalid spec fails here, never inside a step
            compile_structured(params.structured, self.tokenizer)
        seqs = [
            Sequence(f"{request_id}-{i}", request_id, i, list(prompt_token_ids), params, self.eos_token_ids)
            for i in range(params.n)
        ]
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def abort_request(self, request_id: str, n: int) -> list[Sequence]:
        """Abort the request's unfinished samples; return them. Their pages are free at once."""
        aborted = [self.scheduler.abort(f"{request_id}-{i}") for i in range(n)]
        self._update_stats()
        return [seq for seq in aborted if seq is not None]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one step; return the sequences that got a new token (finished ones included)."""
        output = self.scheduler.schedule()
        sampled, failed = {}, []
        if output.chunks:
            plan = self.kv_manager.plan_step([(c.seq_id, len(c.token_ids)) for c in output.chunks])
            result = self.runner.execute(output, plan, self.scheduler.sequences)
            sampled, failed = result.sampled, self._fail(result.failed)
            self._record_prompt_logprobs(result.prompt_logprobs)
        if self.config.debug_integrity:
            self.kv_manager.check_integrity()
        now = time.monotonic()
        updated = self.scheduler.update(output, {s: r.token_id for s, r in sampled.items()})
        self.last_step_itl = [now - s.timings.last_token for s in updated if s.timings.last_token is not None]
        for seq in updated:
            result = sampled[seq.seq_id]
            if result.logprob is not None:
                seq.output_logprobs.append({"logprob": result.logprob, "top": result.top_logprobs})
            if len(seq.output_token_ids) == 1:
                self.stats.prompt_tokens += seq.num_prompt_tokens
                seq.timings.first_token = now
            seq.timings.last_token = now
        self.stats.generation_tokens += len(updated)
        self._update_stats()
        return updated + failed

    def _record_prompt_logprobs(self, computed: dict[str, tuple[int, list[dict]]]) -> None:
        for seq_id, (first_position, entries) in computed.items():
            seq = self.scheduler.sequences.get(seq_id)
            if seq is not None:
                assert len(seq.prompt_logprobs) + 1 == first_position, "prompt logprobs recorded out of order"
                seq.prompt_logprobs.extend(entries)

    def _fail(self, failures: dict[str, Exception]) -> list[Sequence]:
        """Finish the sequences whose rows failed, with finish_reason "error" and `seq.error`
        set; their pages are freed at once and the rest of the step goes on."""
        failed = []
        for seq_id, exc in failures.items():
            seq = self.scheduler.fail(seq_id, f"{type(exc).__name__}: {exc}")
            if seq is not None:
                failed.append(seq)
        return failed

    def _update_stats(self) -> None:
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_usage = self.kv_manager.usage
        s.kv_bytes_by_tier = self.kv_manager.bytes_by_tier()
        s.kv_fp16_equivalent_bytes = self.layout.fp16_bytes_for(self.kv_manager.num_cached_tokens())
        s.num_preemptions = self.scheduler.num_preemptions


def decode_backend_for(spec: AttentionSpec, requested: str) -> str:
    """`requested`, unless the model's attention needs what only the torch path applies
    (softcapped logits, learned sinks): then `torch`, or an error if a fused kernel was asked for."""
    needs = [name for name, used in (("attention logit softcapping", spec.softcap), ("learned attention sinks", spec.sinks)) if used]
    if not needs:
        return requested
    if requested in ("cpu", "triton"):
        raise ValueError(f"--decode-backend {requested}: the fused kernels do not apply {' or '.join(needs)} ({spec.model_type}); use auto or torch")
    return "torch"


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return tuple(sorted(ids))
