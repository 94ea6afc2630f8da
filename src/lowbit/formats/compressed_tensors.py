"""compressed-tensors for vLLM (and transformers): W4A16 `pack-quantized`, group strategy, asymmetric.

compressed-tensors stores w = (q − z)·scale with integer zero points z; lowbit stores
w = (q − 8)·scale + offset. They are the same weights exactly when offset = (8 − z)·scale, which
`HqqConfig(zero_point="integer")` guarantees (the offset is that product rounded to the storage dtype
once); a checkpoint with float offsets is refused. Unsigned codes and zero points in [0, 15] are
stored as they are: compressed-tensors keeps the signed value + 8 in each nibble.

Per linear `p`: `p.weight_packed` int32 [out, in/8] (element i at bits 4·(i % 8), along the input),
`p.weight_scale` [out, in/G] in the compute dtype, `p.weight_zero_point` int32 [out/8, in/G] (packed
along the output), `p.weight_shape` int64 [2]. A layer whose widths the format's groups or packing
cannot hold goes out as a plain `weight`, dequantized, and is listed in `ignore`.
"""
import json

import torch
from tqdm.auto import tqdm

NAME = "compressed-tensors"
SUPPORTED = ("4-bit HQQ checkpoints with integer zero points "
             "(lowbit quantize --method hqq --bits 4 --zero-point integer)")
PACK = 8  # 4-bit values per int32


def default_dst(name: str) -> str:
    return f"{name}-ct"


def options(source, unquantized_type=None) -> dict:
    if unquantized_type is not None:
        raise ValueError("unquantized_type applies to the gguf format only; compressed-tensors keeps the "
                         "checkpoint's compute dtype")
    return {}


def check(source, options) -> None:
    source.require_4bit_hqq(f"the compressed-tensors export holds {SUPPORTED} exactly (W4A16)",
                            "Re-quantize with `lowbit quantize --for vllm`")
    qc = source.quantization
    if qc.get("zero_point", "float") != "integer":
        raise ValueError(f"{source.label}: compressed-tensors stores integer zero points and this checkpoint's are "
                         f"floats (zero_point={qc.get('zero_point', 'float')!r}), so it cannot be exported exactly. "
                         f"Re-quantize with `lowbit quantize --method hqq --bits 4 --zero-point integer` "
                         f"(or `--for vllm`)")


def _exportable(module) -> bool:
    """Whether the format's groups and packing hold this layer's widths."""
    return module.in_features % module.group_size == 0 and module.in_features % PACK == 0 \
        and module.out_features % PACK == 0


def check_weights(model, source, options) -> None:
    from ..integration import quant_linears
    from ..quantize import integer_zero_points

    for name, module in quant_linears(model):
        if integer_zero_points(module.scale_offset, module.bits) is None:
            raise ValueError(f"{source.label}: {name}'s offsets are not integer multiples of its scales, so its zero "
                             f"points are not integers; re-quantize with --zero-point integer")


def pack_int32(codes: torch.Tensor) -> torch.Tensor:
    """uint8 4-bit codes [rows, n] (n a multiple of 8) -> int32 [rows, n/8], element i at bits 4·(i % 8)."""
    c = codes.to(torch.int64).view(codes.shape[0], -1, PACK)
    shifts = torch.arange(PACK, dtype=torch.int64) * 4
    word = (c << shifts).sum(-1)
    return (word - (word >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def _quantized_tensors(module, prefix: str) -> dict:
    from ..quantize import integer_zero_points

    zero = integer_zero_points(module.scale_offset, module.bits)  # [groups, out]
    groups = module.in_features // module.group_size
    tensors = {
        f"{prefix}.weight_packed": pack_int32(module.codes()[:, :module.in_features]),
        f"{prefix}.weight_scale": module.scale_offset[:groups, :, 0].t().contiguous(),
        f"{prefix}.weight_zero_point": pack_int32(zero[:groups].contiguous()).t().contiguous(),
        f"{prefix}.weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64),
    }
    if module.bias is not None:
        tensors[f"{prefix}.bias"] = module.bias.data
    return tensors


def quantization_config(group_size: int, ignore: list) -> dict:
    """config.json's quantization_config, with the keys compressed-tensors' ModelCompressor writes."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": False, "group_size": group_size,
                        "strategy": "group", "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def write(model, source, path, options, progress: bool) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from ..modules import QuantLinear

    path.mkdir()
    tensors, ignore, kept = {}, [], []
    tied = bool(getattr(source.text_config, "tie_word_embeddings", False))
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    for name, module in tqdm(leaves, disable=not progress, desc="compressed-tensors", unit="module"):
        if tied and name.endswith("lm_head"):
            ignore.append(name)  # no tensor: it is the embedding's, and it must not be read as quantized
            continue
        if isinstance(module, QuantLinear) and _exportable(module) and not name.endswith("lm_head"):
            tensors.update(_quantized_tensors(module, name))
            continue
        if isinstance(module, QuantLinear):
            tensors[f"{name}.weight"] = module.dequantize_weight().contiguous()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.data
        else:
            tensors.update({f"{name}.{p}": t.data.contiguous() for p, t in module.named_parameters(recurse=False)})
        if isinstance(module, (QuantLinear, torch.nn.Linear)):
            ignore.append(name)
            kept.append(name)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    config = source.config.to_dict()
    config["quantization_config"] = quantization_config(source.quantization["group_size"], ignore)
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(path)
    if source.tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(source.tokenizer_dir).save_pretrained(path)
    dtype = str(model.dtype).removeprefix("torch.")
    packed = sum(name.endswith(".weight_packed") for name in tensors)
    types = {"W4A16 linears (packed int4)": packed, f"{dtype} tensors": len(tensors) - 4 * packed}
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"bytes": size, "tensor_types": types, "kept": kept, "kept_type": dtype, "notes": []}

