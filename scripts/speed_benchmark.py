"""CPU speed of every method against bf16, in one run: decode and prefill, eager and compiled.

    python scripts/speed_benchmark.py --models smollm2-135m-perm qwen2.5-0.5b-perm --threads 2

Per model, a checkpoint per method is made once under --checkpoints (speed does not depend on the
weight solver, so the rotation methods use RTN and the least calibration their runtime needs:
Householder with its PCA initialisation, no optimisation steps; SVDQuant for the NVFP4 runtime that
ARHQ shares; `-int8` runs it on its int8 runtime, `int8_runtime`). Each cell then loads its checkpoint
in a fresh process and measures, at batch 1:
- prefill: tokens/s of one forward over a 512-token prompt (the last position's logits, as `generate`);
- decode: tokens/s of 64 greedy tokens after a 16-token prompt, eager, from the first generated token's
  arrival to the last's (a streamer notes each);
- compiled decode (`--compile`): the same with `cache_implementation="static"` and `torch.compile`
  (transformers' `CompileConfig`), the one-time compile cost recorded beside it;
- decode after a prefill of each of --contexts tokens, for the methods with a quantized KV cache and bf16;
- llama.cpp's own Q4_1 of the model (`n_batch=1`), with `--llama` (needs `pip install lowbit[llama]`).
`--attention eager` loads every model with transformers' eager attention (plain matmuls and a softmax, which a
compiled step fuses) instead of SDPA's CPU kernel (the default, what `from_pretrained` picks), for the whole
run: the label's line says which.
Every figure is a median of --repeats after a warm-up. With `--rounds N` the model's cells run N times,
round-robin (every method once, then again), and each figure is the median over the rounds: a burst of
load from elsewhere on the host then disturbs one round's cell, not one method's ratio to bf16.
`--label` names the code measured (e.g. a run
with PYTHONPATH set to an older checkout, labelled "before"); results/speed/results.json keeps each
label's cells, and the table in docs/speed.md shows every label's ratios to bf16 side by side.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("LOWBIT_MODELS", Path.home() / ".cache" / "lowbit-models"))
CALIBRATION = ROOT.parent / "shared" / "data" / "wikitext-2-tokens" / "valid.txt"
DOC = ROOT / "docs" / "speed.md"
CHECKPOINTS = Path(tempfile.gettempdir()) / "lowbit-speed-checkpoints"
MARK = ("<!-- results:speed:start -->", "<!-- results:speed:end -->")
KV_METHODS = ("quarot-w4a8kv8", "quarot-w4a8kv4", "quarot-w4a4kv4")
METHODS = ("bf16", "hqq-w4g64", "hqq-w4g64-head", *KV_METHODS, "hh-w4a8", "hh-w4a4", "svdquant-r128",
           "svdquant-r128-int8")


def config_for(method: str, calibration: str):
    import lowbit

    if method.startswith("hqq-"):  # -head: the output head quantized too (a tied one gets its own copy)
        return lowbit.HqqConfig(bits=4, group_size=64,
                                **({"modules_to_not_convert": []} if method.endswith("-head") else {}))
    if method.startswith("quarot-"):
        return lowbit.QuaRotConfig.from_preset(method.split("-", 1)[1])
    if method.startswith("hh-"):
        return lowbit.HouseholderConfig(act_bits=int(method[-1]), weight_quantizer="rtn", steps=0, nsamples=4,
                                        seqlen=256, calibration=calibration)
    if method.startswith("svdquant-r128"):  # -int8: the same checkpoint, switched to the int8 runtime after loading
        return lowbit.ArhqConfig(decomposition="svdquant", rank=128)
    raise SystemExit(f"--methods: unknown {method!r}; choose from {', '.join(METHODS)}")


def checkpoint(model: str, method: str, args) -> Path:
    """The method's checkpoint of the model, made once (in a temp folder, then renamed)."""
    from transformers import AutoModelForCausalLM

    src = MODELS / model
    if method == "bf16":
        return src
    dst = Path(args.checkpoints) / f"{model}-{method.removesuffix('-int8')}"
    if not dst.exists():
        model_ = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                                      quantization_config=config_for(method, args.calib))
        tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".", dir=dst.parent))
        model_.save_pretrained(tmp)
        tmp.rename(dst)
    return dst


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _TokenTimes:
    """A `generate` streamer that notes when each token arrives (the prompt comes first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode_tok_s(model, prompt, new_tokens: int, repeats: int, **kw) -> float | None:
    """Tokens/s from the first generated token to the last, in one `generate` call: one cache length, so
    a compiled step compiles once (the warm-up run). `repeats=0`: the warm-up only."""
    rates = []
    for r in range(repeats + 1):
        stream = _TokenTimes()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, eos_token_id=None, streamer=stream, **kw)
        if r:
            rates.append((new_tokens - 1) / (stream.times[-1] - stream.times[1]))
    return statistics.median(rates) if rates else None


def run_cell(model_name: str, method: str, args) -> dict:
    """Runs inside the per-cell process."""
    from transformers import AutoModelForCausalLM
    from transformers.generation import CompileConfig

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint(model_name, method, args), dtype=torch.bfloat16,
                                                 attn_implementation=args.attention).eval()
    if method.endswith("-int8"):  # a saved checkpoint's own config wins at reload: switched on after loading
        from lowbit import arhq

        arhq.use_int8_runtime(model)
    vocab = model.config.get_text_config().vocab_size

    def random_ids(n, seed):
        return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))

    result = {"model": model_name, "method": method}
    with torch.no_grad():
        ids = random_ids(args.prefill, 0)
        result["prefill_tok_s"] = args.prefill / timed(lambda: model(ids, logits_to_keep=1), args.repeats)
        prompt = random_ids(16, 1)
        result["decode_tok_s"] = decode_tok_s(model, prompt, 64, args.repeats)
        if method in KV_METHODS or method == "bf16":
            for context in args.contexts:
                result[f"decode_tok_s_at_{context}"] = decode_tok_s(model, random_ids(context, 2), 16, 1)
        if args.compile:
            config = CompileConfig()
            config._compile_all_devices = True  # transformers compiles on GPUs only unless told
            model.generation_config.compile_config = config
            start = time.perf_counter()
            decode_tok_s(model, prompt, 64, 0, cache_implementation="static")  # the compile
            result["compile_s"] = time.perf_counter() - start
            result["compiled_decode_tok_s"] = decode_tok_s(model, prompt, 64, args.repeats,
                                                           cache_implementation="static")
    return result


def median_cell(runs: list) -> dict:
    """One method's cells of several rounds as one: each figure the median over the rounds that have it."""
    cell = dict(runs[0])
    for key in {k for r in runs for k, v in r.items() if isinstance(v, float)}:
        cell[key] = statistics.median(r[key] for r in runs if isinstance(r.get(key), float))
    cell["rounds"] = len(runs)
    return cell


