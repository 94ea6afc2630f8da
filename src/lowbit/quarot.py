"""QuaRot (Ashkboos et al., 2024): rotate the model with orthogonal matrices so that weights,
activations and the KV cache lose their outliers, then quantize all three.

What the checkpoint holds: the rotated, norm-fused model with packed weights. The residual rotation,
the per-head value rotation and the down_proj rotation are fused into the weights; what must run
online (the Hadamard on down_proj's input, the key rotation inside the KV cache) is regenerated from
its size at load, never stored. Reload rebuilds the QuantLinear modules and the cache from the
config alone (`_process_model_before_weight_loading`), so transformers loads it like any checkpoint.
"""
import logging

import torch

from . import calibration, hadamard, integration, kvcache, rotation
from .base import (CALIBRATION_OPTIONS, AfterLoadHfQuantizer, LowbitConfig, Method, Option, check_calibration,
                   check_choice)
from .modules import QuantLinear
from .quantize import quantize_gptq

logger = logging.getLogger(__name__)

PRESETS = {
    "w4a4kv4": {"bits": 4, "act_bits": 4, "kv_bits": 4},
    "w4a8kv4": {"bits": 4, "act_bits": 8, "kv_bits": 4},
    "w4a8kv8": {"bits": 4, "act_bits": 8, "kv_bits": 8},
}
GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per output channel (the whole row)
CALIBRATION_BATCH = 1  # samples per forward while calibrating: a batch's MLP activations set the peak memory


class QuaRotConfig(LowbitConfig):
    """QuaRot: rotated weights (RTN with a clipping search, or GPTQ), per-token activations and a
    packed KV cache.

    Args:
        bits: weight bits, 4 or 8.
        act_bits: activation bits, 4 or 8 (16 = activations stay in the compute dtype).
        kv_bits: KV cache bits, 4 or 8 (16 = an ordinary cache).
        group_size: input channels per weight scale/offset: 32, 64, 128, or -1 for one per output channel.
        rotation_method: "hadamard" (calibration-free) or "pca" (calibration activations' principal
            axes, followed by a Hadamard so that variance is spread over all channels).
        weight_quantizer: "rtn" (calibration-free) or "gptq" (needs `calibration`).
        calibration: a local text file, a list of strings, or a `datasets` name ("name[:subset]").
        nsamples, seqlen: calibration windows and their length in tokens.
        seed: picks the calibration windows.
        modules_to_not_convert: module names kept in the compute dtype (the head by default).
    """

    quant_method = "lowbit_quarot"
    _fields = {"bits": 4, "act_bits": 4, "kv_bits": 4, "group_size": 64, "rotation_method": "hadamard",
               "weight_quantizer": "rtn", "calibration": None, "nsamples": 128, "seqlen": 2048, "seed": 13,
               "modules_to_not_convert": ["lm_head"]}
    _renamed = {"w_bits": "bits", "a_bits": "act_bits"}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "QuaRotConfig":
        check_choice("preset", name, PRESETS)
        return cls(**{**PRESETS[name], **overrides})

    def validate(self):
        super().validate()
        check_choice("bits", self.bits, (4, 8))
        check_choice("act_bits", self.act_bits, (4, 8, 16))
        check_choice("kv_bits", self.kv_bits, (4, 8, 16))
        check_choice("group_size", self.group_size, GROUP_SIZES)
        check_choice("rotation_method", self.rotation_method, ("hadamard", "pca"))
        check_choice("weight_quantizer", self.weight_quantizer, ("rtn", "gptq"))
        check_calibration(self)
        if self.needs_calibration and self.calibration is None:
            needs = [f"{k}={getattr(self, k)!r}" for k, v in (("weight_quantizer", "gptq"), ("rotation_method", "pca"))
                     if getattr(self, k) == v]
            raise ValueError(f"{' and '.join(needs)} needs calibration data: pass calibration= a text file, a list "
                             f"of strings or a datasets name (or use weight_quantizer='rtn', rotation_method='hadamard')")

    @property
    def needs_calibration(self) -> bool:
        return self.weight_quantizer == "gptq" or self.rotation_method == "pca"

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def _is_down_proj(name: str) -> bool:
    return name.endswith("mlp.down_proj")


