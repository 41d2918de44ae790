"""The four evaluations, each over a list of cache configurations (columns). Every column's
budget is resolved for the lengths the evaluation attends at (see `configs.resolve`), and
every result carries the column's budget, KV bytes and mean full-precision tokens."""

from __future__ import annotations

import argparse
import random

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logquant.data import essays_text
from logquant.eval import coverage as cov
from logquant.eval import passkey as pk
from logquant.eval import perplexity as ppl
from logquant.eval.common import CacheConfig, column_facts, print_table
from logquant.eval.served import EvalEngine

FACTS = ["B", "bytes/token", "fp tokens"]


def text_ids(tokenizer: PreTrainedTokenizerBase, length: int, offset: int = 0) -> list[int]:
    ids = tokenizer.encode(essays_text()[offset * 6 : offset * 6 + length * 8])
    assert len(ids) >= length, "not enough text"
    return ids[:length]


def _fact_cells(label: str, facts: dict) -> dict[tuple[str, str], str]:
    budget = facts["fp_budget"]
    return {
        (label, "B"): "-" if budget is None else str(budget),
        (label, "bytes/token"): f"{facts['kv_bytes_per_token']:.0f}",
        (label, "fp tokens"): f"{facts['mean_fp_tokens']:.0f}",
    }


def run_coverage(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer, cols: list[CacheConfig], engine: EvalEngine | None
) -> dict:
    ids = text_ids(tokenizer, args.length)
    maps = cov.attention_maps(model, ids)
    queries = list(range(min(256, args.length - 1), args.length, 16))
    result, cells = {}, {}
    for c in tqdm(cols, desc="coverage"):
        resolved, facts = column_facts(c, model.config, queries)
        result[c.label] = facts | {"coverage": cov.coverage(maps, resolved, queries)}
        cells |= _fact_cells(c.label, facts) | {(c.label, "coverage"): f"{result[c.label]['coverage']:.3f}"}
    print_table(
        f"attention coverage of the full-precision set ({args.length} tokens, token 0 excluded)",
        list(result),
        FACTS + ["coverage"],
        cells,
    )
    return result


def run_ppl(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer, cols: list[CacheConfig], engine: EvalEngine | None
) -> dict:
    """Through `engine` if given (each column one engine, fed one token per step), else
    through LogQuantCache (every column one row of a batch)."""
    ids = text_ids(tokenizer, args.length)
    lengths = list(range(1, len(ids)))  # the cache holds t tokens when it predicts token t
    resolved = {c.label: column_facts(c, model.config, lengths) for c in cols}
    quantized = [c for c in cols if c.policy != "fp16"]
    if engine is not None:
        reference = engine.predictions(model, tokenizer, CacheConfig("fp16"), ids)
        predicted = {
            c.label: engine.predictions(model, tokenizer, resolved[c.label][0], ids)
            for c in tqdm(quantized, desc="ppl")
        }
    else:  # every column is one row of a batch: the model's weights are read once per step for all
        rows = ppl.decode_predictions_many(
            model, [CacheConfig("fp16")] + [resolved[c.label][0] for c in quantized], ids
        )
        reference, predicted = rows[0], {c.label: p for c, p in zip(quantized, rows[1:])}
    result, cells = {}, {}
    for c in cols:
        facts = resolved[c.label][1]
        predictions = reference if c.policy == "fp16" else predicted[c.label]
        result[c.label] = facts | {
            "ppl": round(ppl.perplexity(predictions), 4),
            "top1_agreement": round(ppl.argmax_agreement(predictions, reference), 4),
        }
        cells |= _fact_cells(c.label, facts)
        cells |= {(c.label, k): f"{result[c.label][k]:.4f}" for k in ("ppl", "top1_agreement")}
    path = "the engine (LLM), one token per step" if engine is not None else "LogQuantCache, one token at a time"
    print_table(
        f"perplexity, {args.length} tokens through {path}", list(result), FACTS + ["ppl", "top1_agreement"], cells
    )
    return result


def run_agreement(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer, cols: list[CacheConfig], engine: EvalEngine | None
) -> dict:
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.cases):
        excerpt = tokenizer.decode(text_ids(tokenizer, args.length, offset=rng.randrange(0, 80_000)))
        messages = [{"role": "user", "content": excerpt + "\n\nSummarize the text above in a few sentences."}]
        prompts.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)))
    eos = {tokenizer.eos_token_id}
    continuations = [ppl.greedy_continuation(model, p, args.tokens, eos) for p in tqdm(prompts, desc="fp16")]
    lengths = list(range(max(map(len, prompts)), max(map(len, prompts)) + args.tokens))
    result, cells = {}, {}
    for c in cols:
        resolved, facts = column_facts(c, model.config, lengths)
        pairs = tqdm(list(zip(prompts, continuations)), desc=c.label, leave=False)
        counts = [ppl.forced_agreement(model, resolved, p, g) for p, g in pairs]
        result[c.label] = facts | {"agreement": round(sum(m for m, _ in counts) / max(1, sum(n for _, n in counts)), 4)}
        cells |= _fact_cells(c.label, facts) | {(c.label, "agreement"): f"{result[c.label]['agreement']:.3f}"}
    print_table(
        f"greedy agreement with fp16 ({args.cases} prompts of {args.length} tokens, {args.tokens} tokens)",
        list(result),
        FACTS + ["agreement"],
        cells,
    )
    return result


def run_passkey(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer, cols: list[CacheConfig], engine: EvalEngine | None
) -> dict:
    rng = random.Random(args.seed)
    haystack = tokenizer.encode(essays_text())
    lengths = [int(n) for n in args.lengths.split(",")]
    result: dict[str, dict[str, dict]] = {c.label: {} for c in cols}
    for n in lengths:
        cases = [pk.make_case(tokenizer, haystack, n, rng) for _ in range(args.cases)]
        resolved = {c.label: column_facts(c, model.config, [n]) for c in cols}
        answers = pk.run_cases(model, tokenizer, cases, [resolved[c.label][0] for c in cols], engine, f"passkey {n}")
        for c, texts in zip(cols, answers):
            hits = [pk.is_correct(case, text) for case, text in zip(cases, texts)]
            result[c.label][str(n)] = resolved[c.label][1] | {"accuracy": sum(hits) / len(hits), "hits": sum(hits)}
    cells = {
        (lbl, n): f"{v['accuracy']:.2f} (B={v['fp_budget'] or '-'})"
        for lbl, row in result.items()
        for n, v in row.items()
    }
    print_table(
        f"passkey accuracy ({args.cases} cases per length; the budget B at that length in brackets)",
        list(result),
        [str(n) for n in lengths],
        cells,
    )
    return result


RUNNERS = {"coverage": run_coverage, "ppl": run_ppl, "agreement": run_agreement, "passkey": run_passkey}
