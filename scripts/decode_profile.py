"""Where a decode step's time goes: one `generate` profiled per method, its time per token split by kind.

    python scripts/decode_profile.py --model smollm2-135m-perm --methods bf16 hqq-w4g64-head --threads 2

Each method (the names and checkpoints of scripts/speed_benchmark.py) runs 64 greedy tokens after a
16-token prompt under torch.profiler, compiled (static cache, as the speed table's compiled column)
unless --eager, after an unprofiled warm-up run (the compile). Self CPU time of the profiled ops is
grouped into:
- linear kernels: the integer and float products (`_weight_int4pack_mm_for_cpu`, `_int_mm`, mm, ...);
- attention: the attention kernel and the ops inductor fused into its inputs (the static cache's
  keys/values read for it); with `--attention eager` its matmuls count as linear kernels and its softmax
  as other kernels;
- other kernels: norms, rotary embedding, activation quantization, everything else inside the model;
- graph wrapper: the compiled graph's own Python code that launches its kernels;
- guards: Dynamo checking, before each step, that the compiled graph still applies;
- generate and Python: the rest of the wall time (generate's per-step work, eager module dispatch).
The profiler adds a little time per op, so the shares matter more than the absolute figures.
"""
import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_benchmark as sb  # noqa: E402  (same methods, checkpoints and calibration)

LINEAR_OPS = ("aten::_weight_int4pack_mm_for_cpu", "aten::_int_mm", "aten::_weight_int8pack_mm", "aten::mm",
              "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "mkldnn::_linear_pointwise",
              "onednn::qlinear_pointwise", "lowbit::onednn_int8_mm", "lowbit_nvfp4::mm")
KINDS = ("linear kernels", "attention", "other kernels", "graph wrapper", "guards", "generate and Python")


def kind_of(name: str) -> str:
    if name in LINEAR_OPS:
        return "linear kernels"
    if "scaled_dot_product" in name:
        return "attention"
    if name.startswith("## Call CompiledFxGraph"):
        return "graph wrapper"
    if name == "TorchDynamo Cache Lookup":
        return "guards"
    return "other kernels"


# profiler ranges that only enclose others (their self time is bookkeeping, counted as Python)
_ENCLOSING = ("Torch-Compiled Region", "Pregraph bytecode", "AOTDispatcher Runtime Wrapper Prologue")


def profile_method(model_name: str, method: str, args) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM
    from transformers.generation import CompileConfig

    import torch._inductor.config as inductor_config
    inductor_config.cpp.enable_kernel_profile = True  # inductor's kernels appear by name, not as one call

    model = AutoModelForCausalLM.from_pretrained(sb.checkpoint(model_name, method, args), dtype=torch.bfloat16,
                                                 attn_implementation=args.attention).eval()
    if method.endswith("-int8"):
        from lowbit import arhq

        arhq.use_int8_runtime(model)
    kw = {}
    if not args.eager:
        config = CompileConfig()
        config._compile_all_devices = True
        model.generation_config.compile_config = config
        kw["cache_implementation"] = "static"
    prompt = torch.randint(3, model.config.get_text_config().vocab_size, (1, 16),
                           generator=torch.Generator().manual_seed(1))
    kw.update(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        model.generate(prompt, **kw)  # warm-up (the compile)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            model.generate(prompt, **kw)
            wall = time.perf_counter() - start
    per_token = collections.Counter()
    for event in prof.key_averages():
        if not event.key.startswith(_ENCLOSING):
            per_token[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / args.new_tokens
    per_token["generate and Python"] = max(0.0, wall * 1e3 / args.new_tokens - sum(per_token.values()))
    return per_token


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-perm")
    p.add_argument("--methods", nargs="+", default=["bf16", "hqq-w4g64-head"], choices=sb.METHODS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="profile eager decode instead of compiled")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers' attention implementation (eager: matmuls and a softmax, fused when compiled)")
    p.add_argument("--calib", default=str(sb.CALIBRATION), help="calibration text (Householder's PCA)")
    p.add_argument("--checkpoints", default=str(sb.CHECKPOINTS), help="where the methods' checkpoints are made once")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.checkpoints).mkdir(parents=True, exist_ok=True)
    rows = {m: profile_method(args.model, m, args) for m in args.methods}
    print(f"{args.model}, {'eager' if args.eager else 'compiled'} decode, {args.threads} threads: "
          f"ms per token (share)")
    print("| kind | " + " | ".join(args.methods) + " |")
    print("|---|" + "---|" * len(args.methods))
    for kind in KINDS + ("total",):
        cells = []
        for m in args.methods:
            total = sum(rows[m].values())
            value = total if kind == "total" else rows[m][kind]
            cells.append(f"{value:.2f} ({value / total:.0%})")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
