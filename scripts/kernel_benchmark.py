"""The linear kernels alone, on one model's layer shapes: what a decode step's products cost per kernel.

    python scripts/kernel_benchmark.py --model smollm2-135m-perm --threads 2
    python scripts/kernel_benchmark.py --model qwen2.5-0.5b-perm --rows 1 512

For each distinct linear shape of the model (q/o, k/v, gate/up, down, the head) and each row count, the
time of one product on random data, median of --repeats calls after a warm-up, and how fast each
kernel reads its weight (GB/s of the weight's bytes):
- bf16: `F.linear` on a bf16 weight (the unquantized model);
- int4: `_weight_int4pack_mm_for_cpu` at group 64 (HQQ's layers), 0.5 byte per weight;
- int4 dequant: the same weight dequantized from that layout, then a bf16 GEMM: what HQQ's layers run
  on more than `kernels.INT4_CPU_MAX_ROWS` rows;
- int8 w-only: `_weight_int8pack_mm` (bf16 activations, int8 weight, one scale per channel);
- int8 oneDNN / int8 _int_mm: the int8 × int8 product of QuaRot's and Householder's layers
  (`lowbit.kernels`), the input's int8 codes given (their quantization is not timed); oneDNN's only on
  a CPU with AMX, where lowbit uses it (`kernels.onednn_int8_fast`: elsewhere oneDNN runs signed codes
  on its reference kernel, too slow to time on a prompt);
- int8 oneDNN u8: oneDNN's product on the same codes made unsigned (+128, zero point 128), the form
  its kernels for CPUs without AMX take;
- nvfp4: lowbit's NVFP4 CPU kernel (ARHQ's and SVDQuant's simulated layers up to
  `kernels.NVFP4_MM_MAX_ROWS` rows), the input's NVFP4 rounding included, 4.5 bits per weight read from
  the packed codes; nvfp4 dequant: the input rounded and the weight dequantized to bf16 by the kernel,
  then a bf16 GEMM (what those layers run on more rows); nvfp4 lookup: both by torch ops instead
  (`nvfp4.dequantize_lookup`, what runs where the kernel cannot be built).
A decode step at batch 1 is the 1-row case: it reads every weight once, so a kernel that does not
reach the memory's bandwidth there is what a quantized model's decode waits on.

A second table times what runs around the int8 products, per input width (the hidden size, read by
q/k/v/o and gate/up; the MLP width, read by down_proj), on bf16 activations:
- hadamard: `hadamard.transform_activations` as lowbit runs it (`hadamard.activation_dtype`: bfloat16 for
  a prompt on a CPU with native bfloat16 GEMMs), and "hadamard f32" the same in float32;
- householder, householder f32: a 16-reflection `HouseholderRotation` (reflections, then the Hadamard),
  likewise;
- act int8, act int4: per-token activation quantization, at 4 bits with its clipping search.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_benchmark as sb  # noqa: E402  (the same model folders)

GROUP = 64


def layer_shapes(model: str) -> dict:
    """name -> (out_features, in_features), from the model's config.json."""
    c = json.loads((sb.MODELS / model / "config.json").read_text())
    d, ff, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads) * c.get("head_dim", d // heads)
    return {"q/o": (d, d), "k/v": (kv, d), "gate/up": (ff, d), "down": (d, ff), "head": (c["vocab_size"], d)}


def kernels(n: int, k: int, rows: int) -> dict:
    """kernel name -> (a call, the weight's bytes)."""
    from lowbit import kernels as lk
    from lowbit import nvfp4
    from lowbit.quantize import dequantize

    x = torch.randn(rows, k, dtype=torch.bfloat16)
    w_bf16 = torch.randn(n, k, dtype=torch.bfloat16)
    int4 = lk.to_int4_cpu_layout(torch.randint(0, 16, (n, k), dtype=torch.uint8))
    scale_offset = torch.rand(k // GROUP, n, 2, dtype=torch.bfloat16)
    w_int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    channel_scale = torch.rand(n, dtype=torch.bfloat16)
    codes = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
    out = {
        "bf16": (lambda: torch.nn.functional.linear(x, w_bf16), 2 * n * k),
        "int4": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, GROUP, scale_offset), n * k // 2),
        "int4 dequant": (lambda: torch.nn.functional.linear(x, dequantize(lk.from_int4_cpu_layout(int4, n, k),
                                                                          scale_offset, 4, k)), n * k // 2),
        "int8 w-only": (lambda: torch.ops.aten._weight_int8pack_mm(x, w_int8, channel_scale), n * k),
        "int8 _int_mm": (lambda: torch._int_mm(codes, w_int8.t()), n * k),
    }
    if lk.nvfp4_cpu_kernel():
        fp4, block_scales, ts = nvfp4.quantize(w_bf16.float())
        fp4_bytes = n * k // 2 + n * k // nvfp4.BLOCK_SIZE
        out["nvfp4"] = (lambda: torch.ops.lowbit_nvfp4.mm(x, fp4, block_scales, ts), fp4_bytes)
        out["nvfp4 dequant"] = (lambda: torch.nn.functional.linear(nvfp4.fake_quantize_per_token(x), (
            torch.ops.lowbit_nvfp4.dequantize(fp4, block_scales, ts, torch.bfloat16))), fp4_bytes)
        out["nvfp4 lookup"] = (lambda: torch.nn.functional.linear(nvfp4.fake_quantize_per_token_torch(x), (
            nvfp4.dequantize_lookup(fp4, block_scales, ts, torch.bfloat16))), fp4_bytes)
    if lk.onednn_int8_available():
        packed = torch.ops.onednn.qlinear_prepack(w_int8, None)
        if lk.onednn_int8_fast():
            out["int8 oneDNN"] = (lambda: lk._onednn_int8_mm(codes, packed, n), n * k)
        unsigned = codes.view(torch.uint8) ^ 128  # the two's complement byte with its sign bit flipped: code + 128
        ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)
        out["int8 oneDNN u8"] = (lambda: torch.ops.onednn.qlinear_pointwise.default(
            unsigned, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""), n * k)
    return out


def transforms(k: int, rows: int) -> dict:
    """name -> a call, for activations [rows, k] in bf16."""
    from lowbit.hadamard import transform_activations
    from lowbit.modules import HouseholderRotation
    from lowbit.quantize import quantize_activations

    x = torch.randn(rows, k, dtype=torch.bfloat16)
    rotation = HouseholderRotation(16, k)
    rotation.householder_vectors.normal_()
    return {
        "hadamard": lambda: transform_activations(x),
        "hadamard f32": lambda: transform_activations(x.float()).bfloat16(),
        "householder": lambda: rotation(x),
        "householder f32": lambda: rotation(x.float()).bfloat16(),
        "act int8": lambda: quantize_activations(x, 8, 1.0),
        "act int4": lambda: quantize_activations(x, 4, None),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-perm")
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows per product (1: a decode step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.model}, {sb._machine(args.threads)}: microseconds per product "
          f"(GB/s of weight read; x bf16)")
    shapes = layer_shapes(args.model)
    names = None
    for rows in args.rows:
        for layer, (n, k) in shapes.items():
            calls = kernels(n, k, rows)
            if names is None:
                names = list(calls)
                print("| rows | layer | N x K | " + " | ".join(names) + " |")
                print("|---|---|---|" + "---|" * len(names))
            with torch.no_grad():
                seconds = {name: sb.timed(fn, args.repeats) for name, (fn, _) in calls.items()}
            cells = [f"{seconds[m] * 1e6:.0f} ({calls[m][1] / seconds[m] / 1e9:.1f}; {seconds['bf16'] / seconds[m]:.2f}x)"
                     for m in names]
            print(f"| {rows} | {layer} | {n} x {k} | " + " | ".join(cells) + " |")
    print("\nAround the products: microseconds per call (x the float32 transform's speed)")
    widths = {"hidden": shapes["q/o"][1], "mlp": shapes["down"][1]}
    names = None
    for rows in args.rows:
        for width, k in widths.items():
            calls = transforms(k, rows)
            if names is None:
                names = list(calls)
                print("| rows | input | width | " + " | ".join(names) + " |")
                print("|---|---|---|" + "---|" * len(names))
            with torch.no_grad():
                seconds = {name: sb.timed(fn, args.repeats) for name, fn in calls.items()}
            cells = [f"{seconds[m] * 1e6:.0f}" + (f" ({seconds[m + ' f32'] / seconds[m]:.2f}x)" if m + " f32" in calls
                                                  else "") for m in names]
            print(f"| {rows} | {width} | {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
