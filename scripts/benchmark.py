#!/usr/bin/env python
"""One comparison run: every method on the same models, side by side, in one run; and the report.

    python scripts/benchmark.py --models smollm2-135m-perm qwen2.5-0.5b-perm --out results/hqq --max-windows 40
    python scripts/benchmark.py --models smollm2-135m-perm qwen2.5-0.5b-perm --methods QUAROT --seqlen 2048 \
        --max-windows 4 --kv-context 4096 --nsamples 16 --out results/quarot
    python scripts/benchmark.py --methods ARHQ --seqlen 2048 --max-windows 4 --nsamples 16 --out results/arhq
    python scripts/benchmark.py --methods HH --seqlen 2048 --max-windows 4 --nsamples 16 --out results/householder
    python scripts/benchmark.py --report     # docs/results.md, the docs pages' tables, the README summary

A result set is a folder results/<set>/ with its results.json (one cell per model and method);
`--report` rebuilds every table and plot from those files alone.

Methods (`--methods`, default: the first four at bits 4/3 and groups 64/128; `--methods QUAROT`: bf16,
for each preset norot-rtn, quarot-rtn and quarot-gptq, and PCA (rtn, gptq) at w4a4kv4; `--methods ARHQ`:
bf16, the six NVFP4 rows below and svdquant-r128-int8; `--methods HH`: bf16, and at W4A8 and W4A4 (KV cache in bf16)
QuaRot RTN, QuaRot GPTQ and Householder):
  bf16                  the unquantized baseline
  lowbit-hqq-w4g64      lowbit.HqqConfig(bits=4, group_size=64), quantized on load
  hqq-w4g64             the `hqq` package's own HQQLinear, same settings (pytorch backend)
  rtn-w4g64             plain round-to-nearest into lowbit's packed format
  quarot-w4a4kv4-rtn    lowbit.QuaRotConfig.from_preset("w4a4kv4") (Hadamard, RTN with clipping search)
  quarot-w4a4kv4-gptq   the same with GPTQ weights (calibration: --calib, --nsamples x --calib-seqlen)
  quarot-w4a4kv4-gptq-pca  ... and the PCA residual rotation instead of a plain Hadamard
  norot-w4a4kv4-rtn     the same quantizers (weights, per-token activations, KV cache), no rotation
  nvfp4-r0[-sq]         lowbit.ArhqConfig(rank=0): plain NVFP4 W4A4 [with smoothing, alpha --smoothing]
  svdquant-r128[-sq]    lowbit.ArhqConfig(rank=128, decomposition="svdquant") [with smoothing]
  arhq-r128[-sq]        lowbit.ArhqConfig(rank=128) [with smoothing] (calibration as for GPTQ)
  ...-int8              any of the three on the int8 runtime (int8_runtime=True), e.g. svdquant-r128-int8
  hh-w4a8               lowbit.HouseholderConfig(bits=4, act_bits=8, group_size=--quarot-group), --hh-steps
                        Adam steps per layer on --hh-nsamples x --hh-seqlen calibration tokens
  hh-w4a8-gptq          the same, GPTQ onto the learned grid (weight_quantizer="gptq")
  NAME:field=value,...  any registered method (lowbit.registry) with these config settings, e.g.
                        hqq:bits=4,group_size=64 (values parsed as JSON, else taken as strings; a calibrating
                        config gets --calib, --nsamples and --calib-seqlen unless the spec sets them)
QuaRot's bits can also be given as quarot-wWaAkvK-rtn|gptq (e.g. quarot-w4a8kv16-rtn: no KV quantization).
QuaRot's presets are w4a4kv4, w4a8kv4 and w4a8kv8 (group --quarot-group, default 64).
The lm_head stays in bf16 (unless a NAME:field=value spec sets modules_to_not_convert=[]). Each cell
runs in its own process (clean peak RSS, a crash is recorded as a failed cell and the run goes on);
results/results.json is rewritten after every cell, and a cell already there is not recomputed
(delete it, or pass --redo, to measure again).
Writes OUT/results.json, OUT/results.md and OUT/*.png.
"""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("LOWBIT_MODELS", Path.home() / ".cache" / "lowbit-models"))
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wikitext-2-raw-v1.test.rows.json"
CALIBRATION = WIKITEXT.parents[1] / "wikitext-2-tokens" / "valid.txt"
DEFAULT_METHODS = ["bf16"] + [f"{m}-w{b}g{g}" for m in ("lowbit-hqq", "hqq", "rtn") for b in (4, 3) for g in (64, 128)]
QUAROT_METHODS = (["bf16"] + [f"{m}-{p}-{q}" for p in ("w4a4kv4", "w4a8kv4", "w4a8kv8")
                              for m, q in (("norot", "rtn"), ("quarot", "rtn"), ("quarot", "gptq"))]
                  + ["quarot-w4a4kv4-rtn-pca", "quarot-w4a4kv4-gptq-pca"])
