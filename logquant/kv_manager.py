"""KV manager: the one owner of KV bookkeeping (pure Python, no torch).

It holds the page pool and, for every sequence, its page tables (full-precision pages and
2-bit pages), its fp slot map (position -> flat slot) and its policy state. Each step it turns
"sequence s appends n tokens" into a `StepPlan`: flat integer lists covering every sequence of
the step, which the tensor side (`PagedKVStore`) turns into index tensors once and executes in
every layer. Flat fp slot = page * fp_page_tokens + offset in the page.

Contract: `allocate(seq, n)` before a step makes `seq` hold the pages for n tokens;
`plan_step` then appends and never allocates; `free(seq)` returns every page at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from logquant.layout import KVLayout, PagePool
from logquant.policy import PolicyState


@dataclass
class SequenceKV:
    policy_state: PolicyState
    fp_pages: list[int] = field(default_factory=list)
    q_pages: list[int] = field(default_factory=list)  # pages holding demoted blocks, in order
    q_positions: list[list[int]] = field(default_factory=list)  # positions of each q page's block
    spare_q_pages: list[int] = field(default_factory=list)  # allocated, not yet written
    slot_of: dict[int, int] = field(default_factory=dict)  # position -> flat fp slot
    free_slots: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.policy_state.num_tokens

    @property
    def pages(self) -> list[int]:
        return self.fp_pages + self.q_pages + self.spare_q_pages


@dataclass(frozen=True)
class StepPlan:
    """Where every token of one step is read from and written to; the same for every layer.

    Sequences are in step order; `query_ptr`, `fp_ptr` and `q_ptr` are CSR offsets `[S + 1]`.
    `block_sources` and `write_sources` are sequence-local rows: row r < (its cached fp count)
    is its r-th cached fp token (fp_slots order), the rest are its new tokens in order.
    """

    query_ptr: list[int]  # new tokens of sequence i are rows query_ptr[i]:query_ptr[i+1] of the batch
    fp_ptr: list[int]
    fp_slots: list[int]  # cached full-precision tokens
    fp_positions: list[int]  # their positions (only with `with_positions`: to rebuild position order)
    q_ptr: list[int]
    q_pages: list[int]  # cached 2-bit blocks
    q_positions: list[int]  # [len(q_pages) * block_tokens] positions of their tokens (same)
    start_positions: list[int]  # per sequence: position of its first new token
    block_ptr: list[int]
    block_pages: list[int]  # pages the blocks demoted in this step are written to
    block_sources: list[int]  # [len(block_pages) * block_tokens] sequence-local rows
    write_ptr: list[int]
    write_slots: list[int]  # flat fp slots for the new tokens that stay full precision
    write_sources: list[int]  # sequence-local rows (all of them new tokens)

    @property
    def num_seqs(self) -> int:
        return len(self.query_ptr) - 1

    @property
    def num_tokens(self) -> int:
        return self.query_ptr[-1]


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
                f"KV budget of {kv_budget_bytes} bytes is smaller than one page ({layout.page_bytes_all_layers} bytes): "
                "raise --kv-cache-memory"
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

    def _missing(self, seq_id: str, num_tokens: int) -> tuple[int, int]:
        seq = self.sequences.get(seq_id)
        have_fp = len(seq.fp_pages) if seq else 0
        have_q = len(seq.q_pages) + len(seq.spare_q_pages) if seq else 0
        fp = max(0, self.layout.fp_pages_for(num_tokens) - have_fp)
        return fp, max(0, self.layout.q_pages_for(num_tokens) - have_q)

    def can_allocate(self, seq_id: str, num_tokens: int, reserve: int = 0) -> bool:
        """Whether `seq_id` can grow to hold `num_tokens` tokens, leaving `reserve` pages free."""
        fp, q = self._missing(seq_id, num_tokens)
        return fp + q + reserve <= self.pool.num_free

    def allocate(self, seq_id: str, num_tokens: int) -> int:
        """Grow `seq_id` (created if new) to hold `num_tokens` tokens; return the pages added.
        Raises MemoryError if they are not free."""
        fp, q = self._missing(seq_id, num_tokens)
        if fp + q > self.pool.num_free:
            raise MemoryError(f"{seq_id}: needs {fp + q} pages, {self.pool.num_free} free")
        seq = self.sequences.get(seq_id)
        if seq is None:
            seq = self.sequences[seq_id] = SequenceKV(self.layout.policy.new_state())
        fp_pages = self.pool.allocate(fp)
        fpt = self.layout.fp_page_tokens
        seq.fp_pages += fp_pages
        # pop() hands out the lowest slot first, so a sequence fills its pages in order
        seq.free_slots[:0] = [p * fpt + i for p in reversed(fp_pages) for i in range(fpt - 1, -1, -1)]
        seq.spare_q_pages += self.pool.allocate(q)
        return fp + q

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
        per_page = self.layout.page_bytes_all_layers
        fp = sum(len(s.fp_pages) for s in self.sequences.values())
        q = sum(len(s.q_pages) + len(s.spare_q_pages) for s in self.sequences.values())
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
        layout, policy = self.layout, self.layout.policy
        for seq_id, seq in self.sequences.items():
            n = seq.num_tokens
            assert len(seq.q_pages) == policy.num_blocks(n), f"{seq_id}: wrong number of 2-bit blocks"
            assert len(seq.slot_of) == policy.num_fp_tokens(n), f"{seq_id}: wrong number of fp tokens"
            assert policy.max_fp_tokens is None or len(seq.slot_of) <= policy.max_fp_tokens, seq_id
            assert len(seq.pages) == layout.pages_for(n), f"{seq_id}: pages held differ from the cost model"
            assert len(seq.slot_of) + len(seq.free_slots) == len(seq.fp_pages) * layout.fp_page_tokens, seq_id

    # ---- one step ------------------------------------------------------------------------
    def plan_step(self, appends: list[tuple[str, int]], with_positions: bool = False) -> StepPlan:
        """Advance each (seq_id, num_new) of the step; say where every token is read and written.
        `with_positions` also lists the position of every cached token (attention does not need
        them: it is position-agnostic; `LogQuantCache` does, to return keys in position order)."""
        builder = _PlanBuilder(with_positions)
        for seq_id, num_new in appends:
            builder.add(self.sequences[seq_id], num_new)
        return builder.build()


class _PlanBuilder:
    """Accumulates the flat lists of a StepPlan, one sequence at a time."""

    def __init__(self, with_positions: bool) -> None:
        self.with_positions = with_positions
        self.query_ptr, self.fp_ptr, self.q_ptr, self.block_ptr, self.write_ptr = [0], [0], [0], [0], [0]
        self.fp_slots: list[int] = []
        self.fp_positions: list[int] = []
        self.q_pages: list[int] = []
        self.q_positions: list[int] = []
        self.start_positions: list[int] = []
        self.block_pages: list[int] = []
        self.block_sources: list[int] = []
        self.write_slots: list[int] = []
        self.write_sources: list[int] = []

    def add(self, seq: SequenceKV, num_new: int) -> None:
        num_old, new_base = seq.num_tokens, len(seq.slot_of)
        self.fp_slots += seq.slot_of.values()
        self.q_pages += seq.q_pages
        if self.with_positions:
            self.fp_positions += seq.slot_of.keys()
            for positions in seq.q_positions:
                self.q_positions += positions
        self.start_positions.append(num_old)
        demoted_new: set[int] = set()
        blocks = seq.policy_state.append(num_new)
        row_of = {pos: i for i, pos in enumerate(seq.slot_of)} if blocks else {}  # O(fp tokens): only when demoting
        for block in blocks:
            assert seq.spare_q_pages, "2-bit pages exhausted: allocate first"
            page = seq.spare_q_pages.pop(0)
            self.block_pages.append(page)
            self.block_sources += [row_of[p] if p < num_old else new_base + p - num_old for p in block]
            for p in block:
                if p < num_old:
                    seq.free_slots.append(seq.slot_of.pop(p))
                else:
                    demoted_new.add(p)
            seq.q_pages.append(page)
            seq.q_positions.append(block)
        for p in range(num_old, num_old + num_new):
            if p not in demoted_new:
                assert seq.free_slots, "full-precision pages exhausted: allocate first"
                slot = seq.slot_of[p] = seq.free_slots.pop()
                self.write_slots.append(slot)
                self.write_sources.append(new_base + p - num_old)
        self.query_ptr.append(self.query_ptr[-1] + num_new)
        self.fp_ptr.append(len(self.fp_slots))
        self.q_ptr.append(len(self.q_pages))
        self.block_ptr.append(len(self.block_pages))
        self.write_ptr.append(len(self.write_slots))

    def build(self) -> StepPlan:
        return StepPlan(
            query_ptr=self.query_ptr, fp_ptr=self.fp_ptr, fp_slots=self.fp_slots, fp_positions=self.fp_positions,
            q_ptr=self.q_ptr, q_pages=self.q_pages, q_positions=self.q_positions,
            start_positions=self.start_positions, block_ptr=self.block_ptr, block_pages=self.block_pages,
            block_sources=self.block_sources, write_ptr=self.write_ptr, write_slots=self.write_slots,
            write_sources=self.write_sources,
        )  # fmt: skip
