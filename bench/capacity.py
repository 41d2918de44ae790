"""Max concurrent sequences per KV policy at one fixed KV budget, by filling the engine's
KV manager with sequences of each context length until no page is left.

    python bench/capacity.py --kv-cache-memory 8GiB --json results/capacity.json

No weights are needed: the model shapes are written here (SmolLM2-135M, the default model,
Llama-3.1-8B and Gemma-3-270M from their config.json values). The full-precision tier is
16-bit. Gemma 3's 15 sliding-window layers (512 positions) form their own KV group, which
holds the newest 511 tokens of a sequence whatever its length; "Gemma-3-270M, every layer
full" is the same shape without KV groups (every layer kept every token, as before them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logquant.kv_manager import KVManager
from logquant.layout import KVLayout
from logquant.policy import make_policy
from logquant.provenance import provenance
from server.engine.config import parse_bytes

GEMMA3_WINDOWS = tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))  # 5 sliding : 1 full
SHAPES = {  # num_hidden_layers, num_key_value_heads, head_dim, per-layer windows (() = all full)
    "SmolLM2-135M": (30, 3, 64, ()),
    "Llama-3.1-8B": (32, 8, 128, ()),
    "Gemma-3-270M": (18, 1, 256, GEMMA3_WINDOWS),
    "Gemma-3-270M without KV groups": (18, 1, 256, ()),
}
POLICIES = ("fp16", "kivi", "logquant")


def max_sequences(layout: KVLayout, kv_budget_bytes: int, context_length: int) -> int:
    """Allocate sequences of `context_length` tokens until the KV manager says no."""
    allocator = KVManager.for_budget(layout, kv_budget_bytes)
    count = 0
    while allocator.can_allocate(f"s{count}", context_length):
        allocator.allocate(f"s{count}", context_length)
        count += 1
    assert allocator.capacity_bytes <= kv_budget_bytes
    return count


def run(shape: str, kv_budget_bytes: int, lengths: list[int], fp_budget: int, group_size: int) -> dict:
    layers, kv_heads, head_dim, windows = SHAPES[shape]
    table: dict[str, dict[int, int]] = {}
    bytes_per_token: dict[str, float] = {}
    for name in POLICIES:
        layout = KVLayout(
            layers, kv_heads, head_dim, make_policy(name, fp_budget, group_size), 2, group_size, layer_windows=windows
        )
        table[name] = {n: max_sequences(layout, kv_budget_bytes, n) for n in lengths}
        bytes_per_token[name] = layout.bytes_for(lengths[-1]) / lengths[-1]
    return {"sequences": table, "bytes_per_token_at_longest": bytes_per_token}


def print_table(shape: str, result: dict, lengths: list[int]) -> None:
    seqs = result["sequences"]
    print(f"\n{shape}: max concurrent sequences (ratio to fp16)")
    print(f"{'context':>8} | " + " | ".join(f"{p:>16}" for p in POLICIES))
    for n in lengths:
        cells = []
        for p in POLICIES:
            ratio = seqs[p][n] / seqs["fp16"][n] if seqs["fp16"][n] else float("inf")
            cells.append(f"{seqs[p][n]:>7} ({ratio:5.2f}x)")
        print(f"{n:>8} | " + " | ".join(f"{c:>16}" for c in cells))
    per_token = result["bytes_per_token_at_longest"]
    print(f"bytes/token at {lengths[-1]}: " + ", ".join(f"{p} {per_token[p]:.0f}" for p in POLICIES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-cache-memory", default="8GiB")
    parser.add_argument("--lengths", default="512,2048,8192,32768")
    parser.add_argument("--fp-budget", type=int, default=192)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument(
        "--json", type=Path, help="write {shape: {policy: {context_length: max_sequences}}} under 'results'"
    )
    args = parser.parse_args()
    budget = parse_bytes(args.kv_cache_memory)
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"KV budget {budget / 2**30:.2f} GiB, fp_budget {args.fp_budget}, group {args.group_size}, 16-bit tier")
    results = {}
    for shape in args.shapes.split(","):
        results[shape] = run(shape, budget, lengths, args.fp_budget, args.group_size)
        print_table(shape, results[shape], lengths)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "provenance": provenance(),
            "args": vars(args) | {"json": str(args.json)},
            "results": {s: r["sequences"] for s, r in results.items()},
            "bytes_per_token_at_longest": {s: r["bytes_per_token_at_longest"] for s, r in results.items()},
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
