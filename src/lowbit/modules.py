"""`QuantLinear`: the quantized linear layer that stores packed low-bit weights.

Persistent buffers (what the checkpoint holds, see `packing` and `quantize` for the formats):
- `qweight`      uint8 [out, in_pad * bits / 8], codes packed along the input dimension
- `scale_offset` compute dtype [in_pad / group_size, out, 2]
- `bias`         compute dtype [out] (optional)
On CPU, `prepare_runtime()` repacks `qweight` once into the layout of torch's int4 kernel: 2/3-bit
codes are widened to 4 bits in memory for it, and 8-bit codes q = 16·h + l are split into two 4-bit
halves run as two int4 matmuls, since (q − 128)·s + o = (h − 8)·16s + (o + 8s) + (l − 8)·s.
`state_dict()` always emits the portable layout.

Rotation methods switch on two more parts (config, not state: reload rebuilds them from the config):
- `input_transform="hadamard"`: x ← x·H over the input features at run time (QuaRot's down_proj,
  whose weight already holds W·H);
- `input_transform="householder"`: x ← Q·x by the submodule `rotation` (a `HouseholderRotation`,
  whose vectors the checkpoint holds; the weight holds W·Qᵀ);
- `learned_act_clip`: the activation clipping ratio is the persistent float32 buffer `act_clip_ratio`
  instead of ACT_CLIP[act_bits] (Householder checkpoints saved when it learned that ratio still hold one);
- `act_bits` 4 or 8: the input is quantized per token (symmetric, clipped as ACT_CLIP[act_bits] says)
  and the product is one int8 GEMM (`kernels.int8_linear`: `torch._int_mm`, or oneDNN's on a CPU with AMX)
  with the weight re-rounded at load onto a per-channel int8 grid (`kernels.int8_channel_weight`, runtime
  buffers beside the packed codes, which stay for saving): layout "int8_channel". Where the product does
  not take the shape (CUDA below 17 tokens), the layer computes the float reference instead,
  fake-quantized input times the dequantized weight, and says so once in the log. Such layers that read
  the same input (q/k/v, gate/up) share one quantization of it (`SharedInputProduct`).
"""
import itertools
import logging

import torch
from torch import nn

from . import kernels, nvfp4, packing, reflections
from .hadamard import hadamard_transform, in_row_blocks, transform_activations
from .quantize import (dequantize, padded_in_features, quantize_activations, quantize_hqq, quantize_hqq_integer_zero,
                       quantize_rtn, quantize_rtn_clip)

SOLVERS = {"hqq": quantize_hqq, "hqq_integer_zero": quantize_hqq_integer_zero, "rtn": quantize_rtn,
           "rtn_clip": quantize_rtn_clip}
logger = logging.getLogger(__name__)
# Activation clipping ratio per bit width. 4 bits: None, each token's ratio searched for the least
# squared error (`quantize.ACT_CLIP_GRID`): the best fixed ratio (QuaRot's 0.9) differs from model to
# model, and a per-token search is close to the best fixed one on each. 8 bits: not clipped (8 bits
# resolve the range, and clipping cuts exactly the outliers the next layer needs).
ACT_CLIP = {4: None, 8: 1.0}
ACT_BITS = (4, 8, 16)  # 16: activations stay in the compute dtype
INPUT_TRANSFORMS = (None, "hadamard", "householder")


def _check_act_bits(act_bits) -> None:
    if act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {list(ACT_BITS)}, got {act_bits!r}")


