"""Serving benchmark: the same streaming load against each KV policy of our server (started
here, one at a time, at one fixed --kv-cache-memory), or against any OpenAI-compatible
server (--base-url). Prints a table and ratios to fp16; --json writes everything.

    python bench/serve.py --policies fp16,kivi,logquant --kv-cache-memory 64MiB \
        --dataset sharegpt --num-requests 32 --concurrency 1,8,32 --json results/serve.json
    python bench/serve.py --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import print_runs, random_requests, run_load, sharegpt_requests, summarize  # noqa: E402

from logquant.provenance import provenance  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, limit: float = 600.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {limit}s")


@contextmanager
def our_server(model: str, policy: str, kv_cache_memory: str, extra: list[str]) -> Iterator[str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "--model",
        model,
        "--policy",
        policy,
        "--port",
        str(port),
        "--kv-cache-memory",
        kv_cache_memory,
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def make_requests(args: argparse.Namespace) -> list:
    if args.dataset == "sharegpt":
        return sharegpt_requests(args.num_requests, args.max_tokens, args.seed)
    return random_requests(args.num_requests, args.input_len, args.output_len, args.seed)


def bench_url(url: str, model: str, args: argparse.Namespace, label: str, runs: dict) -> None:
    requests = make_requests(args)
    for concurrency in [int(c) for c in args.concurrency.split(",")] if not args.request_rate else [None]:
        name = f"{label} c={concurrency}" if concurrency else f"{label} rate={args.request_rate}"
        results, elapsed = asyncio.run(
            run_load(url, model, requests, concurrency, args.request_rate, args.seed, args.ignore_eos)
        )
        runs[name] = summarize(results, elapsed) | {"concurrency": concurrency, "label": label}
        print(f"{name}: {runs[name]['output_tokens_per_s']:.1f} output tokens/s, {runs[name]['errors']} errors")


def baselines(runs: dict[str, dict], base_label: str) -> dict[str, str]:
    """Each run's baseline: the `base_label` run at the same concurrency (or rate)."""
    out = {}
    for name, run in runs.items():
        base = next(
            (n for n, r in runs.items() if r["label"] == base_label and r["concurrency"] == run["concurrency"]), None
        )
        if base is not None and base != name:
            out[name] = base
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="benchmark this running server instead of starting ours")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--policies", default="fp16,kivi,logquant")
    p.add_argument("--kv-cache-memory", default="64MiB")
    p.add_argument("--server-args", default="", help="extra flags for our server, e.g. '--max-num-seqs 32'")
    p.add_argument("--dataset", choices=["sharegpt", "random"], default="sharegpt")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", default="8", help="comma list: one run per value")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals (req/s) instead of fixed concurrency")
    p.add_argument("--max-tokens", type=int, default=128, help="cap on sharegpt output lengths")
    p.add_argument("--input-len", type=int, default=256, help="random mode: prompt words")
    p.add_argument("--output-len", type=int, default=64, help="random mode: output tokens")
    p.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos: fixed output lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = provenance(args.model)
    runs: dict[str, dict] = {}
    if args.base_url:
        wait_ready(f"{args.base_url.rstrip('/')}/v1/models", None, limit=30)
        bench_url(args.base_url, args.model, args, "server", runs)
    else:
        for policy in args.policies.split(","):
            with our_server(args.model, policy, args.kv_cache_memory, args.server_args.split()) as url:
                bench_url(url, args.model, args, policy, runs)
    print_runs(runs, baselines(runs, "fp16"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"provenance": started, "args": vars(args) | {"json": str(args.json)}, "runs": runs}
        args.json.write_text(json.dumps(record, indent=2))
    return runs


if __name__ == "__main__":
    main()
