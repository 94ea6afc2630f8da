"""The integer kernels torch has, and the weight layouts they take.

int4 (weight-only layers): torch's CPU kernel `_weight_int4pack_mm_for_cpu` and its weight layout.

The kernel computes `x @ ((q - 8) * scale + offset).T` per group of input channels, with `q` in a
blocked nibble layout made by `_convert_weight_to_int4pack_for_cpu`. lowbit's stored format
(`scale_offset` [groups, out, 2], w = (q - 2**(bits-1)) * scale + offset) is chosen so the kernel
takes it as is; 2- and 3-bit codes are shifted by 8 - 2**(bits-1) to share the kernel.

int8 (layers with quantized activations): int8 codes times an int8 weight with one scale per output
channel (`int8_channel_weight`). On a CPU with AMX the weight is held prepacked for oneDNN's int8 GEMM
(what torch's x86 quantization runs; there, on a long prompt, several times faster than `torch._int_mm`,
which re-lays out the weight at every call); everywhere else, and for narrow layers
(ONEDNN_MIN_OUT_FEATURES), as a plain [N, K] tensor for `torch._int_mm`. Both give the same exact int32
dot products.

NVFP4 (ARHQ, SVDQuant): no CPU kernel in torch computes from NVFP4 codes, so lowbit builds its own
(`csrc/nvfp4_cpu.cpp`, with torch's C++ extension tools, on first use) for what a simulated NVFP4 layer
does at each call: the input's per-token rounding through NVFP4, a decode step's product read straight
from the packed codes, and the weight's dequantization for a prompt's GEMM.
"""
import functools
import logging
import os
import subprocess

import torch

logger = logging.getLogger(__name__)

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


def _unpack_blocks_of_64(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The layout of whole blocks of 64 rows: per block and input channel, 32 bytes whose low nibbles
    are rows 0-31 and high nibbles rows 32-63."""
    blocks = packed.view(n // 64, k, 32)
    codes = torch.empty(n // 64, 2, 32, k, dtype=torch.uint8, device=packed.device)
    codes[:, 0] = (blocks & 15).transpose(1, 2)
    codes[:, 1] = (blocks >> 4).transpose(1, 2)
    return codes.view(n, k)


@functools.lru_cache(maxsize=None)
def _int4_cpu_blocks_of_64() -> bool:
    """Whether this torch build lays out 64-row blocks as `_unpack_blocks_of_64` reads them (checked once)."""
    codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.equal(_unpack_blocks_of_64(to_int4_cpu_layout(codes), 128, 64), codes)


def int4_cpu_unpacks_fast(n: int) -> bool:
    """Whether a weight of n rows leaves the kernel layout in two strided passes (whole 64-row blocks)
    rather than through the permutation (a scatter, and an index of N·K int64 to build)."""
    return n % 64 == 0 and _int4_cpu_blocks_of_64()


def from_int4_cpu_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `to_int4_cpu_layout`: the kernel's packed uint8 -> uint8 codes [N, K]."""
    if int4_cpu_unpacks_fast(n):
        return _unpack_blocks_of_64(packed, n, k)
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1)
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[_int4_cpu_permutation(n, k)] = nibbles
    return codes.view(n, k)


# Beyond this many rows (a prompt, not a decode step) torch's int4 kernel is slower than dequantizing the
# weight (a few passes over it) and one bf16 GEMM (scripts/kernel_benchmark.py: "int4", "int4 dequant")
INT4_CPU_MAX_ROWS = 256


