"""Measurements that every method is judged by: perplexity, decode/prefill speed, size.

Perplexity protocols (always reported with the numbers):
- "windows" (GPTQ/QuaRot papers): the text tokenized once, cut into non-overlapping windows of
  `seqlen` tokens, every token after the first of a window scored once, mean NLL, exp.
- "stride" (HQQ's blog): windows of `seqlen` every `stride` tokens, each token scored once, by the
  first window in which it is not in the overlap with the previous window.
"""
import math
import statistics
import time

import torch


def wikitext2_test_text(path: str) -> str:
    """The WikiText-2 test split as the papers join it: a JSON list of rows joined with "\\n\\n",
    or a plain text file read as it is."""
    import json

    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if path.endswith(".json"):
        rows = json.loads(raw)
        if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return "\n\n".join(rows)
    return raw


def score_spans(n_tokens: int, seqlen: int, stride: int | None = None, max_windows: int | None = None):
    """[(begin, end, first_scored)]: the window [begin, end) scores targets first_scored..end-1.

    "windows": n_tokens // seqlen full windows, each scoring all but its first token.
    "stride": every token after the very first scored exactly once, with up to seqlen - 1 of context."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise ValueError(f"stride must be in 1..seqlen ({seqlen}), got {stride}")
    if stride == seqlen:  # the papers: full windows only, the trailing remainder is dropped
        n = n_tokens // seqlen if max_windows is None else min(n_tokens // seqlen, max_windows)
        return [(i * seqlen, (i + 1) * seqlen, i * seqlen + 1) for i in range(n)]
    spans, begin, scored_up_to = [], 0, 1
    while scored_up_to < n_tokens and (max_windows is None or len(spans) < max_windows):
        end = min(begin + seqlen, n_tokens)
        spans.append((begin, end, max(scored_up_to, begin + 1)))
        scored_up_to = end
        begin += stride
    return spans


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seqlen: int = 2048, stride: int | None = None,
               max_windows: int | None = None, progress: bool = True) -> dict:
    """Perplexity of `model` on a 1-D tensor of token ids (see the module docstring for the protocols)."""
    from tqdm.auto import tqdm

    ids = input_ids.reshape(-1)
    spans = score_spans(ids.numel(), seqlen, stride, max_windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for begin, end, first in tqdm(spans, desc="perplexity", disable=not progress, leave=False):
        window = ids[begin:end].unsqueeze(0).to(device)
        logits = model(window).logits[0, :-1].float()
        targets = window[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        keep = losses[first - begin - 1:]
        nll += keep.sum().item()
        count += keep.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens_scored": count, "windows": len(spans),
            "seqlen": seqlen, "stride": stride or seqlen,
            "protocol": "windows" if (stride or seqlen) == seqlen else "stride"}


@torch.no_grad()
def decode_speed(model, prompt_len: int = 16, new_tokens: int = 64, batch_size: int = 1, repeats: int = 3) -> dict:
    """Prefill and decode tokens/s with greedy generation; a warm-up run excluded, median of `repeats`."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, prompt_len), generator=g).to(device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - start

    timed(4)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        t1 = timed(1)  # prefill + first token
        tn = timed(new_tokens + 1)
        prefill.append(batch_size * prompt_len / t1)
        decode.append(batch_size * new_tokens / max(tn - t1, 1e-9))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}


def weight_bytes(model) -> dict:
    """In-memory bytes of all weights, and bits per weight of the quantized linears (with what they need
    beside their codes: scales, low-rank branches, rotations, also a rotation stored in the norm before them)."""
    from .integration import quant_linears
    from .modules import RotatedNorm

    total = model.get_memory_footprint()
    q = quant_linears(model)
    packed = sum(t.numel() * t.element_size() for _, m in q for k, t in m.state_dict().items() if k != "bias")
    packed += sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, RotatedNorm)
                  for t in m.rotation.state_dict().values())
    numel = sum(m.in_features * m.out_features for _, m in q)
    return {"memory_bytes": total, "quantized_linears": len(q),
            "bits_per_weight": 8 * packed / numel if numel else 16.0}


