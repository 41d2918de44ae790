"""python -m logquant.eval {coverage,ppl,agreement,passkey} [options]

Each mode compares fp16, kivi and logquant at equal full-precision budgets (128, 192, 256 by
default) on the default real model, prints one table and writes JSON (--json). Seeded.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from tqdm import tqdm

from logquant.data import essays_text
from logquant.eval import coverage as cov
from logquant.eval import passkey as pk
from logquant.eval import perplexity as ppl
from logquant.eval.common import CacheConfig, configs, print_table, write_json
from logquant.models import DEFAULT_MODEL, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m logquant.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("mode", choices=["coverage", "ppl", "agreement", "passkey"])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", default="128,192,256", help="full-precision token budgets")
    parser.add_argument("--policies", default="kivi,logquant")
    parser.add_argument("--length", type=int, default=1024, help="tokens of text (coverage, ppl)")
    parser.add_argument("--lengths", default="1024", help="passkey context lengths")
    parser.add_argument("--cases", type=int, default=6, help="passkey cases per length / agreement prompts")
    parser.add_argument("--tokens", type=int, default=48, help="agreement: tokens generated per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def text_ids(tokenizer, length: int, offset: int = 0) -> list[int]:
    ids = tokenizer.encode(essays_text()[offset * 6 : offset * 6 + length * 8])
    assert len(ids) >= length, "not enough text"
    return ids[:length]


def run_coverage(args, model, tokenizer, cols: list[CacheConfig]) -> dict:
    ids = text_ids(tokenizer, args.length)
    maps = cov.attention_maps(model, ids)
    queries = list(range(min(256, args.length - 1), args.length, 16))
    result = {c.label: cov.coverage(maps, c, queries) for c in tqdm(cols, desc="coverage")}
    mean_fp = {c.label: cov.mean_fp_tokens(c, queries) for c in cols}
    cells = {
        (c.policy, str(c.fp_budget)): f"{result[c.label]:.3f} ({mean_fp[c.label]:.0f})" for c in cols if c.policy != "fp16"
    }
    budgets = sorted({str(c.fp_budget) for c in cols if c.policy != "fp16"}, key=int)
    print_table(f"attention coverage of the full-precision set ({args.length} tokens, token 0 excluded; "
                "mean full-precision tokens in brackets)",
                sorted({c.policy for c in cols if c.policy != "fp16"}), budgets, cells)  # fmt: skip
    return {label: {"coverage": result[label], "mean_fp_tokens": mean_fp[label]} for label in result}


def run_ppl(args, model, tokenizer, cols: list[CacheConfig]) -> dict:
    ids = text_ids(tokenizer, args.length)
    reference = ppl.decode_logits(model, CacheConfig("fp16"), ids)
    result = {}
    for c in cols:
        logprobs = reference if c.policy == "fp16" else ppl.decode_logits(model, c, ids)
        result[c.label] = {"ppl": ppl.perplexity(logprobs, ids), "top1_agreement": ppl.argmax_agreement(logprobs, reference)}
    cells = {(lbl, k): f"{v[k]:.4f}" for lbl, v in result.items() for k in ("ppl", "top1_agreement")}
    print_table(f"perplexity, {args.length} tokens decoded one by one", list(result), ["ppl", "top1_agreement"], cells)
    return result


def run_agreement(args, model, tokenizer, cols: list[CacheConfig]) -> dict:
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.cases):
        excerpt = tokenizer.decode(text_ids(tokenizer, args.length, offset=rng.randrange(0, 80_000)))
        messages = [{"role": "user", "content": excerpt + "\n\nSummarize the text above in a few sentences."}]
        prompts.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)))
    eos = {tokenizer.eos_token_id}
    continuations = [ppl.greedy_continuation(model, p, args.tokens, eos) for p in tqdm(prompts, desc="fp16")]
    result = {}
    for c in cols:
        pairs = tqdm(list(zip(prompts, continuations)), desc=c.label, leave=False)
        counts = [ppl.forced_agreement(model, c, p, g) for p, g in pairs]
        result[c.label] = sum(m for m, _ in counts) / max(1, sum(n for _, n in counts))
    cells = {(lbl, "agreement"): f"{v:.3f}" for lbl, v in result.items()}
    print_table(f"greedy agreement with fp16 ({args.cases} prompts of {args.length} tokens, {args.tokens} tokens)",
                list(result), ["agreement"], cells)  # fmt: skip
    return result


def run_passkey(args, model, tokenizer, cols: list[CacheConfig]) -> dict:
    rng = random.Random(args.seed)
    haystack = tokenizer.encode(essays_text())
    lengths = [int(n) for n in args.lengths.split(",")]
    result: dict[str, dict[str, float]] = {c.label: {} for c in cols}
    for n in lengths:
        hits: dict[str, list[bool]] = {c.label: [] for c in cols}
        for _ in tqdm(range(args.cases), desc=f"passkey {n} tokens"):
            case = pk.make_case(tokenizer, haystack, n, rng)
            context = pk.prefill(model, case)
            for c in cols:
                hits[c.label].append(pk.is_correct(case, pk.answer(model, c, case, tokenizer, context)))
        for c in cols:
            result[c.label][str(n)] = sum(hits[c.label]) / len(hits[c.label])
    cells = {(lbl, n): f"{v:.2f}" for lbl, row in result.items() for n, v in row.items()}
    print_table(f"passkey accuracy ({args.cases} cases per length)", list(result), [str(n) for n in lengths], cells)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.device)
    cols = configs(args.policies.split(","), [int(b) for b in args.budgets.split(",")])
    runner = {"coverage": run_coverage, "ppl": run_ppl, "agreement": run_agreement, "passkey": run_passkey}
    result = runner[args.mode](args, model, tokenizer, cols)
    write_json(args.json, {"mode": args.mode, "model": args.model, "args": vars(args) | {"json": str(args.json)},
                           "results": result})  # fmt: skip
    return result


if __name__ == "__main__":
    main()