def int4_cpu_dequantizes(rows: int, out_features: int) -> bool:
    """Whether a product of this many rows dequantizes the weight and runs one float GEMM instead of the
    int4 kernel: past INT4_CPU_MAX_ROWS, for weights that unpack fast (`int4_cpu_unpacks_fast`)."""
    return rows > INT4_CPU_MAX_ROWS and int4_cpu_unpacks_fast(out_features)


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
    """Shapes the int8 product takes: any on CPU; on CUDA (`torch._int_mm`) more than 16 rows and K, N
    multiples of 8."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0


@functools.lru_cache(maxsize=None)
def onednn_int8_available() -> bool:
    """Whether this torch build runs oneDNN's int8 GEMM (x86 builds do), checked once on a small exact case."""
    try:
        w = torch.arange(-48, 48, dtype=torch.int8).view(6, 16)
        x = torch.arange(-32, 32, dtype=torch.int8).view(4, 16)
        y = _onednn_int8_mm(x, torch.ops.onednn.qlinear_prepack(w, None), 6)
        return torch.equal(y, x.float() @ w.float().T)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def onednn_int8_fast() -> bool:
    """Whether oneDNN's int8 GEMM is the faster kernel on this CPU: only with AMX. Without it (AVX512-VNNI
    alone, e.g. AMD EPYC) oneDNN multiplies signed int8 inputs on its reference kernel, hundreds of times
    slower than `torch._int_mm`, and unsigned ones on a VNNI kernel that is still no faster than it
    (`scripts/kernel_benchmark.py`'s "int8 oneDNN u8")."""
    return onednn_int8_available() and torch.cpu._is_amx_tile_supported()


# oneDNN's int8 GEMM takes a slow path (milliseconds, not microseconds) when a call has at most 256
# outputs (rows × N), i.e. a decode step of a layer 256 wide or less (GQA k/v projections); such layers
# keep the plain layout, on which `torch._int_mm` is fast at any size that narrow
ONEDNN_MIN_OUT_FEATURES = 512


def onednn_layout_for(out_features: int) -> bool:
    """Whether a CPU int8 weight with this many outputs is held in oneDNN's prepacked layout."""
    return out_features >= ONEDNN_MIN_OUT_FEATURES and onednn_int8_fast()


def pack_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """An int8 weight [N, K] in the layout its int8 product takes here: an opaque oneDNN-prepacked tensor
    (the same bytes) where `onednn_layout_for` says so; otherwise the weight itself."""
    if weight.device.type != "cpu" or not onednn_layout_for(weight.shape[0]):
        return weight
    return torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)


def unpack_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """The plain int8 [N, K] of a weight `pack_int8_weight` made (a copy if it was packed)."""
    return weight.to_dense().t() if weight.is_mkldnn else weight


_UNIT_SCALES = {}  # out_features -> (float32 ones, int64 zeros): the weight's scales and zero points given to
# oneDNN, a plain dict for compile


