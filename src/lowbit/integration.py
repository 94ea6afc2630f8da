"""Module swap and load-time plumbing shared by every lowbit method (transformers' integrations/ role)."""
import contextlib
import ctypes
import functools
import json
import logging
import struct

import torch
from torch import nn

from .modules import Nvfp4Linear, QuantLinear, SharedInputProduct

QUANTIZED_MODULES = (QuantLinear, Nvfp4Linear)
# the linears of a Llama-shaped decoder layer that read the same input
SHARED_INPUT_GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       "gate_up": ("mlp.gate_proj", "mlp.up_proj")}

logger = logging.getLogger(__name__)


def linears_to_quantize(model: nn.Module, modules_to_not_convert) -> list[str]:
    """Names of the nn.Linear modules a config targets: a pure function of the model's structure and
    config, so quantize time and reload time agree. A head tied to the input embeddings is targeted
    like any other linear unless excluded; quantizing it unties it first (`untie_head`)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(modules_to_not_convert or [])
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and should_convert_module(name, skip)]


def tied_head_name(model: nn.Module) -> str | None:
    """The name of the output head when it shares its matrix with the input embeddings, else None."""
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return None
    head = model.get_output_embeddings()
    name = next(name for name, module in model.named_modules() if module is head)
    # on meta, before loading, the tying is still only declared
    declared = f"{name}.weight" in getattr(model, "all_tied_weights_keys", {})
    return name if declared or head.weight is model.get_input_embeddings().weight else None


def untie_head(model: nn.Module, names=None) -> None:
    """Give a tied head its own copy of the matrix, and say so in the config: the head can then be
    quantized (the input embeddings stay in the compute dtype, as a lookup reads one row per token
    while the head reads the whole matrix every step), and a reload builds it as its own module.
    `names`: only if the head is among these (the layers about to be quantized)."""
    name = tied_head_name(model)
    if name is None or (names is not None and name not in names):
        return
    head = model.get_submodule(name)
    head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    getattr(model, "all_tied_weights_keys", {}).pop(f"{name}.weight", None)


def check_group_size(model: nn.Module, names, group_size: int) -> None:
    """Every named layer's input width must be a multiple of `group_size` (-1: one group per row)."""
    for name in names:
        in_features = model.get_submodule(name).in_features
        if group_size != -1 and in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide {name}.in_features={in_features}; pick a "
                             f"group size that divides every quantized layer's input width, or group_size=-1 "
                             f"(one group per output channel)")


def replace_with_quant_linear(model: nn.Module, names, dtype: torch.dtype, with_placeholder: bool, spec,
                              module_cls=QuantLinear) -> None:
    """Swap the named nn.Linear modules for empty `module_cls` modules on the meta device.

    `spec(name, linear)` gives each module's parts (QuantLinear: bits, group_size, act_bits,
    input_transform; Nvfp4Linear: rank, smooth).
    `with_placeholder` keeps a meta `weight` Parameter so the loader routes the fp checkpoint weight
    to the quantize-on-load op (a checkpoint key only loads if the meta model has that name)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        with torch.device("meta"):
            q = module_cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=dtype,
                            **spec(name, linear))
            if with_placeholder:
                q.weight = nn.Parameter(torch.empty(linear.out_features, linear.in_features, dtype=dtype),
                                        requires_grad=False)
        setattr(parent, child, q)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def quant_linears(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)]


def prepare_runtime(model: nn.Module) -> None:
    """Repack every QuantLinear for its device's kernel, handing freed memory back to the OS as it goes.

    Repacking allocates the new layout beside the old one layer by layer; without a trim, glibc keeps
    the freed blocks between the long-lived ones and the process ends up holding more than the bf16
    model."""
    trim = malloc_trim()
    for _, module in quant_linears(model):
        module.prepare_runtime()
        trim()
    share_input_products(model)


def share_input_products(model: nn.Module) -> None:
    """One product per decoder layer's q/k/v and one per gate/up where they quantize their input alike
    (`SharedInputProduct`): in a decode step, most of the per-layer work is per call, not per weight."""
    for layer in model.modules():
        for group in SHARED_INPUT_GROUPS.values():
            try:
                members = [layer.get_submodule(name) for name in group]
            except AttributeError:  # not a decoder layer
                continue
            if SharedInputProduct.can_share(members):
                SharedInputProduct(members)


def progress_enabled() -> bool:
    """Progress bars follow transformers' switch (`disable_progress_bar()`, `HF_HUB_DISABLE_PROGRESS_BARS`)."""
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled()


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # what glibc's adaptive threshold grows to on 64-bit


