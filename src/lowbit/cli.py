"""`lowbit` command line: `lowbit quantize ...`, `lowbit eval ...`."""
import argparse
import logging
import os
import shlex
import sys

METHOD_CHOICES = ("hqq", "quarot", "arhq", "householder")
# flags that only some methods read: attribute -> (flag, the methods it applies to)
METHOD_FLAGS = {
    "bits": ("--bits", ("hqq", "quarot", "householder")),
    "group_size": ("--group-size", ("hqq", "quarot", "householder")),
    "acts_bits": ("--acts-bits", ("quarot", "householder")), "kv_bits": ("--kv-bits", ("quarot",)),
    "rotation": ("--rotation", ("quarot",)), "weight_quantizer": ("--weight-quantizer", ("quarot", "householder")),
    "rank": ("--rank", ("arhq",)), "decomposition": ("--decomposition", ("arhq",)),
    "smoothing": ("--smoothing", ("arhq",)),
    "reflections": ("--reflections", ("householder",)), "pca_variance": ("--pca-variance", ("householder",)),
    "steps": ("--steps", ("householder",)), "lr": ("--lr", ("householder",)),
    "cali_bsz": ("--cali-bsz", ("householder",)), "num_layers": ("--num-layers", ("householder",)),
    "calib": ("--calib", ("quarot", "arhq", "householder")),
    "nsamples": ("--nsamples", ("quarot", "arhq", "householder")),
    "calib_seqlen": ("--calib-seqlen", ("quarot", "arhq", "householder")),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit quantization for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model into a folder that from_pretrained reloads natively")
    q.add_argument("--method", required=True, choices=METHOD_CHOICES)
    q.add_argument("--src", required=True, help="local model folder or Hugging Face Hub repo id")
    q.add_argument("--dst", help="output folder (default: ./<src name>-<tag>, e.g. ./model-HQQ_w4_g64_headfp16)")
    q.add_argument("--bits", type=int, help="hqq, quarot: weight bits: 2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, help="hqq, quarot: input channels per scale/offset (default 64)")
    q.add_argument("--keep-lm-head-fp16", action="store_true",
                   help="hqq: keep the output head unquantized (a head tied to the embeddings always is); "
                        "the other methods always keep it")
    qr = q.add_argument_group("quarot")
    qr.add_argument("--acts-bits", type=int, help="activation bits: 4, 8 or 16 (off) (default 4)")
    qr.add_argument("--kv-bits", type=int, help="KV cache bits: 4, 8 or 16 (off) (default 4)")
    qr.add_argument("--rotation", help="hadamard (default) or pca (needs --calib)")
    qr.add_argument("--weight-quantizer", help="rtn or gptq. quarot: rtn (default, clipping search) or gptq (needs "
                    "--calib); householder: gptq (default) or rtn, both on the learned clipping grid")
    qa = q.add_argument_group("arhq")
    qa.add_argument("--rank", type=int, help="rank of the low-rank branch, 0 = plain NVFP4 (default 128)")
    qa.add_argument("--decomposition", help="arhq (default, needs --calib) or svdquant")
    qa.add_argument("--smoothing", type=float, help="SmoothQuant migration strength alpha in [0, 1] (needs --calib)")
    qh = q.add_argument_group("householder (also --bits, --acts-bits, --group-size, --weight-quantizer)")
    qh.add_argument("--reflections", type=int, help="reflections per rotation (default: from --pca-variance)")
    qh.add_argument("--pca-variance", type=float, help="share of variance the PCA init covers (default 0.95)")
    qh.add_argument("--steps", type=int, help="Adam steps per decoder layer (default 100)")
    qh.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    qh.add_argument("--cali-bsz", type=int, help="calibration windows per step (default 4)")
    qh.add_argument("--num-layers", type=int, help="optimize only the first N decoder layers")
    qc = q.add_argument_group("calibration (quarot, arhq, householder)")
    qc.add_argument("--calib", help="calibration text file (or a datasets name when the Hub is reachable)")
    qc.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    qc.add_argument("--calib-seqlen", type=int, help="tokens per calibration window (default 2048; householder 512)")
    q.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="compute dtype of scales, offsets and unquantized layers (default bfloat16)")
    q.add_argument("--seed", type=int, default=13)
    q.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")

    e = sub.add_parser("eval", help="perplexity, speed and size of any model transformers loads")
    e.add_argument("--model", required=True, help="local model folder or Hub repo id")
    e.add_argument("--tasks", default="ppl,speed,size", help="comma-separated: ppl, speed, size, lm-eval:<task>")
    e.add_argument("--ppl-data", default="wikitext2",
                   help="'wikitext2' (datasets, else the local copy) or a text file / JSON list of rows")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--stride", type=int, help="HQQ's protocol: overlapping windows every N tokens")
    e.add_argument("--max-windows", type=int)
    e.add_argument("--batch-size", type=int, default=1, help="speed is also measured at this batch size")
    e.add_argument("--dtype", default="auto", help="dtype to load in (default: the checkpoint's)")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def _config(args):
    extra = [flag for attr, (flag, methods) in METHOD_FLAGS.items()
             if getattr(args, attr) is not None and args.method not in methods]
    if extra:
        raise ValueError(f"{', '.join(extra)} cannot be used with --method {args.method}")
    calibration = {"calibration": args.calib, "nsamples": args.nsamples, "seqlen": args.calib_seqlen}
    bits = 4 if args.bits is None else args.bits
    group_size = 64 if args.group_size is None else args.group_size
    if args.method == "quarot":
        from .quarot import QuaRotConfig

        given = {"a_bits": args.acts_bits, "kv_bits": args.kv_bits, "rotation_method": args.rotation,
                 "weight_quantizer": args.weight_quantizer, **calibration}
        return QuaRotConfig(w_bits=bits, group_size=group_size, seed=args.seed,
                            **{k: v for k, v in given.items() if v is not None})
    if args.method == "arhq":
        from .arhq import ArhqConfig

        given = {"rank": args.rank, "decomposition": args.decomposition, "smoothing": args.smoothing, **calibration}
        return ArhqConfig(seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    if args.method == "householder":
        from .householder import HouseholderConfig

        given = {"a_bits": args.acts_bits, "weight_quantizer": args.weight_quantizer,
                 "reflections": args.reflections, "pca_variance": args.pca_variance,
                 "steps": args.steps, "lr": args.lr, "cali_bsz": args.cali_bsz, "num_layers": args.num_layers,
                 "calibration": args.calib, "nsamples": args.nsamples, "max_seq_len": args.calib_seqlen}
        return HouseholderConfig(w_bits=bits, group_size=group_size, seed=args.seed,
                                 **{k: v for k, v in given.items() if v is not None})
    from .hqq import HqqConfig

    keep_head = ["lm_head"] if args.keep_lm_head_fp16 else []
    return HqqConfig(bits=bits, group_size=group_size, modules_to_not_convert=keep_head)


def quantize_command(args) -> int:
    import torch

    from . import export

    config = _config(args)  # validates every setting before any work
    export.check_source(args.src)  # before reading its config for the naming tag
    head_kept = "lm_head" in (config.modules_to_not_convert or []) or export.head_is_tied(args.src)
    dst = args.dst or os.path.join(
        ".", f"{os.path.basename(os.path.normpath(args.src))}-{export.naming_tag(config, head_kept)}")
    meta = export.quantize_to_folder(args.src, dst, config, dtype=getattr(torch, args.dtype),
                                     overwrite=args.overwrite, seed=args.seed,
                                     command="lowbit " + shlex.join(sys.argv[1:]))
    if not args.quiet:
        print(export.summary(meta, dst))
    return 0


def eval_command(args) -> int:
    import json

    from . import evaluate

    tasks = evaluate.parse_tasks(args.tasks)
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.stride is not None and not 0 < args.stride <= args.seqlen:
        raise ValueError(f"--stride must be in 1..--seqlen ({args.seqlen}), got {args.stride}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    res = evaluate.evaluate_model(args.model, tasks, ppl_data=args.ppl_data, seqlen=args.seqlen, stride=args.stride,
                                  max_windows=args.max_windows, batch_size=args.batch_size, dtype=args.dtype,
                                  progress=not args.quiet)
    print(evaluate.format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return {"quantize": quantize_command, "eval": eval_command}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
