"""Where a decode-heavy run's time goes: prefill against decode, per policy and batch, in one run.

For each policy and batch, the offline engine (shared model, a KV budget that holds the batch)
runs the same random-token prompts twice: with 1 output token (prefill only) and with
--max-tokens output tokens. Prints prefill tokens/s, decode tokens/s (the extra output tokens
over the extra time) and prefill's share of the full run. Used to explain the decode-heavy
equal-budget comparison (bench/compare.py --scenario decode), whose batches are the 16-bit
cache's capacity at 1 GiB (17) and all of its requests (51):

    python bench/phases.py --batch 17,51 --prompt-len 1000 --max-tokens 65 --json results/phases.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine import engine_seconds, make_llm, prompts  # noqa: E402

from logquant.models import load_model  # noqa: E402
from logquant.provenance import provenance  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--batch", default="17,51")
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=65)
    p.add_argument("--policies", default="fp16,logquant")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--fp-budget", type=int, default=192)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.dtype, args.max_num_batched_tokens = None, None  # what engine.make_llm reads
    return args


def measure(args: argparse.Namespace, model, tokenizer, policy: str, batch: int) -> dict:
    ids = prompts(batch, args.prompt_len, model.config.vocab_size)
    llm = make_llm(args, model, tokenizer, policy, args.backend, batch, args.prompt_len + args.max_tokens)
    engine_seconds(llm, ids[:1], 2)  # warm-up
    prefill_s = engine_seconds(llm, ids, 1)
    full_s = engine_seconds(llm, ids, args.max_tokens)
    del llm
    gc.collect()
    decode_tokens = batch * (args.max_tokens - 1)
    return {
        "policy": policy,
        "batch": batch,
        "prefill_s": prefill_s,
        "full_s": full_s,
        "prefill_tok_s": batch * args.prompt_len / prefill_s,
        "decode_tok_s": decode_tokens / (full_s - prefill_s),
        "prefill_share": prefill_s / full_s,
    }


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model, torch.device("cpu"), torch.float32)
    rows = []
    for policy in args.policies.split(","):
        for batch in [int(b) for b in args.batch.split(",")]:
            row = measure(args, model, tokenizer, policy, batch)
            rows.append(row)
            print(
                f"{policy:9s} batch {batch:3d}  prefill {row['prefill_tok_s']:7.1f} tok/s  "
                f"decode {row['decode_tok_s']:6.1f} tok/s  prefill share {row['prefill_share']:.0%}",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "provenance": provenance(args.model),
            "threads": torch.get_num_threads(),
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "backend": args.backend,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
