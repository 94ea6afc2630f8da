"""lowbit's GGUF export in llama.cpp, side by side with llama.cpp's own quantizer, in one run.

    python scripts/export_benchmark.py --models smollm2-135m-perm qwen2.5-0.5b-perm --threads 2

Per model: an F16 GGUF (lowbit's writer on the unquantized model), llama.cpp's own Q4_1 and Q4_K_M
quantization of it (`llama_cpp.llama_model_quantize`), and lowbit HQQ 4-bit g32 and g64, with float
and with integer zero points, exported to Q4_1 (g64 also with the unquantized embeddings/head as Q8_0). Each file's WikiText-2 perplexity
through llama.cpp (the same token ids and windows as `lowbit eval`, evaluated 512 tokens per batch),
and decode tokens/s at batch 1 (`n_batch=1`, 64 tokens after a 16-token prompt); beside them the
lowbit checkpoints in transformers, same windows, same decode. Needs llama-cpp-python (`pip install
lowbit[llama]`). Writes OUT/results.json and the table into docs/deployment.md.
"""
import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("LOWBIT_MODELS", Path.home() / ".cache" / "lowbit-models"))
DOC = ROOT / "docs" / "deployment.md"
MARK = ("<!-- results:export:start -->", "<!-- results:export:end -->")


def llama(path, threads, logits_all=False, n_ctx=2048, n_batch=1):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                           logits_all=logits_all, verbose=False)


def llama_perplexity(path, ids, seqlen, windows, threads) -> float:
    """Windows scored as `lowbit.evaluate.perplexity` scores them, logits from llama.cpp."""
    from lowbit.evaluate import score_spans

    llm = llama(path, threads, logits_all=True, n_ctx=seqlen, n_batch=512)  # as llama-perplexity, in batches
    nll = count = 0
    for begin, end, first in score_spans(len(ids), seqlen, None, windows):
        window = ids[begin:end]
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[:len(window)], dtype=np.float32))[:-1]
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="none")
        keep = losses[first - begin - 1:]
        nll += keep.sum().item()
        count += keep.numel()
    return math.exp(nll / count)


def llama_decode(path, threads, prompt_len=16, new_tokens=64, repeats=3) -> float:
    llm = llama(path, threads, logits_all=True, n_ctx=256)
    prompt = list(range(100, 100 + prompt_len))
    rates = []
    for r in range(repeats + 1):  # the first run warms up
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        if r:
            rates.append(new_tokens / (time.perf_counter() - start))
    return float(np.median(rates))