HH_METHODS = ["bf16"] + [f"quarot-{b}-{q}" for b in ("w4a8kv16", "w4a4kv16") for q in ("rtn", "gptq")] + \
    [f"hh-{b}{q}" for b in ("w4a8", "w4a4") for q in ("", "-gptq")]
ARHQ_METHODS = ["bf16"] + [f"{m}{sq}" for m in ("nvfp4-r0", "svdquant-r128", "arhq-r128") for sq in ("", "-sq")] + \
    ["svdquant-r128-int8"]


def parse_method(spec: str, smoothing: float = 0.5):
    """-> (method, bits, group, config settings or None)."""
    if spec == "bf16":
        return "bf16", None, None, None
    if ":" in spec:  # NAME:field=value,...: any declared method
        from lowbit import registry

        name, _, rest = spec.partition(":")
        registry.method(name)  # an unknown name is an error here, before any cell runs
        settings = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--methods {spec!r}: expected field=value, got {item!r}")
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value
        return name, settings.get("bits"), settings.get("group_size"), settings
    parts = spec.split("-")
    if parts[0] in ("nvfp4", "svdquant", "arhq"):
        rank = parts[1][1:] if len(parts) > 1 and parts[1].startswith("r") else ""
        options = parts[2:]
        if (not rank.isdigit() or options not in ([], ["sq"], ["int8"], ["sq", "int8"])
                or (parts[0] == "nvfp4") != (rank == "0")):
            raise ValueError(f"--methods: unknown NVFP4 method {spec!r}; use nvfp4-r0[-sq][-int8], "
                             f"svdquant-rN[-sq][-int8] or arhq-rN[-sq][-int8]")
        return parts[0], 4, 16, {"rank": int(rank), "decomposition": "arhq" if parts[0] == "arhq" else "svdquant",
                                 "smoothing": smoothing if "sq" in options else None,
                                 "int8_runtime": "int8" in options}
    if parts[0] == "hh":
        m = re.fullmatch(r"w(\d+)a(\d+)", parts[1]) if len(parts) > 1 else None
        if not m or parts[2:] not in ([], ["gptq"]):
            raise ValueError(f"--methods: unknown Householder method {spec!r}; use hh-wWaA[-gptq], e.g. hh-w4a8")
        return "hh", int(m[1]), None, {"bits": int(m[1]), "act_bits": int(m[2]),
                                       "weight_quantizer": "gptq" if parts[2:] else "rtn"}
    if parts[0] in ("quarot", "norot"):
        m = re.fullmatch(r"w(\d+)a(\d+)kv(\d+)", parts[1]) if len(parts) > 1 else None
        ok = (m and len(parts) in (3, 4) and parts[2] in ("rtn", "gptq")
              and parts[3:] in ([], ["pca"]) and not (parts[0] == "norot" and parts[3:]))
        if not ok:
            raise ValueError(f"--methods: unknown QuaRot method {spec!r}; use quarot-wWaAkvK-rtn|gptq[-pca] or "
                             f"norot-wWaAkvK-rtn|gptq (e.g. the presets w4a4kv4, w4a8kv4, w4a8kv8)")
        return parts[0], int(m[1]), None, {
            "bits": int(m[1]), "act_bits": int(m[2]), "kv_bits": int(m[3]), "weight_quantizer": parts[2],
            "rotation_method": "pca" if parts[3:] else "hadamard"}
    name, _, wg = spec.rpartition("-")
    if name not in ("lowbit-hqq", "hqq", "rtn") or not wg.startswith("w") or "g" not in wg:
        raise ValueError(f"--methods: unknown method {spec!r}; use bf16, lowbit-hqq-wBgG, hqq-wBgG, rtn-wBgG, "
                         f"quarot-PRESET-rtn|gptq[-pca], norot-PRESET-rtn|gptq, nvfp4-r0[-sq][-int8], "
                         f"svdquant-rN[-sq][-int8], arhq-rN[-sq][-int8], hh-wWaA[-gptq] or NAME:field=value,... (NAME a lowbit method)")
    bits, group = wg[1:].split("g")
    return name, int(bits), int(group), None


