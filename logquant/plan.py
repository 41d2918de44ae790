"""The plan of one step: where every token is read from and written to, per KV group.

`KVManager.plan_step` builds it (`PlanBuilder`, one per group, advancing each sequence's
tables); the tensor side (`step.py`) turns it into index tensors once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from logquant.page_tables import GroupKV


@dataclass(frozen=True)
class GroupPlan:
    """Where every token of one step is read from and written to in one KV group; the same for
    every layer of the group. For a window group, the cached tokens are exactly the window's
    (the newest W - 1 before the step, in position order) and only the new tokens that stay in
    the window are written.

    Sequences are in step order; `query_ptr`, `fp_ptr` and `packed_ptr` are CSR offsets `[S + 1]`.
    `block_sources` and `write_sources` are sequence-local rows: row r < (its cached fp count)
    is its r-th cached fp token (fp_slots order), the rest are its new tokens in order.
    """

    query_ptr: list[int]  # new tokens of sequence i are rows query_ptr[i]:query_ptr[i+1] of the batch
    fp_ptr: list[int]
    fp_slots: list[int]  # cached full-precision tokens
    fp_positions: list[int]  # their positions (only with `with_positions`: to rebuild position order)
    packed_ptr: list[int]
    packed_pages: list[int]  # cached 2-bit blocks
    packed_positions: list[int]  # [len(packed_pages) * block_tokens] positions of their tokens (same)
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


@dataclass(frozen=True)
class StepPlan:
    """One step: a `GroupPlan` per KV group (`layout.groups` order), same sequences and order."""

    groups: tuple[GroupPlan, ...]

    @property
    def query_ptr(self) -> list[int]:
        return self.groups[0].query_ptr

    @property
    def num_seqs(self) -> int:
        return self.groups[0].num_seqs

    @property
    def num_tokens(self) -> int:
        return self.groups[0].num_tokens


class PlanBuilder:
    """Accumulates the flat lists of a StepPlan, one sequence at a time."""

    def __init__(self, with_positions: bool, window: int | None = None) -> None:
        self.with_positions, self.window = with_positions, window
        self.query_ptr, self.fp_ptr, self.packed_ptr, self.block_ptr, self.write_ptr = [0], [0], [0], [0], [0]
        self.fp_slots: list[int] = []
        self.fp_positions: list[int] = []
        self.packed_pages: list[int] = []
        self.packed_positions: list[int] = []
        self.start_positions: list[int] = []
        self.block_pages: list[int] = []
        self.block_sources: list[int] = []
        self.write_slots: list[int] = []
        self.write_sources: list[int] = []

    def add(self, seq: GroupKV, num_new: int) -> None:
        num_old, new_base = seq.num_tokens, len(seq.slot_of)
        self.fp_slots += seq.slot_of.values()
        self.packed_pages += seq.packed_pages
        if self.with_positions:
            self.fp_positions += seq.slot_of.keys()
            for positions in seq.packed_positions:
                self.packed_positions += positions
        self.start_positions.append(num_old)
        if self.window is not None:
            self._slide(seq, num_old, num_new, new_base)
        else:
            self._demote_and_write(seq, num_old, num_new, new_base)
        self.query_ptr.append(self.query_ptr[-1] + num_new)
        self.fp_ptr.append(len(self.fp_slots))
        self.packed_ptr.append(len(self.packed_pages))
        self.block_ptr.append(len(self.block_pages))
        self.write_ptr.append(len(self.write_slots))

    def _slide(self, seq: GroupKV, num_old: int, num_new: int, new_base: int) -> None:
        """A window group: drop the tokens that leave the window (their slots take the new
        tokens after attention), write the new tokens that stay in it."""
        seq.policy_state.append(num_new)
        keep_from = max(0, num_old + num_new - (self.window - 1))
        while seq.slot_of and next(iter(seq.slot_of)) < keep_from:  # slot_of is in position order
            seq.free_slots.append(seq.slot_of.pop(next(iter(seq.slot_of))))
        for p in range(max(num_old, keep_from), num_old + num_new):
            assert seq.free_slots, "window pages exhausted: allocate first"
            slot = seq.slot_of[p] = seq.free_slots.pop()
            self.write_slots.append(slot)
            self.write_sources.append(new_base + p - num_old)

    def _demote_and_write(self, seq: GroupKV, num_old: int, num_new: int, new_base: int) -> None:
        """A full-attention group: the policy's demoted blocks, then the new fp tokens."""
        demoted_new: set[int] = set()
        blocks = seq.policy_state.append(num_new)
        row_of = {pos: i for i, pos in enumerate(seq.slot_of)} if blocks else {}  # O(fp tokens): only when demoting
        for block in blocks:
            assert seq.spare_packed_pages, "2-bit pages exhausted: allocate first"
            page = seq.spare_packed_pages.pop(0)
            self.block_pages.append(page)
            self.block_sources += [row_of[p] if p < num_old else new_base + p - num_old for p in block]
            for p in block:
                if p < num_old:
                    seq.free_slots.append(seq.slot_of.pop(p))
                else:
                    demoted_new.add(p)
            seq.packed_pages.append(page)
            seq.packed_positions.append(block)
        for p in range(num_old, num_old + num_new):
            if p not in demoted_new:
                assert seq.free_slots, "full-precision pages exhausted: allocate first"
                slot = seq.slot_of[p] = seq.free_slots.pop()
                self.write_slots.append(slot)
                self.write_sources.append(new_base + p - num_old)

    def build(self) -> GroupPlan:
        return GroupPlan(
            query_ptr=self.query_ptr,
            fp_ptr=self.fp_ptr,
            fp_slots=self.fp_slots,
            fp_positions=self.fp_positions,
            packed_ptr=self.packed_ptr,
            packed_pages=self.packed_pages,
            packed_positions=self.packed_positions,
            start_positions=self.start_positions,
            block_ptr=self.block_ptr,
            block_pages=self.block_pages,
            block_sources=self.block_sources,
            write_ptr=self.write_ptr,
            write_slots=self.write_slots,
            write_sources=self.write_sources,
        )
