import pytest
import torch

from logquant.quant import dequantize, pack, quantize, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,group", [(0, 16), (-1, 8), (1, 3)])
def test_round_trip_error_within_half_step(bits: int, axis: int, group: int) -> None:
    gen = torch.Generator().manual_seed(bits * 10 + group)
    x = torch.randn(32, 6, 16, generator=gen, dtype=torch.float32) * 3
    q = quantize(x, bits=bits, group_size=group, axis=axis, scale_dtype=torch.float32)
    x64 = x.double()
    xq = dequantize(q).double()
    # per-group step from a float64 reference of min/max
    ax = axis % 3
    grouped = x64.reshape(x.shape[:ax] + (x.shape[ax] // group, group) + x.shape[ax + 1 :])
    step = (grouped.amax(ax + 1, keepdim=True) - grouped.amin(ax + 1, keepdim=True)) / (2**bits - 1)
    err = (xq.reshape(grouped.shape) - grouped).abs()
    assert torch.all(err <= step / 2 + 1e-5)
    assert xq.shape == x.shape


def test_known_codes_and_packing() -> None:
    # one group of 4 values spanning [0, 3] -> scale 1, zero 0, codes = values
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0]])
    q = quantize(x, bits=2, group_size=4, axis=-1, scale_dtype=torch.float32)
    # low bits first: 0 | 1<<2 | 2<<4 | 3<<6 = 228 ; 3 | 2<<2 | 1<<4 | 0<<6 = 27
    assert q.codes.tolist() == [[228, 27]]
    assert q.scale.tolist() == [[1.0, 1.0]] and q.zero.tolist() == [[0.0, 0.0]]
    assert torch.equal(dequantize(q), x)


def test_pack_unpack_inverse() -> None:
    codes = torch.randint(0, 4, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack(pack(codes, 2), 2), codes)
    assert pack(codes, 2).shape == (5, 16)


def test_nbytes_exact() -> None:
    x = torch.randn(64, 3, 64, dtype=torch.float16)
    q = quantize(x, bits=2, group_size=32, axis=-1)
    # codes 64*3*64/4 bytes + (scale + zero) 64*3*2 groups * 2 bytes each
    assert q.nbytes == 64 * 3 * 16 + 2 * 64 * 3 * 2 * 2


def test_constant_group_is_exact() -> None:
    x = torch.full((4, 8), 1.5)
    assert torch.equal(dequantize(quantize(x, 2, 4, -1)), x)


def test_shape_checks() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(torch.randn(10, 8), 2, group_size=4, axis=0)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(8, 8), 3, group_size=4)
    with pytest.raises(ValueError, match="pack"):
        quantize(torch.randn(8, 6), 2, group_size=2, axis=-1)
