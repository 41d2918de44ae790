"""Soak test: mixed load against our server for a while, then check that nothing leaked.

Workers send short and long prompts, streaming or not; some requests are cancelled midway,
some are garbage (bad JSON, unknown fields or model, a lone surrogate, an oversized body) and
some are hostile (bench/hostile.py: huge token-id bodies, surrogates on /tokenize and in field
names, too many sequences, too large a response, clients that stop reading or send headers
slowly, long stop-token and logit-bias lists, grammars, /tokenize and /detokenize floods).
Meanwhile a well-behaved client streams long completions, and /health is timed every 50 ms.
Every `--sample-every` seconds the server's RSS and KV usage are sampled. At the end the
server must go idle with no sequence running or waiting and no KV page in use; there must be
no 5xx, every answer must have the status its kind expects (valid: 200, or 429 when the
queue is full; garbage and hostile: their 4xx), /health's p99 must stay under
`--max-health-p99` and the steady stream's tokens must keep flowing (no gap over
`--max-token-gap`). `--mix hostile` sends only the hostile kinds. Writes JSON (with command,
commit and machine) and a PNG.

    python bench/soak.py --duration 1800 --json results/soak.json --plot results/soak.png
    python bench/soak.py --duration 60 --model path/to/tiny --long-words 200   # as CI runs it
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from hostile import EXPECTED as HOSTILE_EXPECTED  # noqa: E402
from hostile import KINDS as HOSTILE_KINDS  # noqa: E402
from hostile import HealthProbe, Hostile, steady_stream  # noqa: E402
from loadgen import WORDS  # noqa: E402
from serve import free_port, wait_ready  # noqa: E402

from logquant.provenance import provenance  # noqa: E402

# kind -> weight; "garbage:*" kinds must be refused with a 4xx
KINDS = {
    "short": 30,
    "short_stream": 25,
    "long_stream": 10,
    "completion": 10,
    "cancel_stream": 10,
    "cancel_wait": 5,
    "garbage:json": 3,
    "garbage:field": 3,
    "garbage:model": 2,
    "garbage:surrogate": 1,
    "garbage:too_big": 1,
    **HOSTILE_KINDS,
}
METRICS = {
    "kv_usage": "logquant:kv_cache_usage_perc",
    "running": "logquant:num_requests_running",
    "waiting": "logquant:num_requests_waiting",
}


class Soak:
    def __init__(self, url: str, model: str, args: argparse.Namespace) -> None:
        self.url, self.model, self.args = url, model, args
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.unexpected: list[str] = []
        self.hostile = Hostile(url, model, args.slow_reader_seconds, args.timeout_request_header + 5)
        self.kinds = HOSTILE_KINDS if args.mix == "hostile" else KINDS

    def text(self, rng: random.Random, words: int) -> str:
        return " ".join(rng.choices(WORDS, k=words))

    def chat(self, rng: random.Random, words: int, stream: bool) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": self.text(rng, words)}],
            "max_tokens": rng.randint(8, self.args.max_tokens),
            "stream": stream,
        }

    async def one(self, client: httpx.AsyncClient, kind: str, rng: random.Random) -> None:
        """Send one request of `kind` and record its outcome: the HTTP status, "cancelled", or
        "error_event" for a stream that ended in an error event."""
        if kind.startswith("garbage:"):
            outcome = await self.garbage(client, kind, rng)
        elif kind.startswith("hostile:"):
            outcome = await self.hostile.run(client, kind, rng)
        elif kind in ("short", "completion"):
            body = self.chat(rng, rng.randint(5, 40), stream=False)
            if kind == "completion":
                body = {"model": self.model, "prompt": body["messages"][0]["content"], "max_tokens": body["max_tokens"]}
            response = await client.post(f"/v1/{'chat/' if kind == 'short' else ''}completions", json=body)
            outcome = str(response.status_code)
        elif kind == "cancel_wait":  # the client gives up on a non-streaming request
            outcome = await self.cancelled(client.post("/v1/chat/completions", json=self.chat(rng, 30, False)))
        else:
            words = self.args.long_words if kind == "long_stream" else rng.randint(5, 40)
            outcome = await self.stream(client, self.chat(rng, words, stream=True), cancel=kind == "cancel_stream")
        self.record(kind, outcome)

    async def stream(self, client: httpx.AsyncClient, body: dict, cancel: bool) -> str:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return str(response.status_code)
            events = [line async for line in self._lines(response, stop_after=3 if cancel else None)]
        if cancel:
            return "cancelled"
        failed = events[-1:] != ["data: [DONE]"] or any(e.startswith('data: {"error"') for e in events)
        return "error_event" if failed else "200"

    @staticmethod
    async def _lines(response: httpx.Response, stop_after: int | None):
        count = 0
        async for line in response.aiter_lines():
            if line:
                yield line
                count += 1
                if stop_after is not None and count >= stop_after:
                    return  # leaving the block closes the connection: the server aborts the request

    async def cancelled(self, request) -> str:
        try:
            return str((await asyncio.wait_for(request, timeout=0.3)).status_code)
        except TimeoutError:
            return "cancelled"  # the client left before an answer

    async def garbage(self, client: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
        chat = self.chat(rng, 5, stream=False)
        headers = {"content-type": "application/json"}
        bodies = {
            "garbage:json": b'{"model": "' + self.model.encode() + b'", "messages": [',
            "garbage:field": json.dumps({**chat, "temperature": "hot", "no_such_field": 1}).encode(),
            "garbage:model": json.dumps({**chat, "model": "no-such-model"}).encode(),
            "garbage:surrogate": json.dumps(chat).replace('"content": "', '"content": "\\ud800').encode(),
            "garbage:too_big": b" " * (self.args.max_body_bytes + 1),
        }
        return str((await client.post("/v1/chat/completions", content=bodies[kind], headers=headers)).status_code)

    def record(self, kind: str, outcome: str) -> None:
        self.outcomes[kind][outcome] += 1
        if kind.startswith("garbage:"):
            allowed = {"400", "404", "413"}
        elif kind.startswith("hostile:"):
            allowed = HOSTILE_EXPECTED[kind]
        else:
            allowed = {"200", "429"} | ({"cancelled"} if kind.startswith("cancel") else set())
        if outcome not in allowed:
            self.unexpected.append(f"{kind}: {outcome}")

    async def worker(self, index: int, deadline: float) -> None:
        """Requests of random kinds by weight; with --mix hostile the workers take the kinds in
        turn instead (worker i: kinds i, i + concurrency, ...), so that every kind runs early."""
        rng = random.Random(self.args.seed + index)
        kinds, weights = list(self.kinds), list(self.kinds.values())
        turn = index
        async with httpx.AsyncClient(base_url=self.url, timeout=300) as client:
            while time.monotonic() < deadline:
                if self.args.mix == "hostile":
                    kind, turn = kinds[turn % len(kinds)], turn + self.args.concurrency
                else:
                    kind = rng.choices(kinds, weights)[0]
                try:
                    await self.one(client, kind, rng)
                except httpx.HTTPError as exc:
                    self.unexpected.append(f"{kind}: {type(exc).__name__}: {exc}")


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return {key: values.get(name, float("nan")) for key, name in METRICS.items()}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def sample_forever(url: str, pid: int, every: float, samples: list[dict], start: float) -> None:
    while True:
        samples.append(
            {
                "t": round(time.monotonic() - start, 1),
                "rss_mib": round(rss_mib(pid), 1),
                **await asyncio.to_thread(scrape, url),
            }
        )
        await asyncio.sleep(every)


async def run(url: str, pid: int, args: argparse.Namespace) -> tuple[Soak, list[dict], dict]:
    """The workers and the steady stream until the deadline, with /health timed all along."""
    soak, samples, start = Soak(url, args.served_name, args), [], time.monotonic()
    sampler = asyncio.create_task(sample_forever(url, pid, args.sample_every, samples, start))
    deadline, gaps = start + args.duration, []
    with HealthProbe(url) as health:
        broken, *_ = await asyncio.gather(
            steady_stream(url, args.served_name, deadline, args.steady_tokens, gaps),
            *(soak.worker(i, deadline) for i in range(args.concurrency)),
        )
    sampler.cancel()
    ordered = sorted(gaps) or [float("inf")]
    steady = {
        "broken_streams": broken,
        "chunks": len(gaps) + 1,
        "max_gap_s": round(ordered[-1], 3),
        "p99_gap_s": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
    }
    return soak, samples, {"health": health.summary(), "steady_stream": steady}


def wait_idle(url: str, limit: float = 120.0) -> dict[str, float]:
    """The server once every aborted request has been cleaned up (or the last state seen)."""
    deadline = time.monotonic() + limit
    while True:
        state = scrape(url)
        if (state["running"], state["waiting"], state["kv_usage"]) == (0, 0, 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    top.plot(minutes, [s["rss_mib"] for s in samples])
    top.set_ylabel("server RSS (MiB)")
    bottom.plot(minutes, [100 * s["kv_usage"] for s in samples], color="tab:orange")
    bottom.set_ylabel("KV cache used (%)")
    bottom.set_xlabel("minutes")
    fig.suptitle("soak: RSS and KV usage under mixed load")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def report(
    args: argparse.Namespace, soak: Soak, samples: list[dict], probes: dict, final: dict, final_rss: float
) -> dict:
    first_rss = samples[0]["rss_mib"] if samples else final_rss
    health, steady = probes["health"], probes["steady_stream"]
    checks = {
        "no_5xx": not any(o[0] == "5" or o == "error_event" for counts in soak.outcomes.values() for o in counts),
        "expected_statuses": not soak.unexpected,
        "idle_after": (final["running"], final["waiting"], final["kv_usage"]) == (0, 0, 0),
        "rss_growth_ok": final_rss <= first_rss * (1 + args.max_rss_growth),
        "health_p99_ok": health["count"] > 0 and not health["non_200"] and health["p99_s"] < args.max_health_p99,
        "steady_stream_flowing": steady["broken_streams"] == 0 and steady["max_gap_s"] < args.max_token_gap,
    }
    return {
        **provenance(args.model),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
        "requests": {kind: dict(sorted(c.items())) for kind, c in sorted(soak.outcomes.items())},
        "total_requests": sum(sum(c.values()) for c in soak.outcomes.values()),
        "unexpected": soak.unexpected[:50],
        "rss_mib": {
            "first_sample": first_rss,
            "final": round(final_rss, 1),
            "max": round(max([s["rss_mib"] for s in samples] + [final_rss]), 1),
        },
        "final_state": final,
        **probes,
        "samples": samples,
        "checks": checks,
        "ok": all(checks.values()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of load (default: 30 minutes)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--policy", default="logquant")
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens of a request")
    p.add_argument("--long-words", type=int, default=1200, help="words in a long prompt")
    p.add_argument("--sample-every", type=float, default=15.0, help="seconds between RSS/KV samples")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--max-rss-growth", type=float, default=0.25, help="allowed RSS growth over the first sample")
    p.add_argument("--mix", choices=("all", "hostile"), default="all", help="hostile: only the hostile kinds")
    p.add_argument("--steady-tokens", type=int, default=200, help="tokens per stream of the well-behaved client")
    p.add_argument("--max-token-gap", type=float, default=2.0, help="seconds the steady stream may wait for a chunk")
    p.add_argument("--max-health-p99", type=float, default=0.25, help="seconds: /health's p99 must stay below")
    p.add_argument("--stream-stall-timeout", type=float, default=5.0, help="the server's setting")
    p.add_argument("--timeout-request-header", type=float, default=5.0, help="the server's setting")
    p.add_argument("--slow-reader-seconds", type=float, default=20.0, help="how long a slow reader reads nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("results/soak.json"))
    p.add_argument("--plot", type=Path, default=Path("results/soak.png"))
    args = p.parse_args(argv)
    args.served_name = "soak-model"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "--model",
        args.model,
        "--served-model-name",
        args.served_name,
        "--policy",
        args.policy,
        "--kv-cache-memory",
        args.kv_cache_memory,
        "--port",
        str(port),
        "--max-body-bytes",
        str(args.max_body_bytes),
        "--log-level",
        "warning",
        "--stream-stall-timeout",
        str(args.stream_stall_timeout),
        "--timeout-request-header",
        str(args.timeout_request_header),
    ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    server_log = args.json.with_suffix(".server.log").open("w")  # its JSON log lines, for the 5xx tracebacks
    server = subprocess.Popen(cmd, env={**os.environ, "TQDM_DISABLE": "1"}, stdout=server_log, stderr=server_log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/ready", server)
        soak, samples, probes = asyncio.run(run(url, server.pid, args))
        final, final_rss = wait_idle(url), rss_mib(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        server_log.close()
    result = report(args, soak, samples, probes, final, final_rss)
    args.json.write_text(json.dumps(result, indent=1))
    plot(samples, args.plot)
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("total_requests", "requests", "rss_mib", "final_state", "health", "steady_stream", "checks")
            }
        )
    )
    for line in result["unexpected"]:
        print("unexpected:", line, file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
