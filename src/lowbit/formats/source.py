"""The lowbit checkpoint an export reads: its config (checked before any weight is loaded), its
tokenizer files, and the model itself, loaded natively through the registered quantizer."""
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import registry

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Source:
    label: str  # what the user passed, for messages
    name: str  # the default output name's stem
    config: object  # the model's transformers config
    quantization: dict  # quantization_config as saved
    tokenizer_dir: Path | None
    path: str | None = None
    model: object = None
    _tmp: list = field(default_factory=list)

    @classmethod
    def open(cls, model_or_path, tokenizer=None) -> "Source":
        if isinstance(model_or_path, (str, os.PathLike)):
            return cls._from_path(str(model_or_path), tokenizer)
        return cls._from_model(model_or_path, tokenizer)

    @classmethod
    def _from_path(cls, src: str, tokenizer) -> "Source":
        from transformers import AutoConfig

        from ..checkpoint import check_source

        check_source(src)
        folder = src
        if not os.path.isdir(src):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(src)
        config = AutoConfig.from_pretrained(folder)
        quantization = _quantization_dict(config, src)
        source = cls(label=src, name=os.path.basename(os.path.normpath(src)), config=config,
                     quantization=quantization, tokenizer_dir=None, path=folder)
        source.tokenizer_dir = source._tokenizer_dir(tokenizer, folder)
        return source

    @classmethod
    def _from_model(cls, model, tokenizer) -> "Source":
        if not hasattr(model, "config"):
            raise ValueError(f"model_or_path must be a lowbit folder, a Hub id or a transformers model, "
                             f"got {type(model).__name__}")
        name_or_path = getattr(model, "name_or_path", "") or ""
        source = cls(label=f"{type(model).__name__} in memory ({name_or_path or 'no name'})",
                     name=os.path.basename(os.path.normpath(name_or_path)) or "model", config=model.config,
                     quantization=_quantization_dict(model.config, "the model"), tokenizer_dir=None, model=model)
        source.tokenizer_dir = source._tokenizer_dir(tokenizer, name_or_path)
        return source

    def _tokenizer_dir(self, tokenizer, fallback: str) -> Path | None:
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            tmp = tempfile.TemporaryDirectory(prefix="lowbit-tokenizer-")
            self._tmp.append(tmp)
            tokenizer.save_pretrained(tmp.name)
            return Path(tmp.name)
        folder = Path(tokenizer if tokenizer is not None else fallback)
        if folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
        if tokenizer is not None:
            raise FileNotFoundError(f"tokenizer {str(tokenizer)!r}: no {' or '.join(TOKENIZER_FILES)} there")
        return None

    def require_tokenizer(self, fmt: str) -> Path:
        if self.tokenizer_dir is None:
            raise FileNotFoundError(f"{self.label}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); {fmt} carries "
                                    f"the vocabulary: save the tokenizer with the checkpoint, or pass tokenizer=")
        return self.tokenizer_dir

    def require_4bit_hqq(self, holds: str, fix: str) -> None:
        """Both formats hold 4-bit HQQ codes only: `holds` says what the format holds, `fix` how to get it."""
        qc = self.quantization
        if qc["quant_method"] != "lowbit_hqq" or qc.get("bits") != 4:
            what = qc["quant_method"] + (f" at {qc['bits']} bits" if "bits" in qc else "")
            raise ValueError(f"{self.label}: {holds}; this checkpoint is {what}. {fix}")

    @property
    def text_config(self):
        return self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config

    def load_model(self):
        if self.model is not None:
            return self.model
        from transformers import AutoModelForCausalLM

        import lowbit  # noqa: F401  (registers the quantizers)

        return AutoModelForCausalLM.from_pretrained(self.path, dtype="auto")


def _quantization_dict(config, label: str) -> dict:
    """quantization_config as a dict; an unquantized or non-lowbit model is an error."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(f"{label} is not quantized (no quantization_config): export reads lowbit's codes; "
                         f"quantize it first with `lowbit quantize`")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method not in {m.quant_method for m in registry.methods().values()}:
        raise ValueError(f"{label} is quantized with {method!r}, not a lowbit method: export reads lowbit's codes; "
                         f"quantize the original model with `lowbit quantize`")
    return qc