class Int8Runtime(nn.Module):
    """The runtime int8 weight of a layer with quantized activations (its non-persistent buffer
    `int8_weight` [N, K]) in its device's layout (`kernels.pack_int8_weight`). oneDNN's prepacked tensor is
    opaque: it cannot move, and has no storage to copy, so moving the layer (`.to()`, `.cpu()`, ...),
    `copy.deepcopy` and pickling see the plain weight and pack it again."""

    int8_packed = False  # int8_weight is oneDNN's: a plain attribute, which torch.compile reads as a constant

    def _set_int8_weight(self, weight: torch.Tensor) -> None:
        self.int8_weight = kernels.pack_int8_weight(weight)
        self.int8_packed = self.int8_weight.is_mkldnn

    def _plain_int8_weight(self) -> torch.Tensor:
        return kernels.unpack_int8_weight(self.int8_weight).contiguous()

    def _apply(self, fn, recurse=True):
        packed = self.int8_packed
        if packed:
            self.int8_weight = self._plain_int8_weight()
        result = super()._apply(fn, recurse)
        if packed:
            self._set_int8_weight(self.int8_weight)
        return result

    def __getstate__(self):
        state = super().__getstate__()
        if self.int8_packed:
            state = {**state, "_buffers": {**state["_buffers"], "int8_weight": self._plain_int8_weight()}}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.int8_packed:
            self._set_int8_weight(self.int8_weight)


