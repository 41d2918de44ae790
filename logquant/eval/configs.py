"""Cache configurations of the evaluation tools, written as short specs, and budget matching.

A spec names one column of a comparison:

    fp16                          the 16-bit cache (the reference)
    kivi@192                      a policy at full-precision budget B = 192
    logquant@192:bits=4           options: bits (2, 4, 8), sinks (tokens always kept at full
    kivi@192:sinks=4              precision), kout (key outlier channels kept at 16 bits per
    logquant@192:kout=4           2-bit block), wdiv (LogQuant window W = B / wdiv; default 3)
    logquant@bytes(kivi@192)      B chosen so that the KV bytes per sequence at the evaluated
                                  context equal those of the anchor `kivi@192`
    logquant@fp(kivi@192)         B chosen so that the mean number of full-precision tokens
                                  over the evaluated lengths equals the anchor's

A matched budget is the largest B whose measure does not exceed the anchor's, so the matched
policy never gets more memory (or more full-precision tokens) than the anchor; when no B does
(e.g. 16-bit key channels cost more than a small budget saves), `resolve` raises ValueError. Bytes are those
of the product's cache: a 16-bit full-precision tier, 16-bit scales (`KVLayout.bytes_for`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from logquant.hf import LogQuantCache
from logquant.layout import KVLayout
from logquant.policy import TokenPolicy, make_policy

GROUP_SIZE = 32
FP_TIER_BYTES = 2  # bytes are counted for a 16-bit full-precision tier (bf16/fp16 serving)
_SPEC = re.compile(
    r"^(?P<policy>fp16|kivi|logquant)"
    r"(?:@(?:(?P<budget>\d+)|(?P<match>bytes|fp)\((?P<anchor>[^()]+)\)))?"
    r"(?P<options>(?::[a-z]+=[0-9.]+)*)$"
)
_OPTIONS = {"bits": "bits", "sinks": "sink_tokens", "kout": "key_fp_channels", "wdiv": "window_divisor"}
_DEFAULTS = {"bits": 2, "sink_tokens": 0, "key_fp_channels": 0, "window_divisor": 3.0}


@dataclass(frozen=True)
class CacheConfig:
    """One column of a comparison. `fp_budget` is 0 for fp16 and for a matched budget that is
    not resolved yet (`match` and `anchor` set); `resolve` fills it in."""

    policy: str
    fp_budget: int = 0
    bits: int = 2
    sink_tokens: int = 0
    key_fp_channels: int = 0
    window_divisor: float = 3.0
    match: str | None = None  # "bytes" or "fp"
    anchor: CacheConfig | None = None

    @property
    def label(self) -> str:
        if self.policy == "fp16":
            return "fp16"
        budget = f"{self.match}({self.anchor.label})" if self.anchor is not None else str(self.fp_budget)
        options = "".join(
            f":{key}={_number(getattr(self, field))}"
            for key, field in _OPTIONS.items()
            if getattr(self, field) != _DEFAULTS[field]
        )
        return f"{self.policy}@{budget}{options}"

    def token_policy(self, group_size: int = GROUP_SIZE) -> TokenPolicy:
        assert self.anchor is None or self.fp_budget, "resolve a matched budget first"
        return make_policy(
            self.policy,
            self.fp_budget or 192,
            group_size,
            sink_tokens=self.sink_tokens,
            window_divisor=self.window_divisor,
        )

    def layout(self, model_config: PretrainedConfig) -> KVLayout:
        """The product's layout for this column: sliding-window layers in their own KV group."""
        return KVLayout.for_model(
            model_config,
            self.token_policy(),
            dtype_bytes=FP_TIER_BYTES,
            group_size=GROUP_SIZE,
            bits=self.bits,
            key_fp_channels=self.key_fp_channels,
        )

    def make_cache(self, model) -> LogQuantCache:
        return LogQuantCache(
            model.config,
            policy=self.token_policy(),
            group_size=GROUP_SIZE,
            bits=self.bits,
            key_fp_channels=self.key_fp_channels,
        )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def parse_spec(spec: str) -> CacheConfig:
    """`kivi@192:sinks=4` -> CacheConfig; raises ValueError naming the bad spec."""
    found = _SPEC.match(spec.strip())
    if not found:
        raise ValueError(f"bad cache spec {spec!r} (examples: fp16, kivi@192, logquant@bytes(kivi@192):sinks=4)")
    fields: dict[str, object] = {}
    for option in filter(None, found["options"].split(":")):
        key, value = option.split("=")
        if key not in _OPTIONS:
            raise ValueError(f"unknown option {key!r} in {spec!r}; expected one of {sorted(_OPTIONS)}")
        fields[_OPTIONS[key]] = float(value) if key == "wdiv" else int(value)
    if found["policy"] == "fp16":
        if found["budget"] or found["match"] or fields:
            raise ValueError(f"fp16 takes no budget or options: {spec!r}")
        return CacheConfig("fp16")
    if found["match"]:
        anchor = parse_spec(found["anchor"])
        return CacheConfig(found["policy"], match=found["match"], anchor=anchor, **fields)  # type: ignore[arg-type]
    if not found["budget"]:
        raise ValueError(f"{spec!r} needs a budget: {found['policy']}@B")
    return CacheConfig(found["policy"], int(found["budget"]), **fields)  # type: ignore[arg-type]


