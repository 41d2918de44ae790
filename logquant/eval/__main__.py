"""python -m logquant.eval {coverage,ppl,agreement,passkey} [options]

Each mode compares the 16-bit cache with 2-bit caches on the default real model, prints one
table and writes JSON (--json) with the command, commit, machine and model. Seeded.

Columns: by default fp16 plus every policy of --policies at every budget of --budgets (equal
full-precision budget B); --match bytes,fp adds each policy after the first at the budget that
gives it the first policy's KV bytes per sequence (bytes) or mean full-precision tokens (fp).
--configs lists columns explicitly instead, e.g. "fp16,kivi@192,logquant@bytes(kivi@192):sinks=4"
(see logquant/eval/configs.py for the spec syntax).

ppl and passkey also run through the serving engine instead of LogQuantCache:
`python bench/eval_engine.py ppl|passkey [the same options]` (the library does not import the
server; that script hands the engine in).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from logquant.eval.common import write_json
from logquant.eval.configs import default_specs, parse_specs
from logquant.eval.modes import RUNNERS
from logquant.eval.served import ENGINE_MODES, EvalEngine
from logquant.models import DEFAULT_MODEL, load_model
from logquant.provenance import provenance


def parse_args(
    argv: list[str] | None = None, through_engine: bool = False, prog: str | None = None
) -> argparse.Namespace:
    """`through_engine`: the caller runs the evaluation through a serving engine (ppl, passkey)."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m logquant.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", choices=sorted(RUNNERS))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", default="128,192,256", help="full-precision token budgets")
    parser.add_argument("--policies", default="kivi,logquant", help="the first one is the anchor of --match")
    parser.add_argument("--match", default="", help="bytes and/or fp: add matched columns (see above)")
    parser.add_argument("--configs", help="explicit comma-separated column specs (replaces the three above)")
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)  # moved: bench/eval_engine.py
    parser.add_argument("--length", type=int, default=1024, help="tokens of text (coverage, ppl)")
    parser.add_argument("--lengths", default="1024", help="passkey context lengths")
    parser.add_argument("--cases", type=int, default=6, help="passkey cases per length / agreement prompts")
    parser.add_argument("--tokens", type=int, default=48, help="agreement: tokens generated per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not set(filter(None, args.match.split(","))) <= {"bytes", "fp"}:
        parser.error(f"--match takes bytes and/or fp, got {args.match!r}")
    if args.engine and not through_engine:
        parser.error(
            "--engine: the library does not import the server; run python bench/eval_engine.py ppl|passkey ..."
        )
    if through_engine and args.mode not in ENGINE_MODES:
        parser.error(f"through the engine: {' and '.join(ENGINE_MODES)} only")
    args.engine = through_engine  # recorded in the JSON
    return args


def main(argv: list[str] | None = None, engine: EvalEngine | None = None, prog: str | None = None) -> dict:
    """`engine`: run ppl or passkey through it instead of LogQuantCache (bench/eval_engine.py)."""
    args = parse_args(argv, through_engine=engine is not None, prog=prog)
    started = provenance(args.model)  # the commit the run started from
    torch.manual_seed(args.seed)
    if args.configs:
        cols = parse_specs(args.configs)
    else:
        match = [m for m in args.match.split(",") if m]
        cols = default_specs(args.policies.split(","), [int(b) for b in args.budgets.split(",")], match)
    model, tokenizer = load_model(args.model, args.device)
    result = RUNNERS[args.mode](args, model, tokenizer, cols, engine)
    write_json(
        args.json, {"mode": args.mode, "args": vars(args) | {"json": str(args.json)}, "results": result}, started
    )
    return result


if __name__ == "__main__":
    main()
