"""Paged KV store: the tensor side of the KV cache (bookkeeping lives in `kv_manager.py`).

One uint8 buffer `[num_pages + 1, page_bytes_all_layers]` is allocated once: a page id holds
its page in every layer of the KV group that owns it (see `layout.py`). Per layer, strided
typed views over it give the full-precision tier and the sections of 2-bit pages. Per layer,
`forward` executes its group's part of a step's `StepTensors` for every sequence in one call:

1. per bucket (decodes, prefill chunks): gather the cached fp tokens into a padded tensor
   with one row copy, put the new tokens after them, dequantize the 2-bit pages (one pass);
2. attend both parts, GQA folded into query rows, merged by log-sum-exp (`attention.py`);
3. then write: quantize every block demoted in the step (one batched pass) and scatter the
   new tokens that stay full precision. Writes come last because a new token may reuse a
   slot freed by a demotion of the same step.

With a fused decode backend (`cpu`: C++ on the CPU; `triton`: CUDA; `auto` picks the
device's own when it can run) the decode bucket skips 1-2: one fused kernel reads the fp
slots and 2-bit pages in place (`logquant/kernels/`), and its writes read only the demoted
cached tokens and the new tokens (no padded `kv_fp`). Prefill chunks take the batched path.
"""

from __future__ import annotations

import math

import torch

from logquant.attention import bucket_attention
from logquant.kernels import select_decode_backend
from logquant.layout import KVGroup, KVLayout
from logquant.plan import StepPlan
from logquant.quant import quantize, unpack_lut
from logquant.step import Bucket, DecodeIndex, StepTensors, build_step_tensors

SCALE_DTYPE = torch.float16


