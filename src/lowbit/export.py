"""Quantize a model into a self-contained folder: weights, tokenizer, metadata and a model card.

Everything is written into a temporary folder beside the destination and renamed into place at the
end, so a failure never leaves a half-written checkpoint behind.
"""
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

METADATA_FILE = "quantization_metadata.json"


@dataclass(frozen=True)
class MethodInfo:
    """How a method names its outputs and describes itself in the model card."""

    title: str
    summary: str


METHODS = {
    "lowbit_hqq": MethodInfo(
        "HQQ", "calibration-free half-quadratic weight-only quantization, packed low-bit weights with a "
        "scale and an offset per group of input channels, run on torch's int4 CPU kernel."),
    "lowbit_quarot": MethodInfo(
        "QuaRot", "Hadamard (or PCA) rotations fused into the weights so that weights, activations and the "
        "KV cache quantize without outliers; packed weights, per-token quantized activations multiplied in "
        "integers, and a packed KV cache."),
    "lowbit_arhq": MethodInfo(
        "ARHQ", "NVFP4 weights and activations (E2M1 values, FP8 E4M3 scales per 16) with a low-rank branch in "
        "the compute dtype, chosen under the activation-residual Hessian (ARHQ) or as the weight's top "
        "singular directions (SVDQuant)."),
    "lowbit_householder": MethodInfo(
        "HH", "learned Householder rotations Q = Had·H_k…H_1 (PCA-initialised, optimized layer by layer with "
        "learnable clipping) in front of each group of linears, applied at run time as k rank-1 updates; "
        "packed weights and per-token quantized activations multiplied in integers."),
}


def naming_tag(config, head_kept: bool) -> str:
    """The tag of the original tools: `HQQ_w4_g64[_headfp16]`, `QuaRot_w4_g64_a4_kv4[_gptq][_pca]_headfp16`
    (a8 and kv8 are left out, as there); ours for ARHQ: `ARHQ|SVDQuant_nvfp4_r128[_sq0.5]_headfp16`, Householder: `HH_w4_g64_a8_headfp16`."""
    title = METHODS[config.quant_method].title
    if config.quant_method == "lowbit_quarot":
        tag = f"{title}_w{config.w_bits}_g{config.group_size}"
        tag += "".join(f"_{k}{b}" for k, b in (("a", config.a_bits), ("kv", config.kv_bits)) if b != 8)
        tag += "_gptq" if config.weight_quantizer == "gptq" else ""
        tag += "_pca" if config.rotation_method == "pca" else ""
    elif config.quant_method == "lowbit_arhq":
        tag = f"{'ARHQ' if config.decomposition == 'arhq' else 'SVDQuant'}_nvfp4_r{config.rank}"
        tag += f"_sq{config.smoothing:g}" if config.smoothing is not None else ""
    elif config.quant_method == "lowbit_householder":
        tag = f"{title}_w{config.w_bits}_g{config.group_size}_a{config.a_bits}"
    else:
        tag = f"{title}_w{config.bits}_g{config.group_size}"
    return tag + ("_headfp16" if head_kept else "")


def source_exists(src: str) -> bool:
    """A local folder with a config.json, or a Hub repo that answers."""
    if os.path.isdir(src):
        return os.path.isfile(os.path.join(src, "config.json"))
    if os.path.exists(src) or src.count("/") > 1 or not src.strip():
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(src)
        return True
    except Exception:
        return False


def check_source(src: str) -> None:
    if not source_exists(src):
        raise FileNotFoundError(f"--src {src!r}: no model folder with a config.json there, and no such Hub repo")


def head_is_tied(src: str) -> bool:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def linear_sizes(model) -> dict:
    """Bytes of the quantized linears, packed and as bf16, and how many layers were (not) quantized."""
    from torch import nn

    from .integration import quant_linears

    packed = bf16 = 0
    quantized = quant_linears(model)
    for _, m in quantized:
        packed += sum(t.numel() * t.element_size() for t in (m.state_dict().values()))
        bf16 += (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)) * 2
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    n_params = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for _, m in quantized)
    return {"bf16_bytes": n_params * 2, "linear_packed_bytes": packed, "linear_bf16_bytes": bf16,
            "layers_quantized": [n for n, _ in quantized], "layers_kept": kept}