def float_gguf(src, path):
    """The unquantized model as an F16 GGUF, through lowbit's own writer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.formats import gguf
    from lowbit.formats.source import Source

    source = Source(label=str(src), name=Path(src).name, config=AutoConfig.from_pretrained(src), quantization={},
                    tokenizer_dir=Path(src))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    gguf.write(model, source, path, {"unquantized_type": "f16"}, progress=False)


def llama_quantize(src, dst, ftype, threads):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {dst}")


def run_model(name, args, work) -> dict:
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit
    from lowbit.evaluate import decode_speed, load_ppl_text, perplexity

    src = MODELS / name
    text, _ = load_ppl_text(args.ppl_data)
    ids = AutoTokenizer.from_pretrained(src)(text, return_tensors="pt").input_ids[0]
    ids = ids[: args.seqlen * args.windows + 1].tolist()
    files = {"F16": work / f"{name}-f16.gguf"}
    float_gguf(src, files["F16"])
    for label, ftype in (("llama.cpp Q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1),
                         ("llama.cpp Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        files[label] = work / f"{name}-{label.split()[-1]}.gguf"
        llama_quantize(files["F16"], files[label], ftype, args.threads)
    rows = {}
    for group, zero in ((32, "float"), (64, "float"), (32, "integer"), (64, "integer")):
        name_ = f"lowbit HQQ w4 g{group}" + (" int-zero" if zero == "integer" else "")
        label = f"{name_} -> Q4_1"
        folder = work / f"{name}-hqq-w4g{group}-{zero}"
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.bfloat16, quantization_config=lowbit.HqqConfig(bits=4, group_size=group, zero_point=zero))
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(src).save_pretrained(folder)
        files[label] = work / f"{folder.name}.gguf"
        lowbit.export(folder, "gguf", dst=files[label], progress=False)
        if (group, zero) == (64, "float"):
            files[label + ", Q8_0 embeddings"] = work / f"{folder.name}-q8emb.gguf"
            lowbit.export(folder, "gguf", dst=files[label + ", Q8_0 embeddings"], unquantized_type="q8_0",
                          progress=False)
        ppl = perplexity(model, torch.tensor(ids), seqlen=args.seqlen, max_windows=args.windows, progress=False)
        speed = decode_speed(model, prompt_len=16, new_tokens=64)
        rows[f"{name_} in transformers"] = {
            "engine": "transformers", "ppl": ppl["ppl"], "decode_tok_s": speed["decode_tok_s"],
            "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}
        del model
    for label, path in files.items():
        print(f"  {name}: {label}", file=sys.stderr, flush=True)
        rows[label] = {"engine": "llama.cpp", "ppl": llama_perplexity(path, ids, args.seqlen, args.windows, args.threads),
                       "decode_tok_s": llama_decode(path, args.threads), "bytes": path.stat().st_size}
    return rows


def table(results: dict) -> str:
    lines = []
    for name, cell in results["models"].items():
        rows = cell["rows"]
        lines += [f"**{name}** (WikiText-2 test, {results['windows']} windows of {results['seqlen']} tokens; decode: "
                  f"batch 1, 64 tokens after 16, {results['threads']} threads)", "",
                  "| model | engine | perplexity | decode tok/s | vs transformers | file |", "|---|---|---|---|---|---|"]
        for label, r in rows.items():
            base = rows.get(label.split(" -> ")[0] + " in transformers")
            ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base and r["engine"] == "llama.cpp" else ""
            lines.append(f"| {label} | {r['engine']} | {r['ppl']:.2f} | {r['decode_tok_s']:.1f} | {ratio} | "
                         f"{r['bytes'] / 2**20:.1f} MiB |")
        lines.append("")
    lines.append(f"Measured {results['date']} on {results['machine']}; llama-cpp-python {results['versions']['llama_cpp']}, "
                 f"torch {results['versions']['torch']}, transformers {results['versions']['transformers']}. "
                 f"`vs transformers`: the export's decode speed over the same checkpoint's in transformers. "
                 f"Regenerate: `python scripts/export_benchmark.py`.")
    return "\n".join(lines)


def vllm_table(out: Path) -> str:
    """The vLLM checks kept by `scripts/vllm_check.py run --out OUT/vllm-<model>.json`."""
    lines = []
    for path in sorted(out.glob("vllm-*.json")):
        r = json.loads(path.read_text())
        s = r["decode_tok_s"]
        lines += [f"**{r['export']}** in vLLM {r['vllm']} (CPU build, {r['date']}): perplexity {r['ppl_vllm']:.3f} "
                  f"through vLLM's prompt logprobs vs {r['ppl_lowbit_transformers']:.3f} for the lowbit checkpoint in "
                  f"transformers ({r['windows']} windows of {r['seqlen']} tokens); greedy tokens agreeing with "
                  f"transformers for 3 prompts: {', '.join(map(str, r['greedy_tokens_agreeing']))} of "
                  f"{r['new_tokens']}; decode tok/s batch 1: {s['export_b1']:.1f} (bf16 {s['bf16_b1']:.1f}), batch 8: "
                  f"{s['export_b8']:.1f} (bf16 {s['bf16_b8']:.1f}).", ""]
    return "\n".join(lines)


def write_doc(results, out: Path):
    doc = DOC.read_text()
    start, end = doc.index(MARK[0]) + len(MARK[0]), doc.index(MARK[1])
    DOC.write_text(doc[:start] + "\n" + table(results) + "\n\n" + vllm_table(out) + doc[end:])


def main():
    import llama_cpp
    import transformers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m-perm", "qwen2.5-0.5b-perm"])
    p.add_argument("--ppl-data", default=str(ROOT.parent / "shared/data/wikitext-2-raw/wikitext-2-raw-v1.test.rows.json"))
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "export"))
    p.add_argument("--report", action="store_true", help="only rewrite the docs table from OUT/results.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.report:
        write_doc(json.loads((out / "results.json").read_text()), out)
        return
    torch.set_num_threads(args.threads)
    cpu = re.sub(r"\s+", " ", next((line.split(":", 1)[1] for line in open("/proc/cpuinfo") if "model name" in line),
                                   platform.processor())).strip()
    results = {"date": datetime.date.today().isoformat(), "machine": f"{cpu}, {args.threads} threads",
               "seqlen": args.seqlen, "windows": args.windows, "threads": args.threads,
               "versions": {"llama_cpp": llama_cpp.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="lowbit-export-bench-") as work:
        for name in args.models:
            results["models"][name] = {"rows": run_model(name, args, Path(work))}
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_doc(results, out)
    print(table(results))


if __name__ == "__main__":
    main()