def linear_spec(config: QuaRotConfig, rotate: bool = True):
    """`spec(name, linear)` for `integration.replace_with_quant_linear`: what each QuantLinear is."""
    def spec(name, linear):
        return {"bits": config.bits, "group_size": config.group_size_for(linear.in_features),
                "act_bits": config.act_bits,
                "input_transform": "hadamard" if rotate and _is_down_proj(name) else None}
    return spec


def check_model(model, config: QuaRotConfig, names) -> None:
    """Everything about the model that would make QuaRot fail, checked before any work."""
    rotation.check_architecture(model)
    integration.check_group_size(model, names, config.group_size)


@torch.no_grad()
def pca_rotation(model, input_ids: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """Q = U·H: U the principal axes (largest variance first) of what the layers read from the residual
    stream (each token's hidden state over its RMS, as the scale-free norms see it), H a Hadamard."""
    d = model.config.hidden_size
    cov = torch.zeros(d, d, dtype=torch.float64)
    for _, _, inputs in calibration.layer_by_layer(model, input_ids, CALIBRATION_BATCH, progress=progress):
        for hidden, _ in inputs.batches():
            x = hidden.reshape(-1, d).double()
            x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
            cov += x.T @ x
    _, vectors = torch.linalg.eigh(cov)
    return vectors.flip(-1) @ hadamard.hadamard_matrix(d, torch.float64)


def _rtn(model, names, spec) -> None:
    from tqdm.auto import tqdm

    trim = integration.malloc_trim()
    for name in tqdm(names, desc="quantizing", disable=not integration.progress_enabled()):
        linear = model.get_submodule(name)
        integration.set_module(model, name, QuantLinear.from_linear(linear, solver="rtn_clip", **spec(name, linear)))
        del linear
        trim()


@torch.no_grad()
def _gptq(model, names, spec, input_ids, progress: bool) -> None:
    """Layer by layer: collect each linear's input Hessian on the calibration samples, quantize with GPTQ;
    the samples then flow through the layer's quantized weights (activations unquantized, as in QuaRot:
    it also keeps calibration on the fast weight-only kernels) to the next one."""
    index = {id(layer): i for i, layer in enumerate(model.model.layers)}
    done = set()
    for _, layer, inputs in calibration.layer_by_layer(model, input_ids, CALIBRATION_BATCH, progress=progress):
        prefix = f"model.layers.{index[id(layer)]}."
        mine = [n for n in names if n.startswith(prefix)]
        hessians, counts = calibration.input_statistics(layer, inputs, {n: model.get_submodule(n) for n in mine},
                                                        calibration.gram, torch.Tensor.add_)
        scaled = set()
        for name in mine:
            linear = model.get_submodule(name)
            weight_only = {**spec(name, linear), "act_bits": 16}
            # q/k/v (gate/up) share one Hessian: the last of them takes the only reference, and GPTQ frees
            # it as soon as it has its own reordered copy
            hessian = [hessians.pop(name)]
            if id(hessian[0]) not in scaled:
                hessian[0].mul_(2 / counts[name])
                scaled.add(id(hessian[0]))
            solver = lambda w, bits, group_size, dtype: quantize_gptq(w, hessian.pop(), bits, group_size, dtype)  # noqa: E731
            integration.set_module(model, name, QuantLinear.from_linear(linear, solver=solver, **weight_only))
            done.add(name)
            del linear, hessian, solver
        integration.malloc_trim()()
    for name in done:
        model.get_submodule(name).set_act_bits(spec(name, model.get_submodule(name))["act_bits"])
    rest = [n for n in names if n not in done]
    if rest:  # outside the decoder layers (a head the user chose to quantize): no Hessian collected there
        logger.info("GPTQ: %s quantized with RTN", ", ".join(rest))
        _rtn(model, rest, spec)


@torch.no_grad()
def quantize_model(model, config: QuaRotConfig, rotate: bool = True, calibration_ids=None) -> None:
    """Rotate and quantize an fp model in place. `rotate=False` quantizes the same way without any
    rotation: the baseline QuaRot is measured against. `calibration_ids`: the config's calibration
    tokens when already at hand (`calibration.model_calibration_ids`)."""
    names = integration.linears_to_quantize(model, config.modules_to_not_convert)
    check_model(model, config, names)
    integration.untie_head(model, names)
    progress = integration.progress_enabled()
    ids = calibration_ids
    if ids is None and config.needs_calibration:
        ids = calibration.model_calibration_ids(model, config)
    hooks = []
    if rotate:
        if config.rotation_method == "pca":
            rotation.fuse_norms(model)
            rotation.rotate_residual(model, pca_rotation(model, ids, progress))
        else:  # the norms keep their scales and run unrotated (see `rotation`), from here on
            rotation.rotate_residual(model, hadamard.hadamard_matrix(model.config.hidden_size, torch.float64))
            rotation.unrotate_norms(model)
        rotation.rotate_values(model)
        rotation.fuse_down_proj_hadamard(model)
        # until down_proj becomes a QuantLinear with input_transform="hadamard", apply it as a hook
        hooks = [model.get_submodule(n).register_forward_pre_hook(
                 lambda m, args: (hadamard.transform_activations(args[0]),)) for n in names if _is_down_proj(n)]
    spec = linear_spec(config, rotate)
    try:
        if config.weight_quantizer == "gptq":
            _gptq(model, names, spec, ids, progress)
        else:
            _rtn(model, names, spec)
    finally:
        for h in hooks:
            h.remove()
    prepare_runtime(model, config, rotated=rotate)


def prepare_runtime(model, config: QuaRotConfig, rotated: bool = True) -> None:
    """Kernel layouts for every QuantLinear, the norms' run-time Hadamards (a Hadamard-rotated model keeps
    its norm scales, see `rotation`), and the quantized KV cache when the config asks for one."""
    integration.prepare_runtime(model)
    if rotated and config.rotation_method == "hadamard":
        rotation.unrotate_norms(model)
    if config.kv_bits < 16:
        kvcache.install(model, config.kv_bits, rotate_keys=rotated)


class QuaRotHfQuantizer(AfterLoadHfQuantizer):
    """Quantize on load: `quantize_model` rotates and quantizes the loaded fp model. Reload: the
    QuantLinear modules from the config alone, then the kernel layouts and the KV cache hook."""

    def target_names(self, model):
        names = integration.linears_to_quantize(model, self.quantization_config.modules_to_not_convert)
        check_model(model, self.quantization_config, names)
        return names

    def replace_for_reload(self, model, names, checkpoint_files):
        integration.replace_with_quant_linear(model, names, self.dtype, with_placeholder=False,
                                              spec=linear_spec(self.quantization_config))

    def quantize(self, model):
        quantize_model(model, self.quantization_config, calibration_ids=self.take_calibration_ids())

    def prepare_runtime(self, model):
        prepare_runtime(model, self.quantization_config)

    def _dequantize(self, model, dtype=None):
        kvcache.uninstall(model)
        model = integration.dequantize_model(model, dtype or self.dtype)
        rotation.fold_unrotated_norms(model)
        return model


def _tag(c: QuaRotConfig) -> str:
    """The original tool's tag: 8-bit activations and KV are left out, as there."""
    tag = f"QuaRot_w{c.bits}_g{c.group_size}"
    tag += "".join(f"_{k}{b}" for k, b in (("a", c.act_bits), ("kv", c.kv_bits)) if b != 8)
    return tag + ("_gptq" if c.weight_quantizer == "gptq" else "") + ("_pca" if c.rotation_method == "pca" else "")


METHOD = Method(
    name="quarot", config=QuaRotConfig, quantizer=QuaRotHfQuantizer, title="QuaRot",
    summary="Hadamard (or PCA) rotations fused into the weights so that weights, activations and the KV cache "
            "quantize without outliers; packed weights, per-token quantized activations multiplied in integers, "
            "and a packed KV cache.",
    options=(Option("--bits", "bits", int, "weight bits: 4 or 8"),
             Option("--group-size", "group_size", int, "input channels per scale/offset: 32, 64, 128, -1 = per "
                    "channel"),
             Option("--acts-bits", "act_bits", int, "activation bits: 4, 8 or 16 (off)"),
             Option("--kv-bits", "kv_bits", int, "KV cache bits: 4, 8 or 16 (off)"),
             Option("--rotation", "rotation_method", str, "hadamard or pca (needs --calib)"),
             Option("--weight-quantizer", "weight_quantizer", str, "rtn (with a clipping search) or gptq "
                    "(needs --calib)"),
             *CALIBRATION_OPTIONS),
    tag=_tag,
)