def resolve_model(name: str) -> Path:
    path = Path(name) if Path(name).exists() else MODELS_DIR / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--models: {name!r} not found (run ../shared/bin/get-models, or pass a folder)")
    return path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples RssAnon every few ms: the peak of memory the process allocated, without the pages of
    the memory-mapped source checkpoint (VmHWM counts those, and a fp32 source is 2x a bf16 model)."""

    def __enter__(self):
        import threading

        self.peak = self.start = _rss_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_kib("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib("RssAnon"))


def run_cell(model_name: str, spec: str, args) -> dict:
    """Runs inside the per-cell process."""
    import tempfile

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit
    from lowbit import evaluate
    torch.manual_seed(0)
    path = resolve_model(model_name)
    method, bits, group, settings = parse_method(spec, args.smoothing)
    from lowbit import registry

    calibration = {"calibration": str(args.calib), "nsamples": args.nsamples, "seqlen": args.calib_seqlen}
    config = None
    if ":" in spec:
        cls = registry.method(method).config
        config = cls(**{**{k: v for k, v in calibration.items() if k in cls._fields}, **settings})
    elif method in ("quarot", "norot"):
        group = args.quarot_group
        config = registry.method("quarot").config(**settings, group_size=group, **calibration)
    elif method == "hh":
        group = args.quarot_group
        config = registry.method("householder").config(
            **settings, group_size=group, steps=args.hh_steps, calibration=str(args.calib), nsamples=args.hh_nsamples,
            seqlen=args.hh_seqlen, cali_bsz=2)
    elif settings:
        config = registry.method("arhq").config(**settings, **calibration)
    rss_before = _rss_kib("VmRSS")
    start = time.perf_counter()
    with AnonPeak() as anon:
        if method == "lowbit-hqq":
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16,
                quantization_config=registry.method("hqq").config(bits=bits, group_size=group))
        elif method == "norot":
            from lowbit import quarot

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
            quarot.quantize_model(model, config, rotate=False)
        elif config is not None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
            if method != "bf16":
                _swap_linears(model, method, bits, group)
    quant_s = time.perf_counter() - start
    peak_rss = _rss_kib("VmHWM")
    model.eval()
    bf16_bytes = _bf16_bytes(model, path)

    result = {"model": model_name, "method": method, "bits": bits, "group_size": group, "spec": spec,
              "config": config.to_dict() if config else None,
              "load_quantize_s": quant_s, "peak_rss_increase_bytes": (peak_rss - rss_before) * 1024,
              "peak_anon_rss_increase_bytes": (anon.peak - anon.start) * 1024,
              "bf16_model_bytes": bf16_bytes}
    if method == "hqq" and config is None:  # the `hqq` package baseline, not lowbit's `hqq:...` spec
        result["memory_bytes"], result["bits_per_weight"] = _hqq_sizes(model)
        result["checkpoint_bytes"] = None
    else:
        sizes = evaluate.weight_bytes(model)
        result["memory_bytes"] = sizes["memory_bytes"]
        result["bits_per_weight"] = sizes["bits_per_weight"] if method != "bf16" else 16.0
        result["checkpoint_bytes"] = None  # norot: an in-memory baseline, not a checkpoint
        if method != "norot":
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                result["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))

    tok = AutoTokenizer.from_pretrained(path)
    text = evaluate.wikitext2_test_text(str(args.ppl_data))
    ids = tok(text, return_tensors="pt").input_ids[0]
    result["ppl"] = evaluate.perplexity(model, ids, seqlen=args.seqlen, max_windows=args.max_windows,
                                        progress=False)
    result["speed"] = evaluate.decode_speed(model, new_tokens=args.new_tokens, repeats=args.repeats)
    if args.kv_context:
        result["kv_cache_bytes"] = evaluate.kv_cache_bytes(model, args.kv_context)
        result["kv_context"] = args.kv_context
    result["torch_threads"] = torch.get_num_threads()
    result["date"] = time.strftime("%Y-%m-%d")
    result["machine"] = _machine()
    result["versions"] = {"lowbit": lowbit.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__}
    return result


def _machine() -> str:
    """The CPU the cell ran on, as /proc/cpuinfo names it, and how many cores the process may use."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, {len(os.sched_getaffinity(0))} cores available"