def quantize_to_folder(src: str, dst: str, config, dtype=torch.bfloat16, overwrite: bool = False,
                       seed: int = 13, command: str = "") -> dict:
    """Load `src` quantized on the fly with `config`, write the folder `dst`, return its metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit

    dst = Path(dst)
    check_source(src)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"--dst {str(dst)!r} already exists; pass --overwrite to replace it")
    torch.manual_seed(seed)
    rss_before = _peak_rss_bytes()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, quantization_config=config)
    seconds = time.perf_counter() - start
    peak_rss = _peak_rss_bytes()

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        except Exception as err:  # a model without a tokenizer is still a model
            logger.warning("no tokenizer saved for %s: %s", src, err)
        sizes = linear_sizes(model)
        checkpoint_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        meta = {
            "method": config.quant_method,
            "settings": config.to_dict(),
            "source": src,
            "dtype": str(dtype).removeprefix("torch."),
            "seed": seed,
            "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__,
                         "transformers": _version("transformers"), "hqq": _version("hqq"),
                         "python": platform.python_version()},
            "seconds": round(seconds, 3),
            "peak_rss_bytes_while_quantizing": peak_rss,
            "rss_bytes_before_loading": rss_before,
            "checkpoint_bytes": checkpoint_bytes,
            **sizes,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(render_model_card(meta, dst.name, command))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def render_model_card(meta: dict, name: str, command: str = "") -> str:
    template = resources.files("lowbit.model_cards").joinpath("lowbit.md").read_text()
    info = METHODS[meta["method"]]
    src = meta["source"]
    settings = {k: v for k, v in meta["settings"].items() if k != "quant_method"}
    link = src if os.path.isdir(src) else f"https://huggingface.co/{src}"
    return template.format(
        name=name, base_model=src if not os.path.isdir(src) else os.path.basename(os.path.normpath(src)),
        base_model_link=link, method_tag=meta["method"], method_title=info.title, method_summary=info.summary,
        settings_table="\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in settings.items()),
        bf16_bytes_h=_human(meta["bf16_bytes"]), checkpoint_bytes_h=_human(meta["checkpoint_bytes"]),
        linear_bf16_bytes_h=_human(meta["linear_bf16_bytes"]),
        linear_packed_bytes_h=_human(meta["linear_packed_bytes"]),
        linear_ratio=meta["linear_packed_bytes"] / max(1, meta["linear_bf16_bytes"]),
        layers_quantized=len(meta["layers_quantized"]), layers_kept=len(meta["layers_kept"]),
        dtype=meta["dtype"], seconds=meta["seconds"], lowbit_version=meta["versions"]["lowbit"],
        torch_version=meta["versions"]["torch"], transformers_version=meta["versions"]["transformers"],
        repo_hint=name, command=command or "lowbit quantize ...",
    )


def summary(meta: dict, dst: str) -> str:
    """The one-screen report the CLI prints at the end."""
    s = {k: v for k, v in meta["settings"].items() if k != "quant_method"}
    ratio = meta["linear_packed_bytes"] / max(1, meta["linear_bf16_bytes"])
    lines = [
        f"lowbit: {METHODS[meta['method']].title} done in {meta['seconds']:.1f} s",
        f"  source      {meta['source']}",
        f"  output      {dst}",
        "  settings    " + ", ".join(f"{k}={v}" for k, v in s.items()),
        f"  layers      {len(meta['layers_quantized'])} quantized, {len(meta['layers_kept'])} kept in {meta['dtype']}",
        f"  linears     {_human(meta['linear_bf16_bytes'])} bf16 -> {_human(meta['linear_packed_bytes'])} packed ({ratio:.3f}x)",
        f"  checkpoint  {_human(meta['checkpoint_bytes'])} (model in bf16: {_human(meta['bf16_bytes'])})",
        f"  peak RSS    {_human(meta['peak_rss_bytes_while_quantizing'])}",
        f"  files       model.safetensors, config.json, tokenizer, {METADATA_FILE}, README.md",
    ]
    return "\n".join(lines)
