"""Paged KV store: full-precision pages and 2-bit pages carved from one preallocated buffer.

One uint8 buffer `[num_layers, num_pages, page_bytes]` is allocated once; typed views over it
give the full-precision tier and the sections of 2-bit pages (see `layout.py`). A sequence
owns a page table per tier. Each step, `plan_append` decides once (for all layers) where the
new tokens go and which blocks are demoted; then, layer by layer, `forward` attends over the
cached tokens plus the new chunk and writes the chunk (quantizing demoted blocks once).
Callers hand pages in with `add_pages`; a `PagePool` or the engine's allocator owns ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from logquant.attention import attend
from logquant.layout import KVLayout
from logquant.policy import PolicyState
from logquant.quant import QuantizedTensor, dequantize, quantize

SCALE_DTYPE = torch.float16


@dataclass
class SequenceState:
    policy_state: PolicyState
    fp_pages: list[int] = field(default_factory=list)
    q_pages: list[int] = field(default_factory=list)  # pages holding demoted blocks, in order
    spare_q_pages: list[int] = field(default_factory=list)  # handed in, not yet written
    slot_of: dict[int, int] = field(default_factory=dict)  # position -> flat fp slot
    free_slots: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.policy_state.num_tokens


@dataclass(frozen=True)
class AppendPlan:
    """Where one sequence's new chunk goes in this step; the same for every layer.
    Flat fp slot = page * fp_page_tokens + offset."""

    num_new: int
    fp_slots: torch.Tensor  # [num_fp_cached] flat slots of cached full-precision tokens
    q_pages: torch.Tensor  # [num_q_cached] pages of cached 2-bit blocks
    block_pages: torch.Tensor  # [num_blocks] pages the demoted blocks are written to
    block_sources: torch.Tensor  # [num_blocks, block_tokens] rows of cat(cached fp, new)
    write_slots: torch.Tensor  # [num_written] flat slots for new tokens that stay fp
    write_sources: torch.Tensor  # [num_written] rows of the new chunk


class PagedKVStore:
    def __init__(self, layout: KVLayout, num_pages: int, dtype: torch.dtype, device: torch.device | str) -> None:
        assert torch.empty((), dtype=dtype).element_size() == layout.dtype_bytes, "layout dtype mismatch"
        self.layout, self.num_pages, self.dtype, self.device = layout, num_pages, dtype, torch.device(device)
        L, P, h, d = layout.num_layers, num_pages, layout.num_kv_heads, layout.head_dim
        self.buffer = torch.zeros(L, P, layout.page_bytes, dtype=torch.uint8, device=self.device)
        fpt = layout.fp_page_tokens
        self.fp = self._view(0, fpt * layout.fp_token_bytes, dtype, (fpt, 2, h, d))  # [L, P, fpt, 2, h, d]
        self.sequences: dict[str, SequenceState] = {}
        if layout.block_tokens == 0:
            return
        bt, packed, groups = layout.block_tokens, d * layout.bits // 8, d // layout.group_size
        sec = layout.q_sections()
        self.key_codes = self._view(*sec["key_codes"], torch.uint8, (bt, h, packed))
        self.value_codes = self._view(*sec["value_codes"], torch.uint8, (bt, h, packed))
        self.key_scale = self._view(*sec["key_scale"], SCALE_DTYPE, (h, d))
        self.key_zero = self._view(*sec["key_zero"], SCALE_DTYPE, (h, d))
        self.value_scale = self._view(*sec["value_scale"], SCALE_DTYPE, (bt, h, groups))
        self.value_zero = self._view(*sec["value_zero"], SCALE_DTYPE, (bt, h, groups))

    def _view(self, offset: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        raw = self.buffer[:, :, offset : offset + length]
        return raw.view(dtype).view(*raw.shape[:2], *shape)

    # ---- sequences and pages -------------------------------------------------------------
    def add_sequence(self, seq_id: str) -> None:
        if seq_id in self.sequences:
            raise KeyError(f"sequence {seq_id!r} already exists")
        self.sequences[seq_id] = SequenceState(policy_state=self.layout.policy.new_state())

    def add_pages(self, seq_id: str, fp_pages: list[int], q_pages: list[int]) -> None:
        seq = self.sequences[seq_id]
        fpt = self.layout.fp_page_tokens
        seq.fp_pages.extend(fp_pages)
        seq.free_slots.extend(p * fpt + i for p in fp_pages for i in range(fpt))
        seq.spare_q_pages.extend(q_pages)

    def pages_needed(self, seq_id: str, num_new: int) -> tuple[int, int]:
        """(fp pages, 2-bit pages) to add before appending `num_new` tokens."""
        seq = self.sequences[seq_id]
        total = seq.num_tokens + num_new
        fp = self.layout.fp_pages_for(total) - len(seq.fp_pages)
        q = self.layout.q_pages_for(total) - len(seq.q_pages) - len(seq.spare_q_pages)
        return max(0, fp), max(0, q)

    def free_sequence(self, seq_id: str) -> list[int]:
        """Forget a sequence; return all its pages."""
        seq = self.sequences.pop(seq_id)
        return seq.fp_pages + seq.q_pages + seq.spare_q_pages

    def num_tokens(self, seq_id: str) -> int:
        return self.sequences[seq_id].num_tokens

    def bytes_used(self) -> dict[str, int]:
        """Exact bytes held per tier (all layers)."""
        per_page = self.layout.page_bytes_all_layers
        fp = sum(len(s.fp_pages) for s in self.sequences.values())
        q = sum(len(s.q_pages) + len(s.spare_q_pages) for s in self.sequences.values())
        return {"fp": fp * per_page, "2bit": q * per_page}

    # ---- one step ------------------------------------------------------------------------
    def plan_append(self, seq_id: str, num_new: int) -> AppendPlan:
        """Advance the sequence by `num_new` tokens and say where everything goes."""
        seq = self.sequences[seq_id]
        num_old = seq.num_tokens
        cached_positions = list(seq.slot_of)
        row_of = {pos: row for row, pos in enumerate(cached_positions)}
        fp_slots = [seq.slot_of[p] for p in cached_positions]
        blocks = seq.policy_state.append(num_new)
        sources, pages = [], []
        for block in blocks:
            sources.append([row_of[p] if p < num_old else len(fp_slots) + p - num_old for p in block])
            pages.append(seq.spare_q_pages.pop(0))
            for p in block:
                if p < num_old:
                    seq.free_slots.append(seq.slot_of.pop(p))
        demoted_new = {p for block in blocks for p in block if p >= num_old}
        q_cached = list(seq.q_pages)
        seq.q_pages.extend(pages)
        write_slots, write_sources = [], []
        for p in range(num_old, num_old + num_new):
            if p not in demoted_new:
                assert seq.free_slots, "full-precision pages exhausted: add_pages first"
                seq.slot_of[p] = seq.free_slots.pop()
                write_slots.append(seq.slot_of[p])
                write_sources.append(p - num_old)
        return self._plan_tensors(num_new, fp_slots, q_cached, pages, sources, write_slots, write_sources)

    def _plan_tensors(self, num_new: int, *lists: list) -> AppendPlan:
        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        fp_slots, q_cached, pages, sources, write_slots, write_sources = lists
        bt = max(self.layout.block_tokens, 1)
        return AppendPlan(
            num_new=num_new,
            fp_slots=tensor(fp_slots),
            q_pages=tensor(q_cached),
            block_pages=tensor(pages),
            block_sources=tensor(sources).view(len(sources), bt),
            write_slots=tensor(write_slots),
            write_sources=tensor(write_sources),
        )

    def forward(
        self,
        layer: int,
        plan: AppendPlan,
        query: torch.Tensor,  # [num_new, num_heads, head_dim]
        key: torch.Tensor,  # [num_new, kv_heads, head_dim]
        value: torch.Tensor,  # [num_new, kv_heads, head_dim]
        scaling: float,
    ) -> torch.Tensor:  # [num_new, num_heads, head_dim]
        """Attend over the cached tokens plus the chunk, then store the chunk in `layer`."""
        fpt = self.layout.fp_page_tokens
        cached = self.fp[layer, plan.fp_slots // fpt, plan.fp_slots % fpt]  # [n_fp, 2, h, d]
        fp_keys = torch.cat([cached[:, 0], key.to(self.dtype)])  # [n_fp + num_new, h, d]
        fp_values = torch.cat([cached[:, 1], value.to(self.dtype)])
        q_keys, q_values = self.dequantize_blocks(layer, plan.q_pages)  # [n_q, h, d]
        out = attend(query, torch.cat([q_keys, fp_keys]), torch.cat([q_values, fp_values]), scaling)
        if plan.block_pages.numel():
            self._write_blocks(layer, plan, fp_keys, fp_values)
        new_kv = torch.stack([fp_keys, fp_values], dim=1)[cached.shape[0] :]  # [num_new, 2, h, d]
        self.fp[layer, plan.write_slots // fpt, plan.write_slots % fpt] = new_kv[plan.write_sources]
        return out

    def _write_blocks(self, layer: int, plan: AppendPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        block_keys = keys[plan.block_sources]  # [nb, bt, h, d]
        block_values = values[plan.block_sources]
        qk = quantize(block_keys, self.layout.bits, self.layout.block_tokens, axis=1, scale_dtype=SCALE_DTYPE)
        qv = quantize(block_values, self.layout.bits, self.layout.group_size, axis=3, scale_dtype=SCALE_DTYPE)
        pages = plan.block_pages
        self.key_codes[layer, pages] = qk.codes
        self.key_scale[layer, pages] = qk.scale.squeeze(1)
        self.key_zero[layer, pages] = qk.zero.squeeze(1)
        self.value_codes[layer, pages] = qv.codes
        self.value_scale[layer, pages] = qv.scale
        self.value_zero[layer, pages] = qv.zero

    def dequantize_blocks(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given 2-bit pages of one layer: [len(pages) * bt, h, d] each."""
        h, d = self.layout.num_kv_heads, self.layout.head_dim
        if pages.numel() == 0:
            empty = torch.empty(0, h, d, dtype=self.dtype, device=self.device)
            return empty, empty
        bt, bits, n = self.layout.block_tokens, self.layout.bits, pages.numel()
        shape = (n, bt, h, d)
        qk = QuantizedTensor(
            self.key_codes[layer, pages], self.key_scale[layer, pages].unsqueeze(1),
            self.key_zero[layer, pages].unsqueeze(1), bits, bt, 1, shape, self.dtype,
        )  # fmt: skip
        qv = QuantizedTensor(
            self.value_codes[layer, pages], self.value_scale[layer, pages], self.value_zero[layer, pages],
            bits, self.layout.group_size, 3, shape, self.dtype,
        )  # fmt: skip
        return dequantize(qk).view(n * bt, h, d), dequantize(qv).view(n * bt, h, d)