class PagedKVStore:
    def __init__(
        self,
        layout: KVLayout,
        num_pages: int,
        dtype: torch.dtype,
        device: torch.device | str,
        decode_backend: str | None = None,
    ) -> None:
        """`decode_backend`: `auto` (or None), `torch`, `cpu` or `triton` (see `select_decode_backend`)."""
        assert torch.empty((), dtype=dtype).element_size() == layout.dtype_bytes, "layout dtype mismatch"
        self.layout, self.num_pages, self.dtype, self.device = layout, num_pages, dtype, torch.device(device)
        self.decode_backend = select_decode_backend(self.device, layout, dtype, decode_backend)
        self._cpu_decode = None
        if self.decode_backend == "cpu":
            from logquant.kernels.cpu_decode import CpuDecode

            self._cpu_decode = [CpuDecode.for_layout(group, dtype) for group in layout.groups]
        # one more page than the KV manager hands out: the zero page, which padding reads
        self.buffer = torch.zeros(num_pages + 1, layout.page_bytes_all_layers, dtype=torch.uint8, device=self.device)
        self._make_views()

    def _make_views(self) -> None:
        """Per layer: its bytes (`layer_bytes`), its fp tier `fp[layer]` [P + 1, fpt, 2, h, d],
        its fp row view and, in a group that demotes, its 2-bit page sections. A layer's page
        p starts at byte p * page_stride + (index of the layer in its group) * page_bytes."""
        h, d = self.layout.num_kv_heads, self.layout.head_dim
        self.fp, self.fp_rows, self.layer_sections = [], [], []
        for g, j in self.layout.group_of:
            group = self.layout.groups[g]
            base, fpt = j * group.page_bytes, group.fp_page_tokens
            self.fp.append(self._view(base, group, self.dtype, (fpt, 2, h, d)))
            self.fp_rows.append(self._fp_row_view(base, group))
            self.layer_sections.append(self._packed_views(base, group) if group.block_tokens else {})

    def _packed_views(self, base: int, group: KVGroup) -> dict[str, torch.Tensor]:
        h, d, bt = group.num_kv_heads, group.head_dim, group.block_tokens
        packed, groups = d * group.bits // 8, d // group.group_size
        shapes = {
            "key_codes": (torch.uint8, (bt, h, packed)),
            "value_codes": (torch.uint8, (bt, h, packed)),
            "key_scale": (SCALE_DTYPE, (h, d)),
            "key_zero": (SCALE_DTYPE, (h, d)),
            "value_scale": (SCALE_DTYPE, (bt, h, groups)),
            "value_zero": (SCALE_DTYPE, (bt, h, groups)),
            "key_outlier_values": (SCALE_DTYPE, (bt, h, group.key_fp_channels)),
            "key_outlier_channels": (torch.uint8, (h, group.key_fp_channels)),
        }
        return {
            name: self._view(base + offset, group, *shapes[name])
            for name, (offset, _) in group.packed_sections().items()
        }

    def _view(self, offset: int, group: KVGroup, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """`[num_pages + 1, *shape]` of `dtype` at byte `offset` of every page (stride: a page id)."""
        elem = torch.empty((), dtype=dtype).element_size()
        flat = self.buffer.view(-1).view(dtype)
        size = math.prod(shape)
        return flat.as_strided((self.num_pages + 1, size), (group.page_stride // elem, 1), offset // elem).view(
            -1, *shape
        )

    def fp_row_strides(self, group: KVGroup) -> tuple[int, int]:
        """(rows per page, rows per token) of a layer's `fp_rows`: a slot's row is
        page * rows_per_page + offset * rows_per_token."""
        step = math.gcd(group.page_stride, group.fp_token_bytes)
        return group.page_stride // step, group.fp_token_bytes // step

    def _fp_row_view(self, base: int, group: KVGroup) -> torch.Tensor:
        """The layer's fp tier as overlapping rows `[virtual_rows, 2 * h * d]` whose start
        steps by gcd(page stride, token bytes): every fp token is one row, so a step gathers
        them with one `index_select` (a row copy) instead of a two-index gather."""
        elem = self.layout.dtype_bytes
        step_elems = group.page_stride // self.fp_row_strides(group)[0] // elem
        row_elems = group.fp_token_bytes // elem
        layer_elems = (self.num_pages + 1) * group.page_stride // elem - base // elem
        num_rows = (layer_elems - row_elems) // step_elems + 1
        flat = self.buffer.view(-1).view(self.dtype)
        return flat.as_strided((num_rows, row_elems), (step_elems, 1), base // elem)

    def layer_bytes(self, layer: int) -> torch.Tensor:
        """The store's bytes from `layer`'s first byte on (flat, contiguous): what the fused
        kernels read, with the page stride of the layer's group."""
        g, j = self.layout.group_of[layer]
        return self.buffer.view(-1)[j * self.layout.groups[g].page_bytes :]

    def grow(self, num_pages: int) -> None:
        """Reallocate for `num_pages` pages, keeping the contents of the existing ones."""
        assert num_pages >= self.num_pages, "the store never shrinks"
        old = self.buffer
        self.buffer = torch.zeros(num_pages + 1, old.shape[1], dtype=torch.uint8, device=self.device)
        self.buffer[: self.num_pages] = old[: self.num_pages]
        self.num_pages = num_pages
        self._make_views()

    def prepare(self, plan: StepPlan, decode_index: bool | None = None) -> StepTensors:
        """The step's index tensors, per KV group; `decode_index` (default: on a fused
        backend) makes the decode bucket a `DecodeIndex` for the fused kernels."""
        fused = self.decode_backend in ("cpu", "triton") if decode_index is None else decode_index
        groups = [
            build_step_tensors(
                group_plan,
                group.block_tokens,
                group.fp_page_tokens,
                self.fp_row_strides(group),
                self.num_pages,
                self.dtype,
                self.device,
                decode_index=fused,
                window=group.window,
            )
            for group, group_plan in zip(self.layout.groups, plan.groups)
        ]
        return StepTensors(plan, groups)

    # ---- one layer of one step -----------------------------------------------------------
    def forward(
        self,
        layer: int,
        step: StepTensors,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim], the step's flat batch
        key: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
        scaling: float,
        softcap: float | None = None,  # attention logits -> tanh(logits / softcap) * softcap
        sinks: torch.Tensor | None = None,  # [num_heads] learned sink logits
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attend every sequence of the step over its cached tokens plus its new ones (within
        its window in a window layer), then store the new tokens in `layer`."""
        out = torch.empty_like(query)
        for bucket in step.groups[self.layout.group_of[layer][0]].buckets:
            if isinstance(bucket, DecodeIndex):
                assert softcap is None and sinks is None, "the fused kernels apply no softcap and no sinks"
                self._fused_decode(layer, bucket, query, key, value, scaling, out)
                continue
            kv_fp, kv_packed = self.gather(layer, bucket, key, value)
            out[bucket.out_rows] = bucket_attention(query, kv_fp, kv_packed, bucket, scaling, softcap, sinks)
            self.write(layer, bucket, kv_fp)
        return out

    def group(self, layer: int) -> KVGroup:
        return self.layout.groups[self.layout.group_of[layer][0]]

    def gather(
        self, layer: int, bucket: Bucket, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The bucket's keys and values: `kv_fp [S, L_fp, 2, h, d]` (cached fp tokens gathered
        from the store with one row copy, then the new tokens) and `kv_packed`, the keys and values
        `[S, L_packed, h, d]` of its 2-bit pages dequantized, or None when no sequence has any."""
        h, d = self.layout.num_kv_heads, self.layout.head_dim
        s, width = bucket.fp_rows.shape
        kv_fp = self.fp_rows[layer].index_select(0, bucket.fp_rows.flatten()).view(s * width, 2, h, d)
        kv_fp[bucket.new_dest] = torch.stack([key[bucket.new_src], value[bucket.new_src]], dim=1).to(self.dtype)
        kv_packed = None
        if bucket.packed_pages.shape[1]:
            keys, values = self.dequantize_pages(layer, bucket.packed_pages.flatten())  # [S * P, bt, h, d]
            kv_packed = (keys.view(s, -1, h, d), values.view(s, -1, h, d))
        return kv_fp.view(s, width, 2, h, d), kv_packed

    def write(self, layer: int, bucket: Bucket, kv_fp: torch.Tensor) -> None:
        """Quantize the bucket's demoted blocks and store its new fp tokens (rows of `kv_fp`)."""
        rows = kv_fp.view(-1, *kv_fp.shape[2:])  # [S * L_fp, 2, h, d]
        if bucket.block_pages.numel():
            self._write_blocks(layer, bucket.block_pages, bucket.block_sources, rows)
        self.fp[layer][bucket.write_pages, bucket.write_offsets] = rows[bucket.write_sources]

    def _fused_decode(
        self,
        layer: int,
        index: DecodeIndex,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        out: torch.Tensor,
    ) -> None:
        """The decode bucket on the fused kernel. Blocks demoted in this step are quantized
        first, from a compact tensor (the demoted cached fp tokens, then the new tokens): they
        go to fresh pages the kernel does not read. New fp tokens are written last."""
        rows = None
        if index.block_pages.numel() or self._cpu_decode is None:
            h, d = self.layout.num_kv_heads, self.layout.head_dim
            rows = torch.stack([key[index.new_src], value[index.new_src]], dim=1).to(self.dtype)  # [S, 2, h, d]
            if index.src_fp_rows.numel():
                rows = torch.cat([self.fp_rows[layer].index_select(0, index.src_fp_rows).view(-1, 2, h, d), rows])
            if index.block_pages.numel():
                self._write_blocks(layer, index.block_pages, index.block_sources, rows)
        if self._cpu_decode is not None:
            kernel, layer_bytes = self._cpu_decode[self.layout.group_of[layer][0]], self.layer_bytes(layer)
            kernel(layer_bytes, index, query, key, value, scaling, out)
            kernel.write(layer_bytes, index, key, value)
            return
        from logquant.kernels.decode import StoreLayer, decode_attention  # imports Triton

        store_layer = StoreLayer.of(self.layer_bytes(layer), self.dtype, self.group(layer))
        decode_attention(store_layer, index, query, key, value, scaling, out)
        self.fp[layer][index.write_pages, index.write_offsets] = rows[index.write_sources]

    def _write_blocks(self, layer: int, pages: torch.Tensor, sources: torch.Tensor, rows: torch.Tensor) -> None:
        """Quantize the blocks `rows[sources]` ([num_blocks, block_tokens] rows) into `pages`."""
        blocks = rows[sources]  # [num_blocks, block_tokens, 2, h, d]
        block_keys, block_values = blocks[:, :, 0], blocks[:, :, 1]
        packed_keys = quantize(block_keys, self.layout.bits, self.layout.block_tokens, axis=1, scale_dtype=SCALE_DTYPE)
        packed_values = quantize(
            block_values, self.layout.bits, self.layout.group_size, axis=3, scale_dtype=SCALE_DTYPE
        )
        sec = self.layer_sections[layer]
        sec["key_codes"][pages] = packed_keys.codes
        sec["key_scale"][pages] = packed_keys.scale.squeeze(1)
        sec["key_zero"][pages] = packed_keys.zero.squeeze(1)
        sec["value_codes"][pages] = packed_values.codes
        sec["value_scale"][pages] = packed_values.scale
        sec["value_zero"][pages] = packed_values.zero
        if self.layout.key_fp_channels:
            spread = block_keys.amax(dim=1) - block_keys.amin(dim=1)  # [num_blocks, h, d]
            channels = spread.topk(self.layout.key_fp_channels, dim=-1).indices  # [num_blocks, h, k]
            index = channels[:, None].expand(-1, block_keys.shape[1], -1, -1)  # [num_blocks, bt, h, k]
            sec["key_outlier_values"][pages] = block_keys.gather(3, index).to(SCALE_DTYPE)
            sec["key_outlier_channels"][pages] = channels.to(torch.uint8)

    def dequantize_pages(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given 2-bit pages of one layer, `[len(pages), bt, h, d]` each.
        One row copy gathers the pages' bytes; sections are views of it."""
        h, d, bt, n = self.layout.num_kv_heads, self.layout.head_dim, self.layout.block_tokens, pages.numel()
        bits, groups = self.layout.bits, d // self.layout.group_size
        g, j = self.layout.group_of[layer]
        group = self.layout.groups[g]
        raw = self._view(j * group.page_bytes, group, torch.uint8, (group.page_bytes,)).index_select(
            0, pages
        )  # [n, page_bytes]
        sections = group.packed_sections()

        def section(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            offset, length = sections[name]
            return raw[:, offset : offset + length].view(dtype).view(n, *shape)

        packed = d * bits // 8
        key_codes = unpack_lut(section("key_codes", torch.uint8, (bt, h, packed)), bits, self.dtype)  # [n, bt, h, d]
        key_scale, key_zero = (section(k, SCALE_DTYPE, (1, h, d)).to(self.dtype) for k in ("key_scale", "key_zero"))
        keys = torch.addcmul(key_zero, key_codes, key_scale)  # one scale and zero per channel over the block
        if self.layout.key_fp_channels:  # the widest channels at 16 bits replace their 2-bit codes
            k = self.layout.key_fp_channels
            channels = section("key_outlier_channels", torch.uint8, (1, h, k)).long().expand(n, bt, h, k)
            keys.scatter_(3, channels, section("key_outlier_values", SCALE_DTYPE, (bt, h, k)).to(self.dtype))
        value_codes = unpack_lut(section("value_codes", torch.uint8, (bt, h, packed)), bits, self.dtype)
        value_scale, value_zero = (
            section(k, SCALE_DTYPE, (bt, h, groups, 1)).to(self.dtype) for k in ("value_scale", "value_zero")
        )
        values = torch.addcmul(value_zero, value_codes.view(n, bt, h, groups, -1), value_scale)  # per token and group
        return keys, values.view(n, bt, h, d)
