"""What every lowbit method shares on the transformers side: the declaration that names a method to
the rest of lowbit, config validation and the quantizer."""
import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import calibration, integration
from .modules import QuantLinear

logger = logging.getLogger(__name__)


class LowbitConfig(QuantizationConfigMixin):
    """Base for lowbit configs: declarative fields, validated in `__init__` so bad input fails before any work.

    Subclasses set `quant_method`, list their fields in `_fields` (name -> default) and may map names
    from an earlier release to the current ones in `_renamed` (old -> new), which keep working with a
    DeprecationWarning. Every config uses the same names for the same thing: `bits`, `act_bits`,
    `kv_bits`, `group_size`, `calibration`, `nsamples`, `seqlen`, `seed`."""

    quant_method: str
    _fields: dict = {}
    _renamed: dict = {}

    def __init__(self, **kwargs):
        kwargs.pop("quant_method", None)  # written by to_dict(), read back by from_dict()
        for old, new in self._renamed.items():
            if old not in kwargs:
                continue
            if new in kwargs:
                raise ValueError(f"{type(self).__name__} got both {old!r} and {new!r}; {old!r} is the deprecated "
                                 f"name of {new!r}: pass only {new!r}")
            warnings.warn(f"{type(self).__name__}({old}=...) is deprecated, use {new}=...", DeprecationWarning,
                          stacklevel=2)
            kwargs[new] = kwargs.pop(old)
        unknown = sorted(set(kwargs) - set(self._fields))
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown parameter(s) {unknown}; "
                             f"allowed: {sorted(self._fields)}")
        for name, default in self._fields.items():
            value = copy.deepcopy(kwargs.get(name, default))
            setattr(self, name, list(value) if isinstance(value, tuple) else value)
        self.quant_method = type(self).quant_method
        self.validate()

    def __getattr__(self, name):  # only reached for names that are not attributes: the deprecated ones
        renamed = type(self)._renamed
        if name in renamed:
            warnings.warn(f"{type(self).__name__}.{name} is deprecated, use .{renamed[name]}", DeprecationWarning,
                          stacklevel=2)
            return getattr(self, renamed[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing reads calibration data (then it is tokenized before the weights load)."""
        return False

    def to_dict(self):
        d = super().to_dict()
        if isinstance(d.get("calibration"), list):  # describe, do not copy, the calibration texts into config.json
            d["calibration"] = f"<{len(d['calibration'])} calibration strings>"
        return d

    def validate(self):
        mods = self.modules_to_not_convert
        if mods is not None and (not isinstance(mods, list) or not all(isinstance(m, str) for m in mods)):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {mods!r}")


def check_calibration(config) -> None:
    """The calibration fields every calibrating method shares: calibration, nsamples, seqlen, seed."""
    for name in ("nsamples", "seqlen", "seed"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, "
                             f"got {value!r}")
    cal = config.calibration
    if cal is not None and not (isinstance(cal, str) and cal) and not (
            isinstance(cal, list) and cal and all(isinstance(s, str) for s in cal)):
        raise ValueError(f"calibration must be None, a text file path, a non-empty list of strings or a "
                         f"datasets name, got {cal!r}")


def check_choice(name: str, value, allowed) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


class LowbitHfQuantizer(HfQuantizer):
    """Per-tensor weight quantization on load, native reload of the packed tensors.

    Quantize on load: the model is built on meta with QuantLinear modules that keep a placeholder
    `weight`; each fp weight is quantized as it streams in, so the fp model never sits in memory.
    Reload: the same modules are built from the config alone and the packed tensors load by name."""

    requires_calibration = False
    solver = "hqq"

    def __init__(self, quantization_config, **kwargs):
        # a copy: what quantizing records in the config (saved with the model) never reaches the caller's object
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.dtype = torch.bfloat16
        self._tied_head = None  # the name of a tied head to quantize after loading (see below)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        """lowbit's modules and KV cache trace without graph breaks, so `generate` compiles the decode
        step when asked to (a static cache and a `CompileConfig`)."""
        return True

    def update_dtype(self, dtype):
        if dtype is None or dtype not in (torch.bfloat16, torch.float16, torch.float32):
            dtype = torch.bfloat16
        self.dtype = dtype
        return dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or not param_name.endswith(".weight"):
            return False
        module = model.get_submodule(param_name.rpartition(".")[0])
        return isinstance(module, QuantLinear) and getattr(module, "weight", None) is not None

    def get_quantize_ops(self):
        return integration.load_time_quantize_op(self)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        names = integration.linears_to_quantize(model, cfg.modules_to_not_convert)
        if not names:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize "
                             f"(modules_to_not_convert={cfg.modules_to_not_convert})")
        # a tied head's weight never streams in under its own name (it arrives by tying): quantized after loading
        head = integration.tied_head_name(model)
        self._tied_head = head if head in names else None
        integration.replace_with_quant_linear(model, [n for n in names if n != self._tied_head], self.dtype,
                                              with_placeholder=not self.pre_quantized, spec=self._spec)
        if self.pre_quantized:
            integration.verify_checkpoint(model, checkpoint_files)
        logger.info("lowbit: %d linear layers -> %s", len(names), cfg.quant_method)
        return model

    def _spec(self, name, linear) -> dict:
        return {"bits": self.quantization_config.bits, "group_size": self.quantization_config.group_size}

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._tied_head:
            integration.untie_head(model)
            head = model.get_submodule(self._tied_head)
            integration.set_module(model, self._tied_head,
                                   QuantLinear.from_linear(head, solver=self.solver, **self._spec(self._tied_head, head)))
        for name, module in integration.quant_linears(model):
            if getattr(module, "weight", None) is not None:
                raise RuntimeError(f"{name} never received its weight: the checkpoint lacks it")
        integration.prepare_runtime(model)
        return model

    def _dequantize(self, model, dtype=None):
        return integration.dequantize_model(model, dtype or self.dtype)


class AfterLoadHfQuantizer(LowbitHfQuantizer):
    """Whole-model methods (QuaRot, ARHQ, Householder): the fp model loads as usual, then `quantize`
    transforms it (rotating, calibrating layer by layer). Reload: `replace_for_reload` builds the final
    structure on meta, the checkpoint is verified, the packed tensors load by name, `prepare_runtime`
    finishes. Subclasses say which layers (`target_names`, which also checks the model) and how."""

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def target_names(self, model) -> list[str]:
        raise NotImplementedError

    def replace_for_reload(self, model, names, checkpoint_files) -> None:
        raise NotImplementedError

    def quantize(self, model) -> None:
        raise NotImplementedError

    def prepare_runtime(self, model) -> None:
        integration.prepare_runtime(model)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        names = self.target_names(model)
        if self.pre_quantized:
            self.replace_for_reload(model, names, checkpoint_files)
            integration.verify_checkpoint(model, checkpoint_files)
        elif self.quantization_config.needs_calibration:
            # tokenized before the weights arrive, so that the tokenizer's transient (hundreds of MiB for
            # a long calibration text) never adds to the loaded model at the memory peak; on the CPU
            # explicitly, as the model is being built under a meta-device context
            with torch.device("cpu"):
                self._calibration_ids = self.calibration_ids(model)
            integration.malloc_trim()()
        return model

    def calibration_ids(self, model):
        """The config's calibration tokens, prepared before the weights load."""
        return calibration.model_calibration_ids(model, self.quantization_config)

    def take_calibration_ids(self):
        """The calibration tokens prepared before loading (None if the config needs none), released here."""
        ids, self._calibration_ids = getattr(self, "_calibration_ids", None), None
        return ids

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            self.prepare_runtime(model)
            return model
        calibrating = self.quantization_config.needs_calibration
        with integration.blocks_returned_on_free() if calibrating else contextlib.nullcontext():
            self.quantize(model)
        return model


@dataclass(frozen=True)
class Option:
    """A `lowbit quantize` flag and the config field it sets. `type=None` makes an on/off flag; `convert`
    maps the flag's value to the field's (applied to on/off flags whether given or not)."""

    flag: str
    field: str
    type: Callable | None
    help: str
    convert: Callable | None = None


CALIBRATION_OPTIONS = (
    Option("--calib", "calibration", str, "calibration text file (or a datasets name when the Hub is reachable)"),
    Option("--nsamples", "nsamples", int, "calibration windows"),
    Option("--calib-seqlen", "seqlen", int, "tokens per calibration window"),
)


@dataclass(frozen=True)
class Method:
    """Everything the rest of lowbit knows about a method, declared once as `METHOD` in its module:
    registration with transformers, the CLI's `--method` and flags, the output folder's tag, the
    model card and the benchmark all read it (see `registry`)."""

    name: str                      # `lowbit quantize --method NAME`
    config: type                   # its LowbitConfig subclass; `config.quant_method` names it to transformers
    quantizer: type                # its HfQuantizer subclass
    title: str                     # in summaries and the model card
    summary: str                   # one sentence for the model card
    tag: Callable                  # config -> the output folder's tag, e.g. "HQQ_w4_g64" (the CLI adds "_headfp16")
    options: tuple = ()            # the `lowbit quantize` flags it reads

    @property
    def quant_method(self) -> str:
        return self.config.quant_method
