"""`lowbit` command line: `lowbit quantize ...`, `lowbit eval ...`, `lowbit export ...`."""
import argparse
import logging
import os
import shlex
import sys


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _method_options() -> dict:
    """{flag: (the Options that declare it, the methods that read it)}, from the methods' declarations."""
    from .registry import methods

    by_flag = {}
    for m in methods().values():
        for opt in m.options:
            opts, owners = by_flag.setdefault(opt.flag, ([], []))
            opts.append(opt)
            owners.append(m)
    return by_flag


def _help(opt, method) -> str:
    """The option's help with the config's default, so that the two can never disagree."""
    default = method.config._fields.get(opt.field)
    return opt.help if opt.type is None or default is None else f"{opt.help} (default {default})"


def _build_parser() -> argparse.ArgumentParser:
    from .formats import FORMATS, gguf
    from .registry import methods

    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit quantization for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model into a folder that from_pretrained reloads natively")
    q.add_argument("--method", choices=list(methods()), help="required unless --for picks it")
    q.add_argument("--src", required=True, help="local model folder or Hugging Face Hub repo id")
    q.add_argument("--dst", help="output folder (default: ./<src name>-<tag>, e.g. ./model-HQQ_w4_g64)")
    group = q.add_argument_group("method settings (each applies to the methods named in its help)")
    for flag, (opts, owners) in _method_options().items():
        helps = [_help(o, m) for o, m in zip(opts, owners)]
        text = helps[0] if len(set(helps)) == 1 else "; ".join(f"{m.name}: {h}" for m, h in zip(owners, helps))
        kind = {"action": "store_true"} if opts[0].type is None else {"type": opts[0].type}
        group.add_argument(flag, dest=_dest(flag), help=f"[{', '.join(m.name for m in owners)}] {text}", **kind)
    q.add_argument("--for", dest="target", choices=sorted(FOR_TARGETS),
                   help="pick settings an engine runs exactly: 4-bit HQQ with integer zero points, which exports "
                        "to gguf (llama.cpp) and to compressed-tensors (vllm); other flags may refine them")
    q.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="compute dtype of scales, offsets and unquantized layers (default bfloat16)")
    q.add_argument("--seed", type=int, default=13, help="seeds torch, and picks the calibration windows")
    q.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")

    x = sub.add_parser("export", help="write a lowbit checkpoint for llama.cpp (GGUF) or vLLM (compressed-tensors)")
    x.add_argument("--src", required=True, help="lowbit output folder or Hub repo id")
    x.add_argument("--format", required=True, choices=sorted(FORMATS))
    x.add_argument("--dst", help="output path (default: ./<src name>.gguf or ./<src name>-ct)")
    x.add_argument("--unquantized-type", choices=gguf.UNQUANTIZED_TYPES,
                   help="gguf: how the tensors lowbit kept unquantized are stored (default: the checkpoint's dtype; "
                        "q8_0 re-quantizes them, smaller and faster, not exact)")
    x.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    x.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")

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


# `lowbit quantize --for ENGINE`: settings that export exactly to that engine's format. One set serves
# both: GGUF holds float zero points too, but integer ones also export to compressed-tensors, and
# docs/deployment.md compares the two against llama.cpp's own quantizer.
EXPORTABLE = {"method": "hqq", "bits": 4, "zero_point": "integer"}
FOR_TARGETS = {"gguf": EXPORTABLE, "vllm": EXPORTABLE}


def _config(args):
    """The method's config from the flags it declares; a flag it does not read is an error."""
    from .registry import method

    if args.target:
        _apply_target(args)
    if args.method is None:
        raise ValueError("--method is required (or --for gguf|vllm, which picks it)")
    m = method(args.method)
    mine = {o.flag for o in m.options}
    extra = [flag for flag in _method_options() if flag not in mine and getattr(args, _dest(flag)) not in (None, False)]
    if extra:
        raise ValueError(f"{', '.join(extra)} cannot be used with --method {args.method}")
    settings = {}
    for opt in m.options:
        value = getattr(args, _dest(opt.flag))
        if opt.convert is not None:
            settings[opt.field] = opt.convert(value)
        elif value is not None:
            settings[opt.field] = value
    if "seed" in m.config._fields:
        settings["seed"] = args.seed
    return m.config(**settings)


def _apply_target(args) -> None:
    """Fill in what `--for` requires; a flag that contradicts it is an error."""
    for dest, value in FOR_TARGETS[args.target].items():
        given = getattr(args, dest, None)
        if given is not None and given != value:
            flag = "--method" if dest == "method" else "--" + dest.replace("_", "-")
            raise ValueError(f"--for {args.target} needs {flag} {value}, got {given}")
        setattr(args, dest, value)


def quantize_command(args) -> int:
    import torch

    from . import checkpoint

    config = _config(args)  # validates every setting before any work
    checkpoint.check_source(args.src)
    dst = args.dst or os.path.join(".", f"{os.path.basename(os.path.normpath(args.src))}-"
                                        f"{checkpoint.naming_tag(config)}")
    meta = checkpoint.quantize_to_folder(args.src, dst, config, dtype=getattr(torch, args.dtype),
                                     overwrite=args.overwrite, seed=args.seed,
                                     command="lowbit " + shlex.join(sys.argv[1:]))
    if not args.quiet:
        print(checkpoint.summary(meta, dst))
    return 0


def export_command(args) -> int:
    from .formats import export, format_summary

    summary = export(args.src, args.format, dst=args.dst, overwrite=args.overwrite,
                     unquantized_type=args.unquantized_type, progress=not args.quiet)
    if not args.quiet:
        print(format_summary(summary))
    return 0


def eval_command(args) -> int:
    import json

    from . import checkpoint, evaluate

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
    if os.path.isdir(args.model) and "ppl" in res and checkpoint.record_evaluation(args.model, res):
        print(f"perplexity recorded in {os.path.join(args.model, 'README.md')} (model-index)")
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
        return {"quantize": quantize_command, "eval": eval_command, "export": export_command}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