def _bf16_bytes(model, path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    with torch.device("meta"):
        fp = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in fp.parameters()) * 2


def _swap_linears(model, method, bits, group):
    import torch
    from lowbit.modules import QuantLinear

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        parent_name, _, child = name.rpartition(".")
        if method == "rtn":
            new = QuantLinear.from_linear(module, bits, group, solver="rtn")
        else:
            from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

            new = HQQLinear(module, BaseQuantizeConfig(nbits=bits, group_size=group, axis=1),
                            compute_dtype=torch.bfloat16, device="cpu")
        setattr(model.get_submodule(parent_name), child, new)


def _hqq_sizes(model):
    """hqq keeps scales/zeros in a `meta` dict that get_memory_footprint() does not see: count them."""
    import torch
    from hqq.core.quantize import HQQLinear

    total = model.get_memory_footprint()
    packed = linear_numel = 0
    for m in model.modules():
        if isinstance(m, HQQLinear):
            linear_numel += m.in_features * m.out_features
            extra = sum(t.numel() * t.element_size() for t in m.meta.values() if isinstance(t, torch.Tensor))
            packed += m.W_q.numel() * m.W_q.element_size() + extra
            total += extra
    return total, 8 * packed / linear_numel


# ---------------------------------------------------------------- report

def _seconds(s) -> str:
    """A load+quantize time, or – where none was kept (a cell paused while it quantized: wall time would lie)."""
    return "–" if s is None else f"{s:.1f}"


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def table(results: dict, models=None) -> str:
    """The Markdown table of a result set's cells (`models`: only these), each row against its model's bf16."""
    rows = ["| model | method | bits/weight | ppl | decode tok/s (x bf16) | prefill tok/s | load+quantize s "
            "| checkpoint MiB (x bf16) | memory MiB | peak RSS increase: allocated / incl. mmapped source (x bf16 size) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    cells = [r for r in results.values() if models is None or r["model"] in models]
    kv = [r.get("kv_context") for r in cells if "kv_cache_bytes" in r]
    if kv:
        rows = [rows[0] + f" KV cache MiB at {'/'.join(map(str, sorted(set(kv))))} tokens (x bf16) |", rows[1] + "---|"]
    for model in sorted({r["model"] for r in cells}):
        mine = [r for r in cells if r["model"] == model]
        base = next((r for r in mine if r.get("method") == "bf16" and "error" not in r), None)
        for r in sorted(mine, key=lambda r: (r["spec"] != "bf16", r["spec"])):
            if "error" in r:
                rows.append(f"| {model} | {r['spec']} | failed: {r['error'][:80]} |||||||" + ("|" if kv else ""))
                continue
            dec = r["speed"]["decode_tok_s"]
            ratio = f" ({dec / base['speed']['decode_tok_s']:.2f}x)" if base else ""
            ck = r["checkpoint_bytes"]
            ck_ratio = f" ({ck / base['checkpoint_bytes']:.3f}x)" if base and ck else ""
            rss = r["peak_rss_increase_bytes"] / r["bf16_model_bytes"]
            anon = r["peak_anon_rss_increase_bytes"] / r["bf16_model_bytes"]
            row = (f"| {model} | {r['spec']} | {r['bits_per_weight']:.2f} | {r['ppl']['ppl']:.2f} | "
                   f"{dec:.1f}{ratio} | {r['speed']['prefill_tok_s']:.0f} | {_seconds(r['load_quantize_s'])} | "
                   f"{_mib(ck)}{ck_ratio} | {_mib(r['memory_bytes'])} | {anon:.2f}x / {rss:.2f}x |")
            if kv:
                kvb, kv0 = r.get("kv_cache_bytes"), (base or {}).get("kv_cache_bytes")
                row += f" {_mib(kvb)}{f' ({kvb / kv0:.3f}x)' if kvb and kv0 else ''} |"
            rows.append(row)
    return "\n".join(rows) + "\n\n" + protocol(cells) + "\n"


def protocol(cells) -> str:
    """How the cells were measured: the perplexity and speed protocols, when, and on what."""
    ok = [r for r in cells if "ppl" in r]
    if not ok:
        return ""
    parts = []
    for p in sorted({(r["ppl"]["windows"], r["ppl"]["seqlen"], r["ppl"]["tokens_scored"]) for r in ok}):
        parts.append(f"{p[0]} non-overlapping windows of {p[1]} tokens ({p[2]} tokens scored)")
    speeds = sorted({(r["speed"]["new_tokens"], r["speed"]["prompt_len"], r["speed"]["repeats"], r["torch_threads"])
                     for r in ok})
    dates = sorted({r.get("date", "not recorded") for r in ok})
    kept = all("lm_head" in (r.get("config") or {}).get("modules_to_not_convert", ["lm_head"]) for r in ok)
    head = ("lm_head in bf16 everywhere" if kept else
            "lm_head in bf16 except in the rows whose settings say modules_to_not_convert=[] (head quantized too)")
    machines = sorted({r.get("machine", "not recorded") for r in ok})
    return (f"Perplexity: WikiText-2 test (rows joined with \"\\n\\n\"), {'; '.join(parts)}. Speed: greedy decode at "
            f"batch 1, " + "; ".join(f"{n} new tokens after a {p}-token prompt, median of {k}, {t} CPU thread"
                                     f"{'s' if t > 1 else ''}" for n, p, k, t in speeds)
            + f". {head}. Measured: {', '.join(dates)}; machine: {'; '.join(machines)}.")


def write_report(results: dict, out: Path) -> None:
    (out / "results.md").write_text(table(results))
    _plots(results, out)


# which rows the README summary shows, per set, when they were measured on the benchmark models
SUMMARY = {"hqq": ["lowbit-hqq-w4g64", "lowbit-hqq-w3g64", "hqq-w4g64", "rtn-w4g64"],
           "quarot": ["quarot-w4a8kv8-rtn", "quarot-w4a8kv8-gptq", "quarot-w4a4kv4-gptq"],
           "arhq": ["arhq-r128", "svdquant-r128", "svdquant-r128-int8", "nvfp4-r0"],
           "householder": ["hh-w4a8-gptq", "hh-w4a4-gptq"]}
BENCHMARK_MODELS = ("smollm2-135m-perm", "qwen2.5-0.5b-perm")


def _replace_block(path: Path, name: str, body: str) -> None:
    start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no {start} ... {end} block to fill")
    head, _, rest = text.partition(start)
    path.write_text(f"{head}{start}\n{body.strip()}\n{end}{rest.partition(end)[2]}")


def report(results_dir: Path, docs: Path, readme: Path) -> None:
    """docs/results.md in full, each method page's block and the README summary, from results/*/results.json."""
    from lowbit.registry import METHOD_MODULES

    order = {name: i for i, name in enumerate(METHOD_MODULES)}
    files = sorted(results_dir.glob("*/results.json"), key=lambda p: (order.get(p.parent.name, len(order)), p))
    # export and speed have scripts of their own (their sections at the end)
    sets = {p.parent.name: json.loads(p.read_text()) for p in files if p.parent.name not in ("export", "speed")}
    rel = os.path.relpath(results_dir, docs)
    page = ["# Results", "",
            "Generated by `python scripts/benchmark.py --report` from `results/*/results.json`; do not edit by hand. "
            "Each table says when and on which machine its cells were measured. Benchmark models: "
            "`../shared/bin/get-models`. The `-perm` models have their channels permuted (the same function, "
            "weights off the 4-bit GGUF grid the originals were dequantized from): those tables are the "
            "comparison. The original models' tables are kept below them, labelled; their grid flatters "
            "plain 4-bit rounding.", ""]
    for name, results in sets.items():
        results = {k: v for k, v in results.items() if "spec" in v}
        write_report(results, results_dir / name)
        perm = sorted({r["model"] for r in results.values() if r["model"] in BENCHMARK_MODELS})
        original = sorted({r["model"] for r in results.values()} - set(perm))
        page += [f"## {name}", "", f"`results/{name}/results.json`", ""]
        if perm:
            page += ["### Permuted models", "", table(results, perm)]
        if original:
            page += ["### Original models (dequantized from 4-bit GGUF files; not comparable with the permuted ones)",
                     "",
                     table(results, original)]
        page += [f"![perplexity vs bits per weight]({rel}/{name}/ppl_vs_bpw.png)",
                 f"![decode tokens/s vs bits per weight]({rel}/{name}/decode_vs_bpw.png)", ""]
        method_page = docs / f"{name}.md"
        if method_page.exists():
            body = table(results, perm) if perm else "Not yet measured on the permuted models."
            body += (f"\nThe original models' rows: [results.md](results.md#{name})." if original else "")
            _replace_block(method_page, name, body)
    snr = sorted(results_dir.glob("arhq_snr/**/snr.md"))
    if snr and (docs / "arhq.md").exists():  # the per-layer tables scripts/arhq_snr.py writes
        _replace_block(docs / "arhq.md", "arhq_snr", "\n".join(
            f"`{p.relative_to(results_dir.parent)}`:\n\n{p.read_text().strip()}\n" for p in snr))
    export = results_dir / "export" / "results.json"
    if export.exists():  # measured by scripts/export_benchmark.py (llama.cpp, vLLM), also shown in deployment.md
        import export_benchmark

        page += ["## export", "", "`results/export/`, measured by `python scripts/export_benchmark.py` (llama.cpp) and "
                 "`scripts/vllm_check.py` (vLLM); see [deployment](deployment.md).", "",
                 export_benchmark.table(json.loads(export.read_text())), "", export_benchmark.vllm_table(export.parent)]
    speed = results_dir / "speed" / "results.json"
    if speed.exists():  # measured by scripts/speed_benchmark.py, also shown in speed.md
        import speed_benchmark

        page += ["## speed", "", "`results/speed/`, measured by `python scripts/speed_benchmark.py`; see "
                 "[speed](speed.md).", "", speed_benchmark.table(json.loads(speed.read_text()))]
    (docs / "results.md").write_text("\n".join(page))
    summary = ["| set | model | method | bits/weight | ppl (x bf16) | ppl windows | decode (x bf16) |",
               "|---|---|---|---|---|---|---|"]
    for name, specs in SUMMARY.items():
        results = sets.get(name, {})
        for model in BENCHMARK_MODELS:
            base = results.get(f"{model}|bf16")
            for spec in specs:
                r = results.get(f"{model}|{spec}")
                if not r or "error" in r or not base or "error" in base:
                    continue
                summary.append(f"| [{name}](docs/{name}.md) | {model} | {spec} | {r['bits_per_weight']:.2f} | "
                               f"{r['ppl']['ppl']:.2f} ({r['ppl']['ppl'] / base['ppl']['ppl']:.2f}x) | "
                               f"{r['ppl']['windows']}×{r['ppl']['seqlen']} | "
                               f"{r['speed']['decode_tok_s'] / base['speed']['decode_tok_s']:.2f}x |")
    _replace_block(readme, "summary", "\n".join(summary) + "\n\nbf16 rows, every other setting, the protocols and "
                   "the machine: [docs/results.md](docs/results.md). The decode column is eager, on the thread "
                   "count and code of each row's run; the current speed of every method, eager and compiled, "
                   "2 threads: [docs/speed.md](docs/speed.md).")


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results.values() if "error" not in r]
    models = sorted({r["model"] for r in ok})
    if not models:
        return
    colors_by_bits = ("lowbit-hqq", "hqq", "rtn")  # labelled by their wBgG suffix, the others by the rest of the spec
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:gray", "tab:olive", "tab:cyan",
               "tab:brown", "tab:pink"]
    colors = {"bf16": "black"}
    for method in sorted({r["method"] for r in ok} - {"bf16"}):
        colors[method] = palette[(len(colors) - 1) % len(palette)]
    for key, label, fname, log in (("ppl", "WikiText-2 perplexity", "ppl_vs_bpw.png", True),
                                   ("decode", "decode tokens/s (batch 1)", "decode_vs_bpw.png", False)):
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            for method, color in colors.items():
                pts = sorted((r["bits_per_weight"], r["ppl"]["ppl"] if key == "ppl" else r["speed"]["decode_tok_s"],
                              r["spec"]) for r in ok if r["model"] == model and r["method"] == method)
                if not pts:
                    continue
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=method)
                for x, y, spec in pts:
                    label_ = spec.partition("-")[2] if method != "bf16" and method not in colors_by_bits else \
                        spec.rpartition("-")[2]
                    ax.annotate(label_ if method != "bf16" else "bf16", (x, y), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            ax.set_title(model)
            ax.set_xlabel("bits per weight (quantized linears, incl. scales)")
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BENCHMARK_MODELS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "hqq", help="the result set's folder")
    p.add_argument("--ppl-data", type=Path, default=WIKITEXT)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib", type=Path, default=CALIBRATION, help="calibration text (QuaRot GPTQ/PCA, ARHQ)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="calibration window length")
    p.add_argument("--smoothing", type=float, default=0.5, help="migration strength of the -sq NVFP4 methods")
    p.add_argument("--hh-steps", type=int, default=50, help="Householder: Adam steps per layer")
    p.add_argument("--hh-nsamples", type=int, default=16, help="Householder: calibration windows")
    p.add_argument("--hh-seqlen", type=int, default=512, help="Householder: calibration window length")
    p.add_argument("--quarot-group", type=int, default=64, help="QuaRot weight group size (-1: per channel)")
    p.add_argument("--kv-context", type=int, default=0, help="also measure the KV cache bytes after a prefill "
                   "of this many tokens (0: skip)")
    p.add_argument("--redo", action="store_true", help="recompute cells already in results.json")
    p.add_argument("--report", action="store_true", help="run nothing: rebuild docs/results.md, the tables in "
                   "docs/<set>.md and the README summary from results/*/results.json")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.cell:
        model, spec = json.loads(args.cell)
        print(json.dumps(run_cell(model, spec, args)))
        return 0
    if importlib.util.find_spec("matplotlib") is None:  # the plots, after every cell has run
        raise SystemExit("the report's plots need matplotlib: pip install '.[bench]'")
    if args.report:
        report(ROOT / "results", ROOT / "docs", ROOT / "README.md")
        print(f"wrote {ROOT / 'docs' / 'results.md'}, the docs pages' tables and the README summary")
        return 0

    args.methods = {"QUAROT": QUAROT_METHODS, "ARHQ": ARHQ_METHODS, "HH": HH_METHODS}.get(" ".join(args.methods),
                                                                                        args.methods)
    for m in args.methods:
        parse_method(m)
    for m in args.models:
        resolve_model(m)
    if not args.ppl_data.exists():
        raise SystemExit(f"--ppl-data {args.ppl_data} does not exist")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    from tqdm import tqdm

    todo = [(m, s) for m in args.models for s in args.methods
            if args.redo or "error" in results.get(f"{m}|{s}", {"error": "todo"})]
    passthrough = ["--ppl-data", str(args.ppl_data), "--seqlen", str(args.seqlen), "--max-windows",
                   str(args.max_windows), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                   "--calib", str(args.calib), "--nsamples", str(args.nsamples), "--calib-seqlen",
                   str(args.calib_seqlen), "--quarot-group", str(args.quarot_group), "--kv-context",
                   str(args.kv_context), "--smoothing", str(args.smoothing), "--hh-steps", str(args.hh_steps),
                   "--hh-nsamples", str(args.hh_nsamples), "--hh-seqlen", str(args.hh_seqlen)]
    for model, spec in tqdm(todo, desc="benchmark"):
        proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps([model, spec]), *passthrough],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            results[f"{model}|{spec}"] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            results[f"{model}|{spec}"] = {"model": model, "spec": spec, "method": parse_method(spec, args.smoothing)[0],
                                          "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "crashed"}
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        tqdm.write(f"{model} {spec}: " + ("failed: " + results[f'{model}|{spec}']['error']
                                          if "error" in results[f"{model}|{spec}"] else "done"))
    write_report(results, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
