"""NVFP4: FP4 E2M1 values in blocks of 16 sharing an FP8 E4M3 scale, under one FP32 per-tensor scale.

value = e2m1 · float(block_scale) · tensor_scale. The default tensor scale, amax / (6 · 448), puts the
largest block scale at the top of the E4M3 range, so block scales use all of E4M3's precision and never
overflow. Codes are 4 bits, sign << 3 | magnitude code, packed two per byte (`packing`'s 4-bit layout):
4.5 bits per element with the block scales.
"""
import torch

from . import kernels, packing

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_VALUES = torch.tensor(_MAGNITUDES + [-m for m in _MAGNITUDES], dtype=torch.float32)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> uint8 [..., K//2], code 2i in the low nibble, 2i+1 in the high nibble."""
    return packing.pack(codes, 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`."""
    return packing.unpack(packed, 4)


def _e2m1_round(scaled: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 values to float32 `scaled` (a new tensor), ties to the even code, beyond ±6
    saturated. The grid steps by 0.5 below 2, by 1 up to 4, then by 2: the step is half the value's
    power of two (its exponent bits), at least 0.5, and torch.round's half-to-even lands on the even code
    on every stretch. One copy, then in-place passes: an eager call on a prefill's activations pays per pass."""
    a = scaled.abs().clamp_(max=E2M1_MAX)
    step = (a.view(torch.int32) & 0x7F800000).view(torch.float32).clamp_(min=1.0).mul_(0.5)
    return a.div_(step).round_().mul_(step).copysign_(scaled)  # -0.0 for negatives that round to 0: the sign bit


def _e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """4-bit codes (sign << 3 | magnitude index) of E2M1 values."""
    magnitude = torch.searchsorted(E2M1_VALUES[:8].to(values.device), values.abs()).to(torch.uint8)
    return magnitude | (torch.signbit(values).to(torch.uint8) << 3)


def _check_width(k: int) -> None:
    if k % BLOCK_SIZE:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, got {k}")


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x [..., K] as blocks [..., K//16, 16] and each block's largest magnitude [..., K//16]."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    lo, hi = torch.aminmax(blocks, dim=-1)  # one pass, no |x| copy
    return blocks, torch.maximum(hi, lo.neg_()).abs_()  # abs_: an all-zero block's amax is +0


def _rounded_blocks(blocks: torch.Tensor, block_amax: torch.Tensor, ts: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E2M1 values [..., K//16, 16], block scales [..., K//16]) of float32 blocks under tensor scale(s)
    `ts` (> 0, broadcast against `block_amax`: [] or [..., 1])."""
    block_scales = (block_amax / E2M1_MAX / ts).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    divisor = (block_scales.float() * ts).unsqueeze(-1)
    # A block scale that is (or rounds to) 0 leaves its block at 0 (x / inf); adding 0 makes those zeros, and
    # -0.0 inputs, +0 (code 0). Past ±6, where E4M3 rounded the scale down, `_e2m1_round` saturates.
    scaled = (blocks / torch.where(divisor > 0, divisor, torch.inf)).add_(0.0)
    return _e2m1_round(scaled), block_scales


def _default_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    ts = amax / (E2M1_MAX * E4M3_MAX)
    return torch.where(ts > 0, ts, torch.ones_like(ts))  # all-zero (or underflowing) input: any scale will do


def quantize(x: torch.Tensor, tensor_scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed codes uint8 [..., K//2], block scales float8_e4m3fn [..., K//16], tensor scale)."""
    _check_width(x.shape[-1])
    blocks, block_amax = _blocks(x.float())
    if tensor_scale is None:
        ts = _default_tensor_scale(block_amax.amax() if x.numel() else torch.tensor(0.0))
    else:
        ts = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device).reshape(())
        ts = torch.where(ts > 0, ts, torch.ones_like(ts))
    values, block_scales = _rounded_blocks(blocks, block_amax, ts)
    return pack(_e2m1_codes(values).reshape(x.shape)), block_scales, ts


# [block scale byte, code byte, 2]: the two values a packed byte holds (low nibble first) times each
# E4M3 block scale, exact in float32 (2 + 4 significant bits). Dequantizing is one lookup per byte.
_SCALED_BYTE_VALUES = (torch.stack([E2M1_VALUES[torch.arange(256) & 15], E2M1_VALUES[torch.arange(256) >> 4]], -1)
                       * torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()[:, None, None])
_PAIR_AS_INT = {2: torch.int32, 4: torch.int64}  # a pair of 16-/32-bit floats moved as one integer
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what lowbit's CPU kernel reads and writes


def dequantize(codes_packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize`, up to rounding: [..., K] in `dtype`, each value e2m1 · block scale ·
    tensor scale evaluated in float32 and rounded once to `dtype`. A weight on the CPU goes through
    lowbit's kernel (`kernels.nvfp4_cpu_kernel`), bit for bit the lookup table's result."""
    if dtype in _KERNEL_DTYPES and kernels.nvfp4_kernel_takes(codes_packed, block_scales):
        return torch.ops.lowbit_nvfp4.dequantize(codes_packed, block_scales, tensor_scale.float(), dtype)
    return dequantize_lookup(codes_packed, block_scales, tensor_scale, dtype)


def dequantize_lookup(codes_packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize` with torch ops, any shape and device: one table lookup per byte."""
    pair_dtype = dtype if dtype.itemsize in _PAIR_AS_INT else torch.float32
    table = (_SCALED_BYTE_VALUES.to(codes_packed.device) * tensor_scale.float()).to(pair_dtype)
    pairs = table.view(_PAIR_AS_INT[pair_dtype.itemsize]).reshape(-1)
    index = codes_packed.reshape(*block_scales.shape, -1).long()  # (mixed-dtype broadcasting is far slower)
    index += (block_scales.view(torch.uint8).long() << 8).unsqueeze(-1)
    return pairs.take(index).view(pair_dtype).reshape(*codes_packed.shape[:-1], -1).to(dtype)


def linear(x: torch.Tensor, codes_packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] rounded through NVFP4 per token (`fake_quantize_per_token`), times the NVFP4 weight [N, K]
    transposed (+ bias): a simulated NVFP4 layer. Up to `kernels.NVFP4_MM_MAX_ROWS` rows on the CPU (a
    decode step), one call of lowbit's kernel, which reads the packed codes (4.5 bits per weight, where a
    dequantized copy would be read at 16) and sums the exact products of both operands' NVFP4 values in
    float32; otherwise the rounded input, in x's dtype, times the weight dequantized to x's dtype in one
    GEMM. The two agree up to float32 summation order and the rounding of both operands to x's dtype."""
    rows = x.numel() // x.shape[-1]
    if (rows <= kernels.NVFP4_MM_MAX_ROWS and x.dtype in _KERNEL_DTYPES
            and kernels.nvfp4_kernel_takes(codes_packed, block_scales)):
        y = torch.ops.lowbit_nvfp4.mm(x.reshape(rows, x.shape[-1]), codes_packed, block_scales, tensor_scale.float())
        y = y.view(*x.shape[:-1], codes_packed.shape[0])
        return y if bias is None else y + bias
    return torch.nn.functional.linear(fake_quantize_per_token(x), dequantize(codes_packed, block_scales, tensor_scale,
                                                                             x.dtype), bias)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """x rounded through NVFP4 with a per-call tensor scale: simulated NVFP4 activations, and the reference."""
    return dequantize(*quantize(x), dtype=x.dtype)


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded through NVFP4 with one tensor scale per row (token): simulated NVFP4
    activations whose rounding never depends on the other tokens of the batch. On the CPU, lowbit's
    kernel does it in one pass, bit for bit what `fake_quantize_per_token_torch` computes."""
    _check_width(x.shape[-1])
    if x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and x.numel() and kernels.nvfp4_cpu_kernel():
        return torch.ops.lowbit_nvfp4.round_per_token(x)
    return fake_quantize_per_token_torch(x)


def fake_quantize_per_token_torch(x: torch.Tensor) -> torch.Tensor:
    """`fake_quantize_per_token` with torch ops, any device and dtype."""
    _check_width(x.shape[-1])
    blocks, block_amax = _blocks(x.float())
    ts = _default_tensor_scale(block_amax.amax(-1, keepdim=True))
    values, block_scales = _rounded_blocks(blocks, block_amax, ts)
    return values.mul_(block_scales.float().unsqueeze(-1)).mul_(ts.unsqueeze(-1)).reshape(x.shape).to(x.dtype)


INT8_PER_E2M1_UNIT = 127 / (E2M1_MAX * E4M3_MAX)  # int8 steps per e2m1 · block scale unit


def int8_codes_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] rounded through NVFP4 per token (as `fake_quantize_per_token`), then each value re-rounded
    onto the token's int8 grid max|x|/127: (codes int8 [M, K], scale float32 [M, 1]), the input of one
    `torch._int_mm`. The per-token tensor scale puts max|x| at 6 · 448 units, where it stays after NVFP4
    rounding, so the codes span [-127, 127] and no other maximum is needed."""
    _check_width(x.shape[-1])
    blocks, block_amax = _blocks(x.float())
    ts = _default_tensor_scale(block_amax.amax(-1, keepdim=True))
    values, block_scales = _rounded_blocks(blocks, block_amax, ts)
    # reshaped before the cast: inductor (torch 2.13) multiplies a reshaped int8 [M, K/16, 16] wrongly in _int_mm
    units = values.mul_(block_scales.float().unsqueeze(-1)).reshape(x.shape)
    return units.mul_(INT8_PER_E2M1_UNIT).round_().to(torch.int8), ts / INT8_PER_E2M1_UNIT
