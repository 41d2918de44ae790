"""Decode attention of one layer, batch x context: fp16 SDPA over a dense cache, the batched
torch 2-bit path (store gather + dequantize + two SDPA calls) and the fused Triton kernel.

    python bench/kernel.py --json results/kernel.json                   # CUDA: the full sweep
    python bench/kernel.py --dry-run --json /tmp/kernel.json            # CPU: one tiny case

Each case fills a one-layer store with B sequences of `context` tokens (random K/V, random
2-bit codes, sane scales), plans the next decode step and times attention only (the writes
are the same for both 2-bit paths). Bytes per step: the dense fp16 cache for SDPA; for the
2-bit paths, what the kernel must read (fp tokens, 2-bit pages, index entries). GB/s is bytes
over time; `x fp16` is the fp16 time over the path's time. Without CUDA the kernel runs in
Triton's interpreter: those timings only show that the path runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before logquant.kernels.decode defines the kernels

sys.path.insert(0, str(Path(__file__).parent))
from logquant.provenance import provenance  # noqa: E402

from logquant.attention import bucket_attention  # noqa: E402
from logquant.kernels import triton_available  # noqa: E402
from logquant.kv_manager import KVManager  # noqa: E402
from logquant.layout import KVLayout  # noqa: E402
from logquant.policy import make_policy  # noqa: E402
from logquant.store import PagedKVStore  # noqa: E402

SHAPES = {  # one layer: (query heads, kv heads, head_dim)
    "llama-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
    "tiny": (8, 2, 32),
}


@dataclass(frozen=True)
class Case:
    shape: str
    policy: str
    fp_budget: int
    group_size: int
    batch: int
    context: int
    dtype: torch.dtype
    device: torch.device

    @property
    def heads(self) -> tuple[int, int, int]:
        return SHAPES[self.shape]

    def layout(self) -> KVLayout:
        _, kv_heads, head_dim = self.heads
        policy = make_policy(self.policy, self.fp_budget, group_size=self.group_size)
        size = torch.empty((), dtype=self.dtype).element_size()
        return KVLayout(1, kv_heads, head_dim, policy, dtype_bytes=size, group_size=self.group_size)


def described(case: Case) -> dict:
    return asdict(case) | {"dtype": str(case.dtype), "device": str(case.device)}


def fill_store(case: Case) -> tuple[PagedKVStore, KVManager]:
    """B sequences of `context` tokens, bookkeeping from the KV manager, contents random."""
    layout = case.layout()
    manager = KVManager(layout, case.batch * layout.pages_for(case.context + 1) + 1)
    backend = "triton" if triton_available() else "torch"
    store = PagedKVStore(layout, manager.num_pages, case.dtype, case.device, decode_backend=backend)
    for i in range(case.batch):
        manager.allocate(f"s{i}", case.context)
        manager.plan_step([(f"s{i}", case.context)])
    fp_pages = torch.tensor([p for s in manager.sequences.values() for p in s.fp_pages], device=case.device)
    q_pages = torch.tensor([p for s in manager.sequences.values() for p in s.q_pages], device=case.device)
    store.fp[0, fp_pages] = torch.randn(store.fp[0, fp_pages].shape, device=case.device).to(case.dtype)
    if q_pages.numel():
        for codes in (store.key_codes, store.value_codes):
            codes[0, q_pages] = torch.randint(0, 256, codes[0, q_pages].shape, dtype=torch.uint8, device=case.device)
        for scale, zero in ((store.key_scale, store.key_zero), (store.value_scale, store.value_zero)):
            scale[0, q_pages] = torch.rand(scale[0, q_pages].shape, device=case.device).half() * 0.5 + 0.01
            zero[0, q_pages] = -torch.rand(zero[0, q_pages].shape, device=case.device).half()
    return store, manager


def bytes_per_step(case: Case, layout: KVLayout, manager: KVManager) -> tuple[int, int]:
    """(dense fp16 cache, what the kernel reads: fp tokens + 2-bit blocks + index entries)."""
    _, kv_heads, head_dim = case.heads
    dense = case.batch * (case.context + 1) * 2 * kv_heads * head_dim * 2
    fp_tokens = sum(len(s.slot_of) for s in manager.sequences.values())
    blocks = sum(len(s.q_pages) for s in manager.sequences.values())
    return dense, fp_tokens * (layout.fp_token_bytes + 4) + blocks * (layout.q_block_bytes + 4)


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of `fn` after two warm-up calls (one call on the CPU)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_case(case: Case, reps: int) -> dict:
    heads, kv_heads, head_dim = case.heads
    store, manager = fill_store(case)
    dense_bytes, q_bytes = bytes_per_step(case, store.layout, manager)
    seqs = list(manager.sequences)
    for seq in seqs:
        manager.allocate(seq, case.context + 1)
    step = store.prepare(manager.plan_step([(s, 1) for s in seqs]))
    bucket, scale, dev = step.buckets[0], head_dim**-0.5, case.device
    q, k, v = (torch.randn(case.batch, h, head_dim, device=dev, dtype=case.dtype) for h in (heads, kv_heads, kv_heads))
    dense_shape = (case.batch, kv_heads, case.context + 1, head_dim)
    dense_k, dense_v = (torch.randn(dense_shape, device=dev, dtype=torch.float16) for _ in "kv")
    dense_q = q.to(torch.float16).unsqueeze(2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row = described(case) | {"bytes_fp16": dense_bytes, "bytes_2bit": q_bytes}
    row["fp16_ms"] = timed(lambda: sdpa(dense_q, dense_k, dense_v, scale=scale, enable_gqa=True), dev, reps)
    row["torch_2bit_ms"] = timed(lambda: bucket_attention(q, *store.gather(0, bucket, k, v), bucket, scale), dev, reps)
    if bucket.decode is not None:
        from logquant.kernels.decode import StoreLayer, decode_attention

        view, out = StoreLayer.of(store.buffer, 0, store.dtype, store.layout), torch.empty_like(q)
        row["kernel_ms"] = timed(lambda: decode_attention(view, bucket.decode, q, k, v, scale, out), dev, reps)
        expected = bucket_attention(q, *store.gather(0, bucket, k, v), bucket, scale)
        row["kernel_max_abs_diff"] = float((out.float() - expected.float()).abs().max())
    return row


def derived(row: dict) -> dict:
    """GB/s of each path and its speedup over fp16 SDPA."""
    extra = {"fp16_gbps": row["bytes_fp16"] / row["fp16_ms"] / 1e6}
    for path in ("torch_2bit", "kernel"):
        if f"{path}_ms" in row:
            extra[f"{path}_gbps"] = row["bytes_2bit"] / row[f"{path}_ms"] / 1e6
            extra[f"{path}_x_fp16"] = row["fp16_ms"] / row[f"{path}_ms"]
    return row | extra


def print_row(row: dict) -> None:
    if "skipped" in row:
        print(f"{row['batch']:>5} {row['context']:>7}  skipped: {row['skipped']}")
        return
    kernel = "      n/a"
    if "kernel_ms" in row:
        kernel = f"{row['kernel_ms']:9.3f} {row['kernel_gbps']:7.1f} {row['kernel_x_fp16']:5.2f}x"
    print(
        f"{row['batch']:>5} {row['context']:>7} {row['bytes_fp16'] / 2**20:9.1f} {row['bytes_2bit'] / 2**20:9.1f}"
        f" {row['fp16_ms']:9.3f} {row['fp16_gbps']:7.1f} {row['torch_2bit_ms']:9.3f} {row['torch_2bit_gbps']:7.1f}"
        f" {row['torch_2bit_x_fp16']:5.2f}x {kernel}"
    )


def sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    print(f"{'batch':>5} {'context':>7} {'fp16 MiB':>9} {'2bit MiB':>9} {'fp16 ms':>9} {'GB/s':>7} "
          f"{'torch ms':>9} {'GB/s':>7} {'x fp16':>6} {'kernel ms':>9} {'GB/s':>7} {'x fp16':>6}")  # fmt: skip
    for batch in args.batches:
        for context in args.contexts:
            case = Case(args.shape, args.policy, args.fp_budget, args.group_size, batch, context, args.dtype, device)
            dense = batch * (context + 1) * 2 * SHAPES[args.shape][1] * SHAPES[args.shape][2] * 2
            if dense * 3 > args.max_gib * 2**30:  # dense cache + the torch path's dequantized copy
                rows.append(described(case) | {"skipped": f"over --max-gib {args.max_gib}"})
            else:
                rows.append(derived(run_case(case, args.reps)))
            print_row(rows[-1])
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 128, 256])
    p.add_argument("--contexts", type=ints, default=[1024, 4096, 16384, 32768])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument("--policy", choices=["logquant", "kivi"], default="logquant")
    p.add_argument("--fp-budget", type=int, default=192)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--max-gib", type=float, default=24.0, help="skip cases whose caches need more GPU memory")
    p.add_argument("--dry-run", action="store_true", help="one tiny case (batch 2, context 96), any device")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.dry_run:
        args.batches, args.contexts, args.shape, args.fp_budget, args.group_size = [2], [96], "tiny", 24, 8
    args.dtype = getattr(torch, args.dtype)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        sys.exit("bench/kernel.py needs CUDA (use --dry-run to check it on the CPU)")
    if not triton_available():
        print("triton is not installed: the kernel column is skipped (pip install -e '.[gpu]')")
    rows = sweep(args, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        record = {"provenance": provenance(), "device": name, "interpreted": interpreted, "rows": rows}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
