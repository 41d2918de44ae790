"""Cases shared by the fused-kernel tests (Triton: test_kernels.py; C++: test_cpu_kernel.py):
steps run through the KV manager and a store, every output checked against `attend` on the
stored reference (fp tokens exact, each demoted block quantized once)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from logquant.attention import attend
from logquant.kv_manager import KVManager
from logquant.layout import KVLayout
from logquant.policy import make_policy
from logquant.quant import dequantize, quantize
from logquant.step import DecodeIndex
from logquant.store import PagedKVStore

D, LAYERS, GROUP_SIZE = 32, 2, 8
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}  # atol and rtol
DECODE = {"a": 1, "b": 1, "c": 1}
# a: no 2-bit block; b: a few; c: many; d joins with a prefill chunk beside the decodes
STEPS = [{"a": 2, "b": 29, "c": 61}, DECODE, DECODE, {**DECODE, "d": 7}, DECODE, {**DECODE, "d": 1}, DECODE]
GQA = {1: (2, 2), 3: (6, 2), 4: (8, 2), 8: (8, 1)}  # ratio -> (query heads, kv heads)


@dataclass(frozen=True)
class Case:
    policy: str
    budget: int
    heads: int
    kv_heads: int
    dtype: torch.dtype = torch.float32
    head_dim: int = D
    group_size: int = GROUP_SIZE
    key_fp_channels: int = 0
    sink_tokens: int = 0  # the schedules below are sized so that decode steps demote blocks
    windows: tuple[int | None, ...] = ()  # per layer: a sliding window (its own KV group), or None

    @property
    def num_layers(self) -> int:
        return len(self.windows) or LAYERS

    @property
    def head_counts(self) -> tuple[int, int, int]:
        """Heads of q, k and v."""
        return self.heads, self.kv_heads, self.kv_heads

    def layout(self) -> KVLayout:
        policy = make_policy(self.policy, self.budget, group_size=self.group_size, sink_tokens=self.sink_tokens)
        size = torch.empty((), dtype=self.dtype).element_size()
        return KVLayout(
            self.num_layers,
            self.kv_heads,
            self.head_dim,
            policy,
            dtype_bytes=size,
            group_size=self.group_size,
            key_fp_channels=self.key_fp_channels,
            layer_windows=self.windows,
        )


def make_store(
    case: Case, backend: str | None, seed: int = 0, num_pages: int = 300, device: torch.device | str = "cpu"
) -> tuple[PagedKVStore, KVManager]:
    layout = case.layout()
    manager = KVManager(layout, num_pages)
    random.Random(seed).shuffle(manager.pool._free)  # shuffled page ids
    store = PagedKVStore(layout, num_pages, case.dtype, device, decode_backend=backend)
    store.buffer[:num_pages] = 255  # never-written bytes read as NaN
    return store, manager


def stored_reference(case: Case, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's keys/values as the policy stores them: fp tokens exact (in the store
    dtype), each demoted block quantized once (keys per channel, values per token)."""
    state = case.layout().policy.new_state()
    blocks = state.append(keys.shape[0])
    keys, values = keys.to(case.dtype).float(), values.to(case.dtype).float()
    fp = state.full_precision_positions()
    ks, vs = [keys[fp]], [values[fp]]
    for block in blocks:
        block_keys = dequantize(quantize(keys[block], 2, len(block), axis=0, scale_dtype=torch.float16), torch.float32)
        for head in range(keys.shape[1]):  # the widest key channels of the block stay at 16 bits
            exact = keys[block][:, head]
            widest = (exact.max(0).values - exact.min(0).values).argsort(descending=True)[: case.key_fp_channels]
            block_keys[:, head, widest] = exact[:, widest].half().float()
        ks.append(block_keys)
        packed = quantize(values[block], 2, case.group_size, axis=-1, scale_dtype=torch.float16)
        vs.append(dequantize(packed, torch.float32))
    return torch.cat(ks), torch.cat(vs)


