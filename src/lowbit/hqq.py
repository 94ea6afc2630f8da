"""HQQ: calibration-free half-quadratic weight-only quantization (2/3/4/8 bits)."""
from .base import LowbitConfig, LowbitHfQuantizer, Method, Option, check_choice
from .packing import SUPPORTED_BITS

GROUP_SIZES = (32, 64, 128, 256)
ZERO_POINTS = ("float", "integer")


class HqqConfig(LowbitConfig):
    """Weight-only HQQ. `group_size` input channels share a scale and an offset; rows whose width is
    not a multiple of it are zero-padded to one (see `lowbit.quantize`), so every Linear is quantized.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: 32, 64, 128 or 256.
        zero_point: "float" (hqq's optimized zero point) or "integer" (rounded to an integer inside the
            solver's loop: what compressed-tensors, and so vLLM, stores; `lowbit export` needs it for that format).
        modules_to_not_convert: module names (or regexes, transformers' rules) kept in the compute dtype.
    """

    quant_method = "lowbit_hqq"
    _fields = {"bits": 4, "group_size": 64, "zero_point": "float", "modules_to_not_convert": ["lm_head"]}

    def validate(self):
        super().validate()
        check_choice("bits", self.bits, SUPPORTED_BITS)
        check_choice("group_size", self.group_size, GROUP_SIZES)
        check_choice("zero_point", self.zero_point, ZERO_POINTS)


class HqqHfQuantizer(LowbitHfQuantizer):
    @property
    def solver(self):
        return "hqq_integer_zero" if self.quantization_config.zero_point == "integer" else "hqq"


METHOD = Method(
    name="hqq", config=HqqConfig, quantizer=HqqHfQuantizer, title="HQQ",
    summary="calibration-free half-quadratic weight-only quantization, packed low-bit weights with a scale and "
            "an offset per group of input channels, run on torch's int4 CPU kernel.",
    options=(Option("--bits", "bits", int, "weight bits: 2, 3, 4 or 8"),
             Option("--group-size", "group_size", int, "input channels per scale/offset: 32, 64, 128 or 256"),
             Option("--zero-point", "zero_point", str, "float or integer (integer: exportable to compressed-tensors "
                                                        "for vLLM)"),
             Option("--keep-lm-head-fp16", "modules_to_not_convert", None,
                    "keep the output head in the compute dtype (else quantized; a head tied to the "
                    "embeddings gets its own quantized copy)",
                    convert=lambda keep: ["lm_head"] if keep else [])),
    tag=lambda c: f"HQQ_w{c.bits}_g{c.group_size}" + ("_zint" if c.zero_point == "integer" else ""),
)
