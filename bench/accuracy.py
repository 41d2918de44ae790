"""Accuracy per KV policy at equal full-precision budgets, on a real model: attention coverage
(paper Fig. 4), perplexity of real text decoded token by token, greedy agreement with fp16,
and passkey retrieval. Runs every `python -m logquant.eval` mode; prints one table, one JSON.

    python bench/accuracy.py --json results/accuracy.json                 # full settings
    python bench/accuracy.py --smoke                                      # seconds, for CI
    python bench/accuracy.py --model /path/to/Llama-3.1-8B-Instruct       # on a GPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logquant.eval.__main__ import main as run_eval

FULL = {
    "coverage": ["--length", "2048"],
    "ppl": ["--length", "1024"],
    "agreement": ["--cases", "8", "--length", "768", "--tokens", "48"],
    "passkey": ["--lengths", "1024,2048,4096", "--cases", "50"],
}
SMOKE = {
    "coverage": ["--length", "96"],
    "ppl": ["--length", "32"],
    "agreement": ["--cases", "1", "--length", "48", "--tokens", "4"],
    "passkey": ["--lengths", "96", "--cases", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--budgets", default="128,192,256")
    parser.add_argument("--modes", default="coverage,ppl,agreement,passkey")
    parser.add_argument("--smoke", action="store_true", help="smallest settings (CI)")
    parser.add_argument("--passkey-cases", type=int, help="override the number of passkey cases per length")
    parser.add_argument("--passkey-lengths", help="override the passkey context lengths, e.g. 1024,2048")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = SMOKE if args.smoke else FULL
    budgets = "36" if args.smoke else args.budgets
    results = {}
    for mode in args.modes.split(","):
        extra = list(settings[mode])
        if mode == "passkey" and args.passkey_cases:
            extra[extra.index("--cases") + 1] = str(args.passkey_cases)
        if mode == "passkey" and args.passkey_lengths:
            extra[extra.index("--lengths") + 1] = args.passkey_lengths
        results[mode] = {"args": extra, "results": run_eval([mode, "--model", args.model, "--budgets", budgets, *extra])}
        if args.json:  # after every mode, so a long run that is stopped keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model": args.model, "budgets": budgets, **results}, indent=2))
    print_summary(results)


def print_summary(results: dict) -> None:
    """One table: a row per cache configuration, a column per measurement."""
    rows: dict[str, dict[str, str]] = {}
    for mode, entry in results.items():
        for label, value in entry["results"].items():
            row = rows.setdefault(label, {})
            if mode == "coverage":
                row["coverage"] = "-" if label == "fp16" else f"{value['coverage']:.3f}"
            elif mode == "ppl":
                row["ppl"], row["top1 vs fp16"] = f"{value['ppl']:.3f}", f"{value['top1_agreement']:.3f}"
            elif mode == "agreement":
                row["greedy agreement"] = f"{value:.3f}"
            else:
                row.update({f"passkey@{n}": f"{acc:.2f}" for n, acc in value.items()})
    columns = sorted({c for row in rows.values() for c in row}, key=lambda c: (c.startswith("passkey"), c))
    print("\nsummary")
    print(f"{'cache':<14} | " + " | ".join(f"{c:>16}" for c in columns))
    for label, row in rows.items():
        print(f"{label:<14} | " + " | ".join(f"{row.get(c, ''):>16}" for c in columns))


if __name__ == "__main__":
    main()
