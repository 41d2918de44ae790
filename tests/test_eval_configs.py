"""Cache specs of the evaluation tools and budget matching (no model weights needed)."""

import pytest
from transformers import LlamaConfig

from logquant.eval.configs import CacheConfig, default_specs, kv_bytes, mean_fp_tokens, parse_spec, parse_specs, resolve

SMOL = LlamaConfig(num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9, hidden_size=576)  # head_dim 64


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("fp16", CacheConfig("fp16")),
        ("kivi@192", CacheConfig("kivi", 192)),
        ("logquant@128:bits=4:sinks=4", CacheConfig("logquant", 128, bits=4, sink_tokens=4)),
        ("logquant@192:kout=2:wdiv=2.5", CacheConfig("logquant", 192, window_divisor=2.5, key_fp_channels=2)),
        (
            "logquant@bytes(kivi@192):sinks=4",
            CacheConfig("logquant", match="bytes", anchor=CacheConfig("kivi", 192), sink_tokens=4),
        ),
        ("kivi@fp(logquant@96)", CacheConfig("kivi", match="fp", anchor=CacheConfig("logquant", 96))),
    ],
)
def test_specs_parse_and_labels_round_trip(spec: str, expected: CacheConfig) -> None:
    assert parse_spec(spec) == expected
    assert expected.label == spec


@pytest.mark.parametrize(
    "bad", ["int4@3", "kivi", "kivi@192:foo=1", "fp16@3", "logquant@bytes(kivi)", "kivi@192:sinks"]
)
def test_bad_specs_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_spec(bad)


def test_default_specs_add_matched_columns() -> None:
    labels = [c.label for c in default_specs(["kivi", "logquant"], [128, 192], ["bytes", "fp"])]
    assert labels == [
        "fp16",
        "kivi@128",
        "logquant@128",
        "kivi@192",
        "logquant@192",
        "logquant@bytes(kivi@128)",
        "logquant@bytes(kivi@192)",
        "logquant@fp(kivi@128)",
        "logquant@fp(kivi@192)",
    ]
    assert [c.label for c in parse_specs("fp16, kivi@64")] == ["fp16", "kivi@64"]


@pytest.mark.parametrize("anchor_budget", [128, 192, 256])
@pytest.mark.parametrize("length", [1024, 4096])
def test_equal_bytes_is_the_largest_budget_within_the_anchors_bytes(anchor_budget: int, length: int) -> None:
    anchor = CacheConfig("kivi", anchor_budget)
    for spec in [f"logquant@bytes(kivi@{anchor_budget})", f"kivi@bytes(kivi@{anchor_budget}):sinks=4:kout=2"]:
        resolved = resolve(parse_spec(spec), SMOL, [length])
        target = kv_bytes(anchor, SMOL, length)
        assert kv_bytes(resolved, SMOL, length) <= target
        bigger = CacheConfig(
            resolved.policy,
            resolved.fp_budget + 1,
            sink_tokens=resolved.sink_tokens,
            key_fp_channels=resolved.key_fp_channels,
        )
        assert kv_bytes(bigger, SMOL, length) > target or resolved.fp_budget + 1 > 2 * length
    same = resolve(parse_spec(f"kivi@bytes(kivi@{anchor_budget})"), SMOL, [length])
    assert kv_bytes(same, SMOL, length) == kv_bytes(anchor, SMOL, length) and same.fp_budget >= anchor_budget


def test_an_unreachable_match_is_an_error() -> None:
    """4 key channels at 16 bits in every 32-token KIVI block cost more at 4096 tokens than
    shrinking the window from 128 to 32 tokens saves."""
    with pytest.raises(ValueError, match="no budget reaches the bytes of kivi@128"):
        resolve(parse_spec("kivi@bytes(kivi@128):kout=4"), SMOL, [4096])


def test_equal_fp_tokens_and_extra_bytes_of_options() -> None:
    lengths = list(range(1, 1024))
    matched = resolve(parse_spec("logquant@fp(kivi@192)"), SMOL, lengths)
    assert mean_fp_tokens(matched, lengths) <= mean_fp_tokens(CacheConfig("kivi", 192), lengths)
    assert mean_fp_tokens(CacheConfig("logquant", matched.fp_budget + 3), lengths) > mean_fp_tokens(
        CacheConfig("kivi", 192), lengths
    )
    plain, outliers = CacheConfig("logquant", 192), CacheConfig("logquant", 192, key_fp_channels=4)
    assert kv_bytes(outliers, SMOL, 4096) > kv_bytes(plain, SMOL, 4096)  # the 16-bit channels are paid for
    assert kv_bytes(CacheConfig("logquant", 192, bits=4), SMOL, 4096) > kv_bytes(plain, SMOL, 4096)
    assert kv_bytes(CacheConfig("fp16"), SMOL, 100) == 100 * 2 * 3 * 64 * 2 * 30
