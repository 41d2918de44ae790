"""Offline engine against plain `model.generate` with a static batch, side by side in one run.

The same random-token prompts (exact lengths, fixed seed) go to `model.generate` (one static
batch, DynamicCache, greedy, exactly --max-tokens new tokens) and to the engine (`LLM`,
continuous batching, greedy, ignore_eos) under every policy. Prints output tokens/s and the
ratios engine/generate and policy/fp16; `--profile` prints the top ops of one engine run.

    python bench/engine.py --batch 1,8,32,64 --prompt-len 256,1024 --json results/engine.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from logquant.provenance import provenance  # noqa: E402

from logquant.models import load_model  # noqa: E402
from server.engine import LLM, SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--batch", default="1,8,32,64")
    p.add_argument("--prompt-len", default="256,1024")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--policies", default="fp16,kivi,logquant")
    p.add_argument("--fp-budget", type=int, default=192)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the engine's default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory", default="6GiB")
    p.add_argument("--profile", action="store_true", help="print the top ops of the last engine run")
    p.add_argument("--json", type=Path)
    return p.parse_args()


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch * 100003 + length)
    return torch.randint(100, vocab - 100, (batch, length), generator=gen).tolist()


@torch.inference_mode()
def time_generate(model, ids: list[list[int]], max_tokens: int) -> float:
    input_ids = torch.tensor(ids)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert out.shape == (len(ids), len(ids[0]) + max_tokens)
    return len(ids) * max_tokens / elapsed


def time_engine(llm: LLM, ids: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(ids, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return len(ids) * max_tokens / elapsed


def make_llm(args: argparse.Namespace, policy: str, max_seqs: int) -> LLM:
    extra = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    return LLM(args.model, policy=policy, fp_budget=args.fp_budget, kv_cache_memory=args.kv_cache_memory,
               dtype=args.dtype, max_num_seqs=max(max_seqs, 1), **extra)  # fmt: skip


def profile(llm: LLM, ids: list[list[int]], max_tokens: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        time_engine(llm, ids, max_tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    args = parse_args()
    policies = args.policies.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    llms = {p: make_llm(args, p, max(batches)) for p in policies}
    model, _ = load_model(args.model, torch.device("cpu"), llms[policies[0]].engine.dtype)
    vocab = model.config.vocab_size
    rows = []
    for length in [int(n) for n in args.prompt_len.split(",")]:
        for batch in batches:
            ids = prompts(batch, length, vocab)
            time_engine(llms[policies[0]], ids[:1], 2)  # warm-up
            row = {"prompt_len": length, "batch": batch, "generate": time_generate(model, ids, args.max_tokens)}
            for policy in policies:
                row[policy] = time_engine(llms[policy], ids, args.max_tokens)
            rows.append(row)
            print(format_row(row, policies), flush=True)
    if args.profile:
        profile(llms[policies[-1]], prompts(batches[-1], int(args.prompt_len.split(",")[-1]), vocab), args.max_tokens)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"provenance": provenance(args.model), "dtype": str(llms[policies[0]].engine.dtype),
                                         "rows": rows}, indent=2))  # fmt: skip


def format_row(row: dict, policies: list[str]) -> str:
    cells = [f"prompt {row['prompt_len']:5d} batch {row['batch']:3d}  generate {row['generate']:7.1f} tok/s"]
    for policy in policies:
        cells.append(f"{policy} {row[policy]:7.1f} ({row[policy] / row['generate']:.2f}x gen)")
    if "fp16" in row:
        cells += [f"{p}/fp16 {row[p] / row['fp16']:.2f}x" for p in policies if p != "fp16"]
    return "  ".join(cells)


if __name__ == "__main__":
    main()
