"""The engine's outputs on the default model, as JSON: a behaviour fingerprint for refactors.

Runs the offline engine (`LLM`) over 8 prompts (6 short chat questions, 2 essay excerpts long
enough to demote tokens at the default budget) for 64 tokens each, greedy (ignore_eos), under
fp16, kivi and logquant (the default budget 192 and a small one, 48), plus a structured-output
batch (JSON schema) and a seeded sampling batch with logprobs. Compare two runs with `cmp`:

    python bench/greedy_outputs.py --json /tmp/after.json && cmp /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logquant.data import essays_text
from logquant.models import DEFAULT_MODEL, load_model
from server.engine import LLM, SamplingParams
from server.engine.request import StructuredSpec

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "Who wrote Pride and Prejudice?",
    "Give me a short recipe for pancakes.",
]
COLUMNS = [("fp16", 192), ("kivi", 48), ("logquant", 48), ("logquant", 192)]
ENGINE_OPTIONS = {"kv_cache_memory": "256MiB", "device": "cpu"}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def prompts(tokenizer) -> list[list[int]]:
    """The chat-templated prompts: the questions, then two essay excerpts to summarize."""
    text = essays_text()
    contents = QUESTIONS + [text[offset : offset + 1600] + "\n\nSummarize the text above." for offset in (0, 50_000)]
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, return_dict=False
            )
        )
        for c in contents
    ]


def outputs(llm: LLM, ids: list[list[int]], params: SamplingParams) -> list[dict]:
    return [
        {
            "samples": [
                {"token_ids": c.token_ids, "finish_reason": c.finish_reason, "logprobs": c.logprobs} for c in o.outputs
            ],
            "prompt_logprobs": o.prompt_logprobs,
        }
        for o in llm.generate(ids, params)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer = load_model(DEFAULT_MODEL, "cpu")
    ids = prompts(tokenizer)
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    result: dict[str, object] = {"prompt_lengths": [len(p) for p in ids]}
    for policy, budget in COLUMNS:
        llm = LLM(model_object=model, tokenizer=tokenizer, policy=policy, fp_budget=budget, **ENGINE_OPTIONS)
        result[f"{policy}@{budget} greedy"] = outputs(llm, ids, greedy)
        if (policy, budget) == ("logquant", 48):
            structured = SamplingParams(max_tokens=48, temperature=0, structured=StructuredSpec.json_schema(SCHEMA))
            result[f"{policy}@{budget} json_schema"] = outputs(llm, ids[:4], structured)
            seeded = SamplingParams(
                max_tokens=32, temperature=0.8, top_p=0.9, seed=7, logprobs=2, n=2, prompt_logprobs=1
            )
            result[f"{policy}@{budget} seeded"] = outputs(llm, ids[:4], seeded)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}: {len(result) - 1} runs; prompt lengths {result['prompt_lengths']}")


if __name__ == "__main__":
    main()
