"""Offline engine against plain `model.generate` with a static batch, side by side in one run.

The same random-token prompts (exact lengths, fixed seed) go to `model.generate` (one static
batch, DynamicCache, greedy, exactly --max-tokens new tokens) and to the engine (`LLM`,
continuous batching, greedy, ignore_eos) under every policy and decode backend, all sharing
one copy of the model; each engine gets the KV budget its batch needs. Prints output tokens/s
and the ratios engine/generate and policy/fp16 (same backend); `--profile` prints the top ops
of one engine run.

    python bench/engine.py --batch 1,8,32,64 --prompt-len 256 --json results/engine_256.json
    python bench/engine.py --batch 1,8,32 --prompt-len 2048 --json results/engine_2048.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from logquant.layout import KVLayout  # noqa: E402
from logquant.models import load_model  # noqa: E402
from logquant.policy import make_policy  # noqa: E402
from logquant.provenance import provenance  # noqa: E402
from server.engine import LLM, SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--batch", default="1,8,32,64")
    p.add_argument("--prompt-len", default="256,1024")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--policies", default="fp16,kivi,logquant")
    p.add_argument("--backends", default="cpu,torch", help="decode backends (auto, torch, cpu, triton)")
    p.add_argument("--fp-budget", type=int, default=192)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the engine's default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="print the top ops of the last engine run")
    p.add_argument("--json", type=Path)
    return p.parse_args()


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch * 100003 + length)
    return torch.randint(100, vocab - 100, (batch, length), generator=gen).tolist()


@torch.inference_mode()
def time_generate(model, ids: list[list[int]], max_tokens: int) -> float:
    input_ids = torch.tensor(ids)
    model.set_attn_implementation("sdpa")  # an engine on the shared model set its own
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
    )
    elapsed = time.perf_counter() - start
    assert out.shape == (len(ids), len(ids[0]) + max_tokens)
    return len(ids) * max_tokens / elapsed


def engine_seconds(llm: LLM, ids: list[list[int]], max_tokens: int) -> float:
    """Wall time of the engine generating exactly `max_tokens` greedy tokens for every prompt."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(ids, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return elapsed


def time_engine(llm: LLM, ids: list[list[int]], max_tokens: int) -> float:
    elapsed = engine_seconds(llm, ids, max_tokens)
    return len(ids) * max_tokens / elapsed


def make_llm(args: argparse.Namespace, model, tokenizer, policy: str, backend: str, batch: int, length: int) -> LLM:
    """An engine on the shared model whose KV budget holds `batch` sequences of `length` tokens."""
    extra = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    layout = KVLayout.for_model(model.config, make_policy(policy, args.fp_budget), dtype_bytes=model.dtype.itemsize)
    budget = batch * layout.bytes_for(length) + 4 * layout.page_bytes_all_layers
    return LLM(
        args.model,
        model_object=model,
        tokenizer=tokenizer,
        policy=policy,
        fp_budget=args.fp_budget,
        kv_cache_memory=budget,
        dtype=args.dtype,
        max_num_seqs=batch,
        decode_backend=backend,
        max_model_len=length,
        **extra,
    )


def profile(llm: LLM, ids: list[list[int]], max_tokens: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        time_engine(llm, ids, max_tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    args = parse_args()
    configs = [(p, b) for p in args.policies.split(",") for b in args.backends.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    model, tokenizer = load_model(args.model, torch.device("cpu"), dtype)
    rows, vocab = [], model.config.vocab_size
    for length in [int(n) for n in args.prompt_len.split(",")]:
        for batch in batches:
            ids = prompts(batch, length, vocab)
            row = {"prompt_len": length, "batch": batch, "generate": time_generate(model, ids, args.max_tokens)}
            for policy, backend in configs:
                llm = make_llm(args, model, tokenizer, policy, backend, batch, length + args.max_tokens)
                time_engine(llm, ids[:1], 2)  # warm-up
                row[f"{policy}/{backend}"] = time_engine(llm, ids, args.max_tokens)
                if args.profile and (length, batch) == (int(args.prompt_len.split(",")[-1]), batches[-1]):
                    profile(llm, ids, args.max_tokens)
                del llm
                gc.collect()
            rows.append(row)
            print(format_row(row, configs), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "provenance": provenance(args.model),
            "dtype": str(dtype),
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2))


def format_row(row: dict, configs: list[tuple[str, str]]) -> str:
    cells = [f"prompt {row['prompt_len']:5d} batch {row['batch']:3d}  generate {row['generate']:7.1f} tok/s"]
    for policy, backend in configs:
        name = f"{policy}/{backend}"
        cells.append(f"{name} {row[name]:7.1f} ({row[name] / row['generate']:.2f}x gen)")
    for policy, backend in configs:
        if policy != "fp16" and f"fp16/{backend}" in row:
            cells.append(f"{policy}/fp16 ({backend}) {row[f'{policy}/{backend}'] / row[f'fp16/{backend}']:.2f}x")
    return "  ".join(cells)


if __name__ == "__main__":
    main()