def parse_specs(text: str) -> list[CacheConfig]:
    return [parse_spec(s) for s in text.split(",") if s.strip()]


def default_specs(policies: list[str], budgets: list[int], match: list[str]) -> list[CacheConfig]:
    """fp16, each policy at each budget, then (for each `match` kind) every policy after the
    first matched to the first (the anchor) at each budget."""
    configs = [CacheConfig("fp16")] + [CacheConfig(p, b) for b in budgets for p in policies if p != "fp16"]
    anchor_policy, *others = [p for p in policies if p != "fp16"] or ["kivi"]
    for kind in match:
        configs += [CacheConfig(p, match=kind, anchor=CacheConfig(anchor_policy, b)) for b in budgets for p in others]
    return configs


def kv_bytes(config: CacheConfig, model_config: PretrainedConfig, num_tokens: int) -> int:
    """KV bytes (all layers) of one sequence of `num_tokens` tokens under `config`."""
    if config.policy == "fp16":
        return config.layout(model_config).fp16_bytes_for(num_tokens)
    return config.layout(model_config).bytes_for(num_tokens)


def mean_fp_tokens(config: CacheConfig, lengths: list[int]) -> float:
    """Mean size of the full-precision set when the cache holds each of `lengths` tokens."""
    if config.policy == "fp16":
        return sum(lengths) / len(lengths)
    policy = config.token_policy()
    return sum(policy.num_fp_tokens(n) for n in lengths) / len(lengths)


def resolve(config: CacheConfig, model_config: PretrainedConfig, lengths: list[int]) -> CacheConfig:
    """A config with a concrete budget. `lengths`: the cache lengths the evaluation attends at
    (bytes are matched at the longest, full-precision tokens over all of them)."""
    if config.anchor is None:
        return config
    anchor = resolve(config.anchor, model_config, lengths)

    def measure(c: CacheConfig) -> float:
        return kv_bytes(c, model_config, max(lengths)) if config.match == "bytes" else mean_fp_tokens(c, lengths)

    target = measure(anchor)
    base = replace(config, match=None, anchor=None)
    smallest = GROUP_SIZE if config.policy == "kivi" else 3
    fitting = [b for b in range(smallest, 2 * max(lengths) + 1) if measure(replace(base, fp_budget=b)) <= target]
    if not fitting:
        raise ValueError(
            f"{config.label}: no budget reaches the {config.match} of {anchor.label} at {max(lengths)} tokens "
            f"({target:.0f}); even B = {smallest} needs {measure(replace(base, fp_budget=smallest)):.0f}"
        )
    return replace(base, fp_budget=max(fitting))
