"""Bit packing of unsigned integer codes along the last dimension: the on-disk layout.

Layout (little-endian within a byte, codes in row-major order):
- 8 bits: one code per byte.
- 4 bits: two codes per byte, code 2i in the low nibble, code 2i+1 in the high nibble.
- 2 bits: four codes per byte, code 4i+j in bits 2j..2j+1.
- 3 bits: eight codes in three bytes, code 8i+j in bits 3j..3j+2 of the 24-bit little-endian word.
The last dimension must fill whole words: a multiple of 8 codes at 3 bits, 4 at 2 bits, 2 at 4 bits
(lowbit pads rows to a multiple of the group size).
"""
import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _codes_per_word(bits: int) -> int:
    return 8 if bits == 3 else 8 // bits


def _whole_codes_per_byte(bits: int) -> bool:
    """2 and 4 bits: several codes per byte and none straddling one, so packing is a few uint8 shifts (the
    int32 word path's traffic is four times that)."""
    return bits in (2, 4)


def packed_width(n: int, bits: int) -> int:
    """Bytes per row holding `n` codes of `bits` bits."""
    if n % _codes_per_word(bits):
        raise ValueError(f"rows of {bits}-bit codes must hold a multiple of {_codes_per_word(bits)} codes, got {n}")
    return n * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] with values < 2**bits -> packed uint8 [..., n*bits/8]."""
    packed_width(codes.shape[-1], bits)
    if bits == 8:
        return codes.to(torch.uint8)
    per_word = _codes_per_word(bits)  # codes per little-endian word of `bits*per_word` bits
    if _whole_codes_per_byte(bits):  # or'd together in uint8
        c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_word)
        out = c[..., 0].clone()
        for j in range(1, per_word):
            out |= c[..., j] << (bits * j)
        return out
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32, device=c.device) * bits
    word = (c << shifts).sum(-1, dtype=torch.int32)
    nbytes = bits * per_word // 8
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=c.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def _byte_codes(packed: torch.Tensor, bits: int) -> list:
    """Each byte's codes in order, shifted out in uint8 (`_whole_codes_per_byte` widths)."""
    mask = (1 << bits) - 1
    codes = [packed & mask] + [(packed >> shift) & mask for shift in range(bits, 8 - bits, bits)]
    return codes + [packed >> (8 - bits)]  # the top code: the shift leaves nothing else


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 [..., m] -> uint8 codes [..., m*8/bits]."""
    if bits == 8:
        return packed
    if _whole_codes_per_byte(bits):
        return torch.stack(_byte_codes(packed, bits), -1).reshape(*packed.shape[:-1], -1)
    per_word = _codes_per_word(bits)
    nbytes = bits * per_word // 8
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, nbytes)
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=b.device) * 8
    word = (b << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(per_word, dtype=torch.int32, device=b.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def unpack_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """`unpack` written into `out` (any dtype, contiguous, [..., m*8/bits]): at 2 and 4 bits each byte's
    codes go straight to their strided places, converted on the way, without an unpacked uint8 copy."""
    if _whole_codes_per_byte(bits):
        places = out.view(*packed.shape, 8 // bits)
        for j, codes in enumerate(_byte_codes(packed, bits)):
            places[..., j] = codes
        return out
    return out.copy_(unpack(packed, bits))
