"""Prometheus metrics with vLLM's names and meanings under the `logquant:` prefix.

Updated by the engine thread once per step (`on_step`); served by `GET /metrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from server.engine.core import EngineStats
from server.engine.request import SequenceState

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]  # fmt: skip
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


def buckets_1_2_5(maximum: int) -> list[float]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `maximum`."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > maximum:
                return out
            out.append(float(value))
        exponent += 1


class Metrics:
    def __init__(self, model_name: str, max_model_len: int, cache_info: dict[str, str]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> Gauge:
            return Gauge(f"logquant:{name}", doc, labels + (extra or []), registry=r)

        def counter(name: str, doc: str, extra: list[str] | None = None) -> Counter:
            return Counter(f"logquant:{name}", doc, labels + (extra or []), registry=r)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(f"logquant:{name}", doc, labels, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Sequences in model execution batches.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be processed.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent (exact page count).")
        self.kv_bytes = gauge("kv_cache_bytes", "KV-cache bytes held, per tier.", ["tier"])
        self.kv_capacity = gauge("kv_cache_capacity_bytes", "KV-cache bytes preallocated.")
        self.compression = gauge("kv_compression_ratio", "16-bit bytes the cached tokens would need / bytes used.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens processed.")
        self.preemptions = counter("num_preemptions", "Cumulative number of preemptions.")
        self.success = counter("request_success", "Finished requests.", ["finished_reason"])
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time spent waiting.", REQUEST_LATENCY_BUCKETS)
        token_buckets = buckets_1_2_5(max_model_len)
        self.req_prompt = histogram("request_prompt_tokens", "Prompt tokens per request.", token_buckets)
        self.req_generation = histogram("request_generation_tokens", "Tokens generated per request.", token_buckets)
        info = Info("logquant:cache_config", "KV cache configuration.", labels, registry=r)
        info.labels(model_name).info(cache_info)
        self._last = EngineStats()

    def on_step(self, stats: EngineStats, finished: list[SequenceState], inter_token_latencies: list[float]) -> None:
        m = self.model_name
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_usage)
        for tier, value in stats.kv_bytes_by_tier.items():
            self.kv_bytes.labels(m, tier).set(value)
        self.kv_capacity.labels(m).set(stats.kv_capacity_bytes)
        used = sum(stats.kv_bytes_by_tier.values())
        self.compression.labels(m).set(stats.kv_fp16_equivalent_bytes / used if used else 0.0)
        self.prompt_tokens.labels(m).inc(stats.prompt_tokens - self._last.prompt_tokens)
        self.generation_tokens.labels(m).inc(stats.generation_tokens - self._last.generation_tokens)
        self.preemptions.labels(m).inc(stats.num_preemptions - self._last.num_preemptions)
        self._last = EngineStats(
            prompt_tokens=stats.prompt_tokens,
            generation_tokens=stats.generation_tokens,
            num_preemptions=stats.num_preemptions,
        )
        for gap in inter_token_latencies:
            self.itl.labels(m).observe(gap)
        for seq in finished:
            self._on_finished(seq)

    def _on_finished(self, seq: SequenceState) -> None:
        m, t = self.model_name, seq.timings
        self.success.labels(m, seq.finish_reason or "abort").inc()
        self.req_prompt.labels(m).observe(seq.num_prompt_tokens)
        self.req_generation.labels(m).observe(len(seq.output_token_ids))
        if t.finished is not None:
            self.e2e.labels(m).observe(t.finished - t.arrival)
        if t.scheduled is not None:
            self.queue.labels(m).observe(t.scheduled - t.arrival)
        if t.first_token is not None:
            self.ttft.labels(m).observe(t.first_token - t.arrival)
