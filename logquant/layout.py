"""Byte layout and cost model of the paged KV store (pure Python, no tensors).

Layers are split into KV groups (vLLM's hybrid allocator): full-attention layers keep the
cache policy's full-precision and 2-bit tokens; sliding-window layers (W positions) keep only
the newest W - 1 tokens, at full precision. All groups share one page pool: a page id is
`page_bytes_all_layers` bytes, one `page_bytes` page in each layer of the group that owns it,
at byte offset (index of the layer in the group) * page_bytes.

Layers of one kind are split into groups of equal size (vLLM's hybrid allocator), so that
every page id has the same size and no byte is left over: Gemma 3 270M's 3 full-attention
and 15 window layers make 6 groups of 3 layers. A page of a full-attention layer holds either
full-precision tokens (`fp_page_tokens` tokens of K and V) or one demoted block of
`block_tokens` 2-bit tokens:

    key codes   [block_tokens, kv_heads, head_dim * bits / 8]  uint8 (packed along head_dim)
    value codes [block_tokens, kv_heads, head_dim * bits / 8]  uint8
    key scale, key zero      [kv_heads, head_dim]                per channel over the block
    value scale, value zero  [block_tokens, kv_heads, head_dim / group_size]  per token
    key outliers (optional)  values [block_tokens, kv_heads, k] float16, channels [kv_heads, k]
                             uint8: the k key channels of widest range in the block, at 16 bits

For policies that demote, a full-attention layer's page is one block (sections aligned to 16
bytes), so a page is never wasted on the 2-bit tier; full-precision pages then hold as many
tokens as fit. For `fp16`, it holds `DEFAULT_FP_PAGE_TOKENS` tokens. A window layer's page
is the same size and holds full-precision tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from logquant.policy import TokenPolicy, WindowPolicy

ALIGN = 16
DEFAULT_FP_PAGE_TOKENS = 16


def head_dim_of(text_config: object) -> int:
    """Attention head size of a transformers text config (explicit `head_dim` or hidden / heads)."""
    explicit = getattr(text_config, "head_dim", None)
    return explicit or text_config.hidden_size // text_config.num_attention_heads  # type: ignore[attr-defined]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PageFormat:
    """What one token and one 2-bit block of one layer take; every size is in bytes."""

    num_kv_heads: int
    head_dim: int
    policy: TokenPolicy
    dtype_bytes: int = 2  # full-precision tier element size (2 for bf16/fp16, 4 for fp32)
    group_size: int = 32  # value quantization group (channels of one token)
    bits: int = 2
    scale_bytes: int = 2  # scales and zero points are stored as float16
    key_fp_channels: int = 0  # per 2-bit block and head, key channels kept at 16 bits (outliers)

    @property
    def block_tokens(self) -> int:
        return self.policy.block_tokens

    @property
    def fp_token_bytes(self) -> int:
        """K and V of one token in one layer at full precision."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def packed_sections(self) -> dict[str, tuple[int, int]]:
        """name -> (byte offset, byte length) of each section of a 2-bit page."""
        bt, h, d = self.block_tokens, self.num_kv_heads, self.head_dim
        lengths = {
            "key_codes": bt * h * d * self.bits // 8,
            "value_codes": bt * h * d * self.bits // 8,
            "key_scale": h * d * self.scale_bytes,
            "key_zero": h * d * self.scale_bytes,
            "value_scale": bt * h * (d // self.group_size) * self.scale_bytes,
            "value_zero": bt * h * (d // self.group_size) * self.scale_bytes,
        }
        if self.key_fp_channels:
            lengths["key_outlier_values"] = bt * h * self.key_fp_channels * self.scale_bytes
            lengths["key_outlier_channels"] = h * self.key_fp_channels  # uint8 channel ids
        sections, offset = {}, 0
        for name, length in lengths.items():
            sections[name] = (offset, length)
            offset += _align(length)
        return sections

    @property
    def packed_block_bytes(self) -> int:
        """Bytes of one 2-bit block (aligned sections) in one layer; 0 when nothing is demoted."""
        if self.block_tokens == 0:
            return 0
        offset, length = list(self.packed_sections().values())[-1]
        return offset + _align(length)


@dataclass(frozen=True)
class KVGroup(PageFormat):
    """Layers that share page tables: one window (None: full attention) and one policy."""

    window: int | None = None
    layers: tuple[int, ...] = ()  # model layer ids, ascending
    page_bytes: int = 0  # bytes of one page in one of its layers
    page_stride: int = 0  # bytes of one page id (all layers of the group): the pool's page size

    @property
    def fp_page_tokens(self) -> int:
        return self.page_bytes // self.fp_token_bytes

    def fp_pages_for(self, num_tokens: int) -> int:
        """Full-precision pages a sequence of `num_tokens` tokens holds (they are never
        returned before the sequence ends, so this covers its peak)."""
        return _ceil_div(self.policy.peak_fp_tokens(num_tokens), self.fp_page_tokens)

    def packed_pages_for(self, num_tokens: int) -> int:
        return self.policy.num_blocks(num_tokens)

    def pages_for(self, num_tokens: int) -> int:
        return self.fp_pages_for(num_tokens) + self.packed_pages_for(num_tokens)


@dataclass(frozen=True)
class KVLayout:
    """Shape of one model's KV cache under one policy: its groups and the cost model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    policy: TokenPolicy  # of the full-attention layers
    dtype_bytes: int = 2  # full-precision tier element size (2 for bf16/fp16, 4 for fp32)
    group_size: int = 32  # value quantization group (channels of one token)
    bits: int = 2
    scale_bytes: int = 2  # scales and zero points are stored as float16
    key_fp_channels: int = 0  # per 2-bit block and head, key channels kept at 16 bits (outliers)
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window W or None; (): all full

    @classmethod
    def for_model(
        cls,
        config: object,
        policy: TokenPolicy,
        *,
        dtype_bytes: int = 2,
        group_size: int = 32,
        bits: int = 2,
        key_fp_channels: int = 0,
    ) -> KVLayout:
        """The layout of a transformers model config (any `PretrainedConfig`; its decoder's
        text config is read): layers, KV heads, head size and each layer's sliding window.
        Raises `UnsupportedModelError` for attention our store cannot run."""
        from logquant.attention_spec import attention_spec  # imports transformers (and torch)

        text = config.get_text_config(decoder=True)  # type: ignore[attr-defined]
        return cls(
            num_layers=text.num_hidden_layers,
            num_kv_heads=text.num_key_value_heads,
            head_dim=head_dim_of(text),
            policy=policy,
            dtype_bytes=dtype_bytes,
            group_size=group_size,
            bits=bits,
            key_fp_channels=key_fp_channels,
            layer_windows=attention_spec(config).windows,  # type: ignore[arg-type]
        )

    def __post_init__(self) -> None:
        if not 0 <= self.key_fp_channels < min(self.head_dim, 256):
            raise ValueError(f"key_fp_channels must be in [0, {min(self.head_dim, 256)}), got {self.key_fp_channels}")
        if self.head_dim % self.group_size != 0:
            raise ValueError(f"head_dim {self.head_dim} is not a multiple of group_size {self.group_size}")
        if self.head_dim * self.bits % 8 != 0:
            raise ValueError(f"head_dim {self.head_dim} cannot be packed at {self.bits} bits")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"{len(self.layer_windows)} layer windows for {self.num_layers} layers")

    @cached_property
    def format(self) -> PageFormat:
        """The page format of the full-attention layers (window layers use its fp tokens)."""
        return PageFormat(**{name: getattr(self, name) for name in PageFormat.__dataclass_fields__})

    @property
    def block_tokens(self) -> int:
        return self.policy.block_tokens

    @property
    def fp_token_bytes(self) -> int:
        return self.format.fp_token_bytes

    def packed_sections(self) -> dict[str, tuple[int, int]]:
        return self.format.packed_sections()

    @property
    def packed_block_bytes(self) -> int:
        return self.format.packed_block_bytes

    @property
    def windows(self) -> tuple[int | None, ...]:
        return self.layer_windows or (None,) * self.num_layers

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in one layer, in every group: one 2-bit block for a policy that
        demotes (so the 2-bit tier wastes nothing), else `DEFAULT_FP_PAGE_TOKENS` tokens. A
        window layer's page holds as many full-precision tokens as a full-attention layer's."""
        has_full = None in self.windows
        if self.block_tokens == 0 or not has_full:
            return _align(DEFAULT_FP_PAGE_TOKENS * self.fp_token_bytes)
        return _align(max(self.packed_block_bytes, self.fp_token_bytes))

    @cached_property
    def groups(self) -> tuple[KVGroup, ...]:
        """Layers of one kind (full attention, or one window size) in groups of equal size,
        the gcd of the kinds' layer counts, as vLLM's hybrid allocator does: a page id holds
        one page in each layer of its group, so every group's pages are the same size with
        nothing left over. Full-attention groups first, then windows ascending."""
        kinds = sorted(set(self.windows), key=lambda w: -1 if w is None else w)
        layers = {w: [i for i, lw in enumerate(self.windows) if lw == w] for w in kinds}
        size = math.gcd(*(len(v) for v in layers.values()))
        fmt = {name: getattr(self, name) for name in PageFormat.__dataclass_fields__}
        return tuple(
            KVGroup(
                **(fmt | {"policy": self.policy if w is None else WindowPolicy(w)}),
                window=w,
                layers=tuple(layers[w][start : start + size]),
                page_bytes=self.page_bytes,
                page_stride=size * self.page_bytes,
            )
            for w in kinds
            for start in range(0, len(layers[w]), size)
        )

    @cached_property
    def group_of(self) -> tuple[tuple[int, int], ...]:
        """Per layer: (its group, its index among the group's layers)."""
        where = {layer: (g, j) for g, group in enumerate(self.groups) for j, layer in enumerate(group.layers)}
        return tuple(where[layer] for layer in range(self.num_layers))

    @property
    def page_bytes_all_layers(self) -> int:
        """Bytes of one page id (the page in every layer of the group that owns it)."""
        return self.groups[0].page_stride

    def pages_for(self, num_tokens: int) -> int:
        """Page ids a sequence of `num_tokens` tokens holds, summed over groups."""
        return sum(group.pages_for(num_tokens) for group in self.groups)

    def bytes_for(self, num_tokens: int) -> int:
        """Exact bytes of KV cache (all layers) of one sequence of `num_tokens` tokens."""
        return self.pages_for(num_tokens) * self.page_bytes_all_layers

    def fp16_bytes_for(self, num_tokens: int) -> int:
        """What the same tokens would take in this model's 16-bit cache with no paging
        overhead (a window layer holds its newest W - 1 tokens there too)."""
        kept = sum(num_tokens if w is None else min(num_tokens, w - 1) for w in self.windows)
        return kept * 2 * self.num_kv_heads * self.head_dim * 2

    def num_pages(self, kv_budget_bytes: int) -> int:
        return kv_budget_bytes // self.page_bytes_all_layers


class PagePool:
    """Free list of page ids in [0, num_pages). Pure Python."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"need {count} pages, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free_ids(self) -> list[int]:
        return list(self._free)

    def grow(self, count: int) -> None:
        """Add `count` new page ids (the caller grows its buffers to match)."""
        self._free[:0] = range(self.num_pages + count - 1, self.num_pages - 1, -1)
        self.num_pages += count

    def free(self, page_ids: list[int]) -> None:
        self._free.extend(reversed(page_ids))
        assert len(self._free) <= self.num_pages, "a page was freed twice"
