"""Asymmetric min/max group quantization with bit packing (2, 4 or 8 bits).

`quantize(x, bits, group_size, axis)` splits `axis` into groups of `group_size` consecutive
elements; every group gets its own scale and zero point (the group's minimum):

    code = clamp(round((x - zero) / scale), 0, 2**bits - 1),   x ~= code * scale + zero

Codes are packed along the *last* dimension, `8 // bits` codes per uint8, low bits first
(code i of a byte sits at bits [i*bits, (i+1)*bits)). The grouping axis and the packing axis
are independent, so keys (grouped along tokens, per channel) and values (grouped along
channels, per token) share one layout: codes `[..., last // (8 // bits)]` uint8.

`QuantizedTensor.nbytes` = packed codes + scales + zero points, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed codes plus per-group scale and zero point.

    codes: uint8 `shape[:-1] + (shape[-1] * bits // 8,)`.
    scale, zero: `shape` with `shape[axis]` replaced by `shape[axis] // group_size`.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: int  # non-negative
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the tensor `dequantize` returns

    @property
    def nbytes(self) -> int:
        return (
            self.codes.numel() * self.codes.element_size()
            + self.scale.numel() * self.scale.element_size()
            + self.zero.numel() * self.zero.element_size()
        )


def _check(shape: tuple[int, ...], bits: int, group_size: int, axis: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if len(shape) == 0:
        raise ValueError("cannot quantize a 0-d tensor")
    axis = axis % len(shape)
    if group_size <= 0 or shape[axis] % group_size != 0:
        raise ValueError(f"axis {axis} of size {shape[axis]} is not a multiple of group_size {group_size}")
    if shape[-1] % (8 // bits) != 0:
        raise ValueError(f"last dimension {shape[-1]} must be a multiple of {8 // bits} to pack {bits}-bit codes")
    return axis


def _grouped_shape(shape: tuple[int, ...], axis: int, group_size: int) -> tuple[int, ...]:
    return shape[:axis] + (shape[axis] // group_size, group_size) + shape[axis + 1 :]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2**bits) `[..., n]` -> packed uint8 `[..., n * bits // 8]`."""
    per_byte = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # [per_byte]
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 `[..., m]` -> codes uint8 `[..., m * 8 // bits]`."""
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [per_byte]
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask  # [..., m, per_byte]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


_LUTS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def unpack_lut(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`unpack` as `dtype` through a 256-entry byte -> codes table: one row gather instead of
    a shift, a mask and a conversion. packed uint8 `[..., m]` -> `[..., m * 8 // bits]`."""
    key = (bits, packed.device, dtype)
    if key not in _LUTS:
        table = unpack(torch.arange(256, dtype=torch.uint8, device=packed.device).unsqueeze(1), bits)
        _LUTS[key] = table.to(dtype)  # [256, 8 // bits]; codes < 256 are exact in every float dtype
    codes = torch.nn.functional.embedding(packed.int(), _LUTS[key])  # [..., m, 8 // bits]
    return codes.view(*packed.shape[:-1], -1)


def quantize(
    x: torch.Tensor,
    bits: int = 2,
    group_size: int = 32,
    axis: int = -1,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedTensor:
    """Quantize `x` in groups of `group_size` along `axis`; scales stored in `scale_dtype`
    (default: `x.dtype`)."""
    shape = tuple(x.shape)
    axis = _check(shape, bits, group_size, axis)
    scale_dtype = scale_dtype or x.dtype
    grouped = x.reshape(_grouped_shape(shape, axis, group_size)).float()
    low = grouped.amin(dim=axis + 1, keepdim=True)
    high = grouped.amax(dim=axis + 1, keepdim=True)
    max_code = (1 << bits) - 1
    # Round the stored scale and zero first, so codes are chosen for the values that decode.
    scale = ((high - low) / max_code).to(scale_dtype)
    zero = low.to(scale_dtype)
    safe_scale = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((grouped - zero.float()) / safe_scale).clamp_(0, max_code).to(torch.uint8)
    return QuantizedTensor(
        codes=pack(codes.reshape(shape), bits),
        scale=scale.squeeze(axis + 1),
        zero=zero.squeeze(axis + 1),
        bits=bits,
        group_size=group_size,
        axis=axis,
        shape=shape,
        dtype=x.dtype,
    )


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse layout of `quantize`: returns a tensor of `q.shape` in `dtype` (default `q.dtype`)."""
    expected_codes = q.shape[:-1] + (q.shape[-1] * q.bits // 8,)
    if tuple(q.codes.shape) != expected_codes:
        raise ValueError(f"codes shape {tuple(q.codes.shape)} != {expected_codes}")
    grouped_shape = _grouped_shape(q.shape, q.axis, q.group_size)
    codes = unpack(q.codes, q.bits).reshape(grouped_shape).float()
    scale = q.scale.unsqueeze(q.axis + 1).float()
    zero = q.zero.unsqueeze(q.axis + 1).float()
    return (codes * scale + zero).reshape(q.shape).to(dtype or q.dtype)
