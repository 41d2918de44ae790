"""`LogQuantCache`: a transformers `Cache` with the fp16 / KIVI / LogQuant token policies.

    cache = LogQuantCache(model.config, policy="logquant", fp_budget=192)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=64)

Each layer keeps its full-precision tokens as dense `[batch, kv_heads, n_fp, head_dim]`
tensors plus a list of 2-bit blocks (one per demotion, quantized once). On `update` the layer
returns the cached tokens in position order (2-bit blocks dequantized for this layer only)
followed by the new tokens at full precision, so transformers' own masks (causal, left
padding) apply unchanged; then it stores the new tokens and demotes what the policy says.
With left padding all rows share one length, so the policy counts pad positions too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

from logquant.layout import head_dim_of
from logquant.policy import TokenPolicy, make_policy
from logquant.quant import QuantizedTensor, dequantize, quantize

SEQ_AXIS = 2  # [batch, kv_heads, seq, head_dim]


@dataclass(frozen=True)
class QuantizedBlock:
    positions: torch.Tensor  # [block_tokens] long
    keys: QuantizedTensor  # [batch, kv_heads, block_tokens, head_dim], one group per channel
    values: QuantizedTensor  # same shape, groups of `group_size` channels per token


class LogQuantLayer(DynamicLayer):
    is_croppable = False

    def __init__(self, policy: TokenPolicy, group_size: int = 32, bits: int = 2) -> None:
        super().__init__()
        self.policy, self.group_size, self.bits = policy, group_size, bits
        self.state = policy.new_state()
        self.fp_positions = torch.empty(0, dtype=torch.long)  # positions of self.keys' columns
        self.blocks: list[QuantizedBlock] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, d)
        self.fp_positions = self.fp_positions.to(key_states.device)

    def get_seq_length(self) -> int:
        return self.state.num_tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old_keys, old_values = self._materialize()
        keys_out = torch.cat([old_keys, key_states], dim=SEQ_AXIS)
        values_out = torch.cat([old_values, value_states], dim=SEQ_AXIS)
        self._store(key_states, value_states)
        return keys_out, values_out

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached tokens in position order: [batch, kv_heads, num_tokens, head_dim]."""
        if not self.blocks:
            return self.keys, self.values  # full precision only, already in position order
        b, h, _, d = self.keys.shape
        n = self.state.num_tokens
        keys = self.keys.new_empty(b, h, n, d)
        values = self.values.new_empty(b, h, n, d)
        keys[:, :, self.fp_positions] = self.keys
        values[:, :, self.fp_positions] = self.values
        for block in self.blocks:
            keys[:, :, block.positions] = dequantize(block.keys)
            values[:, :, block.positions] = dequantize(block.values)
        return keys, values

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        num_old, num_new = self.state.num_tokens, key_states.shape[SEQ_AXIS]
        device = key_states.device
        new_positions = torch.arange(num_old, num_old + num_new, device=device)
        positions = torch.cat([self.fp_positions, new_positions])
        keys = torch.cat([self.keys, key_states], dim=SEQ_AXIS)
        values = torch.cat([self.values, value_states], dim=SEQ_AXIS)
        column_of = {int(p): i for i, p in enumerate(positions.tolist())}
        keep = torch.ones(positions.numel(), dtype=torch.bool, device=device)
        for block in self.state.append(num_new):
            columns = torch.tensor([column_of[p] for p in block], device=device)
            keep[columns] = False
            self.blocks.append(self._quantize_block(positions[columns], keys[:, :, columns], values[:, :, columns]))
        self.fp_positions, self.keys, self.values = positions[keep], keys[:, :, keep], values[:, :, keep]

    def _quantize_block(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> QuantizedBlock:
        block_tokens = positions.numel()
        qk = quantize(keys, self.bits, block_tokens, axis=SEQ_AXIS, scale_dtype=torch.float16)
        qv = quantize(values, self.bits, self.group_size, axis=-1, scale_dtype=torch.float16)
        return QuantizedBlock(positions, qk, qv)

    def reset(self) -> None:
        super().reset()
        self.state = self.policy.new_state()
        self.fp_positions = torch.empty(0, dtype=torch.long)
        self.blocks = []

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)

        def on_quantized(q: QuantizedTensor) -> QuantizedTensor:
            codes, scale, zero = fn(q.codes), fn(q.scale), fn(q.zero)
            return replace(q, codes=codes, scale=scale, zero=zero, shape=(codes.shape[0], *q.shape[1:]))

        self.blocks = [replace(b, keys=on_quantized(b.keys), values=on_quantized(b.values)) for b in self.blocks]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LogQuantCache cannot be cropped: demoted tokens are quantized once")


class LogQuantCache(Cache):
    """A transformers `Cache` whose layers keep `policy`'s full-precision set and 2-bit
    blocks. `policy`: `fp16`, `kivi` or `logquant`; `fp_budget`: full-precision tokens per
    sequence (LogQuant W = fp_budget // 3, KIVI residual = fp_budget)."""

    def __init__(
        self,
        config: PretrainedConfig,
        policy: str | TokenPolicy = "logquant",
        fp_budget: int = 192,
        group_size: int = 32,
        bits: int = 2,
    ) -> None:
        text_config = config.get_text_config(decoder=True)
        head_dim = head_dim_of(text_config)
        if head_dim % group_size != 0:
            raise ValueError(f"head_dim {head_dim} is not a multiple of group_size {group_size}")
        token_policy = make_policy(policy, fp_budget, group_size) if isinstance(policy, str) else policy
        self.policy = token_policy
        layers = [LogQuantLayer(token_policy, group_size, bits) for _ in range(text_config.num_hidden_layers)]
        super().__init__(layers=layers)