def window_reference(
    q: torch.Tensor,
    old_k: torch.Tensor,
    old_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    window: int,
    case: Case,
) -> torch.Tensor:
    """A sliding-window layer: query i of the chunk sees the `window` newest positions up to its
    own, all at full precision."""
    keys = torch.cat([old_k.to(case.dtype).float(), new_k])
    values = torch.cat([old_v.to(case.dtype).float(), new_v])
    base = old_k.shape[0]
    rows = [
        attend(
            q[i : i + 1],
            keys[max(0, base + i + 1 - window) : base + i + 1],
            values[max(0, base + i + 1 - window) : base + i + 1],
            case.head_dim**-0.5,
        )
        for i in range(q.shape[0])
    ]
    return torch.cat(rows)


def run_steps(
    case: Case,
    steps: list[dict[str, int]],
    seed: int,
    backend: str | None = "triton",
    num_pages: int = 300,
    device: torch.device | str = "cpu",
) -> int:
    """Run the steps through the manager and store; check every layer's output for every
    sequence against `attend` on the stored reference. Returns the blocks demoted by
    decode buckets that ran on a fused kernel."""
    gen = torch.Generator().manual_seed(seed)
    store, manager = make_store(case, backend, seed, num_pages, device)
    history: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    kernel_demotions, tol = 0, TOLERANCE[case.dtype]
    for chunks in steps:
        for seq, n in chunks.items():
            manager.allocate(seq, (manager.num_tokens(seq) if seq in manager.sequences else 0) + n)
        step = store.prepare(manager.plan_step(list(chunks.items())))
        kernel_demotions += sum(b.block_pages.numel() for b in step.groups[0].buckets if isinstance(b, DecodeIndex))
        total = sum(chunks.values())
        for layer in range(case.num_layers):
            q, k, v = (torch.randn(total, h, case.head_dim, generator=gen) for h in case.head_counts)
            on_device = (t.to(case.dtype).to(device) for t in (q, k, v))
            out = store.forward(layer, step, *on_device, scaling=case.head_dim**-0.5)
            assert out.dtype == case.dtype and out.isfinite().all()
            row, window = 0, case.windows[layer] if case.windows else None
            for seq, n in chunks.items():
                empty = torch.empty(0, case.kv_heads, case.head_dim)
                old_k, old_v = history.get((seq, layer), (empty, empty))
                new = slice(row, row + n)
                new_k, new_v = (t[new].to(case.dtype).float() for t in (k, v))
                if window is None:
                    ref_k, ref_v = stored_reference(case, old_k, old_v)
                    keys, values = torch.cat([ref_k, new_k]), torch.cat([ref_v, new_v])
                    expected = attend(q[new].to(case.dtype).float(), keys, values, case.head_dim**-0.5)
                else:
                    expected = window_reference(q[new].to(case.dtype).float(), old_k, old_v, new_k, new_v, window, case)
                torch.testing.assert_close(out[new].float().cpu(), expected, atol=tol, rtol=tol)
                history[(seq, layer)] = (torch.cat([old_k, k[new]]), torch.cat([old_v, v[new]]))
                row += n
        manager.check_integrity()
    return kernel_demotions


def decode_bucket(
    case: Case, lengths: dict[str, int], backend: str, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[PagedKVStore, DecodeIndex, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A store holding sequences of the given lengths (written with random K/V through the
    torch path) and the decode step that follows, prepared for the fused kernel."""
    store, manager = make_store(case, backend, seed=seed, device=device)
    gen = torch.Generator().manual_seed(seed)
    for seq, n in lengths.items():
        manager.allocate(seq, n)
        step = store.prepare(manager.plan_step([(seq, n)]))
        for layer in range(case.num_layers):
            q, k, v = (torch.randn(n, h, case.head_dim, generator=gen).to(device) for h in case.head_counts)
            store.forward(layer, step, q, k, v, case.head_dim**-0.5)
    for seq, n in lengths.items():
        manager.allocate(seq, n + 1)
    step = store.prepare(manager.plan_step([(seq, 1) for seq in lengths]), decode_index=True)
    total = len(lengths)
    q, k, v = (torch.randn(total, h, case.head_dim, generator=gen).to(device) for h in case.head_counts)
    index = step.groups[0].buckets[0]
    assert isinstance(index, DecodeIndex)
    return store, index, (q, k, v)
