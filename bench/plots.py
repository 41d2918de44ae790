"""Plots (PNG, in docs/) from the JSON the benchmarks and `python -m logquant.eval` write:

    python bench/plots.py --serve results/serve.json --capacity results/capacity.json \
        --coverage results/accuracy_coverage.json \
        --ppl results/accuracy_ppl.json results/accuracy_variants_ppl.json \
        --passkey results/accuracy_passkey.json --out docs

- throughput_vs_concurrency.png   (serve.py run with several --concurrency values)
- capacity_vs_context.png         (capacity.py)
- coverage_vs_budget.png          (eval coverage: equal-budget columns)
- pareto_ppl_vs_bytes.png         (eval ppl: perplexity against KV bytes per token, Pareto front)
- passkey_vs_bytes.png            (eval passkey: accuracy against KV bytes per token, per length)

The accuracy plots of a model other than the default one are named after it, e.g.
pareto_ppl_vs_bytes_gemma-3-270m.png (one Pareto plot per model).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from logquant.eval.configs import parse_spec  # noqa: E402
from logquant.models import DEFAULT_MODEL  # noqa: E402

COLORS = {"fp16": "tab:gray", "kivi": "tab:blue", "logquant": "tab:red"}


def series_of(label: str) -> str:
    """The line a results column belongs to: policy and bit width, plus any option."""
    config = parse_spec(label)
    if config.policy == "fp16":
        return "fp16"
    extras = "".join(part for part in label.split(":")[1:] if not part.startswith("bits="))
    return f"{config.policy} {config.bits}-bit" + (f" {extras}" if extras else "")


def marker_style(series: str) -> str:
    """Lines for plain policies (by bit width), lone markers for options."""
    if "sinks" in series and "kout" in series:
        return "*"
    for option, style in (("kout", "P"), ("sinks", "v"), ("wdiv", "x"), ("4-bit", "s--"), ("8-bit", "^:")):
        if option in series:
            return style
    return "o-" if series != "fp16" else "D"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (fewer bytes and lower perplexity)."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def model_of(data: dict) -> str:
    return data.get("provenance", {}).get("model", {}).get("name", DEFAULT_MODEL)


def named(stem: str, data: dict) -> str:
    """`stem.png` for the default model, `stem_<model>.png` for any other."""
    model = model_of(data)
    return f"{stem}.png" if model == DEFAULT_MODEL else f"{stem}_{Path(model).name}.png"


def plot_serve(data: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    by_label: dict[str, list[tuple[int, float]]] = {}
    for run in data["runs"].values():
        by_label.setdefault(run["label"], []).append((run["concurrency"], run["output_tokens_per_s"]))
    for label, points in by_label.items():
        points.sort()
        ax.plot([c for c, _ in points], [t for _, t in points], "o-", label=label, color=COLORS.get(label))
    ax.set(
        xlabel="concurrent requests",
        ylabel="output tokens/s",
        xscale="log",
        title=f"Throughput at KV budget {data['args']['kv_cache_memory']}",
    )
    ax.legend()
    return save(fig, out / "throughput_vs_concurrency.png")


def plot_capacity(data: dict, out: Path) -> Path:
    shapes = data["results"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (shape, table) in zip(axes[0], shapes.items()):
        for policy, row in table.items():
            lengths = sorted(int(n) for n in row)
            ax.plot(lengths, [row[str(n)] for n in lengths], "o-", label=policy, color=COLORS.get(policy))
        ax.set(
            xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="max concurrent sequences", title=shape
        )
        ax.legend()
    return save(fig, out / "capacity_vs_context.png")


def plot_coverage(data: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    results = {k: v for k, v in data["results"].items() if re.fullmatch(r"(kivi|logquant)@\d+", k)}
    for policy in ("kivi", "logquant"):
        points = sorted((v["fp_budget"], v["coverage"]) for k, v in results.items() if k.startswith(policy))
        ax.plot([b for b, _ in points], [c for _, c in points], "o-", label=policy, color=COLORS[policy])
    ax.set(
        xlabel="full-precision budget B (tokens)",
        ylabel="attention coverage (token 0 excluded)",
        title="Attention mass on full-precision tokens",
    )
    ax.legend()
    return save(fig, out / "coverage_vs_budget.png")


def plot_pareto(data: dict, out: Path) -> Path:
    """Perplexity against KV bytes per token at the evaluated length; one line per series."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_series: dict[str, list[tuple[float, float, str]]] = {}
    for label, v in data["results"].items():
        by_series.setdefault(series_of(label), []).append((v["kv_bytes_per_token"], v["ppl"], label))
    for series, points in sorted(by_series.items()):
        points.sort()
        color = COLORS.get(series.split()[0], "tab:green")
        ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker_style(series), color=color, label=series)
    front = pareto_front([(x, y) for points in by_series.values() for x, y, _ in points])
    ax.step([x for x, _ in front], [y for _, y in front], "k-", where="post", alpha=0.3, label="Pareto front")
    length = data["args"]["length"]
    ax.set(
        xscale="log",
        xlabel=f"KV bytes per token at {length} tokens (16-bit tier, all layers)",
        ylabel=f"perplexity ({length} tokens, one at a time)",
        title=f"Perplexity against KV memory: {model_of(data)}",
    )
    ax.legend(fontsize=8)
    return save(fig, out / named("pareto_ppl_vs_bytes", data))


def plot_passkey(data: dict, out: Path) -> Path:
    results = data["results"]
    lengths = sorted({int(n) for row in results.values() for n in row})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        by_series: dict[str, list[tuple[float, float]]] = {}
        for label, row in results.items():
            cell = row[str(n)]
            by_series.setdefault(series_of(label), []).append((cell["kv_bytes_per_token"], cell["accuracy"]))
        for series, points in sorted(by_series.items()):
            points.sort()
            ax.plot(
                [x for x, _ in points], [y for _, y in points], "o-", color=COLORS.get(series.split()[0]), label=series
            )
        ax.set(
            xscale="log",
            ylim=(-0.05, 1.05),
            xlabel="KV bytes per token",
            ylabel="passkey accuracy",
            title=f"{model_of(data)}, {n} tokens",
        )
        ax.legend(fontsize=8)
    return save(fig, out / named("passkey_vs_bytes", data))


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
    p.add_argument("--coverage", type=Path)
    p.add_argument("--ppl", type=Path, nargs="+", help="ppl files at one --length; their columns share the plot")
    p.add_argument("--passkey", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    if args.serve:
        plot_serve(json.loads(args.serve.read_text()), args.out)
    if args.capacity:
        plot_capacity(json.loads(args.capacity.read_text()), args.out)
    for path, plot in ((args.coverage, plot_coverage), (args.passkey, plot_passkey)):
        if path:
            plot(json.loads(path.read_text()), args.out)
    if args.ppl:
        records = [json.loads(path.read_text()) for path in args.ppl]
        assert len({r["args"]["length"] for r in records}) == 1, "ppl files of different lengths"
        assert len({model_of(r) for r in records}) == 1, "ppl files of different models: one plot per model"
        merged = {k: v for r in records for k, v in r["results"].items()}
        plot_pareto(
            {"args": records[0]["args"], "provenance": records[0].get("provenance", {}), "results": merged}, args.out
        )


if __name__ == "__main__":
    main()
