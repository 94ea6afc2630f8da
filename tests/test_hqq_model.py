"""Quantize on load -> save -> reload in a fresh process, on tiny random models and stories260K."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import lowbit
from lowbit import QuantLinear

from conftest import check_generation, run_python

PROMPT = "Once upon a time"


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2", "stories"])
def quantized(request, tmp_path_factory):
    src = request.getfixturevalue(request.param)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                                 quantization_config=lowbit.HqqConfig(bits=4, group_size=64))
    tok = AutoTokenizer.from_pretrained(src)
    out = tmp_path_factory.mktemp(f"{request.param}-hqq")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    torch.save({"ids": ids, "logits": logits}, out / "expected.pt")
    return src, out, model


def test_every_targeted_linear_is_replaced(quantized):
    src, _, model = quantized
    fp = AutoModelForCausalLM.from_pretrained(src)
    linears = {n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)}
    replaced = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert replaced == linears - {"lm_head"}
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_checkpoint_holds_packed_uint8_and_is_small(quantized):
    src, out, model = quantized
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert not any(k.endswith("proj.weight") for k in keys)
        for name, m in layers.items():
            assert f.get_slice(f"{name}.qweight").get_dtype() == "U8"
            nbytes = sum(f.get_tensor(f"{name}.{b}").numel() * f.get_tensor(f"{name}.{b}").element_size()
                         for b in ("qweight", "scale_offset"))
            # 4 bits per (zero-padded) weight + a bf16 scale and offset per group of 64
            k_pad = -(-m.in_features // 64) * 64
            assert nbytes == m.out_features * k_pad // 2 + m.out_features * k_pad // 64 * 4
            if m.in_features % 64 == 0:
                assert nbytes <= 0.32 * m.in_features * m.out_features * 2
    bf16 = sum(m.in_features * m.out_features * 2 for m in layers.values())
    fp_bytes = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).get_memory_footprint()
    assert model.get_memory_footprint() < fp_bytes - 0.6 * bf16


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
out = sys.argv[1] if len(sys.argv) > 1 else {out!r}
{prelude}
model = AutoModelForCausalLM.from_pretrained(out)
exp = torch.load(out + "/expected.pt")
with torch.no_grad():
    logits = model(exp["ids"]).logits
print(json.dumps({{"equal": torch.equal(logits, exp["logits"]), "lowbit_imported_by_user": {imported},
                  "types": sorted({{type(m).__name__ for m in model.modules()}}), "dtype": str(model.dtype)}}))
"""


@pytest.mark.slow
def test_reload_in_fresh_process_without_import_lowbit_is_bit_identical(quantized):
    _, out, _ = quantized
    res = run_python(RELOAD.format(out=str(out), prelude="", imported=False))
    assert res["equal"]
    assert "QuantLinear" in res["types"] and res["dtype"] == "torch.bfloat16"


@pytest.mark.slow
def test_reload_does_not_requantize(quantized):
    _, out, _ = quantized
    prelude = (
        "import lowbit.modules\n"
        "def _fail(*a, **k): raise AssertionError('re-quantized on reload')\n"
        "lowbit.modules.SOLVERS.update(hqq=_fail, rtn=_fail)\n"
        "lowbit.modules.QuantLinear.quantized_tensors = _fail\n"
    )
    res = run_python(RELOAD.format(out=str(out), prelude=prelude, imported=True))
    assert res["equal"]


def test_generate_and_pipeline_from_the_saved_folder_continue_as_before_saving(quantized):
    _, out, model = quantized
    check_generation(model, AutoTokenizer.from_pretrained(out), reloaded=str(out), prompt=PROMPT, new_tokens=8)


def test_dequantize_returns_a_plain_model(quantized):
    _, out, _ = quantized
    model = AutoModelForCausalLM.from_pretrained(out)
    exp = torch.load(out / "expected.pt")
    model = model.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        logits = model(exp["ids"]).logits
    assert torch.allclose(logits.float(), exp["logits"].float(), atol=0.1 * exp["logits"].abs().max().item())


def test_device_map_auto_loads(quantized):
    _, out, _ = quantized
    model = AutoModelForCausalLM.from_pretrained(out, device_map="auto")
    exp = torch.load(out / "expected.pt")
    with torch.no_grad():
        assert torch.equal(model(exp["ids"]).logits, exp["logits"])


def _greedy(model, tok, n):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0]


def test_stories_8bit_tells_the_float_model_s_story(stories):
    tok = AutoTokenizer.from_pretrained(stories)
    ref = _greedy(AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32), tok, 24)
    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32,
                                                 quantization_config=lowbit.HqqConfig(bits=8, group_size=32))
    assert torch.equal(_greedy(model, tok, 24), ref), tok.decode(ref)


def test_stories_greedy_story_survives_4bit(stories, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.bfloat16,
                                                 quantization_config=lowbit.HqqConfig(bits=4, group_size=32))
    tok = AutoTokenizer.from_pretrained(stories)
    text = tok.decode(_greedy(model, tok, 12), skip_special_tokens=True)
    assert "Lily" in text, text


def test_saved_config_round_trips(quantized):
    _, out, _ = quantized
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "lowbit_hqq", "bits": 4, "group_size": 64, "modules_to_not_convert": ["lm_head"],
                  "zero_point": "float"}
    assert lowbit.HqqConfig.from_dict(qc).to_dict() == qc
