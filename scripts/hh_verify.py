#!/usr/bin/env python
"""Verify Householder optimization layer by layer: the error of each decoder layer's output against the fp
layer (`householder.output_error`, each token's squared error relative to its own output, averaged) with
no rotation, after the PCA init and after optimization; no NaN anywhere.

    python scripts/hh_verify.py --model-path ~/.cache/lowbit-models/smollm2-135m --nsamples 8 --cali-bsz 2 \\
        --max-seq-len 512 --steps 50 --lr 1e-3 --num-layers 2 --device cpu

Prints a table (and writes it with --out), exits 1 if optimization made a layer worse than its PCA init
(the quantizer then keeps the init: the row says so) or anything is NaN. Layers after the first
--num-layers are not run. Calibration: --calib (default: WikiText-2 validation from ../shared when
present), else text sampled from the model, as the quantizer does.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

CALIBRATION = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-tokens" / "valid.txt"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--cali-bsz", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--reflections", type=int, help="k per rotation (default: the config's)")
    p.add_argument("--pca-variance", type=float, help="instead of --reflections: k from each rotation's variance")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib", help="calibration text file")
    p.add_argument("--out", type=Path, help="also write the rows as JSON and the table as Markdown here")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from lowbit import calibration, householder, integration

    calib = args.calib or (str(CALIBRATION) if CALIBRATION.exists() else None)
    try:
        config = householder.HouseholderConfig(
            bits=args.w_bits, act_bits=args.a_bits, group_size=args.group_size, steps=args.steps, lr=args.lr,
            nsamples=args.nsamples, cali_bsz=args.cali_bsz, seqlen=args.max_seq_len, num_layers=args.num_layers,
            calibration=calib,
            **{k: v for k, v in (("reflections", args.reflections), ("pca_variance", args.pca_variance))
               if v is not None})
    except ValueError as err:
        print(f"hh_verify: error: {err}", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).to(args.device)
    names = integration.linears_to_quantize(model, config.modules_to_not_convert)
    householder.check_model(model, config, names)
    for prm in model.parameters():
        prm.requires_grad_(False)
    ids, source = householder.calibration_tokens(model, config)
    source = source or calib
    rows = []
    for index, layer, inputs in calibration.layer_by_layer(model, ids, config.cali_bsz, progress=False):
        if index >= args.num_layers:
            break
        row = householder.quantize_layer(layer, index, inputs, names, config, progress=True)
        rows.append(row)
        print(f"layer {index}: none {row['error_none']:.4g}  pca {row['error_init']:.4g}  opt {row['error_opt']:.4g}  "
              f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)

    lines = ["| layer | reflections (qkv / o / gate_up / down) | error no rotation | error PCA init | error optimized "
             "| opt / none | s | status |", "|---|---|---|---|---|---|---|---|"]
    bad = False
    for r in rows:
        ks = r["reflections"]
        nan = not all(math.isfinite(r[k]) for k in ("error_none", "error_init", "error_opt"))
        status = "NaN" if nan else ("worse than PCA init: kept the init" if r["fell_back"] else "ok")
        bad |= nan or r["fell_back"]
        lines.append(f"| {r['layer']} | {ks['qkv']} / {ks['o']} / {ks['gate_up']} / {ks['down']} | {r['error_none']:.4g} "
                     f"| {r['error_init']:.4g} | {r['error_opt']:.4g} | {r['error_opt'] / r['error_none']:.3f} "
                     f"| {r['seconds']:.0f} | {status} |")
    lines.append(f"\n{args.model_path}: W{args.w_bits}A{args.a_bits} g{args.group_size}, {args.nsamples}×"
                 f"{args.max_seq_len} calibration tokens ({source}), {args.steps} Adam steps at lr {args.lr}, "
                 f"batch {args.cali_bsz}, device {args.device}.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hh_verify.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                             "calibration": source, "rows": rows}, indent=1))
        (args.out / "hh_verify.md").write_text(table + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
