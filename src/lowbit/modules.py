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
- `act_bits` 4 or 8: the input is quantized per token (symmetric, clipped to ACT_CLIP of its range)
  and the product runs in integers with `torch._int_mm` per weight group (`kernels.int8_group_linear`);
  the runtime layout is then "int8_groups", one byte per weight code.
"""
import torch
from torch import nn

from . import kernels, packing
from .hadamard import hadamard_transform
from .quantize import (dequantize, padded_in_features, quantize_activations, quantize_hqq, quantize_rtn,
                       quantize_rtn_clip)

SOLVERS = {"hqq": quantize_hqq, "rtn": quantize_rtn, "rtn_clip": quantize_rtn_clip}
ACT_CLIP = 0.9  # QuaRot's activation clipping ratio
ACT_BITS = (4, 8, 16)  # 16: activations stay in the compute dtype
INPUT_TRANSFORMS = (None, "hadamard")


def _check_act_bits(act_bits) -> None:
    if act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {list(ACT_BITS)}, got {act_bits!r}")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 dtype: torch.dtype = torch.bfloat16, device=None, act_bits: int = 16,
                 input_transform: str | None = None):
        super().__init__()
        _check_act_bits(act_bits)
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be one of {list(INPUT_TRANSFORMS)}, got {input_transform!r}")
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
        self.layout = "packed"  # "int4_cpu" / "int8_groups" once prepare_runtime() ran
        # 8 bits on the int4 kernel: the scale_offset tables of the high and low halves (runtime only)
        self.register_buffer("nibble_scale_offsets", None, persistent=False)

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
        if self.layout == "int8_groups":
            return (self.qweight.permute(2, 0, 1).reshape(n, k).to(torch.int16) + 2 ** (self.bits - 1)).to(torch.uint8)
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
        """Repack for the kernel this layer runs on: integer matmuls when its activations are quantized,
        else torch's CPU int4 kernel when the layer lives on CPU and the kernel fits."""
        if self.layout == "packed" and self.act_bits < 16:
            codes = packing.unpack(self.qweight, self.bits)
            self.qweight = kernels.group_weight_for_int8(codes, self.bits, self.group_size)
            self.layout = "int8_groups"
            return self
        if (self.layout != "packed" or self.qweight.device.type != "cpu"
                or not kernels.int4_cpu_supported(self.out_features, self.padded_in_features, self.group_size)):
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
        self.nibble_scale_offsets = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform == "hadamard":
            x = hadamard_transform(x.float()).to(x.dtype)
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
        if self.layout != "int8_groups":
            self.prepare_runtime()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.padded_in_features != shape[-1]:
            x2 = nn.functional.pad(x2, (0, self.padded_in_features - shape[-1]))
        codes, scale = quantize_activations(x2, self.act_bits, ACT_CLIP)
        y = kernels.int8_group_linear(codes, scale, self.qweight, self.scale_offset).to(x.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def _int4_cpu_forward(self, x):
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
