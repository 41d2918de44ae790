"""`LogQuantCache`: a transformers `Cache` with the fp16 / KIVI / LogQuant token policies.

    cache = LogQuantCache(model.config, policy="logquant", fp_budget=192)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=64)

It runs the server's KV path: one `KVManager` (pages, slot maps, policy state; each batch row
is one sequence) plans every step, and one `PagedKVStore` executes the plan, so demotion and
block quantization are the very code the server runs. On `update` a layer gets its cached
tokens back in position order (2-bit pages dequantized for this layer only) followed by the
new tokens at full precision, so transformers' own masks (causal, left padding) apply
unchanged; then the store writes the new tokens and the step's demoted blocks. With left
padding all rows share one length, so the policy counts pad positions too. A sliding-window
layer (its KV group keeps the newest W - 1 tokens) returns those plus the new tokens and tells
transformers' mask their offset, as `DynamicSlidingWindowLayer` does.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

from logquant.kv_manager import KVManager
from logquant.layout import KVLayout
from logquant.plan import GroupPlan
from logquant.policy import TokenPolicy, make_policy
from logquant.step import Bucket, StepTensors
from logquant.store import PagedKVStore

INITIAL_PAGES = 64


class SharedKV:
    """The KV manager and store of one cache, shared by its layers. A step starts when a
    layer is updated a second time (layer 0 of the next forward)."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout  # its dtype_bytes is set from the first keys
        self.manager = KVManager(layout, INITIAL_PAGES)
        self.store: PagedKVStore | None = None
        self.step: StepTensors | None = None
        self.orders: list[torch.Tensor] = []  # per group: its rows in (row, position) order
        self.updated_layers: set[int] = set()

    def update(
        self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [batch, kv_heads, num_new, head_dim] -> all tokens, same layout."""
        batch, heads, num_new, dim = key_states.shape
        if self.store is None:
            self.layout = replace(self.layout, dtype_bytes=key_states.element_size())
            self.manager = KVManager(self.layout, INITIAL_PAGES)
            # the cache reads keys back through `gather` (position order), never the fused decode kernel
            self.store = PagedKVStore(
                self.layout, self.manager.num_pages, key_states.dtype, key_states.device, decode_backend="torch"
            )
        if self.step is None or layer in self.updated_layers:
            self._begin_step(batch, num_new)
        self.updated_layers.add(layer)
        flat_keys = key_states.transpose(1, 2).reshape(batch * num_new, heads, dim)  # [rows, kv_heads, dim]
        flat_values = value_states.transpose(1, 2).reshape(batch * num_new, heads, dim)
        g = self.layout.group_of[layer][0]
        (bucket,) = self.step.groups[g].buckets  # every row appends the same number of tokens
        kv_fp, kv_packed = self.store.gather(layer, bucket, flat_keys, flat_values)
        rows = kv_fp.view(-1, 2, heads, dim)
        if kv_packed is not None:
            packed_rows = torch.stack(
                [t.reshape(-1, heads, dim) for t in kv_packed], dim=1
            )  # [S * L_packed, 2, heads, dim]
            rows = torch.cat([packed_rows, rows])
        ordered = rows[self.orders[g]].view(batch, -1, 2, heads, dim)
        keys, values = (
            ordered[:, :, 0].transpose(1, 2),
            ordered[:, :, 1].transpose(1, 2),
        )  # [batch, kv_heads, tokens, dim]
        self.store.write(layer, bucket, kv_fp)
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def _begin_step(self, batch: int, num_new: int) -> None:
        rows = [f"row{i}" for i in range(batch)]
        total = (self.manager.num_tokens(rows[0]) if rows[0] in self.manager.sequences else 0) + num_new
        needed = sum(self.layout.pages_for(total) - len(self._pages_of(r)) for r in rows)
        if needed > self.manager.num_free_pages:
            self._grow(max(needed - self.manager.num_free_pages, self.manager.num_pages))
        for row in rows:
            self.manager.allocate(row, total)
        plan = self.manager.plan_step([(row, num_new) for row in rows], with_positions=True)
        self.step = self.store.prepare(plan)
        self.orders = [
            _position_order(group_plan, tensors.buckets[0], group.block_tokens).to(self.store.device)
            for group, group_plan, tensors in zip(self.layout.groups, plan.groups, self.step.groups)
        ]
        self.updated_layers = set()

    def _pages_of(self, row: str) -> list[int]:
        seq = self.manager.sequences.get(row)
        return seq.pages if seq else []

    def _grow(self, count: int) -> None:
        self.manager.pool.grow(count)
        self.store.grow(self.manager.num_pages)

    def num_tokens(self) -> int:
        return self.manager.num_tokens("row0") if "row0" in self.manager.sequences else 0

    def num_blocks(self) -> int:
        return sum(len(g.packed_pages) for s in self.manager.sequences.values() for g in s.groups)


def _position_order(plan: GroupPlan, bucket: Bucket, block_tokens: int) -> torch.Tensor:
    """Rows of cat(kv_packed flattened, kv_fp flattened) sorted by (sequence, position)."""
    batch, width_fp = bucket.fp_rows.shape
    width_packed = bucket.packed_pages.shape[1] * block_tokens
    total = max(plan.start_positions) + max(b - a for a, b in zip(plan.query_ptr, plan.query_ptr[1:]))
    rows, keys = [], []  # key of a row: sequence * total + position
    for i in range(batch):
        packed_a, packed_b = plan.packed_ptr[i] * block_tokens, plan.packed_ptr[i + 1] * block_tokens
        fp_a, fp_b = plan.fp_ptr[i], plan.fp_ptr[i + 1]
        start, num_new = plan.start_positions[i], plan.query_ptr[i + 1] - plan.query_ptr[i]
        fp_base = batch * width_packed + i * width_fp
        rows += [
            *range(i * width_packed, i * width_packed + packed_b - packed_a),
            *range(fp_base, fp_base + fp_b - fp_a + num_new),
        ]
        positions = [
            *plan.packed_positions[packed_a:packed_b],
            *plan.fp_positions[fp_a:fp_b],
            *range(start, start + num_new),
        ]
        keys += [i * total + p for p in positions]
    return torch.tensor(rows)[torch.tensor(keys).argsort()]


class LogQuantLayer(DynamicLayer):
    """One layer's view of the shared KV; it counts the tokens it has been given."""

    is_croppable = False

    def __init__(self, shared: SharedKV, layer_idx: int) -> None:
        super().__init__()
        self.shared, self.layer_idx, self.num_tokens = shared, layer_idx, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.num_tokens += key_states.shape[-2]
        return self.shared.update(self.layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.num_tokens

    def reset(self) -> None:
        raise NotImplementedError("LogQuantCache cannot be reset: make a new cache")

    def _no_batch_change(self, *args, **kwargs) -> None:
        if self.num_tokens:
            raise NotImplementedError(
                "LogQuantCache keeps one paged sequence per row: beam search and row reordering are not supported"
            )

    batch_repeat_interleave = batch_select_indices = reorder_cache = _no_batch_change

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LogQuantCache cannot be cropped: demoted tokens are quantized once")


class LogQuantWindowLayer(LogQuantLayer):
    """A sliding-window layer: it returns the newest W - 1 cached tokens plus the new ones."""

    is_sliding = True

    def __init__(self, shared: SharedKV, layer_idx: int, window: int) -> None:
        super().__init__(shared, layer_idx)
        self.sliding_window = window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        cached = min(self.num_tokens, self.sliding_window - 1)
        return cached + query_length, self.num_tokens - cached  # (kv_length, kv_offset)


class LogQuantCache(Cache):
    """A transformers `Cache` whose layers keep `policy`'s full-precision set and 2-bit
    blocks. `policy`: `fp16`, `kivi` or `logquant`; `fp_budget`: full-precision tokens per
    sequence (LogQuant W = fp_budget // 3, KIVI residual = fp_budget); `bits`: 2, 4 or 8;
    `key_fp_channels`: key channels of widest range kept at 16 bits in every 2-bit block;
    `sink_tokens`: first tokens kept at full precision for good (None: the policy's default,
    4 for kivi, 0 otherwise)."""

    def __init__(
        self,
        config: PretrainedConfig,
        policy: str | TokenPolicy = "logquant",
        fp_budget: int = 192,
        group_size: int = 32,
        bits: int = 2,
        key_fp_channels: int = 0,
        sink_tokens: int | None = None,
    ) -> None:
        if isinstance(policy, str):
            token_policy = make_policy(policy, fp_budget, group_size, sink_tokens=sink_tokens)
        else:
            assert sink_tokens is None, "give sink_tokens to make_policy when passing a TokenPolicy"
            token_policy = policy
        self.policy = token_policy
        # refuses what our attention cannot run; dtype_bytes is set from the first keys
        layout = KVLayout.for_model(
            config, token_policy, group_size=group_size, bits=bits, key_fp_channels=key_fp_channels
        )
        self.shared = SharedKV(layout)
        layers = [
            LogQuantLayer(self.shared, i) if w is None else LogQuantWindowLayer(self.shared, i, w)
            for i, w in enumerate(layout.windows)
        ]
        super().__init__(layers=layers)