@contextlib.contextmanager
def blocks_returned_on_free():
    """While calibrating, every block above 128 KiB gets its own mapping, handed back to the OS when
    freed.

    glibc raises that threshold to the size of each large block freed (up to 32 MiB); from then on a
    layer's activations come from the heap, whose freed holes stay resident and add to the peak.
    Mapping and faulting every block costs time where there are many small ones (quantize-on-load
    without calibration is several times slower with it), so methods without calibration run without
    it. On exit the threshold is left where the adaptive one ends up after loading a model (setting it
    once turns the adaptation off), so inference allocates as it would have."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def malloc_trim():
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return lambda: None
    return lambda: libc.malloc_trim(0)


def _safetensors_header(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise OSError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
        f.seek(0, 2)
        size = f.tell()
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise OSError(f"{path} is truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return header


def checkpoint_header(checkpoint_files) -> dict | None:
    """{tensor name: its header entry (dtype, shape, offsets)} over every .safetensors file of a checkpoint;
    None when it has none (nothing to read without loading)."""
    files = [f for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        return None
    header = {}
    for f in files:
        header.update(_safetensors_header(str(f)))
    return header


def verify_checkpoint(model: nn.Module, checkpoint_files) -> None:
    """Fail loudly, before loading, if a lowbit checkpoint lacks a quantized tensor or has a wrong shape.

    transformers only warns about missing or mismatched keys and fills them with random values."""
    header = checkpoint_header(checkpoint_files)
    if header is None:
        return
    for name, module in quant_linears(model):
        for buf, expected in module.state_dict().items():
            key = f"{name}.{buf}"
            if key not in header:
                raise ValueError(f"lowbit checkpoint is missing tensor {key!r} (expected {expected.dtype} "
                                 f"{list(expected.shape)}): the checkpoint is incomplete or was tampered with")
            entry = header[key]
            if entry["shape"] != list(expected.shape) or (buf == "qweight" and entry["dtype"] != "U8"):
                raise ValueError(f"lowbit checkpoint tensor {key!r} is {entry['dtype']} {entry['shape']}, expected "
                                 f"{expected.dtype} {list(expected.shape)} for this quantization config")


def load_time_quantize_op(hf_quantizer):
    """The ConversionOps that quantizes one fp weight as it streams in (imported lazily: transformers'
    core_model_loading must not be imported while transformers registers quantizers)."""
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.quantizers_utils import get_module_from_name

    class QuantizeOnLoad(ConversionOps):
        def __init__(self, quantizer):
            self.hf_quantizer = quantizer

        def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
            value = next(iter(input_dict.values()))
            weight = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, full_layer_name)
            tensors = module.quantized_tensors(weight, solver=self.hf_quantizer.solver)
            del module.weight
            if missing_keys is not None:
                missing_keys.discard(full_layer_name)
            prefix = full_layer_name.rpartition(".")[0]
            return {f"{prefix}.{k}": v for k, v in tensors.items()}

    return QuantizeOnLoad(hf_quantizer)


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Plain nn.Linear layers computing what the packed weights do (an online input transform is folded
    back into the weight; activation quantization is dropped)."""
    for name, module in quant_linears(model):
        w = module.dequantize_weight(torch.float32)
        if isinstance(module, QuantLinear):
            w = module.input_transform_inverse(w)
        w = w.to(dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=w.device, dtype=dtype)
        linear.weight.data = w
        if module.bias is not None:
            linear.bias.data = module.bias.data.to(dtype)
        set_module(model, name, linear)
    return model
