import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit import evaluate
from lowbit.cli import main

TEXT = ["The quick brown fox jumps over the lazy dog.", "", "Once upon a time there was a tiny model."] * 6


@pytest.mark.parametrize("n,seqlen,stride", [(10, 4, None), (10, 4, 2), (11, 4, 3), (1000, 512, 256),
                                             (1000, 512, 1), (7, 8, 4), (4096, 2048, None)])
def test_windows_score_each_token_once(n, seqlen, stride):
    spans = evaluate.score_spans(n, seqlen, stride)
    scored = [t for b, e, f in spans for t in range(f, e)]
    assert all(e - b <= seqlen and b < f for b, e, f in spans)
    assert len(scored) == len(set(scored))
    if stride in (None, seqlen):  # the papers: full windows, all but each window's first token
        assert len(spans) == n // seqlen and len(scored) == n // seqlen * (seqlen - 1)
    else:  # HQQ's stride protocol: every token but the very first, exactly once
        assert scored == list(range(1, n))


def test_perplexity_equals_a_direct_computation(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = AutoTokenizer.from_pretrained(tiny_llama)("\n\n".join(TEXT), return_tensors="pt").input_ids[0]
    seqlen = 32
    res = evaluate.perplexity(model, ids, seqlen=seqlen, progress=False)
    nll = []
    with torch.no_grad():
        for i in range(ids.numel() // seqlen):
            w = ids[i * seqlen:(i + 1) * seqlen]
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nll += [-logp[j - 1, w[j]].item() for j in range(1, seqlen)]
    assert res["tokens_scored"] == len(nll) and res["windows"] == ids.numel() // seqlen
    assert math.isclose(res["ppl"], math.exp(sum(nll) / len(nll)), rel_tol=1e-5)


def test_eval_cli_writes_the_documented_json(tiny_llama, tmp_path, capsys):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(TEXT))
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(tiny_llama), "--tasks", "ppl,size", "--ppl-data", str(data),
                 "--seqlen", "16", "--stride", "8", "--json", str(out), "-q"]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"model", "dtype", "quantization", "torch_threads", "ppl", "size"}
    assert set(res["ppl"]) == {"ppl", "nll", "tokens_scored", "windows", "seqlen", "stride", "protocol", "data", "join"}
    assert res["ppl"]["protocol"] == "stride" and res["ppl"]["stride"] == 8
    ids = AutoTokenizer.from_pretrained(tiny_llama)("\n\n".join(TEXT)).input_ids
    assert res["ppl"]["tokens_scored"] == len(ids) - 1
    assert res["size"]["checkpoint_bytes"] > 0 and res["quantization"] is None
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--tasks", "ppl,bogus"], "--tasks: unknown task"),
    (["--ppl-data", "/nonexistent/file.txt"], "--ppl-data '/nonexistent/file.txt': no such file"),
    (["--stride", "0"], "--stride must be in"),
])
def test_eval_cli_bad_input(tiny_llama, capsys, args, match):
    assert main(["eval", "--model", str(tiny_llama), "-q", *args]) == 2
    assert match in capsys.readouterr().err
