"""Markdown tables from the JSON files `python -m logquant.eval` writes, for the README:

    python bench/accuracy_report.py results/accuracy_ppl.json results/accuracy_passkey.json

One table per file, one row per cache column (in the file's order, or the order of --rows),
with its budget B, KV bytes per token and mean full-precision tokens at the evaluated length.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = {"ppl": "perplexity", "top1_agreement": "top-1 = fp16", "coverage": "coverage", "agreement": "agreement"}


def table(record: dict, rows: list[str] | None) -> list[str]:
    results = record["results"]
    labels = rows or list(results)
    if record["mode"] == "passkey":
        lengths = sorted({int(n) for row in results.values() for n in row})
        head = ["cache"] + [f"{n} tokens: acc (B, bytes/token)" for n in lengths]
        body = [[f"`{label}`"] + [_passkey_cell(results[label][str(n)]) for n in lengths] for label in labels]
    else:
        metrics = [m for m in METRICS if m in next(iter(results.values()))]
        head = ["cache", "B", "bytes/token", "fp tokens"] + [METRICS[m] for m in metrics]
        body = [
            [f"`{label}`", *_facts(results[label]), *(_number(results[label][m]) for m in metrics)] for label in labels
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _facts(cell: dict) -> list[str]:
    budget = cell["fp_budget"]
    return [
        "-" if budget is None else str(budget),
        f"{cell['kv_bytes_per_token']:.0f}",
        f"{cell['mean_fp_tokens']:.0f}",
    ]


def _passkey_cell(cell: dict) -> str:
    budget = "-" if cell["fp_budget"] is None else cell["fp_budget"]
    return f"{cell['accuracy']:.2f} ({budget}, {cell['kv_bytes_per_token']:.0f})"


def _number(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--rows", help="comma-separated labels to show, in this order")
    args = parser.parse_args()
    for path in args.files:
        record = json.loads(path.read_text())
        print(f"\n{path} ({record['mode']}): `{record['provenance']['command']}`\n")
        print("\n".join(table(record, args.rows.split(",") if args.rows else None)))


if __name__ == "__main__":
    main()
