"""GGUF for llama.cpp: lowbit's 4-bit HQQ codes as Q4_1 blocks, unchanged.

lowbit stores w = (q − 8)·scale + offset per group of input channels; a Q4_1 block stores
w = d·q + m per 32 weights. So d = scale and m = offset − 8·scale, the codes go in as they are, and
a group of 64 or 128 is two or four blocks with the same d and m. Only the fp16 rounding of d and m
can differ from lowbit's own dequantized weight. A quantized layer whose input width is not a
multiple of 32 cannot be cut into blocks: it goes out dequantized, exactly, in the 16-bit type, like
everything lowbit kept unquantized (embeddings, a kept head, norms and biases in F32).

Metadata and vocabulary follow llama.cpp's own converter: for its `llama` architecture the rows of
q_proj and k_proj are permuted into llama.cpp's RoPE order (rows only: the blocks stay intact).
"""
import json
import re

import numpy as np
import torch
from tqdm.auto import tqdm

NAME = "gguf"
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # HF model_type -> GGUF
ROPE_PERMUTED = ("llama",)  # llama.cpp's llama architecture rotates interleaved pairs, HF rotates halves
UNQUANTIZED_TYPES = ("bf16", "f16", "f32", "q8_0")
BLOCK = 32  # weights per Q4_1 / Q8_0 block
SUPPORTED = "4-bit HQQ checkpoints (lowbit quantize --method hqq --bits 4, any group size)"

# Pre-tokenizer regexes of tokenizer.json's Split step, by the name llama.cpp gives the same split.
SPLIT_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


def default_dst(name: str) -> str:
    return f"{name}.gguf"


def options(source, unquantized_type=None) -> dict:
    if unquantized_type is not None and unquantized_type not in UNQUANTIZED_TYPES:
        raise ValueError(f"unquantized_type must be one of {list(UNQUANTIZED_TYPES)}, got {unquantized_type!r}")
    return {"unquantized_type": unquantized_type}


def check(source, options) -> None:
    """Everything the config and tokenizer tell, before any weight is read."""
    source.require_4bit_hqq(f"GGUF export holds {SUPPORTED} exactly as Q4_1",
                            "Re-quantize with `lowbit quantize --method hqq --bits 4` (or `--for gguf`)")
    model_type = source.text_config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{source.label}: GGUF export supports the architectures {sorted(ARCHITECTURES)}, "
                         f"got {model_type!r}")
    rope = _rope_parameters(source.text_config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ValueError(f"{source.label}: RoPE scaling {rope['rope_type']!r} is not supported by the GGUF export "
                         f"(supported: default, linear)")
    _vocabulary_kind(source.require_tokenizer("GGUF"))


def check_weights(model, source, options) -> None:
    pass  # every 4-bit HQQ layer has a Q4_1 or a 16-bit form


def _rope_parameters(cfg) -> dict:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope = dict(rope)
    if "rope_theta" not in rope and getattr(cfg, "rope_theta", None) is not None:
        rope["rope_theta"] = cfg.rope_theta
    return rope


def _tokenizer_json(folder) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder}: GGUF export reads the vocabulary from tokenizer.json (a fast tokenizer); "
                         f"none there")
    return json.loads(path.read_text(encoding="utf-8"))


def _vocabulary_kind(folder) -> tuple[str, str | None]:
    """(llama.cpp tokenizer model, pre-tokenizer): ("gpt2", pre) for byte-level BPE, ("llama", None)
    for SentencePiece-style BPE with byte fallback."""
    tok = _tokenizer_json(folder)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}: GGUF export supports BPE tokenizers, got {model.get('type')!r}")
    if model.get("byte_fallback"):
        return "llama", None
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        # GPT-2's split. llama.cpp's "smollm" is that split after single digits, the same tokens when
        # the vocabulary has no multi-digit token (it then also keeps spaces as HF does when decoding).
        multi_digit = any(re.search(r"\d\d", t) for t in model.get("vocab", {}))
        return "gpt2", "gpt-2" if multi_digit else "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return "gpt2", name
    raise ValueError(f"{folder}: this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one the GGUF export "
                     f"maps to llama.cpp (supported: GPT-2/SmolLM byte-level, Qwen2, Llama 3, SentencePiece BPE)")


# ---------------------------------------------------------------------------------------------- tensors

