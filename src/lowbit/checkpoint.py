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
from importlib import resources
from pathlib import Path

import torch

from . import registry

logger = logging.getLogger(__name__)

METADATA_FILE = "quantization_metadata.json"


def naming_tag(config) -> str:
    """The method's tag for its output folder (`HQQ_w4_g64`), `_headfp16` when the head stays unquantized."""
    tag = registry.method(config.quant_method).tag(config)
    return tag + ("_headfp16" if "lm_head" in (config.modules_to_not_convert or []) else "")


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


def human_size(n: int) -> str:
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
            "settings": model.config.quantization_config.to_dict(),  # as saved, with what quantizing recorded
            "source": src,
            "base_model": None if os.path.isdir(src) else src,
            "license": source_license(src),
            "command": command,
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
        (tmp / "README.md").write_text(render_model_card(meta, dst.name))
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


def source_license(src: str) -> str | None:
    """The license the source model's card declares (local folder or Hub), None when it declares none."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(os.path.join(src, "README.md") if os.path.isdir(src) else src)
    except Exception:  # no card, no network: the license is unknown, not an error
        return None
    return card.data.license


def _eval_results(evaluation: dict | None) -> list:
    """model-index entries for what `lowbit eval` measured on the folder (perplexity)."""
    from huggingface_hub import EvalResult

    if not evaluation or "ppl" not in evaluation:
        return []
    ppl = evaluation["ppl"]
    return [EvalResult(task_type="text-generation", dataset_type="wikitext", dataset_name=ppl["data"],
                       metric_type="perplexity", metric_value=round(ppl["ppl"], 4),
                       metric_config=_ppl_protocol(ppl))]


def _ppl_protocol(ppl: dict) -> str:
    return (f"{ppl['windows']} windows of {ppl['seqlen']} tokens"
            + (f", stride {ppl['stride']}" if ppl.get("protocol") == "stride" else "")
            + f", {ppl['tokens_scored']} tokens scored")


def render_model_card(meta: dict, name: str) -> str:
    """The model card: YAML metadata through huggingface_hub's ModelCardData, the body from the template."""
    from huggingface_hub import ModelCard, ModelCardData

    template = resources.files("lowbit.model_cards").joinpath("lowbit.md").read_text()
    method = registry.method(meta["method"])
    evaluation = meta.get("eval")
    data = ModelCardData(base_model=meta.get("base_model"), license=meta.get("license"), library_name="transformers",
                         tags=["lowbit", method.quant_method, "quantized"], model_name=name,
                         eval_results=_eval_results(evaluation) or None)
    base = meta.get("base_model")
    local_name = os.path.basename(os.path.normpath(meta["source"]))
    source = f"[{base}](https://huggingface.co/{base})" if base else f"`{local_name}`"
    settings = {k: v for k, v in meta["settings"].items() if k != "quant_method"}
    evaluation_md = ""
    if evaluation and "ppl" in evaluation:
        ppl = evaluation["ppl"]
        evaluation_md = (f"\n## Evaluation (`lowbit eval`)\n\nPerplexity {ppl['ppl']:.3f} on {ppl['data']} "
                         f"({_ppl_protocol(ppl)}), {evaluation['dtype']}.\n")
    body = template.format(
        name=name, source=source,
        method_title=method.title, method_summary=method.summary,
        settings_table="\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in settings.items()),
        bf16_bytes_h=human_size(meta["bf16_bytes"]), checkpoint_bytes_h=human_size(meta["checkpoint_bytes"]),
        linear_bf16_bytes_h=human_size(meta["linear_bf16_bytes"]),
        linear_packed_bytes_h=human_size(meta["linear_packed_bytes"]),
        linear_ratio=meta["linear_packed_bytes"] / max(1, meta["linear_bf16_bytes"]),
        layers_quantized=len(meta["layers_quantized"]), layers_kept=len(meta["layers_kept"]),
        dtype=meta["dtype"], seconds=meta["seconds"], lowbit_version=meta["versions"]["lowbit"],
        torch_version=meta["versions"]["torch"], transformers_version=meta["versions"]["transformers"],
        repo_hint=name, command=meta.get("command") or "lowbit quantize ...", evaluation=evaluation_md,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def record_evaluation(folder: str, evaluation: dict) -> bool:
    """Put what `lowbit eval` measured into a lowbit output folder's metadata and model card (model-index).
    Returns False, touching nothing, for a folder lowbit did not write."""
    folder = Path(folder)
    meta_file = folder / METADATA_FILE
    if not meta_file.is_file():
        return False
    meta = json.loads(meta_file.read_text())
    meta["eval"] = evaluation
    card = render_model_card(meta, folder.name)
    for target, text in ((meta_file, json.dumps(meta, indent=2) + "\n"), (folder / "README.md", card)):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return True


def summary(meta: dict, dst: str) -> str:
    """The one-screen report the CLI prints at the end."""
    s = {k: v for k, v in meta["settings"].items() if k != "quant_method"}
    ratio = meta["linear_packed_bytes"] / max(1, meta["linear_bf16_bytes"])
    lines = [
        f"lowbit: {registry.method(meta['method']).title} done in {meta['seconds']:.1f} s",
        f"  source      {meta['source']}",
        f"  output      {dst}",
        "  settings    " + ", ".join(f"{k}={v}" for k, v in s.items()),
        f"  layers      {len(meta['layers_quantized'])} quantized, {len(meta['layers_kept'])} kept in {meta['dtype']}",
        f"  linears     {human_size(meta['linear_bf16_bytes'])} bf16 -> "
        f"{human_size(meta['linear_packed_bytes'])} packed ({ratio:.3f}x)",
        f"  checkpoint  {human_size(meta['checkpoint_bytes'])} (model in bf16: {human_size(meta['bf16_bytes'])})",
        f"  peak RSS    {human_size(meta['peak_rss_bytes_while_quantizing'])}",
        f"  files       model.safetensors, config.json, tokenizer, {METADATA_FILE}, README.md",
    ]
    return "\n".join(lines)