class QuantLinear(Int8Runtime):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 dtype: torch.dtype = torch.bfloat16, device=None, act_bits: int = 16,
                 input_transform: str | None = None, reflections: int = 0, learned_act_clip: bool = False):
        super().__init__()
        _check_act_bits(act_bits)
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be one of {list(INPUT_TRANSFORMS)}, got {input_transform!r}")
        if (input_transform == "householder") != (reflections > 0):
            raise ValueError(f"reflections must be >= 1 exactly when input_transform='householder', got "
                             f"{reflections} with input_transform={input_transform!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.act_bits, self.input_transform = act_bits, input_transform
        self.padded_in_features = padded_in_features(in_features, group_size)
        width = packing.packed_width(self.padded_in_features, bits)
        groups = self.padded_in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, width, dtype=torch.uint8, device=device))
        self.register_buffer("scale_offset", torch.empty(groups, out_features, 2, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.bias = None
        self.rotation = HouseholderRotation(reflections, in_features, dtype, device) if reflections else None
        # float32, not the loader's default dtype
        self.register_buffer("act_clip_ratio", torch.empty((), dtype=torch.float32, device=device)
                             if learned_act_clip else None)
        self.layout = "packed"  # "int4_cpu" / "int8_channel" once prepare_runtime() ran
        # 8 bits on the int4 kernel: the scale_offset tables of the high and low halves (runtime only)
        self.register_buffer("nibble_scale_offsets", None, persistent=False)
        # "int8_channel": the weight as int8 [out, in] and its float32 scale per output channel (runtime only)
        self.register_buffer("int8_weight", None, persistent=False)
        self.register_buffer("int8_scale", None, persistent=False)
        self.shared_input = None  # a SharedInputProduct this layer belongs to (runtime only)
        self._warned_fallback = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, solver="hqq",
                    dtype: torch.dtype | None = None, **parts) -> "QuantLinear":
        """`solver`: a name in SOLVERS, or a callable (weight, bits, group_size, dtype) -> (codes, scale_offset)."""
        dtype = dtype or linear.weight.dtype
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                     dtype=dtype, device=linear.weight.device, **parts)
        for name, tensor in module.quantized_tensors(linear.weight.data, solver).items():
            setattr(module, name, tensor)
        if linear.bias is not None:
            module.bias.data = linear.bias.data.to(dtype)
        return module.prepare_runtime()

    def quantized_tensors(self, weight: torch.Tensor, solver: str = "hqq") -> dict:
        """The persistent buffers for `weight` (what quantize-on-load hands to the loader)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit "
                             f"QuantLinear({self.in_features}, {self.out_features})")
        solve = SOLVERS[solver] if isinstance(solver, str) else solver
        codes, scale_offset = solve(weight, self.bits, self.group_size, self.scale_offset.dtype)
        return {"qweight": packing.pack(codes, self.bits), "scale_offset": scale_offset}

    def codes(self) -> torch.Tensor:
        """The unpacked uint8 codes [out, in_pad], whatever the current layout."""
        n, k = self.out_features, self.padded_in_features
        if self.layout == "int4_cpu":
            if self.bits == 8:
                high = kernels.from_int4_cpu_layout(self.qweight[:n], n, k)
                return high * 16 + kernels.from_int4_cpu_layout(self.qweight[n:], n, k)
            return kernels.from_int4_cpu_layout(self.qweight, n, k) - (8 - 2 ** (self.bits - 1))
        return packing.unpack(self.qweight, self.bits)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes(), self.scale_offset, self.bits, self.in_features, dtype)

    @torch.no_grad()
    def prepare_runtime(self) -> "QuantLinear":
        """Repack for the kernel this layer runs on: one integer matmul when its activations are quantized,
        else torch's CPU int4 kernel when the layer lives on CPU and the kernel fits."""
        if self.layout == "packed" and self.act_bits < 16:
            weight, self.int8_scale = kernels.int8_channel_weight(self.dequantize_weight(torch.float32))
            self._set_int8_weight(weight)
            self.layout = "int8_channel"
            return self
        if self.layout != "packed" or self.qweight.device.type != "cpu":
            return self
        if not kernels.int4_cpu_supported(self.out_features, self.padded_in_features, self.group_size):
            logger.info("%s: torch's CPU int4 kernel does not take this shape; the weight is dequantized at each "
                        "call", self.extra_repr())
            return self
        codes = packing.unpack(self.qweight, self.bits)
        if self.bits == 8:
            self.qweight = torch.cat([kernels.to_int4_cpu_layout(codes >> 4), kernels.to_int4_cpu_layout(codes & 15)])
            scale, offset = self.scale_offset.unbind(-1)
            self.nibble_scale_offsets = torch.stack([torch.stack([scale * 16, offset + 8 * scale], -1),
                                                     torch.stack([scale, torch.zeros_like(offset)], -1)])
        else:
            self.qweight = kernels.to_int4_cpu_layout(codes + (8 - 2 ** (self.bits - 1)))
        self.layout = "int4_cpu"
        return self

    def set_act_bits(self, act_bits: int) -> None:
        """Switch activation quantization on or off (e.g. after calibrating weight-only)."""
        _check_act_bits(act_bits)
        if act_bits != self.act_bits:
            self._to_packed_layout()
            self.act_bits = act_bits
            self.prepare_runtime()

    @torch.no_grad()
    def _to_packed_layout(self):
        codes = self.codes()
        self.qweight = packing.pack(codes.to(self.qweight.device), self.bits)
        self.layout = "packed"
        self.nibble_scale_offsets = self.int8_weight = self.int8_scale = None
        self.int8_packed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform == "hadamard":
            x = transform_activations(x)
        elif self.input_transform == "householder":
            x = self.rotation(x)
        if self.act_bits < 16:
            return self._integer_forward(x)
        if self.layout == "int4_cpu":
            if x.device.type == "cpu":
                y = self._int4_cpu_forward(x).to(x.dtype)
                return y + self.bias if self.bias is not None else y
            self._to_packed_layout()  # the module was moved off the CPU
        w = self.dequantize_weight(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _integer_forward(self, x):
        if self.layout != "int8_channel":
            self.prepare_runtime()
        y = _int8_product(self, x)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def quantizes_input_like(self, other: "QuantLinear") -> bool:
        """Whether `other` reads the same input into the same int8 codes (`SharedInputProduct`)."""
        mine, theirs = self.act_clip_ratio, other.act_clip_ratio
        return (self.act_bits == other.act_bits and self.input_transform is None and other.input_transform is None
                and (mine is None) == (theirs is None) and (mine is None or torch.equal(mine, theirs)))

    FALLBACK = "the float reference"  # what `_float_product` computes where torch._int_mm refuses the shape

    def _input_codes(self, x2):
        clip = ACT_CLIP[self.act_bits] if self.act_clip_ratio is None else self.act_clip_ratio
        return quantize_activations(x2, self.act_bits, clip)

    def _float_product(self, codes, scale, int8_weight, int8_scale):
        """The reference: the activation codes times this layer's group-wise weight, not its int8 copy."""
        return (codes.float() * scale) @ self.dequantize_weight(torch.float32).T

    def _int4_cpu_forward(self, x):
        if kernels.int4_cpu_dequantizes(x.numel() // x.shape[-1], self.out_features):  # a prompt: one float GEMM
            return nn.functional.linear(x, self.dequantize_weight(x.dtype))
        k = self.padded_in_features
        if self.bits != 8:
            return kernels.int4_cpu_linear(x, self.qweight, self.group_size, self.scale_offset, k)
        n, (high, low) = self.out_features, self.nibble_scale_offsets
        return (kernels.int4_cpu_linear(x, self.qweight[:n], self.group_size, high, k)
                + kernels.int4_cpu_linear(x, self.qweight[n:], self.group_size, low, k))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "packed":
            destination[prefix + "qweight"] = packing.pack(self.codes(), self.bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, act_bits={self.act_bits}, "
                f"input_transform={self.input_transform}, layout={self.layout}")

    def input_transform_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """W from the stored W·Tᵀ of an online input transform T (what a plain Linear needs)."""
        if self.input_transform == "hadamard":
            return hadamard_transform(w, inverse=True)
        if self.input_transform == "householder":
            return self.rotation.inverse(w)
        return w


def _integer_product(module, x: torch.Tensor, int8_weight: torch.Tensor, int8_scale: torch.Tensor,
                     codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """An int8 layer's input codes (`module._input_codes`, or `codes` already made from x) times an int8
    weight (its own or several layers' stacked) in one int8 GEMM (`kernels.int8_linear`), in x's dtype;
    where `torch._int_mm` refuses the shape, `module._float_product`, said once in the log."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    codes, scale = codes or module._input_codes(x2)
    out_features = int8_scale.shape[0]  # one scale per output channel, whatever the weight's layout
    if kernels.int8_mm_supported(x2.shape[0], module.in_features, out_features, x.device):
        y = kernels.int8_linear(codes, scale, int8_weight, int8_scale, module.int8_packed, x.dtype)
    else:
        if not module._warned_fallback:
            logger.info("%s: torch._int_mm does not take %d x %d x %d on %s; computing %s", module.extra_repr(),
                        x2.shape[0], module.in_features, out_features, x.device, module.FALLBACK)
            module._warned_fallback = True
        y = module._float_product(codes, scale, int8_weight, int8_scale).to(x.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])


def _int8_product(module, x: torch.Tensor) -> torch.Tensor:
    """An int8 layer's product (no bias): its columns of a `SharedInputProduct`, or its own."""
    shared = module.shared_input
    if shared is not None and not torch.compiler.is_compiling():  # compiled: each layer alone, in the graph
        y = shared.output(module, x)
        if y is not None:
            return y
    return _integer_product(module, x, module.int8_weight, module.int8_scale)


class SharedInputProduct:
    """One activation quantization (and where it pays, one product) for int8 layers that read the same
    input (q/k/v, gate/up; QuantLinears with quantized activations, Nvfp4Linears on their int8 runtime):
    the first member called with an input quantizes it, and the others reuse that when called with the
    same, unmodified tensor. Each entry is exact, so results are bit-identical to the members' own.

    Weights laid out for `torch._int_mm` (plain [N, K]: CUDA, CPUs without AMX, narrow layers) are stacked:
    the first member multiplies the input by all members' weights at once and the others take their
    columns, and the members' `int8_weight`/`int8_scale` become views of the stacked ones (nothing is held
    twice). That pays for a decode step's few rows, where each call's fixed cost dominates; where the
    product would be larger than MAX_ELEMENTS (e.g. a long prompt's gate/up) the members share only the
    input's codes and each runs its own product, whose float32 epilogue stays in cache where the stacked
    one would not. oneDNN-packed weights (CPUs with AMX) cannot be views of a stacked one: where any member has
    one, the members always share the codes only, each with its own product and layout (oneDNN's fixed
    cost per call is small).

    A member whose weight no longer fits (moved to another device, repacked) computes on its own, as it
    does when the int8 product does not take the shape."""

    MAX_ELEMENTS = 1 << 20  # rows × stacked output features: 4 MB of float32

    def __init__(self, members: list):
        self.members = frozenset(members)
        self.weight = self.scale = None  # the stacked weight and scales (plain layout only)
        self.columns = {}  # member -> its (start, stop) columns of the stacked product
        if not any(m.int8_packed for m in members):
            self.weight = torch.cat([m.int8_weight for m in members])
            self.scale = torch.cat([m.int8_scale for m in members])
            bounds = list(itertools.accumulate((m.out_features for m in members), initial=0))
            self.columns = {m: (start, stop) for m, start, stop in zip(members, bounds, bounds[1:])}
            for m, (start, stop) in self.columns.items():
                m.int8_weight, m.int8_scale = self.weight[start:stop], self.scale[start:stop]
        for m in members:
            m.shared_input = self
        # (input, its version, product or (codes, scale), members still to be served), replaced whole and
        # never changed in place: threads running the model at once each read a consistent state (at worst
        # one recomputes it)
        self._state = None

    @staticmethod
    def can_share(members: list) -> bool:
        """Members must be int8 layers of one kind on one device that quantize their input the same way."""
        first = members[0]
        return (all(type(m) is type(first) and getattr(m, "int8_weight", None) is not None
                    and m.in_features == first.in_features and m.int8_weight.device == first.int8_weight.device
                    for m in members)
                and all(first.quantizes_input_like(m) for m in members[1:]))

    def _serves(self, member) -> bool:
        weight = member.int8_weight
        if weight is None:
            return False
        return self.weight is None or weight._base is self.weight

    def output(self, member: "QuantLinear", x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s product (no bias): its columns of the shared one, or its own from the shared codes;
        None: the member computes on its own."""
        if not self._serves(member):
            return None
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        state = self._state
        if state is None or x is not state[0] or version != state[1] or member not in state[3]:
            rows = x.numel() // x.shape[-1]
            device = member.int8_weight.device if self.weight is None else self.weight.device
            width = member.out_features if self.weight is None else self.weight.shape[0]
            if x.device != device or not kernels.int8_mm_supported(rows, member.in_features, width, x.device):
                return None
            if self.weight is None or rows * width > self.MAX_ELEMENTS:
                shared = member._input_codes(x.reshape(-1, x.shape[-1]))
            else:
                shared = _integer_product(member, x, self.weight, self.scale)
            state = (x, version, shared, self.members)
        pending = state[3] - {member}
        self._state = (*state[:3], pending) if pending else None  # all served: let go of input and product
        if isinstance(state[2], tuple):
            return _integer_product(member, x, member.int8_weight, member.int8_scale, codes=state[2])
        start, stop = self.columns[member]
        return state[2][..., start:stop]


class HouseholderRotation(nn.Module):
    """x ← Q·x over the last dimension, Q = Had·H_k…H_1: k rank-1 updates, then a fast Hadamard
    transform (`reflections.rotate`).

    Persistent buffer: `householder_vectors` [k, d] in the compute dtype (Q is orthogonal for any vectors,
    so rounding them changes which rotation is stored, never its orthogonality: the weights it precedes
    are folded with the rounded vectors). The Hadamard is regenerated from d. The WY factors are
    computed once, in float32, at first use (V rounded to bfloat16 once for a bfloat16 prompt, which
    `hadamard.activation_dtype` transforms in bfloat16)."""

    def __init__(self, reflections: int, features: int, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.register_buffer("householder_vectors", torch.empty(reflections, features, dtype=dtype, device=device))
        self._wy = None  # ((vectors, their version), {dtype: factors}): not a buffer, so .to(dtype) leaves it be

    def _factors(self, dtype: torch.dtype = torch.float32):
        """The WY factors for inputs of `dtype`: S in float32, V in `dtype` (rounded from the float32 V)."""
        v = self.householder_vectors
        if self._wy is None or (not torch.compiler.is_compiling()  # compiled: as the eager steps before set them
                                and (self._wy[0][0] is not v or self._wy[0][1] != v._version)):
            self._wy = ((v, v._version), {torch.float32: reflections.wy_factors(v.float())})
        by_dtype = self._wy[1]
        if dtype not in by_dtype:
            unit, s = by_dtype[torch.float32]
            by_dtype[dtype] = (unit.to(dtype), s)
        return by_dtype[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.householder_vectors
        return in_row_blocks(x, lambda rows: reflections.rotate(rows, v, factors=self._factors(rows.dtype)))

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        """Q·w over the last dimension: W·Qᵀ, the weight of a linear reading the rotated input."""
        return reflections.rotate(w.float(), self.householder_vectors.float()).to(w.dtype)

    def inverse(self, w: torch.Tensor) -> torch.Tensor:
        """Qᵀ·w over the last dimension: W from a folded W·Qᵀ."""
        return reflections.rotate(w.float(), self.householder_vectors.float(), inverse=True).to(w.dtype)

    def extra_repr(self) -> str:
        return f"reflections={self.householder_vectors.shape[0]}, features={self.householder_vectors.shape[1]}"


class RotatedNorm(nn.Module):
    """A norm followed by the rotation that every linear reading its output shares (Householder's
    q/k/v and gate/up): the rotation runs and is stored once for the group."""

    def __init__(self, norm: nn.Module, rotation: HouseholderRotation):
        super().__init__()
        self.norm, self.rotation = norm, rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.norm(x))


class Nvfp4Linear(Int8Runtime):
    """y = Q(x)·Q(W_res)ᵀ + x·Lᵀ (ARHQ, SVDQuant): the residual weight and its input in NVFP4, a low-rank
    branch L = lora_up·lora_down in the compute dtype beside them.

    Persistent buffers (what the checkpoint holds):
    - `qweight`      uint8 [out, in / 2], E2M1 codes, two per byte (`nvfp4.pack`)
    - `block_scales` float8_e4m3fn [out, in / 16], `tensor_scale` float32 []
    - `lora_down`    compute dtype [rank, in], `lora_up` [out, rank] (rank > 0)
    - `smooth_scale` compute dtype [in] when smoothing could not be folded into the layer before: the
      module reads x / smooth_scale and its weights hold W·diag(smooth_scale)
    - `bias`         compute dtype [out] (optional)
    No hardware here computes in NVFP4, so the arithmetic is simulated: the input is rounded to NVFP4 per
    token (a per-token tensor scale: each token's result is independent of its batch) and multiplied by
    the residual's exact values (`nvfp4.linear`): on the CPU a decode step reads the packed codes
    through lowbit's kernel, a prompt dequantizes the residual once per call. Memory holds the packed
    4.5 bits per weight, not a float copy.
    `use_int8_runtime` trades that exactness for speed: the residual is re-rounded once onto a
    per-channel int8 grid and the input's NVFP4 values onto a per-token one, and the layer is one
    `torch._int_mm` (as QuaRot's integer layers), plus the low-rank branch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, smooth: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if in_features % nvfp4.BLOCK_SIZE:
            raise ValueError(f"NVFP4 needs in_features to be a multiple of {nvfp4.BLOCK_SIZE}, got {in_features}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < min(in_features, out_features):
            raise ValueError(f"rank must be an integer in [0, min(in_features, out_features)) = "
                             f"[0, {min(in_features, out_features)}), got {rank!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        empty = lambda *shape, dtype=dtype: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("qweight", empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("block_scales", empty(out_features, in_features // nvfp4.BLOCK_SIZE,
                                                   dtype=torch.float8_e4m3fn))
        self.register_buffer("tensor_scale", empty((), dtype=torch.float32))
        self.register_buffer("lora_down", empty(rank, in_features) if rank else None)
        self.register_buffer("lora_up", empty(out_features, rank) if rank else None)
        self.register_buffer("smooth_scale", empty(in_features) if smooth else None)
        self.bias = nn.Parameter(empty(out_features), requires_grad=False) if bias else None
        # runtime only (ArhqConfig(int8_runtime=True)): the residual as int8 [out, in], its float32 scale per
        # output channel
        self.register_buffer("int8_weight", None, persistent=False)
        self.register_buffer("int8_scale", None, persistent=False)
        self.shared_input = None  # a SharedInputProduct this layer belongs to (runtime only)
        self._warned_fallback = False

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, lora_up=None, lora_down=None,
                    smooth_scale=None, dtype: torch.dtype | None = None) -> "Nvfp4Linear":
        """`weight` is the full (smoothed) W; the residual W − lora_up·lora_down is what gets quantized."""
        dtype = dtype or weight.dtype
        out, k = weight.shape
        rank = 0 if lora_up is None else lora_up.shape[1]
        module = cls(k, out, bias is not None, rank, smooth_scale is not None, dtype=dtype, device=weight.device)
        residual = weight.float()
        if rank:
            module.lora_up.copy_(lora_up)
            module.lora_down.copy_(lora_down)
            residual = residual - module.lora_up.float() @ module.lora_down.float()  # the branch as stored
        module.qweight, module.block_scales, module.tensor_scale = nvfp4.quantize(residual)
        if smooth_scale is not None:
            module.smooth_scale.copy_(smooth_scale)
        if bias is not None:
            module.bias.data = bias.detach().to(dtype)
        return module

    def dequantize_residual(self, dtype: torch.dtype) -> torch.Tensor:
        return nvfp4.dequantize(self.qweight, self.block_scales, self.tensor_scale, dtype)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The W a plain Linear needs to compute this layer without its input quantization."""
        w = self.dequantize_residual(torch.float32)
        if self.rank:
            w = w + self.lora_up.float() @ self.lora_down.float()
        if self.smooth_scale is not None:
            w = w / self.smooth_scale.float()
        return w.to(dtype)

    def prepare_runtime(self) -> "Nvfp4Linear":
        if self.qweight.device.type == "cpu":
            kernels.nvfp4_cpu_kernel()  # built (or found) at load, not inside a first compiled step
        return self

    @torch.no_grad()
    def use_int8_runtime(self) -> None:
        """Compute from now on with an int8 copy of the residual (1 more byte per weight; see the class)."""
        weight, self.int8_scale = kernels.int8_channel_weight(self.dequantize_residual(torch.float32))
        self._set_int8_weight(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_scale is not None:
            x = x / self.smooth_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.int8_weight is None:
            y = nvfp4.linear(x, self.qweight, self.block_scales, self.tensor_scale, bias)
        else:
            y = _int8_product(self, x)
            y = y if bias is None else y + bias
        if self.rank:  # y + (x·lora_downᵀ)·lora_upᵀ, the addition inside the second GEMM
            down = nn.functional.linear(x.reshape(-1, x.shape[-1]), self.lora_down.to(x.dtype))
            y = torch.addmm(y.reshape(-1, y.shape[-1]), down, self.lora_up.to(x.dtype).t()).view(y.shape)
        return y

    def quantizes_input_like(self, other: "Nvfp4Linear") -> bool:
        """Whether `other` reads the same input into the same int8 codes (`SharedInputProduct`)."""
        return self.smooth_scale is None and other.smooth_scale is None

    FALLBACK = "it in float32"  # what `_float_product` computes where torch._int_mm refuses the shape

    def _input_codes(self, x2):
        return nvfp4.int8_codes_per_token(x2)

    def _float_product(self, codes, scale, int8_weight, int8_scale):
        """The same product of int8 codes, computed in float32."""
        return (codes.float() @ kernels.unpack_int8_weight(int8_weight).float().T).mul_(scale).mul_(int8_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, smooth={self.smooth_scale is not None}")
