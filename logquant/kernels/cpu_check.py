"""Start-up check of the fused CPU kernel: build it, run one decode step of a small case with
the model's cache shape on it and on the torch path, and compare.

`check_cpu_kernel(layout, dtype)` returns None when the kernel can run this layout here, else
one line saying why (unsupported layout, failed build, or a disagreement with the torch path).
The result is cached per layout shape and dtype for the life of the process.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import torch

from logquant.kernels.cpu_build import KernelBuildError
from logquant.kernels.cpu_decode import CpuDecode, cpu_kernel_supports
from logquant.layout import KVLayout

CHECK_LENGTHS = (1, 150, 700)  # cached tokens per sequence: none, fp only (small budgets aside), many blocks
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def check_cpu_kernel(layout: KVLayout, dtype: torch.dtype) -> str | None:
    """The full-attention page format, on one layer (a window group reads fp pages the same way)."""
    return _check(dataclasses.replace(layout, num_layers=1, layer_windows=()), dtype)


@cache
def _check(layout: KVLayout, dtype: torch.dtype) -> str | None:
    reason = cpu_kernel_supports(layout, dtype)
    if reason is not None:
        return reason
    try:
        kernel = CpuDecode.for_layout(layout.groups[0], dtype)
    except KernelBuildError as exc:
        return str(exc)
    error = _max_error(kernel, layout, dtype)
    if not error <= TOLERANCE[dtype]:  # also catches NaN
        return f"the kernel disagrees with the torch path on a small case (max abs error {error:.3g})"
    return None


@torch.inference_mode()
def _max_error(kernel: CpuDecode, layout: KVLayout, dtype: torch.dtype) -> float:
    """Prefill CHECK_LENGTHS on the torch path, then one decode step on both paths."""
    from logquant.kv_manager import KVManager
    from logquant.store import PagedKVStore

    gen = torch.Generator().manual_seed(0)
    seqs = [f"s{i}" for i in range(len(CHECK_LENGTHS))]
    manager = KVManager(layout, sum(layout.pages_for(n + 1) for n in CHECK_LENGTHS))
    store = PagedKVStore(layout, manager.num_pages, dtype, "cpu", decode_backend="torch")
    heads = layout.num_kv_heads * 2  # a GQA group of two
    for seq, length in zip(seqs, CHECK_LENGTHS):
        manager.allocate(seq, length + 1)
        _run(store, store.prepare(manager.plan_step([(seq, length)])), length, heads, gen)
    plan = manager.plan_step([(seq, 1) for seq in seqs])
    fused = store.prepare(plan, decode_index=True).groups[0].buckets[0]
    query, key, value = _random_tokens(len(seqs), heads, layout, dtype, gen)
    fused_out = torch.zeros_like(query)
    kernel(store.layer_bytes(0), fused, query, key, value, layout.head_dim**-0.5, fused_out)
    torch_out = store.forward(0, store.prepare(plan), query, key, value, layout.head_dim**-0.5)
    return float((fused_out.float() - torch_out.float()).abs().max())


def _random_tokens(
    num_tokens: int, heads: int, layout: KVLayout, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = [(num_tokens, heads, layout.head_dim)] + [(num_tokens, layout.num_kv_heads, layout.head_dim)] * 2
    return tuple(torch.randn(shape, generator=gen).to(dtype) for shape in shapes)  # type: ignore[return-value]


def _run(store, step, num_tokens: int, heads: int, gen: torch.Generator) -> None:
    query, key, value = _random_tokens(num_tokens, heads, store.layout, store.dtype, gen)
    store.forward(0, step, query, key, value, store.layout.head_dim**-0.5)
