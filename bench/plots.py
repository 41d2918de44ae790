"""Plots (PNG, in docs/) from the JSON the benchmarks write:

    python bench/plots.py --serve results/serve.json --capacity results/capacity.json \
        --accuracy results/accuracy.json --out docs

- throughput_vs_concurrency.png   (serve.py run with several --concurrency values)
- capacity_vs_context.png         (capacity.py)
- coverage_vs_budget.png          (accuracy.py, coverage)
- accuracy_vs_bits.png            (accuracy.py: passkey accuracy and perplexity vs bits/value)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from logquant.layout import KVLayout  # noqa: E402
from logquant.policy import make_policy  # noqa: E402

DEFAULT_SHAPE = (30, 3, 64)  # SmolLM2-135M: layers, kv heads, head dim
COLORS = {"fp16": "tab:gray", "kivi": "tab:blue", "logquant": "tab:red"}


def bits_per_value(label: str, context: int) -> float:
    """KV bits per cached value at `context` tokens, paging included (16-bit tier)."""
    policy, _, budget = label.partition("@")
    layout = KVLayout(*DEFAULT_SHAPE, make_policy(policy, int(budget or 192)), 2, 32)
    values = context * 2 * DEFAULT_SHAPE[0] * DEFAULT_SHAPE[1] * DEFAULT_SHAPE[2]
    return layout.bytes_for(context) * 8 / values


def plot_serve(data: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    by_label: dict[str, list[tuple[int, float]]] = {}
    for run in data["runs"].values():
        by_label.setdefault(run["label"], []).append((run["concurrency"], run["output_tokens_per_s"]))
    for label, points in by_label.items():
        points.sort()
        ax.plot([c for c, _ in points], [t for _, t in points], "o-", label=label, color=COLORS.get(label))
    ax.set(xlabel="concurrent requests", ylabel="output tokens/s", xscale="log",
           title=f"Throughput at KV budget {data['args']['kv_cache_memory']}")  # fmt: skip
    ax.legend()
    return save(fig, out / "throughput_vs_concurrency.png")


def plot_capacity(data: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4), squeeze=False)
    for ax, (shape, table) in zip(axes[0], data.items()):
        for policy, row in table.items():
            lengths = sorted(int(n) for n in row)
            ax.plot(lengths, [row[str(n)] for n in lengths], "o-", label=policy, color=COLORS.get(policy))
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="max concurrent sequences",
               title=shape)  # fmt: skip
        ax.legend()
    return save(fig, out / "capacity_vs_context.png")


def plot_coverage(data: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    results = data["coverage"]["results"]
    for policy in ("kivi", "logquant"):
        points = sorted((int(k.split("@")[1]), v["coverage"]) for k, v in results.items() if k.startswith(policy))
        ax.plot([b for b, _ in points], [c for _, c in points], "o-", label=policy, color=COLORS[policy])
    ax.set(xlabel="full-precision budget (tokens)", ylabel="attention coverage (token 0 excluded)",
           title="Attention mass on full-precision tokens")  # fmt: skip
    ax.legend()
    return save(fig, out / "coverage_vs_budget.png")


def plot_accuracy_vs_bits(data: dict, out: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    passkey = data["passkey"]["results"]
    longest = max(int(n) for row in passkey.values() for n in row)
    ppl = data["ppl"]["results"]
    ppl_len = int(data["ppl"]["args"][data["ppl"]["args"].index("--length") + 1])
    for label in passkey:
        point = (bits_per_value(label, longest), passkey[label][str(longest)])
        left.scatter(*point, color=COLORS[label.split("@")[0]])
        left.annotate(label, point, fontsize=7)
    for label in ppl:
        point = (bits_per_value(label, ppl_len), ppl[label]["ppl"])
        right.scatter(*point, color=COLORS[label.split("@")[0]])
        right.annotate(label, point, fontsize=7)
    left.set(xlabel=f"KV bits per value at {longest} tokens", ylabel="passkey accuracy", title=f"Passkey @ {longest}")
    right.set(xlabel=f"KV bits per value at {ppl_len} tokens", ylabel="perplexity", title="Perplexity")
    return save(fig, out / "accuracy_vs_bits.png")


def save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=Path)
    p.add_argument("--capacity", type=Path)
    p.add_argument("--accuracy", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    if args.serve:
        plot_serve(json.loads(args.serve.read_text()), args.out)
    if args.capacity:
        plot_capacity(json.loads(args.capacity.read_text()), args.out)
    if args.accuracy:
        data = json.loads(args.accuracy.read_text())
        plot_coverage(data, args.out)
        plot_accuracy_vs_bits(data, args.out)


if __name__ == "__main__":
    main()
