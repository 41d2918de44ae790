"""Token policies: which tokens of a sequence stay in full precision.

Every policy is a deterministic function of the sequence length. Tokens leave the
full-precision set in *blocks* (`block_tokens` tokens at a time); a block is quantized once,
as one key group per channel, and never touched again. A `PolicyState` follows one sequence:
`append(n)` returns the blocks demoted by those n tokens, and appending n tokens at once
gives exactly the same state as n single appends.

- `fp16`: nothing is ever demoted.
- `kivi`: the newest tokens stay full precision while there are at most R = fp_budget of
  them; past that the oldest `group_size` full-precision tokens are demoted as one block
  (so between R - group_size + 1 and R tokens are full precision).
- `window` (not a cache policy: the KV manager gives it to sliding-window layers): the newest
  W - 1 tokens, which is all the next query of a W-token window sees; older ones are dropped.
- `logquant`: W = fp_budget // 3; a local window of the newest W+1..2W tokens plus a
  log-sparse set of W older tokens. When the window passes 2W its oldest W tokens merge with
  the sparse set, which keeps every other token (`(sparse + oldest_W)[0::2]`); the other half
  (W tokens) is the demoted block. The first time, the sparse set is just the oldest W.
  `window_divisor` sets W = fp_budget / window_divisor (3 by default, the paper's split).

Any policy can keep `sink_tokens` first tokens at full precision for good (attention sinks,
StreamingLLM): `SinkPolicy` runs the policy on the tokens after them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

POLICY_NAMES = ("fp16", "kivi", "logquant")


class PolicyState(ABC):
    """Per-sequence state of a policy."""

    num_tokens: int

    @abstractmethod
    def append(self, count: int) -> list[list[int]]:
        """Add `count` tokens; return the blocks of positions that left full precision."""

    @abstractmethod
    def full_precision_positions(self) -> list[int]:
        """Positions currently in full precision, ascending."""


class TokenPolicy(ABC):
    name: str
    fp_budget: int
    block_tokens: int  # tokens per demoted block; 0 when nothing is ever demoted
    max_fp_tokens: int | None  # most full-precision tokens a sequence ever holds; None: unbounded

    @abstractmethod
    def new_state(self) -> PolicyState: ...

    @abstractmethod
    def num_blocks(self, num_tokens: int) -> int:
        """Blocks demoted once a sequence holds `num_tokens` tokens (closed form)."""

    def full_precision_positions(self, num_tokens: int) -> list[int]:
        state = self.new_state()
        state.append(num_tokens)
        return state.full_precision_positions()

    def num_fp_tokens(self, num_tokens: int) -> int:
        return num_tokens - self.num_blocks(num_tokens) * self.block_tokens

    def peak_fp_tokens(self, num_tokens: int) -> int:
        """Most full-precision tokens held at any length <= num_tokens."""
        return num_tokens if self.max_fp_tokens is None else min(num_tokens, self.max_fp_tokens)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Fp16State(PolicyState):
    num_tokens: int = 0

    def append(self, count: int) -> list[list[int]]:
        self.num_tokens += count
        return []

    def full_precision_positions(self) -> list[int]:
        return list(range(self.num_tokens))


@dataclass(frozen=True)
class Fp16Policy(TokenPolicy):
    fp_budget: int = 0
    name: str = "fp16"
    block_tokens: int = 0
    max_fp_tokens: int | None = None

    def new_state(self) -> PolicyState:
        return _Fp16State()

    def num_blocks(self, num_tokens: int) -> int:
        return 0


@dataclass
class _KiviState(PolicyState):
    residual: int
    group_size: int
    num_tokens: int = 0
    num_quantized: int = 0

    def append(self, count: int) -> list[list[int]]:
        self.num_tokens += count
        blocks = []
        while self.num_tokens - self.num_quantized > self.residual:
            blocks.append(list(range(self.num_quantized, self.num_quantized + self.group_size)))
            self.num_quantized += self.group_size
        return blocks

    def full_precision_positions(self) -> list[int]:
        return list(range(self.num_quantized, self.num_tokens))


@dataclass(frozen=True)
class KiviPolicy(TokenPolicy):
    fp_budget: int
    group_size: int = 32
    name: str = "kivi"

    @property
    def block_tokens(self) -> int:  # type: ignore[override]
        return self.group_size

    @property
    def max_fp_tokens(self) -> int:  # type: ignore[override]
        return self.fp_budget

    def new_state(self) -> PolicyState:
        return _KiviState(residual=self.fp_budget, group_size=self.group_size)

    def num_blocks(self, num_tokens: int) -> int:
        return max(0, _ceil_div(num_tokens - self.fp_budget, self.group_size))


@dataclass
class _LogQuantState(PolicyState):
    window: int
    num_tokens: int = 0
    local_start: int = 0  # the local window is [local_start, num_tokens)
    sparse: list[int] = field(default_factory=list)
    merged_once: bool = False

    def append(self, count: int) -> list[list[int]]:
        self.num_tokens += count
        blocks = []
        w = self.window
        while self.num_tokens - self.local_start > 2 * w:
            oldest = list(range(self.local_start, self.local_start + w))
            self.local_start += w
            if not self.merged_once:
                self.sparse, self.merged_once = oldest, True
                continue
            merged = self.sparse + oldest
            self.sparse = merged[0::2]
            blocks.append(merged[1::2])
        return blocks

    def full_precision_positions(self) -> list[int]:
        return self.sparse + list(range(self.local_start, self.num_tokens))


@dataclass(frozen=True)
class LogQuantPolicy(TokenPolicy):
    fp_budget: int
    window_divisor: float = 3.0
    name: str = "logquant"

    @property
    def window(self) -> int:
        return int(self.fp_budget / self.window_divisor)

    @property
    def block_tokens(self) -> int:  # type: ignore[override]
        return self.window

    @property
    def max_fp_tokens(self) -> int:  # type: ignore[override]
        return 3 * self.window

    def new_state(self) -> PolicyState:
        return _LogQuantState(window=self.window)

    def num_blocks(self, num_tokens: int) -> int:
        merges = max(0, _ceil_div(num_tokens - 2 * self.window, self.window))
        return max(0, merges - 1)


@dataclass
class _SinkState(PolicyState):
    sink_tokens: int
    inner: PolicyState
    num_tokens: int = 0

    def append(self, count: int) -> list[list[int]]:
        to_sinks = max(0, min(count, self.sink_tokens - self.num_tokens))
        self.num_tokens += count
        blocks = self.inner.append(count - to_sinks) if count > to_sinks else []
        return [[p + self.sink_tokens for p in block] for block in blocks]

    def full_precision_positions(self) -> list[int]:
        sinks = list(range(min(self.num_tokens, self.sink_tokens)))
        return sinks + [p + self.sink_tokens for p in self.inner.full_precision_positions()]


@dataclass(frozen=True)
class SinkPolicy(TokenPolicy):
    """`inner` applied to the tokens after the first `sink_tokens`, which stay full precision."""

    inner: TokenPolicy
    sink_tokens: int

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def fp_budget(self) -> int:  # type: ignore[override]
        return self.inner.fp_budget

    @property
    def block_tokens(self) -> int:  # type: ignore[override]
        return self.inner.block_tokens

    @property
    def max_fp_tokens(self) -> int | None:  # type: ignore[override]
        inner = self.inner.max_fp_tokens
        return None if inner is None else inner + self.sink_tokens

    def new_state(self) -> PolicyState:
        return _SinkState(self.sink_tokens, self.inner.new_state())

    def num_blocks(self, num_tokens: int) -> int:
        return self.inner.num_blocks(max(0, num_tokens - self.sink_tokens))


@dataclass
class _WindowState(PolicyState):
    keep: int
    num_tokens: int = 0

    def append(self, count: int) -> list[list[int]]:
        self.num_tokens += count
        return []  # tokens that leave the window are dropped, never demoted

    def full_precision_positions(self) -> list[int]:
        return list(range(max(0, self.num_tokens - self.keep), self.num_tokens))


@dataclass(frozen=True)
class WindowPolicy(TokenPolicy):
    """The tokens a sliding-window layer of `window` positions needs: the newest window - 1."""

    window: int
    name: str = "window"
    fp_budget: int = 0
    block_tokens: int = 0

    @property
    def max_fp_tokens(self) -> int:  # type: ignore[override]
        return self.window - 1

    def new_state(self) -> PolicyState:
        return _WindowState(keep=self.window - 1)

    def num_blocks(self, num_tokens: int) -> int:
        return 0

    def num_fp_tokens(self, num_tokens: int) -> int:
        return min(num_tokens, self.window - 1)


# Attention sinks by default: KIVI keeps its first 4 tokens at full precision (at equal KV
# bytes this won on both perplexity and passkey, README "Beyond the paper"); LogQuant keeps
# token 0 by construction, and 4 sinks tied on passkey, so it keeps none by default.
DEFAULT_SINK_TOKENS = {"fp16": 0, "kivi": 4, "logquant": 0}


def make_policy(
    name: str, fp_budget: int = 192, group_size: int = 32, sink_tokens: int | None = None, window_divisor: float = 3.0
) -> TokenPolicy:
    """Build a policy by name (`fp16`, `kivi`, `logquant`) at a full-precision budget; the
    first `sink_tokens` tokens never leave full precision (None: `DEFAULT_SINK_TOKENS`);
    `window_divisor`: LogQuant's W = fp_budget / window_divisor."""
    policy = _base_policy(name, fp_budget, group_size, window_divisor)
    sink_tokens = DEFAULT_SINK_TOKENS[name] if sink_tokens is None else sink_tokens
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    return SinkPolicy(policy, sink_tokens) if sink_tokens and policy.block_tokens else policy


def _base_policy(name: str, fp_budget: int, group_size: int, window_divisor: float) -> TokenPolicy:
    if name == "fp16":
        return Fp16Policy(fp_budget=fp_budget)
    if name == "kivi":
        if fp_budget < group_size:
            raise ValueError(f"kivi needs fp_budget >= group_size ({group_size}), got {fp_budget}")
        return KiviPolicy(fp_budget=fp_budget, group_size=group_size)
    if name == "logquant":
        if window_divisor < 1 or int(fp_budget / window_divisor) < 1:
            raise ValueError(
                f"logquant needs a window fp_budget / {window_divisor:g} of at least 1, got fp_budget {fp_budget}"
            )
        return LogQuantPolicy(fp_budget=fp_budget, window_divisor=window_divisor)
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICY_NAMES}")


def sink_tokens_of(policy: TokenPolicy) -> int:
    """Tokens `policy` keeps at full precision for good at the start of every sequence."""
    return policy.sink_tokens if isinstance(policy, SinkPolicy) else 0
