"""Paged KV store: the tensor side of the KV cache (bookkeeping lives in `kv_manager.py`).

One uint8 buffer `[num_layers, num_pages, page_bytes]` is allocated once; typed views over it
give the full-precision tier and the sections of 2-bit pages (see `layout.py`). Per layer,
`forward` executes a step's `StepTensors` for every sequence of the step in one call:

1. gather the cached fp tokens (one index), dequantize every named 2-bit page (one pass),
   and lay them next to the step's new tokens in one pool;
2. attend: one batched call per bucket (decodes, prefill chunks), GQA folded into query rows;
3. then write: quantize every block demoted in the step (one batched pass) and scatter the
   new tokens that stay full precision. Writes come last because a new token may reuse a
   slot freed by a demotion of the same step.
"""

from __future__ import annotations

import torch

from logquant.attention import bucket_attention
from logquant.kv_manager import StepPlan
from logquant.layout import KVLayout
from logquant.quant import quantize, unpack_lut
from logquant.step import StepTensors, build_step_tensors

SCALE_DTYPE = torch.float16


class PagedKVStore:
    def __init__(self, layout: KVLayout, num_pages: int, dtype: torch.dtype, device: torch.device | str) -> None:
        assert torch.empty((), dtype=dtype).element_size() == layout.dtype_bytes, "layout dtype mismatch"
        self.layout, self.num_pages, self.dtype, self.device = layout, num_pages, dtype, torch.device(device)
        self.buffer = torch.zeros(layout.num_layers, num_pages, layout.page_bytes, dtype=torch.uint8, device=self.device)
        self._make_views()

    def _make_views(self) -> None:
        layout, h, d = self.layout, self.layout.num_kv_heads, self.layout.head_dim
        fpt = layout.fp_page_tokens
        self.fp = self._view(0, fpt * layout.fp_token_bytes, self.dtype, (fpt, 2, h, d))  # [L, P, fpt, 2, h, d]
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

    def grow(self, num_pages: int) -> None:
        """Reallocate for `num_pages` pages, keeping the contents of the existing ones."""
        assert num_pages >= self.num_pages, "the store never shrinks"
        old = self.buffer
        self.buffer = torch.zeros(old.shape[0], num_pages, old.shape[2], dtype=torch.uint8, device=self.device)
        self.buffer[:, : self.num_pages] = old
        self.num_pages = num_pages
        self._make_views()

    def prepare(self, plan: StepPlan) -> StepTensors:
        return build_step_tensors(plan, self.layout.block_tokens, self.layout.fp_page_tokens, self.device)

    # ---- one layer of one step -----------------------------------------------------------
    def forward(
        self,
        layer: int,
        step: StepTensors,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim], the step's flat batch
        key: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        scaling: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attend every sequence of the step over its cached tokens plus its new ones, then
        store the new tokens in `layer`."""
        key_pool, value_pool = self.pool(layer, step, key, value)
        out = bucket_attention(query, key_pool, value_pool, step.buckets, scaling)
        self.write(layer, step, key_pool[step.num_q_rows :], value_pool[step.num_q_rows :])
        return out

    def pool(
        self, layer: int, step: StepTensors, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [pool_rows, kv_heads, head_dim] each
        """2-bit tokens, cached fp tokens and new tokens of the step, in the plan's row order."""
        cached = self.fp[layer, step.fp_pages, step.fp_offsets]  # [num_fp_cached, 2, h, d]
        q_keys, q_values = self.dequantize_pages(layer, step.q_pages)  # [num_q_rows, h, d]
        key_pool = torch.cat([q_keys, cached[:, 0], key.to(self.dtype)])
        value_pool = torch.cat([q_values, cached[:, 1], value.to(self.dtype)])
        return key_pool, value_pool

    def write(self, layer: int, step: StepTensors, fp_keys: torch.Tensor, fp_values: torch.Tensor) -> None:
        """Quantize the step's demoted blocks and store the new fp tokens. `fp_keys`/`fp_values`:
        the fp part of the pool `[num_fp_cached + num_tokens, h, d]`."""
        if step.block_pages.numel():
            self._write_blocks(layer, step, fp_keys, fp_values)
        rows = step.write_sources
        self.fp[layer, step.write_pages, step.write_offsets] = torch.stack([fp_keys[rows], fp_values[rows]], dim=1)

    def _write_blocks(self, layer: int, step: StepTensors, keys: torch.Tensor, values: torch.Tensor) -> None:
        block_keys = keys[step.block_sources]  # [num_blocks, block_tokens, h, d]
        block_values = values[step.block_sources]
        qk = quantize(block_keys, self.layout.bits, self.layout.block_tokens, axis=1, scale_dtype=SCALE_DTYPE)
        qv = quantize(block_values, self.layout.bits, self.layout.group_size, axis=3, scale_dtype=SCALE_DTYPE)
        pages = step.block_pages
        self.key_codes[layer, pages] = qk.codes
        self.key_scale[layer, pages] = qk.scale.squeeze(1)
        self.key_zero[layer, pages] = qk.zero.squeeze(1)
        self.value_codes[layer, pages] = qv.codes
        self.value_scale[layer, pages] = qv.scale
        self.value_zero[layer, pages] = qv.zero

    def dequantize_pages(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given 2-bit pages of one layer: `[len(pages) * bt, h, d]` each."""
        h, d = self.layout.num_kv_heads, self.layout.head_dim
        if pages.numel() == 0:
            empty = torch.empty(0, h, d, dtype=self.dtype, device=self.device)
            return empty, empty
        bt, n, bits, groups = self.layout.block_tokens, pages.numel(), self.layout.bits, d // self.layout.group_size
        key_codes = unpack_lut(self.key_codes[layer, pages], bits).view(n, bt, h, d)  # float32
        keys = torch.addcmul(
            self.key_zero[layer, pages].unsqueeze(1).float(), key_codes, self.key_scale[layer, pages].unsqueeze(1).float()
        )  # [n, bt, h, d], one scale and zero per channel over the block
        value_codes = unpack_lut(self.value_codes[layer, pages], bits).view(n, bt, h, groups, -1)
        values = torch.addcmul(
            self.value_zero[layer, pages].unsqueeze(-1).float(),
            value_codes,
            self.value_scale[layer, pages].unsqueeze(-1).float(),
        )  # [n, bt, h, groups, group_size], one scale and zero per group of channels
        return keys.view(n * bt, h, d).to(self.dtype), values.view(n * bt, h, d).to(self.dtype)
