"""The evaluations run their cache configurations as the rows of one batch
(`logquant/eval/batched.py`); each row sees what it sees alone, up to float noise: a batched
matmul rounds differently from a single-row one (~1e-7), which is invisible with 16-bit caches
but can move a key across a rounding boundary of the 2-bit grid (as between the engine and
`LogQuantCache`, tests/test_served_path.py), so 2-bit rows are bounded on perplexity."""

import pytest
import torch
from tiny import byte_tokenizer, tiny_model
from transformers import DynamicCache

from logquant.eval import passkey as pk
from logquant.eval.configs import parse_specs
from logquant.eval.perplexity import argmax_agreement, decode_predictions, decode_predictions_many, perplexity

SPECS = "fp16,kivi@32,logquant@12,logquant@12:kout=2:sinks=2,kivi@32:bits=4"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_predictions_equal_one_cache_at_a_time(arch: str) -> None:
    model = tiny_model(arch)
    ids = torch.randint(3, 250, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    configs = parse_specs(SPECS)
    together = decode_predictions_many(model, configs, ids)
    for config, batched in zip(configs, together):
        alone = decode_predictions(model, config, ids)
        if config.policy == "fp16":
            torch.testing.assert_close(batched.target_logprobs, alone.target_logprobs, atol=1e-4, rtol=0)
        assert perplexity(batched) == pytest.approx(perplexity(alone), rel=0.01), config.label
        assert argmax_agreement(batched, alone) >= 0.97, config.label


def test_batched_passkey_answers_equal_one_cache_at_a_time() -> None:
    model, tok = tiny_model("gemma3"), byte_tokenizer()
    ids = tok.encode("some filler text, " * 6 + "the key is 12345. " + "more filler " * 3)
    case = pk.PasskeyCase("12345", ids[:-10], ids[-10:])
    context = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([case.context_ids]), cache=context)
    configs = parse_specs(SPECS)
    together = pk.answer_many(model, configs, case, tok, context)
    assert together == [pk.answer(model, config, case, tok, context) for config in configs]