def llama_cpp_cell(model_name: str, args) -> dict:
    """llama.cpp's own Q4_1 of the model, decode at batch 1 (the export benchmark's protocol)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import export_benchmark as eb
    import llama_cpp

    with tempfile.TemporaryDirectory() as work:
        f16, q41 = Path(work) / "f16.gguf", Path(work) / "q4_1.gguf"
        eb.float_gguf(MODELS / model_name, f16)
        eb.llama_quantize(f16, q41, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, args.threads)
        return {"model": model_name, "method": "llama.cpp-q4_1",
                "decode_tok_s": eb.llama_decode(q41, args.threads, repeats=args.repeats)}


def _machine(threads: int) -> str:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, {threads} threads"


def _commit(package: Path) -> str:
    """' at commit X' (with '+changes' for uncommitted ones) when lowbit runs from a git checkout."""
    git = ["git", "-C", str(package)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return f" from {package}"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout.strip()
    return f" at commit {head.stdout.strip()}{'+changes' if dirty else ''}"


def _ratio(cell, bf16, key):
    if not cell or not bf16 or key not in cell or key not in bf16:
        return "–"
    return f"{cell[key] / bf16[key]:.2f}×"


def table(results: dict) -> str:
    """One table per model: each method's ratios to bf16 under every label that measured the model (bf16 of
    the same label and run)."""
    lines = []
    for model in results["models"]:
        labels = [lab for lab in results["labels"] if results["labels"][lab].get(model)]
        cells = {lab: {c["method"]: c for c in results["labels"][lab][model]} for lab in labels}
        rounds = ", ".join(f"{lab} {max(c.get('rounds', 1) for c in cells[lab].values())}" for lab in labels)
        lines += [f"**{model}** (ratios to bf16 of the same run and mode, eager or compiled; bf16 and llama.cpp "
                  f"in tokens/s; rounds per cell: {rounds})", ""]
        head = ["method"] + [f"decode {lab}" for lab in labels] + [f"prefill {lab}" for lab in labels]
        compiled = any("compiled_decode_tok_s" in c for lab in labels for c in cells[lab].values())
        if compiled:
            head += [f"compiled decode {lab}" for lab in labels] + ["compile s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        methods = [m for m in METHODS + ("llama.cpp-q4_1",) if any(m in cells[lab] for lab in labels)]
        for method in methods:
            row = [method]
            for key in ("decode_tok_s", "prefill_tok_s") + (("compiled_decode_tok_s",) if compiled else ()):
                for lab in labels:
                    cell, bf16 = cells[lab].get(method), cells[lab].get("bf16")
                    if method in ("bf16", "llama.cpp-q4_1") and cell and key in cell:
                        row.append(f"{cell[key]:.1f} tok/s")
                    elif method == "llama.cpp-q4_1":
                        row.append("–")
                    else:
                        row.append(_ratio(cell, bf16, key))
            if compiled:
                row.append(next((f"{cells[lab][method]['compile_s']:.0f}" for lab in reversed(labels)
                                 if "compile_s" in cells[lab].get(method, {})), "–"))
            lines.append("| " + " | ".join(row) + " |")
        for lab in labels:
            llama = cells[lab].get("llama.cpp-q4_1", {})
            for method, what in (("hqq-w4g64", "head in bf16"), ("hqq-w4g64-head", "head quantized")):
                hqq = cells[lab].get(method, {})
                if "compiled_decode_tok_s" in hqq and "decode_tok_s" in llama:
                    lines += ["", f"{lab}: HQQ w4g64 ({what}) compiled decode {hqq['compiled_decode_tok_s']:.1f} tok/s, "
                              f"llama.cpp's Q4_1 {llama['decode_tok_s']:.1f} tok/s: llama.cpp is "
                              f"{llama['decode_tok_s'] / hqq['compiled_decode_tok_s']:.2f}× faster."]
        kv = [(lab, m, c) for lab in labels for m, c in cells[lab].items() if any(k.startswith("decode_tok_s_at_")
                                                                                  for k in c)]
        if kv:
            contexts = sorted({int(k.rsplit("_", 1)[1]) for _, _, c in kv for k in c
                               if k.startswith("decode_tok_s_at_")})
            lines += ["", "Decode tokens/s after a long prefill (context tokens; × bf16 of the same label):", "",
                      "| label | method | " + " | ".join(str(c) for c in contexts) + " |",
                      "|---|---|" + "---|" * len(contexts)]
            for lab, m, c in kv:
                row = []
                for n in contexts:
                    key = f"decode_tok_s_at_{n}"
                    ratio = "" if m == "bf16" else f" ({_ratio(c, cells[lab].get('bf16'), key)})"
                    row.append(f"{c[key]:.1f}{ratio}" if key in c else "–")
                lines.append(f"| {lab} | {m} | " + " | ".join(row) + " |")
        lines.append("")
    meta = "; ".join(f"{lab}: {v['_meta']}" for lab, v in results["labels"].items())
    return "\n".join(lines) + f"\nMeasured: {meta}.\n"


def write_doc(results: dict) -> None:
    text = DOC.read_text()
    start, end = text.index(MARK[0]) + len(MARK[0]), text.index(MARK[1])
    DOC.write_text(text[:start] + "\n" + table(results) + text[end:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m-perm", "qwen2.5-0.5b-perm"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--label", default="current", help="names the code measured (a column group of the table)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    p.add_argument("--contexts", type=int, nargs="*", default=[], help="decode after prefills this long (KV methods)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="run every cell this many times, round-robin; medians")
    p.add_argument("--compile", action="store_true", help="also measure compiled decode (static cache)")
    p.add_argument("--llama", action="store_true", help="also measure llama.cpp's own Q4_1 (decode)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers' attention implementation for every cell (default: sdpa)")
    p.add_argument("--calib", default=str(CALIBRATION), help="calibration text (Householder's PCA)")
    p.add_argument("--checkpoints", default=str(CHECKPOINTS))
    p.add_argument("--out", default=str(ROOT / "results" / "speed"),
                   help="the results folder; docs/speed.md is rewritten only from results/speed")
    p.add_argument("--report", action="store_true",
                   help="only rewrite the docs table from OUT/results.json (print it, for a scratch OUT)")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        model, method = json.loads(args.cell)
        cell = llama_cpp_cell(model, args) if method == "llama.cpp-q4_1" else run_cell(model, method, args)
        print(json.dumps(cell))
        return
    out = Path(args.out)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"models": [], "labels": {}}
    scratch = out.resolve() != (ROOT / "results" / "speed").resolve()  # a run elsewhere is a scratch run
    if args.report:
        if scratch:
            print(table(results))
        else:
            write_doc(results)
        return
    for m in args.methods:
        if m != "bf16":
            config_for(m, args.calib)
    Path(args.checkpoints).mkdir(parents=True, exist_ok=True)
    import lowbit
    import transformers

    label = results["labels"].setdefault(args.label, {})
    label["_meta"] = (f"{datetime.date.today().isoformat()}, {_machine(args.threads)}, lowbit {lowbit.__version__}"
                      f"{_commit(Path(lowbit.__file__).parent)}, torch {torch.__version__}, transformers "
                      f"{transformers.__version__}" + (f", {args.attention} attention" if args.attention != "sdpa" else ""))
    passthrough = ["--threads", str(args.threads), "--prefill", str(args.prefill), "--repeats", str(args.repeats),
                   "--calib", args.calib, "--checkpoints", args.checkpoints, "--attention", args.attention,
                   "--contexts", *map(str, args.contexts)]
    passthrough += ["--compile"] * args.compile
    for model in args.models:
        if model not in results["models"]:
            results["models"].append(model)
        rounds = {}  # method -> its cell of each round
        for round_ in range(args.rounds):
            for method in args.methods + (["llama.cpp-q4_1"] if args.llama else []):
                proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps([model, method]), *passthrough],
                                      capture_output=True, text=True)
                if proc.returncode:
                    print(f"{model} {method}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                rounds.setdefault(method, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{model} {method} (round {round_ + 1}/{args.rounds}): {rounds[method][-1]}", flush=True)
        cells = [median_cell(runs) for runs in rounds.values()]
        done = {c["method"] for c in cells}  # a rerun of some methods keeps the label's other cells
        label[model] = [c for c in label.get(model, []) if c["method"] not in done] + cells
        out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    if not scratch:
        write_doc(results)
    print(table(results))


if __name__ == "__main__":
    main()
