"""torch's CPU int4 kernel: `_weight_int4pack_mm_for_cpu` and its weight layout.

The kernel computes `x @ ((q - 8) * scale + offset).T` per group of input channels, with `q` in a
blocked nibble layout made by `_convert_weight_to_int4pack_for_cpu`. lowbit's stored format
(`scale_offset` [groups, out, 2], w = (q - 2**(bits-1)) * scale + offset) is chosen so the kernel
takes it as is; 2- and 3-bit codes are shifted by 8 - 2**(bits-1) to share the kernel.
"""
import functools

import torch

INT4_CPU_GROUP_SIZES = (32, 64, 128, 256)


def int4_cpu_supported(out_features: int, padded_in_features: int, group_size: int) -> bool:
    """Shapes the CPU kernel accepts (it needs out_features % 16 == 0)."""
    return (
        hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and out_features % 16 == 0
        and padded_in_features % group_size == 0
        and group_size in INT4_CPU_GROUP_SIZES
    )


def to_int4_cpu_layout(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> the kernel's packed uint8 [N, K/2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


@functools.lru_cache(maxsize=4)
def _int4_cpu_permutation(n: int, k: int) -> torch.Tensor:
    """For each nibble of the kernel layout (byte-major, low nibble first), the flat index of its code.

    Found by packing the indices themselves four bits at a time, so it follows whatever blocking this
    torch build uses instead of hard-coding it.
    """
    index = torch.arange(n * k, dtype=torch.int64)
    perm = torch.zeros(n * k, dtype=torch.int64)
    digits = max(1, ((n * k - 1).bit_length() + 3) // 4)
    for d in range(digits):
        digit = ((index >> (4 * d)) & 15).view(n, k)
        packed = to_int4_cpu_layout(digit).reshape(-1).to(torch.int64)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
        perm |= nibbles << (4 * d)
    return perm


def from_int4_cpu_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `to_int4_cpu_layout`: the kernel's packed uint8 -> uint8 codes [N, K]."""
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1)
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[_int4_cpu_permutation(n, k)] = nibbles
    return codes.view(n, k)


def int4_cpu_linear(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_offset: torch.Tensor,
                    padded_in_features: int) -> torch.Tensor:
    """`x @ W.T` with W in the kernel layout; x [..., K] is zero-padded to the stored width if needed."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(scale_offset.dtype)
    if padded_in_features != shape[-1]:
        x2 = torch.nn.functional.pad(x2, (0, padded_in_features - shape[-1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group_size, scale_offset)
    return y.reshape(*shape[:-1], y.shape[-1])


INT8_BLOCK_ELEMENTS = 1 << 18  # output elements per row block of int8_group_linear


def int8_group_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, w_grouped: torch.Tensor,
                      scale_offset: torch.Tensor) -> torch.Tensor:
    """y = Q(x) @ Wᵀ in integer arithmetic (torch._int_mm) for quantized activations and weights.

    x_codes int8 [M, K_pad] with a float32 scale per row `x_scale` [M, 1]; `w_grouped` int8
    [groups, group_size, N] holding q − 2^(bits−1) (see `group_weight_for_int8`); scale_offset
    [groups, N, 2]. Each group's exact int32 products are scaled and summed in float32; the offsets
    need only the activations' group sums: y = x_scale · (Σ_g scale_g · (x_g · w_g) + Σ_g offset_g · Σ x_g).
    Long inputs run in row blocks whose [rows, N] partial products stay in cache (prefill is faster so)."""
    groups, group_size, n = w_grouped.shape
    m = x_codes.shape[0]
    if 1 < groups and m * groups <= SMALL_M_ROWS:
        return _int8_group_linear_small_m(x_codes, x_scale, w_grouped, scale_offset)
    rows = max(64, INT8_BLOCK_ELEMENTS // n)
    if m > rows:
        return torch.cat([int8_group_linear(x_codes[i:i + rows], x_scale[i:i + rows], w_grouped, scale_offset)
                          for i in range(0, m, rows)])
    xg = x_codes.view(m, groups, group_size)
    so = scale_offset.float()
    row_sums = xg.sum(-1, dtype=torch.int32).float()  # [M, groups]
    y = row_sums @ so[:, :, 1]  # the offsets' share, one small matmul
    if groups == 1:
        return (y + torch._int_mm(x_codes, w_grouped[0]).float() * so[0, :, 0]) * x_scale
    for g in range(groups):
        y.addcmul_(torch._int_mm(xg[:, g].contiguous(), w_grouped[g]).float(), so[g, :, 0])
    return y.mul_(x_scale)


SMALL_M_ROWS = 256  # up to this many (token, group) rows, one block-diagonal product beats a loop


def _int8_group_linear_small_m(x_codes, x_scale, w_grouped, scale_offset):
    """Decode-sized inputs: every group's dot products from one `_int_mm`, the activations spread
    block-diagonally ([M·groups, K], group g's codes in row (m, g), zeros elsewhere). Python overhead
    dominates at M = 1, and this is one call instead of one per group."""
    groups, group_size, n = w_grouped.shape
    m = x_codes.shape[0]
    xg = x_codes.view(m, groups, 1, group_size)
    spread = torch.zeros(m, groups, groups, group_size, dtype=torch.int8, device=x_codes.device)
    spread.diagonal(dim1=1, dim2=2).copy_(xg.squeeze(2).transpose(1, 2))
    dots = torch._int_mm(spread.view(m * groups, groups * group_size), w_grouped.view(groups * group_size, n))
    so = scale_offset.float()
    y = (dots.view(m, groups, n).float() * so[:, :, 0]).sum(1)
    y += xg.sum(-1, dtype=torch.int32).view(m, groups).float() @ so[:, :, 1]
    return y.mul_(x_scale)


def group_weight_for_int8(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """uint8 codes [N, K_pad] -> int8 [groups, group_size, N], centred: the layout `int8_group_linear` reads."""
    n, k = codes.shape
    centred = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    return centred.view(n, k // group_size, group_size).permute(1, 2, 0).contiguous()