def _onednn_int8_mm(codes: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """codes @ Wᵀ as float32 (the int32 sums converted, as `.float()` does)."""
    if out_features not in _UNIT_SCALES:
        _UNIT_SCALES[out_features] = (torch.ones(out_features), torch.zeros(out_features, dtype=torch.int64))
    ones, zeros = _UNIT_SCALES[out_features]
    return torch.ops.onednn.qlinear_pointwise.default(codes, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                                      "none", [], "")


@torch.library.custom_op("lowbit::onednn_int8_mm", mutates_args=())
def _onednn_int8_mm_op(codes: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The oneDNN product as one opaque op for torch.compile: inductor lowers oneDNN's own op only for
    weights it froze itself, and would not take a module's prepacked weight."""
    return _onednn_int8_mm(codes, packed, out_features)


@_onednn_int8_mm_op.register_fake
def _(codes, packed, out_features):
    return codes.new_empty(codes.shape[0], out_features, dtype=torch.float32)


# rows of a prompt's int32 products converted and scaled at a time: the float32 block stays in a core's
# cache between the two multiplies and the cast, where the whole product's would not
EPILOGUE_ROWS = 64


def int8_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                packed: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q(x) @ Wᵀ in `dtype` for int8 activations (codes [M, K], a float32 scale per row [M, 1]) and an
    `int8_channel_weight` [N, K] (`packed`: as `pack_int8_weight` laid it out for oneDNN; said by the
    caller, since torch.compile's stand-in for an opaque tensor does not say so): exact int32 dot products
    times the two scales, in that order, in float32, then rounded to `dtype` (the same result from either
    kernel). After `torch._int_mm` the first multiply converts the int32 products, as `.float()` would,
    without a float32 copy of its own, EPILOGUE_ROWS rows at a time on a prompt (eager); oneDNN returns
    them converted."""
    if packed:
        mm = _onednn_int8_mm_op if torch.compiler.is_compiling() else _onednn_int8_mm
        return mm(x_codes, w_int8, w_scale.shape[0]).mul_(x_scale).mul_(w_scale).to(dtype)
    products = torch._int_mm(x_codes, w_int8.t())
    rows = products.shape[0]
    if rows <= EPILOGUE_ROWS or torch.compiler.is_compiling():  # compiled: inductor fuses the epilogue
        return torch.mul(products, x_scale).mul_(w_scale).to(dtype)
    out = products.new_empty(products.shape, dtype=dtype)
    for start in range(0, rows, EPILOGUE_ROWS):
        block = slice(start, start + EPILOGUE_ROWS)
        out[block] = torch.mul(products[block], x_scale[block]).mul_(w_scale)
    return out


NVFP4_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "nvfp4_cpu.cpp")
# Up to this many rows (decode steps, small batches) the NVFP4 kernel's product reads the packed weight;
# beyond it, dequantizing the weight once and one float GEMM is faster (scripts/kernel_benchmark.py --rows
# 1 4 8: "nvfp4" against "nvfp4 dequant")
NVFP4_MM_MAX_ROWS = 8
_nvfp4_built = None  # None: not tried yet; then whether torch.ops.lowbit_nvfp4 is loaded


def build_nvfp4_extension(name: str = "lowbit_nvfp4", defines: tuple = ()) -> None:
    """Compile and load `csrc/nvfp4_cpu.cpp` (torch.utils.cpp_extension, cached by source hash under
    TORCH_EXTENSIONS_DIR: a few seconds once per machine and torch version). `defines` ("NAME=value")
    are for the tests, which also build the scalar loops alone under another op namespace."""
    from torch.utils import cpp_extension

    cpp_extension.load(name=name, sources=[NVFP4_SOURCE], extra_cflags=["-O3"] + [f"-D{d}" for d in defines],
                       is_python_module=False, verbose=False)


def nvfp4_cpu_kernel() -> bool:
    """Whether lowbit's NVFP4 CPU kernel is loaded (`torch.ops.lowbit_nvfp4`); the first call builds it.
    Without a C++ compiler (or ninja) it says why once, and NVFP4 layers compute with torch ops instead."""
    global _nvfp4_built
    if _nvfp4_built is None:
        try:
            logger.info("loading lowbit's NVFP4 CPU kernel (the first time on this machine, it compiles)")
            build_nvfp4_extension()
            torch.library.register_fake("lowbit_nvfp4::mm")(
                lambda x, codes, block_scales, tensor_scale: x.new_empty(x.shape[0], codes.shape[0]))
            torch.library.register_fake("lowbit_nvfp4::dequantize")(
                lambda codes, block_scales, tensor_scale, dtype: codes.new_empty(codes.shape[0], 2 * codes.shape[1],
                                                                                 dtype=dtype))
            torch.library.register_fake("lowbit_nvfp4::round_per_token")(torch.empty_like)
            _nvfp4_built = True
        except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as e:
            lines = str(e).strip().splitlines() or [repr(e)]
            why = next((line for line in lines if "error" in line.lower() and line is not lines[0]), lines[-1])
            logger.warning("lowbit's NVFP4 CPU kernel could not be built (%s); NVFP4 layers compute with torch ops "
                           "instead, several times slower", why.strip())
            _nvfp4_built = False
    return _nvfp4_built


def nvfp4_kernel_takes(codes: torch.Tensor, block_scales: torch.Tensor) -> bool:
    """Whether the NVFP4 CPU kernel takes this weight: 2-D, contiguous, on the CPU, with the kernel loaded."""
    return (codes.device.type == "cpu" and codes.dim() == 2 and codes.is_contiguous() and block_scales.is_contiguous()
            and nvfp4_cpu_kernel())