@torch.no_grad()
def kv_cache_bytes(model, context: int) -> int:
    """Bytes the model's KV cache holds after a prefill of `context` tokens (batch 1)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    out = model(ids.to(model.device), use_cache=True, logits_to_keep=1)
    cache = out.get("cache", out.get("past_key_values"))  # transformers >= 5.24 names it `cache`
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


TASKS = ("ppl", "speed", "size")
WIKITEXT2_LOCAL = "../shared/data/wikitext-2-raw/wikitext-2-raw-v1.test.rows.json"


def load_ppl_text(spec: str) -> tuple[str, str]:
    """(text, description) for `--ppl-data`: "wikitext2" or a path (plain text, or a JSON list of rows)."""
    import os

    if spec != "wikitext2":
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"--ppl-data {spec!r}: no such file (give 'wikitext2', a text file "
                                    "or a JSON list of rows)")
        return wikitext2_test_text(spec), spec
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows), "wikitext-2-raw-v1 test (datasets)"
    except Exception:
        pass
    path = os.environ.get("LOWBIT_WIKITEXT2", WIKITEXT2_LOCAL)
    if not os.path.isfile(path):
        raise FileNotFoundError("--ppl-data wikitext2: the Hub is not reachable and no local copy was found at "
                                f"{path!r} (set LOWBIT_WIKITEXT2 to the rows JSON, or pass --ppl-data PATH)")
    return wikitext2_test_text(path), f"wikitext-2-raw-v1 test ({path})"


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS and not t.startswith("lm-eval:")]
    if not tasks or bad:
        raise ValueError(f"--tasks: unknown task(s) {bad or [spec]}; allowed: {', '.join(TASKS)}, lm-eval:<task>")
    return tasks


def checkpoint_bytes(model_id: str) -> int | None:
    import os
    from pathlib import Path

    folder = Path(model_id)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model_id, allow_patterns=["*.safetensors"]))
        except Exception:
            return None
    return sum(os.path.getsize(f) for f in folder.glob("*.safetensors"))


def evaluate_model(model_id: str, tasks: list[str], ppl_data: str = "wikitext2", seqlen: int = 2048,
                   stride: int | None = None, max_windows: int | None = None, batch_size: int = 1,
                   dtype: str = "auto", progress: bool = True) -> dict:
    """What `lowbit eval` measures, as one JSON-serialisable dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = load_ppl_text(ppl_data) if "ppl" in tasks else None  # a bad path fails before the model loads
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    model.eval()
    qc = getattr(model.config, "quantization_config", None)
    out = {"model": model_id, "dtype": str(model.dtype).removeprefix("torch."),
           "quantization": qc.to_dict() if hasattr(qc, "to_dict") else qc, "torch_threads": torch.get_num_threads()}
    if "ppl" in tasks:
        ids = AutoTokenizer.from_pretrained(model_id)(text[0], return_tensors="pt").input_ids[0]
        out["ppl"] = {**perplexity(model, ids, seqlen, stride, max_windows, progress), "data": text[1],
                      "join": "rows joined with \"\\n\\n\", tokenized once"}
    if "speed" in tasks:
        out["speed"] = [decode_speed(model, batch_size=b) for b in sorted({1, batch_size})]
    if "size" in tasks:
        out["size"] = {**weight_bytes(model), "checkpoint_bytes": checkpoint_bytes(model_id)}
    for task in (t for t in tasks if t.startswith("lm-eval:")):
        out.setdefault("lm_eval", {})[task[8:]] = _lm_eval(model, model_id, task[8:], batch_size)
    return out


def _lm_eval(model, model_id, task, batch_size):
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError("--tasks lm-eval:<task> needs the lm-eval package: pip install 'lowbit[eval]'") from err
    from transformers import AutoTokenizer

    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_id), batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=[task])["results"].get(task)


def format_report(res: dict) -> str:
    lines = [f"model      {res['model']} ({res['dtype']}, {res['torch_threads']} threads)"]
    if res.get("quantization"):
        lines.append(f"quantized  {res['quantization']}")
    if "ppl" in res:
        p = res["ppl"]
        proto = (f"non-overlapping windows of {p['seqlen']}" if p["protocol"] == "windows"
                 else f"windows of {p['seqlen']} every {p['stride']} tokens")
        lines.append(f"perplexity {p['ppl']:.3f} on {p['data']}: {proto}, {p['windows']} windows, "
                     f"{p['tokens_scored']} tokens scored")
    for s in res.get("speed", []):
        lines.append(f"speed      batch {s['batch_size']}: prefill {s['prefill_tok_s']:.1f} tok/s, "
                     f"decode {s['decode_tok_s']:.1f} tok/s (median of {s['repeats']})")
    if "size" in res:
        s = res["size"]
        ck = "n/a" if s["checkpoint_bytes"] is None else f"{s['checkpoint_bytes'] / 2**20:.1f} MiB"
        lines.append(f"size       checkpoint {ck}, in memory {s['memory_bytes'] / 2**20:.1f} MiB, "
                     f"{s['quantized_linears']} quantized linears at {s['bits_per_weight']:.2f} bits/weight")
    for task, r in res.get("lm_eval", {}).items():
        lines.append(f"lm-eval    {task}: {r}")
    return "\n".join(lines)
