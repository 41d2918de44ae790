"""One sequence's KV bookkeeping (pure Python): its page tables, fp slot map and policy state,
per KV group. The KV manager owns them; `PlanBuilder` (plan.py) advances them each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from logquant.policy import PolicyState


@dataclass
class GroupKV:
    """One sequence's pages and slots in one KV group."""

    policy_state: PolicyState
    fp_pages: list[int] = field(default_factory=list)
    packed_pages: list[int] = field(default_factory=list)  # pages holding demoted blocks, in order
    packed_positions: list[list[int]] = field(default_factory=list)  # positions of each packed page's block
    spare_packed_pages: list[int] = field(default_factory=list)  # allocated, not yet written
    slot_of: dict[int, int] = field(default_factory=dict)  # position -> flat fp slot
    free_slots: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.policy_state.num_tokens

    @property
    def pages(self) -> list[int]:
        return self.fp_pages + self.packed_pages + self.spare_packed_pages


@dataclass
class SequenceKV:
    groups: list[GroupKV]  # in `layout.groups` order

    @property
    def num_tokens(self) -> int:
        return self.groups[0].num_tokens

    @property
    def pages(self) -> list[int]:
        return [p for group in self.groups for p in group.pages]
