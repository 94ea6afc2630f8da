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


def int8_channel_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] as int8 [N, K] with one float32 scale per output channel, symmetric, the
    nearest codes to each weight (|error| <= scale / 2): the layout of one `torch._int_mm` per layer,
    whose epilogue is a single per-channel multiply. Group-wise codes cannot share one integer product
    (each group's dot product would need its own scale), so the group-quantized weight is re-rounded
    once, at load, onto a per-channel grid 127 steps wide (QServe's progressive layout, without its
    second-level integer scales)."""
    w = weight.float()
    scale = (w.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def int8_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Shapes `torch._int_mm` takes: any on CPU; on CUDA more than 16 rows and K, N multiples of 8."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0


def int8_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, w_int8: torch.Tensor,
                w_scale: torch.Tensor) -> torch.Tensor:
    """Q(x) @ Wᵀ for int8 activations (codes [M, K], a float32 scale per row [M, 1]) and an
    `int8_channel_weight` [N, K]: exact int32 dot products from one `torch._int_mm`, scaled in float32 (the
    first multiply converts them, as `.float()` would, without a float32 copy of its own)."""
    return torch.mul(torch._int_mm(x_codes, w_int8.t()), x_scale).mul_(w_scale)
