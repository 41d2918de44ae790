"""KV manager: the one owner of KV bookkeeping (pure Python, no torch).

It holds the page pool and, for every sequence and every KV group of the layout (see
`layout.py`), its page tables (full-precision pages and 2-bit pages), its fp slot map
(position -> flat slot) and its policy state. Full-attention layers follow the cache policy;
a sliding-window group of W positions keeps the newest W - 1 tokens: the slots of tokens that
leave the window take the next tokens (a ring), so its pages stop growing at the window. Each
step it turns "sequence s appends n tokens" into a `StepPlan`: per group, flat integer lists
covering every sequence of the step, which the tensor side (`PagedKVStore`) turns into index
tensors once and executes in every layer of the group. Flat fp slot = page * fp_page_tokens +
offset in the page.

Contract: `allocate(seq, n)` before a step makes `seq` hold the pages for n tokens;
`plan_step` then appends and never allocates; `free(seq)` returns every page at once.
"""

from __future__ import annotations

from logquant.layout import KVGroup, KVLayout, PagePool
from logquant.page_tables import GroupKV, SequenceKV
from logquant.plan import GroupPlan, PlanBuilder, StepPlan

__all__ = ["GroupKV", "GroupPlan", "KVManager", "SequenceKV", "StepPlan"]


class KVManager:
    def __init__(self, layout: KVLayout, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"the KV cache needs at least one page of {layout.page_bytes_all_layers} bytes")
        self.layout = layout
        self.pool = PagePool(num_pages)
        self.sequences: dict[str, SequenceKV] = {}

    @classmethod
    def for_budget(cls, layout: KVLayout, kv_budget_bytes: int) -> KVManager:
        num_pages = layout.num_pages(kv_budget_bytes)
        if num_pages == 0:
            raise ValueError(
                f"KV budget of {kv_budget_bytes} bytes is smaller than one page "
                f"({layout.page_bytes_all_layers} bytes): raise --kv-cache-memory"
            )
        return cls(layout, num_pages)

    # ---- pages ---------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free

    def pages_for(self, num_tokens: int) -> int:
        return self.layout.pages_for(num_tokens)

    def _missing(self, seq_id: str, num_tokens: int) -> list[tuple[int, int]]:
        """Per group: (fp pages, 2-bit pages) `seq_id` lacks to hold `num_tokens` tokens."""
        seq = self.sequences.get(seq_id)
        missing = []
        for g, group in enumerate(self.layout.groups):
            have = seq.groups[g] if seq else None
            have_fp = len(have.fp_pages) if have else 0
            have_packed = len(have.packed_pages) + len(have.spare_packed_pages) if have else 0
            missing.append(
                (
                    max(0, group.fp_pages_for(num_tokens) - have_fp),
                    max(0, group.packed_pages_for(num_tokens) - have_packed),
                )
            )
        return missing

    def can_allocate(self, seq_id: str, num_tokens: int, reserve: int = 0) -> bool:
        """Whether `seq_id` can grow to hold `num_tokens` tokens, leaving `reserve` pages free."""
        return sum(fp + q for fp, q in self._missing(seq_id, num_tokens)) + reserve <= self.pool.num_free

    def allocate(self, seq_id: str, num_tokens: int) -> int:
        """Grow `seq_id` (created if new) to hold `num_tokens` tokens; return the pages added.
        Raises MemoryError if they are not free."""
        missing = self._missing(seq_id, num_tokens)
        total = sum(fp + q for fp, q in missing)
        if total > self.pool.num_free:
            raise MemoryError(f"{seq_id}: needs {total} pages, {self.pool.num_free} free")
        seq = self.sequences.get(seq_id)
        if seq is None:
            seq = self.sequences[seq_id] = SequenceKV([GroupKV(g.policy.new_state()) for g in self.layout.groups])
        for group, table, (fp, q) in zip(self.layout.groups, seq.groups, missing):
            fp_pages = self.pool.allocate(fp)
            fpt = group.fp_page_tokens
            table.fp_pages += fp_pages
            # pop() hands out the lowest slot first, so a sequence fills its pages in order
            table.free_slots[:0] = [p * fpt + i for p in reversed(fp_pages) for i in range(fpt - 1, -1, -1)]
            table.spare_packed_pages += self.pool.allocate(q)
        return total

    def free(self, seq_id: str) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is not None:
            self.pool.free(seq.pages)

    def num_tokens(self, seq_id: str) -> int:
        return self.sequences[seq_id].num_tokens

    # ---- exact accounting ----------------------------------------------------------------
    @property
    def num_used_pages(self) -> int:
        return self.pool.num_pages - self.pool.num_free

    @property
    def usage(self) -> float:
        return self.num_used_pages / self.pool.num_pages

    @property
    def capacity_bytes(self) -> int:
        return self.pool.num_pages * self.layout.page_bytes_all_layers

    def bytes_by_tier(self) -> dict[str, int]:
        """Bytes held at full precision (every group's fp pages) and in 2-bit pages."""
        per_page = self.layout.page_bytes_all_layers
        tables = [t for s in self.sequences.values() for t in s.groups]
        fp = sum(len(t.fp_pages) for t in tables)
        q = sum(len(t.packed_pages) + len(t.spare_packed_pages) for t in tables)
        return {"fp": fp * per_page, "2bit": q * per_page}

    def num_cached_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences.values())

    def check_integrity(self) -> None:
        """Raise AssertionError unless: every page is free or owned by exactly one sequence,
        bytes held equal the cost model, and no sequence is over its full-precision bound.
        Holds between steps (after a step, each sequence holds exactly its tokens' pages)."""
        owned = [p for s in self.sequences.values() for p in s.pages]
        free = self.pool.free_ids()
        assert len(set(owned)) == len(owned), "a page is owned twice"
        assert not set(owned) & set(free), "a page is both free and owned"
        assert len(owned) + len(free) == self.pool.num_pages, "a page leaked"
        for seq_id, seq in self.sequences.items():
            n = seq.num_tokens
            assert len(seq.pages) == self.layout.pages_for(n), f"{seq_id}: pages held differ from the cost model"
            for group, table in zip(self.layout.groups, seq.groups):
                _check_group(f"{seq_id} (window {group.window})", group, table, n)

    # ---- one step ------------------------------------------------------------------------
    def plan_step(self, appends: list[tuple[str, int]], with_positions: bool = False) -> StepPlan:
        """Advance each (seq_id, num_new) of the step; say where every token is read and written.
        `with_positions` also lists the position of every cached token (attention does not need
        them: it is position-agnostic; `LogQuantCache` does, to return keys in position order)."""
        plans = []
        for g, group in enumerate(self.layout.groups):
            builder = PlanBuilder(with_positions, group.window)
            for seq_id, num_new in appends:
                builder.add(self.sequences[seq_id].groups[g], num_new)
            plans.append(builder.build())
        return StepPlan(tuple(plans))


def _check_group(name: str, group: KVGroup, table: GroupKV, num_tokens: int) -> None:
    policy = group.policy
    assert table.num_tokens == num_tokens, f"{name}: groups disagree on the length"
    assert len(table.packed_pages) == policy.num_blocks(num_tokens), f"{name}: wrong number of 2-bit blocks"
    assert len(table.slot_of) == policy.num_fp_tokens(num_tokens), f"{name}: wrong number of fp tokens"
    assert policy.max_fp_tokens is None or len(table.slot_of) <= policy.max_fp_tokens, name
    assert len(table.pages) == group.pages_for(num_tokens), f"{name}: pages held differ from the cost model"
    assert len(table.slot_of) + len(table.free_slots) == len(table.fp_pages) * group.fp_page_tokens, name
    if group.window is not None:
        assert list(table.slot_of) == policy.full_precision_positions(num_tokens), f"{name}: not the window's tokens"
