"""Page allocator: page ids against a fixed KV budget (pure Python, no torch).

Every page is `layout.page_bytes` bytes in every layer. A sequence of n tokens holds exactly
`layout.pages_for(n)` pages (full-precision pages plus one page per demoted 2-bit block), so
usage is counted, never estimated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from logquant.layout import KVLayout, PagePool


@dataclass
class SequencePages:
    fp_pages: list[int] = field(default_factory=list)
    q_pages: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens these pages cover


@dataclass(frozen=True)
class NewPages:
    fp_pages: list[int]
    q_pages: list[int]


class PageAllocator:
    def __init__(self, layout: KVLayout, kv_budget_bytes: int) -> None:
        self.layout = layout
        self.kv_budget_bytes = kv_budget_bytes
        self.num_pages = layout.num_pages(kv_budget_bytes)
        if self.num_pages == 0:
            raise ValueError(
                f"KV budget of {kv_budget_bytes} bytes is smaller than one page "
                f"({layout.page_bytes_all_layers} bytes)"
            )
        self.pool = PagePool(self.num_pages)
        self.tables: dict[str, SequencePages] = {}

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free

    def _missing(self, seq_id: str, num_tokens: int) -> tuple[int, int]:
        table = self.tables.get(seq_id, SequencePages())
        fp = max(0, self.layout.fp_pages_for(num_tokens) - len(table.fp_pages))
        q = max(0, self.layout.q_pages_for(num_tokens) - len(table.q_pages))
        return fp, q

    def can_allocate(self, seq_id: str, num_tokens: int, reserve: int = 0) -> bool:
        """Whether `seq_id` can grow to cover `num_tokens` tokens, leaving `reserve` pages free."""
        fp, q = self._missing(seq_id, num_tokens)
        return fp + q + reserve <= self.pool.num_free

    def pages_for(self, num_tokens: int) -> int:
        return self.layout.pages_for(num_tokens)

    def allocate(self, seq_id: str, num_tokens: int) -> NewPages:
        """Grow `seq_id` to cover `num_tokens` tokens; raises MemoryError if the pages are not free."""
        fp, q = self._missing(seq_id, num_tokens)
        if fp + q > self.pool.num_free:
            raise MemoryError(f"{seq_id}: needs {fp + q} pages, {self.pool.num_free} free")
        table = self.tables.setdefault(seq_id, SequencePages())
        new = NewPages(self.pool.allocate(fp), self.pool.allocate(q))
        table.fp_pages += new.fp_pages
        table.q_pages += new.q_pages
        table.num_tokens = max(table.num_tokens, num_tokens)
        return new

    def free(self, seq_id: str) -> None:
        table = self.tables.pop(seq_id, None)
        if table is not None:
            self.pool.free(table.fp_pages + table.q_pages)

    # ---- exact accounting ----------------------------------------------------------------
    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.pool.num_free

    @property
    def usage(self) -> float:
        return self.num_used_pages / self.num_pages

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.layout.page_bytes_all_layers

    def bytes_by_tier(self) -> dict[str, int]:
        per_page = self.layout.page_bytes_all_layers
        fp = sum(len(t.fp_pages) for t in self.tables.values())
        q = sum(len(t.q_pages) for t in self.tables.values())
        return {"fp": fp * per_page, "2bit": q * per_page}

    def num_cached_tokens(self) -> int:
        return sum(t.num_tokens for t in self.tables.values())