def q4_1_blocks(codes: torch.Tensor, scale_offset: torch.Tensor, in_features: int, group_size: int) -> np.ndarray:
    """lowbit's uint8 codes [out, in_pad] and scale_offset [groups, out, 2] -> Q4_1 bytes [out, in/32·20]:
    per block fp16 d, fp16 m, then byte j = q[j] | q[j+16] << 4."""
    out = codes.shape[0]
    nblocks = in_features // BLOCK
    so = scale_offset.float().transpose(0, 1).repeat_interleave(group_size // BLOCK, dim=1)[:, :nblocks]
    d = so[..., 0]
    m = so[..., 1] - 8 * so[..., 0]
    q = codes[:, :in_features].reshape(out, nblocks, BLOCK).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    dm = torch.stack([d, m], -1).to(torch.float16).view(torch.uint8).reshape(out, nblocks, 4)
    return torch.cat([dm, qs], -1).reshape(out, nblocks * 20).numpy()


def _dense(t: torch.Tensor, kind: str):
    """(bytes, GGML type) of a tensor kept unquantized; 1-D tensors (norms, biases) are F32."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if t.dim() == 1 or kind == "f32":
        return t.float().contiguous().numpy().view(np.uint8).reshape(*t.shape[:-1], -1), T.F32
    if kind == "q8_0" and t.shape[-1] % BLOCK == 0:
        return quantize(t.float().numpy(), T.Q8_0), T.Q8_0
    dtype, ggml = (torch.float16, T.F16) if kind == "f16" or t.dtype == torch.float16 else (torch.bfloat16, T.BF16)
    return t.to(dtype).contiguous().view(torch.uint8).numpy(), ggml


def _rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row permutation from HF's rotate-half layout (per head: first halves, then second halves) to
    llama.cpp's interleaved pairs."""
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _tensors(model, source, kind: str):
    """(HF name, bytes, GGML type, kept) for every tensor the GGUF file holds."""
    from gguf import GGMLQuantizationType as T
    from torch import nn

    from ..modules import QuantLinear

    cfg = source.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    permuted = ARCHITECTURES[cfg.model_type] in ROPE_PERMUTED
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if list(module.children()) or (tied and name.endswith("lm_head")):
            continue
        leaf = name.rsplit(".", 1)[-1]
        rows = _rope_row_order(heads[leaf] * head_dim, heads[leaf]) if permuted and leaf in heads else slice(None)
        if isinstance(module, QuantLinear):
            if module.in_features % BLOCK == 0:
                blocks = q4_1_blocks(module.codes()[rows], module.scale_offset[:, rows], module.in_features,
                                     module.group_size)
                yield f"{name}.weight", blocks, T.Q4_1, False
            else:
                yield (f"{name}.weight", *_dense(module.dequantize_weight()[rows], kind), True)
            if module.bias is not None:
                yield (f"{name}.bias", *_dense(module.bias.data[rows], kind), False)
            continue
        for pname, p in module.named_parameters(recurse=False):
            kept = isinstance(module, (nn.Linear, nn.Embedding)) and pname == "weight"
            yield (f"{name}.{pname}", *_dense(p.data[rows], kind), kept)


# ---------------------------------------------------------------------------------------------- metadata

def _write_metadata(w, source) -> None:
    import gguf

    cfg = source.text_config
    w.add_name(source.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = _rope_parameters(cfg)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if ARCHITECTURES[cfg.model_type] == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim or cfg.hidden_size // cfg.num_attention_heads)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocabulary(w, source)


def _write_vocabulary(w, source) -> None:
    import gguf
    from transformers import AutoTokenizer

    folder = source.tokenizer_dir
    model_kind, pre = _vocabulary_kind(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    n_vocab = max(source.text_config.vocab_size, len(tok))
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types, scores = [], [], []
    merge_rank = _merge_ranks(_tokenizer_json(folder)) if model_kind == "llama" else {}
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif model_kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN if i == tok.unk_token_id else gguf.TokenType.NORMAL)
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest; HF's BPE
        # merges the pair of lowest rank: scoring each token by minus the rank of the merge that makes it
        # gives the same merges.
        scores.append(-float(merge_rank.get(token, 0)) if model_kind == "llama" else 0.0)
    w.add_tokenizer_model(model_kind)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if model_kind == "llama":
        w.add_token_scores(scores)
    special = gguf.SpecialVocab(folder, load_merges=model_kind == "gpt2", n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)


def _merge_ranks(tok: dict) -> dict:
    ranks = {}
    for rank, merge in enumerate(tok["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank + 1)
    return ranks


# ---------------------------------------------------------------------------------------------- writing

def write(model, source, path, options, progress: bool) -> dict:
    """Also writes an unquantized model (every matrix in `unquantized_type`): the F16 reference that
    llama.cpp's own quantizer starts from in scripts/export_benchmark.py."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it opens at INFO

    cfg = source.text_config
    kind = options["unquantized_type"] or {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model.dtype, "f32")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHITECTURES[cfg.model_type].upper()], cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), ARCHITECTURES[cfg.model_type])
    _write_metadata(w, source)
    types, kept, notes = {}, [], []
    for hf_name, data, ggml_type, is_kept in tqdm(_tensors(model, source, kind), disable=not progress, desc="gguf",
                                                  unit="tensor"):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {hf_name!r} has no llama.cpp name for architecture {cfg.model_type!r}")
        w.add_tensor(name, data, raw_dtype=ggml_type)
        types[ggml_type.name] = types.get(ggml_type.name, 0) + 1
        if is_kept:
            kept.append(f"{name} ({ggml_type.name})")
    file_type = "MOSTLY_Q4_1" if "Q4_1" in types else {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0",
                                                       "bf16": "MOSTLY_BF16", "f32": "ALL_F32"}[kind]
    w.add_file_type(gguf.LlamaFileType[file_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    if "Q8_0" in types:
        notes.append("Q8_0 (requested) re-quantizes the tensors lowbit kept unquantized: those are not exact")
    return {"bytes": path.stat().st_size, "tensor_types": types, "kept": kept, "kept_type": kind.upper(),
            "notes": notes}
