#!/usr/bin/env python
"""Per layer and projection: the output SNR (dB) of NVFP4 W4A4 layers on held-out calibration tokens,
for rank 0, SVDQuant and ARHQ at each --ranks, with and without smoothing.

    python scripts/arhq_snr.py --model smollm2-135m --out results/arhq_snr

Every candidate sees the fp model's inputs (no error propagation between layers), so each cell is the
quality of that one layer's decomposition. SNR = 10·log10(‖Y‖² / ‖Y − Ŷ‖²) with Y = X·Wᵀ in float32 and
Ŷ the Nvfp4Linear's output (input rounded to NVFP4 per token, residual NVFP4, branch in float32).
Smoothing uses one scale per shared input (q/k/v, gate/up), as the quantizer folds it. Projections
whose input width is not a multiple of 16 are skipped (they stay in the compute dtype).
Writes OUT/snr.json, OUT/snr.md and OUT/snr.png.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

MODELS_DIR = Path(os.environ.get("LOWBIT_MODELS", Path.home() / ".cache" / "lowbit-models"))
CALIBRATION = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-tokens" / "valid.txt"
GROUPS = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "mlp": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def candidates(ranks):
    """(label, decomposition or None, rank) for each low-rank choice."""
    return [("rank0", None, 0)] + [(f"{d}-r{r}", d, r) for r in ranks for d in ("svdquant", "arhq")]


def snr_db(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return 10 * math.log10(y.pow(2).sum().item() / max((y - y_hat).pow(2).sum().item(), 1e-30))


@torch.no_grad()
def layer_snr(layer, calib, held, ranks, alphas) -> dict:
    """{(projection, smoothing, candidate): SNR dB} for one decoder layer; `calib`/`held` map a group's
    first projection name to its inputs [tokens, in] (float32)."""
    from lowbit import arhq, nvfp4
    from lowbit.modules import Nvfp4Linear

    out = {}
    for group, projections in GROUPS.items():
        linears = [layer.get_submodule(p) for p in projections]
        xc, xh = calib[projections[0]], held[projections[0]]
        if xc.shape[1] % nvfp4.BLOCK_SIZE:  # such layers stay in the compute dtype (see lowbit.arhq)
            continue
        for alpha in alphas:
            s = (arhq.smoothing_scales(xc.abs().amax(0), [m.weight for m in linears], alpha)
                 if alpha is not None else torch.ones(xc.shape[1]))
            roots = arhq.hessian_roots(arhq.activation_residual_hessian(xc / s))
            for proj, linear in zip(projections, linears):
                w = linear.weight.float()
                y = xh @ w.T
                for label, decomposition, rank in candidates(ranks):
                    if rank >= min(w.shape):
                        continue
                    ws = w * s
                    branch = (arhq.low_rank_branch(ws, rank, roots if decomposition == "arhq" else None)
                              if rank else (None, None))
                    module = Nvfp4Linear.from_weight(ws, None, *branch, smooth_scale=None if alpha is None else s,
                                                     dtype=torch.float32)
                    out[proj.rpartition(".")[2], "none" if alpha is None else f"sq{alpha:g}", label] = \
                        snr_db(y, module(xh))
    return out


def collect_inputs(layer, inputs):
    from lowbit import calibration

    firsts = {p[0]: layer.get_submodule(p[0]) for p in GROUPS.values()}
    xs, _ = calibration.input_statistics(layer, inputs, firsts, lambda x: x.float(), lambda a, b: torch.cat([a, b]))
    return xs


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tqdm.auto import tqdm

    from lowbit import calibration

    path = Path(args.model) if Path(args.model).exists() else MODELS_DIR / args.model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    ids = calibration.calibration_ids(tok, str(args.calib), args.nsamples + args.holdout, args.seqlen, args.seed)
    calib_ids, held_ids = ids[:args.nsamples], ids[args.nsamples:]
    alphas = [None, args.smoothing]
    cells = []
    walk = zip(calibration.layer_by_layer(model, calib_ids, 2, progress=False),
               calibration.layer_by_layer(model, held_ids, 2, progress=False))
    for (index, layer, calib_inputs), (_, _, held_inputs) in tqdm(walk, total=model.config.num_hidden_layers,
                                                                  desc="layers", disable=args.quiet):
        snr = layer_snr(layer, collect_inputs(layer, calib_inputs), collect_inputs(layer, held_inputs),
                        args.ranks, alphas)
        cells += [{"layer": index, "projection": p, "smoothing": sm, "candidate": c, "snr_db": v}
                  for (p, sm, c), v in snr.items()]
    return {"model": str(args.model), "calibration": str(args.calib), "nsamples": args.nsamples,
            "holdout": args.holdout, "seqlen": args.seqlen, "ranks": args.ranks, "smoothing": args.smoothing,
            "cells": cells}


def summary(res: dict) -> list[dict]:
    """Mean SNR per (smoothing, candidate), overall and per projection."""
    rows = {}
    for c in res["cells"]:
        rows.setdefault((c["smoothing"], c["candidate"]), []).append(c)
    out = []
    for (sm, cand), cells in rows.items():
        per_proj = {}
        for c in cells:
            per_proj.setdefault(c["projection"], []).append(c["snr_db"])
        out.append({"smoothing": sm, "candidate": cand, "mean_snr_db": sum(c["snr_db"] for c in cells) / len(cells),
                    "per_projection": {p: sum(v) / len(v) for p, v in per_proj.items()}})
    return out


def markdown(res: dict) -> str:
    rows = summary(res)
    projs = list(rows[0]["per_projection"])
    lines = ["| smoothing | decomposition | mean SNR dB | " + " | ".join(projs) + " |",
             "|---|---|---|" + "---|" * len(projs)]
    for r in rows:
        lines.append(f"| {r['smoothing']} | {r['candidate']} | {r['mean_snr_db']:.2f} | "
                     + " | ".join(f"{r['per_projection'][p]:.2f}" if p in r["per_projection"] else "n/a"
                                  for p in projs) + " |")
    wins = {}
    for r in res["ranks"]:
        pairs = {}
        for c in res["cells"]:
            if c["candidate"] in (f"svdquant-r{r}", f"arhq-r{r}"):
                pairs.setdefault((c["layer"], c["projection"], c["smoothing"]), {})[c["candidate"]] = c["snr_db"]
        wins[r] = (sum(p[f"arhq-r{r}"] > p[f"svdquant-r{r}"] for p in pairs.values() if len(p) == 2), len(pairs))
    lines.append("")
    lines.append(f"{res['model']}: held-out {res['holdout']}×{res['seqlen']} tokens, statistics from "
                 f"{res['nsamples']}×{res['seqlen']} calibration tokens ({Path(res['calibration']).name}). "
                 + "; ".join(f"ARHQ above SVDQuant in {w}/{n} layer-projections at rank {r}"
                             for r, (w, n) in wins.items()) + "."
                 + (" n/a: the rank is not below min(in, out) for that projection." if any(
                     len(r["per_projection"]) < len(projs) for r in rows) else ""))
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    projs = sorted({c["projection"] for c in res["cells"]})
    fig, axes = plt.subplots(2, math.ceil(len(projs) / 2), figsize=(4.2 * math.ceil(len(projs) / 2), 7), squeeze=False)
    for ax, proj in zip(axes.flat, projs):
        series = {}
        for c in res["cells"]:
            if c["projection"] == proj:
                series.setdefault(f"{c['candidate']} {c['smoothing']}", []).append((c["layer"], c["snr_db"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1,
                    ls="--" if "none" not in label else "-")
        ax.set_title(proj)
        ax.set_xlabel("layer")
        ax.set_ylabel("output SNR (dB)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(projs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="folder, or a name under $LOWBIT_MODELS")
    p.add_argument("--calib", type=Path, default=CALIBRATION, help="calibration text file")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows for the statistics")
    p.add_argument("--holdout", type=int, default=4, help="further windows the SNR is measured on")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    p.add_argument("--smoothing", type=float, default=0.5, help="migration strength alpha of the smoothed rows")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--out", type=Path, default=Path("results/arhq_snr"))
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.calib.exists():
        raise SystemExit(f"--calib {args.calib} does not exist")
    if not 0 <= args.smoothing <= 1 or min(args.ranks) < 1 or args.nsamples < 1 or args.holdout < 1:
        raise SystemExit("--smoothing must be in [0, 1]; --ranks, --nsamples and --holdout at least 1")
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    res["summary"] = summary(res)
    (args.out / "snr.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (args.out / "snr.md").write_text(md)
    plot(res, args.out / "snr.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
