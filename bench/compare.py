"""Side by side in one run: `transformers serve` (transformers' own OpenAI-compatible server,
same model files, same machine) and our server with each KV policy, under the same load.
Prints each run and the ratios of output tokens/s and p50 TPOT to transformers serve.

    python bench/compare.py --num-requests 16 --concurrency 8 --json results/compare.json
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import print_runs, run_load, summarize  # noqa: E402
from serve import free_port, make_requests, our_server, parse_args, wait_ready  # noqa: E402

from logquant.models import resolve_model  # noqa: E402


def run_transformers_serve(model_dir: str, args, runs: dict, continuous_batching: bool) -> None:
    beside = Path(sys.executable).parent / "transformers"  # a venv's script when its bin is not on PATH
    exe = str(beside) if beside.exists() else shutil.which("transformers")
    if exe is None:
        raise SystemExit("the `transformers` command is not on PATH")
    port = free_port()
    cmd = [exe, "serve", model_dir, "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["--continuous-batching"] if continuous_batching else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    label = "transformers-cb" if continuous_batching else "transformers"
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        results, elapsed = asyncio.run(
            run_load(f"http://127.0.0.1:{port}", model_dir, make_requests(args), int(args.concurrency), None)
        )
        runs[label] = summarize(results, elapsed) | {"label": label}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    args = parse_args()
    model_dir = str(resolve_model(args.model).directory)
    runs: dict[str, dict] = {}
    run_transformers_serve(model_dir, args, runs, continuous_batching=False)
    for policy in args.policies.split(","):
        with our_server(args.model, policy, args.kv_cache_memory, args.server_args.split()) as url:
            results, elapsed = asyncio.run(run_load(url, args.model, make_requests(args), int(args.concurrency), None))
            runs[f"logquant-serve {policy}"] = summarize(results, elapsed) | {"label": policy}
    print_runs(runs, {name: "transformers" for name in runs if name != "transformers"})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
