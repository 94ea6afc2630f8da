import pytest
import torch

from lowbit import kernels, packing


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (3, 4, 192)])
def test_pack_roundtrip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == shape[-1] * bits // 8
    assert torch.equal(packing.unpack(packed, bits), codes)


def test_pack_layout_is_little_endian():
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 1] = 1
    assert packing.pack(codes, 4).tolist() == [[16, 0, 0, 0]]
    assert packing.pack(codes, 2).tolist() == [[4, 0]]
    assert packing.pack(codes, 3).tolist() == [[8, 0, 0]]
    codes[0, 7] = 7  # bits 21..23 of the 24-bit word
    assert packing.pack(codes, 3).tolist() == [[8, 0, 0xE0]]


@pytest.mark.parametrize("bits,n,per_word", [(3, 12, 8), (2, 6, 4), (4, 7, 2)])
def test_pack_rejects_rows_that_do_not_fill_whole_words(bits, n, per_word):
    with pytest.raises(ValueError, match=f"rows of {bits}-bit codes must hold a multiple of {per_word} codes, got {n}"):
        packing.pack(torch.zeros(2, n, dtype=torch.uint8), bits)


@pytest.mark.parametrize("n,k", [(16, 64), (48, 192), (176, 96)])
def test_int4_cpu_layout_roundtrip(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = kernels.to_int4_cpu_layout(codes)
    assert packed.shape == (n, k // 2)
    assert torch.equal(kernels.from_int4_cpu_layout(packed, n, k), codes)


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_unpack_into_writes_what_unpack_returns(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 48), dtype=torch.uint8, generator=g)
    packed = packing.pack(codes, bits)
    out = torch.full(codes.shape, -1, dtype=dtype)
    assert packing.unpack_into(packed, bits, out) is out
    assert torch.equal(out, codes.to(dtype))
