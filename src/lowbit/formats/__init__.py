"""Export a lowbit checkpoint to the formats deployment engines read: GGUF (llama.cpp) and
compressed-tensors (vLLM).

An export moves the checkpoint's own codes, scales and offsets into the engine's layout; nothing is
re-quantized. What a format cannot hold exactly is refused before any work (`check`), and the output
is written to a temporary path beside `dst` and renamed into place at the end.

A format is a module with `NAME`, `default_dst(name)`, `options(source, **settings)`,
`check(source, options)` (config and tokenizer), `check_weights(model, source, options)` (what only the
weights tell, still before writing) and `write(model, source, path, options, progress) -> dict` (the
summary's figures).
"""
import os
import shutil
import tempfile
from pathlib import Path

from ..checkpoint import human_size
from . import compressed_tensors, gguf
from .source import Source

FORMATS = {m.NAME: m for m in (gguf, compressed_tensors)}


def export(model_or_path, format: str, dst: str | None = None, overwrite: bool = False,
           unquantized_type: str | None = None, tokenizer=None, progress: bool = True) -> dict:
    """Write `model_or_path` (a lowbit folder, a Hub id, or a lowbit model in memory) as `format`
    ("gguf" or "compressed-tensors") to `dst` (default `<name>.gguf` / `<name>-ct`), and return the
    summary (`format_summary` prints it).

    `unquantized_type` (GGUF only): how tensors lowbit kept unquantized are stored: "bf16", "f16", "f32"
    or "q8_0" (default: the checkpoint's compute dtype). `tokenizer`: a folder or tokenizer object, for
    a model in memory whose `name_or_path` holds none."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    writer = FORMATS[format]
    source = Source.open(model_or_path, tokenizer=tokenizer)
    options = writer.options(source, unquantized_type=unquantized_type)
    writer.check(source, options)
    dst = Path(dst or writer.default_dst(source.name))
    if dst.exists() and not overwrite:
        raise FileExistsError(f"--dst {str(dst)!r} already exists; pass --overwrite to replace it")

    model = source.load_model()
    writer.check_weights(model, source, options)  # what only the weights can tell, still before writing
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        out = tmp / dst.name
        summary = writer.write(model, source, out, options, progress)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(out, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"format": format, "source": source.label, "dst": str(dst), **summary}


def format_summary(summary: dict) -> str:
    """The one-screen report `lowbit export` prints."""
    kept = summary["kept"]
    lines = [f"lowbit export: {summary['format']} written",
             f"  source    {summary['source']}",
             f"  output    {summary['dst']} ({human_size(summary['bytes'])})",
             "  tensors   " + ", ".join(f"{n} {t}" for t, n in sorted(summary["tensor_types"].items()))]
    if kept:
        lines.append(f"  kept in {summary['kept_type']} (not quantized by lowbit, or a width the format's "
                     f"blocks cannot hold): " + ", ".join(kept[:6])
                     + (f" and {len(kept) - 6} more" if len(kept) > 6 else ""))
    lines += [f"  {line}" for line in summary.get("notes", [])]
    return "\n".join(lines)
