"""Decode attention of one layer, batch x context, side by side in one run: a dense 16-bit
cache under SDPA, and the paged store under both policies (`fp16`: every token full
precision; `logquant`: 2-bit blocks) on the torch path (gather + dequantize + SDPA) and on
the device's fused kernel (C++ on the CPU, Triton on CUDA), which reads the store in place.

    python bench/kernel.py --json results/kernel_cpu.json               # CPU: SmolLM2's layer shape
    python bench/kernel.py --json results/kernel.json                   # CUDA: Llama-8B's layer shape
    python bench/kernel.py --dry-run --json /tmp/kernel.json            # one tiny case, any device

Each case fills a one-layer store per policy with B sequences of `context` tokens (random
K/V, random 2-bit codes, sane scales), plans the next decode step and times attention only
(the writes are the same on both paths). Bytes per step: what each path must read (the
dense cache; fp tokens + 2-bit blocks + index entries for the paged store). GB/s is bytes
over time; `x` columns are the fp16 torch path's time over each path's time. Without CUDA
the Triton kernel is not run (its interpreter timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from logquant.attention import bucket_attention  # noqa: E402
from logquant.kv_manager import KVManager  # noqa: E402
from logquant.layout import KVLayout  # noqa: E402
from logquant.policy import make_policy  # noqa: E402
from logquant.provenance import provenance  # noqa: E402
from logquant.step import DecodeIndex  # noqa: E402
from logquant.store import PagedKVStore  # noqa: E402

SHAPES = {"llama-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64), "tiny": (8, 2, 32)}  # (heads, kv heads, dim)
PATHS = ("dense", "fp16_torch", "fp16_fused", "2bit_torch", "2bit_fused")


def fill_store(policy: str, args: argparse.Namespace, batch: int, context: int, device: torch.device, backend: str):
    """A one-layer store of `batch` sequences of `context` tokens and the decode step after."""
    _, kv_heads, head_dim = SHAPES[args.shape]
    element = torch.empty((), dtype=args.dtype).element_size()
    layout = KVLayout(
        1,
        kv_heads,
        head_dim,
        make_policy(policy, args.fp_budget, group_size=args.group_size),
        dtype_bytes=element,
        group_size=args.group_size,
    )
    manager = KVManager(layout, batch * layout.pages_for(context + 1) + 1)
    store = PagedKVStore(layout, manager.num_pages, args.dtype, device, decode_backend=backend)
    for i in range(batch):
        manager.allocate(f"s{i}", context + 1)
        manager.plan_step([(f"s{i}", context)])
    store.buffer.random_(0, 256)  # codes; then fp tokens and scales with sane values
    store.fp[0].copy_(torch.randn(store.fp[0].shape, device=device).to(args.dtype))
    if layout.block_tokens:
        sections = store.layer_sections[0]
        for scale, zero in (
            (sections["key_scale"], sections["key_zero"]),
            (sections["value_scale"], sections["value_zero"]),
        ):
            scale.copy_(torch.rand(scale.shape, device=device).half() * 0.5 + 0.01)
            zero.copy_(-torch.rand(zero.shape, device=device).half())
    plan = manager.plan_step([(f"s{i}", 1) for i in range(batch)])
    (group_plan,) = plan.groups
    fp_tokens = len(group_plan.fp_slots)
    read = fp_tokens * (layout.fp_token_bytes + 4) + len(group_plan.packed_pages) * (layout.packed_block_bytes + 4)
    return store, plan, read


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of `fn` after a warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def paged_paths(policy: str, args, batch: int, context: int, device: torch.device, tokens) -> dict[str, float]:
    fused = "triton" if device.type == "cuda" else "cpu"
    store, plan, read = fill_store(policy, args, batch, context, device, fused)
    query, key, value = tokens
    scale = SHAPES[args.shape][2] ** -0.5
    bucket = store.prepare(plan, decode_index=False).groups[0].buckets[0]
    index = store.prepare(plan, decode_index=True).groups[0].buckets[0]
    assert isinstance(index, DecodeIndex)
    out = torch.empty_like(query)
    name = "fp16" if policy == "fp16" else "2bit"
    row = {f"{name}_bytes": read}
    row[f"{name}_torch_ms"] = timed(
        lambda: bucket_attention(query, *store.gather(0, bucket, key, value), bucket, scale), device, args.reps
    )
    row[f"{name}_fused_ms"] = timed(lambda: _fused(store, index, tokens, scale, out), device, args.reps)
    expected = bucket_attention(query, *store.gather(0, bucket, key, value), bucket, scale)
    row[f"{name}_fused_max_abs_diff"] = float((out.float() - expected.float()).abs().max())
    return row


def _fused(store: PagedKVStore, index: DecodeIndex, tokens, scale: float, out: torch.Tensor) -> None:
    if store.decode_backend == "cpu":
        store._cpu_decode[0](store.layer_bytes(0), index, *tokens, scale, out)
    else:
        from logquant.kernels.decode import StoreLayer, decode_attention

        decode_attention(
            StoreLayer.of(store.layer_bytes(0), store.dtype, store.layout.groups[0]), index, *tokens, scale, out
        )


def run_case(args: argparse.Namespace, batch: int, context: int, device: torch.device) -> dict:
    heads, kv_heads, head_dim = SHAPES[args.shape]
    gen = torch.Generator(device=device).manual_seed(batch * 7919 + context)
    tokens = [
        torch.randn(batch, h, head_dim, device=device, generator=gen).to(args.dtype)
        for h in (heads, kv_heads, kv_heads)
    ]
    dense_dtype = torch.float16 if device.type == "cuda" else args.dtype
    dense = [torch.randn(batch, kv_heads, context + 1, head_dim, device=device).to(dense_dtype) for _ in "kv"]
    query = tokens[0].to(dense_dtype).unsqueeze(2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row = {"batch": batch, "context": context, "dense_bytes": 2 * dense[0].numel() * dense[0].element_size()}
    row["dense_ms"] = timed(lambda: sdpa(query, *dense, scale=head_dim**-0.5, enable_gqa=True), device, args.reps)
    for policy in ("fp16", args.policy):
        row |= paged_paths(policy, args, batch, context, device, tokens)
    for path in PATHS:
        if f"{path}_ms" in row:
            row[f"{path}_gbps"] = row[f"{path.split('_')[0]}_bytes"] / row[f"{path}_ms"] / 1e6
            row[f"{path}_x_fp16_torch"] = row["fp16_torch_ms"] / row[f"{path}_ms"]
    return row


def print_row(row: dict) -> None:
    cells = [f"{row['batch']:>5} {row['context']:>6}"]
    for path in PATHS:
        if f"{path}_ms" in row:
            cells.append(f"{row[f'{path}_ms']:8.3f} {row[f'{path}_gbps']:6.1f} {row[f'{path}_x_fp16_torch']:5.2f}x")
        else:
            cells.append(f"{'n/a':>23}")
    print("  ".join(cells), flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    cuda = torch.cuda.is_available()
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 128, 256] if cuda else [1, 8, 32, 64])
    p.add_argument("--contexts", type=ints, default=[1024, 4096, 16384, 32768] if cuda else [256, 1024, 2048, 4096])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b" if cuda else "smollm2-135m")
    p.add_argument("--policy", choices=["logquant", "kivi"], default="logquant")
    p.add_argument("--fp-budget", type=int, default=192)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16" if cuda else "float32")
    p.add_argument("--reps", type=int, default=20 if cuda else 5)
    p.add_argument("--max-gib", type=float, default=24.0 if cuda else 4.0, help="skip cases whose caches need more")
    p.add_argument("--dry-run", action="store_true", help="one tiny case (batch 2, context 96)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.dry_run:
        args.batches, args.contexts, args.shape, args.fp_budget, args.group_size, args.reps = (
            [2],
            [96],
            "tiny",
            24,
            8,
            2,
        )
    args.dtype = getattr(torch, args.dtype)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{'batch':>5} {'ctx':>6}  " + "  ".join(f"{p + ' ms  GB/s  x':>23}" for p in PATHS))
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            _, kv_heads, head_dim = SHAPES[args.shape]
            dense = batch * (context + 1) * 2 * kv_heads * head_dim * torch.empty((), dtype=args.dtype).element_size()
            if dense * 3 > args.max_gib * 2**30:  # dense cache + the fp16 store + the torch path's copy
                rows.append({"batch": batch, "context": context, "skipped": f"over --max-gib {args.max_gib}"})
                print(f"{batch:>5} {context:>6}  skipped: over --max-gib {args.max_gib}")
                continue
            rows.append(run_case(args, batch, context, device))
            print_row(rows[-1])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        record = {
            "provenance": provenance(),
            "device": name,
            "threads": torch.get_num_threads(),
            "shape": args.shape,
            "dtype": str(args.dtype),
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
