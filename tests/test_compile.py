"""The fast paths: compiled decode (static cache + torch.compile, whole graph) for every method, and
the eager fast paths against their references."""
import logging

import pytest
import torch
from conftest import CALIBRATION_TEXTS, build_tiny
from transformers import AutoModelForCausalLM
from transformers.generation import CompileConfig

import lowbit
from lowbit import kernels
from lowbit.modules import QuantLinear

CONFIGS = {
    "hqq": lambda: lowbit.HqqConfig(bits=4, group_size=32),
    "quarot-w4a8kv4": lambda: lowbit.QuaRotConfig.from_preset("w4a8kv4", group_size=32),
    "quarot-w4a8kv4-int-mm": lambda: lowbit.QuaRotConfig.from_preset("w4a8kv4", group_size=32),
    "quarot-w4a8kv4-eager-attention": lambda: lowbit.QuaRotConfig.from_preset("w4a8kv4", group_size=32),
    "quarot-w4a4kv8": lambda: lowbit.QuaRotConfig(bits=4, act_bits=4, kv_bits=8, group_size=32),
    "householder": lambda: lowbit.HouseholderConfig(act_bits=8, group_size=32, weight_quantizer="rtn", steps=2,
                                                    nsamples=2, cali_bsz=1, seqlen=32, calibration=CALIBRATION_TEXTS),
    "arhq": lambda: lowbit.ArhqConfig(rank=8, calibration=CALIBRATION_TEXTS, nsamples=2, seqlen=32),
    "arhq-int8": lambda: lowbit.ArhqConfig(rank=8, decomposition="svdquant", int8_runtime=True),
}


FOUR_BIT_ACTIVATIONS = ("quarot-w4a4kv8", "arhq", "arhq-int8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # one layer keeps the compile short; every width a multiple of 16 (NVFP4) and of the group size
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-compile"), num_hidden_layers=1, intermediate_size=192)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CONFIGS))
def test_compiled_decode_generates_what_eager_does(tiny, method, monkeypatch):
    """Whole-graph compile (a graph break anywhere in the step fails it). Compiled kernels reduce in
    another order, so a 4-bit activation grid (W4A4, NVFP4) can round a near-tie the other way: there the
    logits of every step whose prefix both runs share are compared; elsewhere the tokens must be the same.
    The reference is eager decode with the same static cache. Int8 layers run on oneDNN's prepacked
    weights where torch has them (every layer of the tiny model, however narrow), "-int-mm" on
    `torch._int_mm`. "-eager-attention": transformers' eager attention (the CPU fast path docs/speed.md
    recommends) over the packed KV cache."""
    if method.endswith("-int-mm"):
        monkeypatch.setattr(kernels, "pack_int8_weight", lambda weight: weight)
    else:
        monkeypatch.setattr(kernels, "onednn_layout_for", lambda out_features: True)
    torch._dynamo.reset()
    attention = "eager" if method.endswith("-eager-attention") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16, quantization_config=CONFIGS[method](),
                                                 attn_implementation=attention)
    assert model.config._attn_implementation == attention
    ids = torch.randint(3, 80, (1, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    eager = model.generate(ids, cache_implementation="static", **kw)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    model.generation_config.compile_config = compile_config
    compiled = model.generate(ids, cache_implementation="static", **kw)
    new_e, new_c = eager.sequences[0, 8:], compiled.sequences[0, 8:]
    shared = int((new_e != new_c).nonzero()[0, 0]) + 1 if not torch.equal(new_e, new_c) else len(new_e)
    if method not in FOUR_BIT_ACTIVATIONS:
        assert shared == len(new_e)
    assert shared >= 4  # the first token comes from the eager prefill; three compiled steps at least
    for step in range(shared):
        e, c = eager.logits[step].float(), compiled.logits[step].float()
        if method in FOUR_BIT_ACTIVATIONS:  # one code of a 4-bit grid moves a tiny random model's logits a lot
            assert torch.nn.functional.cosine_similarity(e, c).item() > 0.97, f"step {step}"
        else:
            assert (e - c).abs().max() <= 0.05 * e.abs().max(), f"step {step}"


def test_integer_path_falls_back_to_the_reference_where_int_mm_refuses(monkeypatch, caplog):
    from lowbit import quantize as Q

    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), 4, 32, solver="rtn", act_bits=8)
    x = torch.randn(3, 64)
    fast = q(x)
    monkeypatch.setattr(kernels, "int8_mm_supported", lambda *a: False)
    with caplog.at_level(logging.INFO, logger="lowbit.modules"):
        slow = q(x)
        q(x)
    assert sum("computing the float reference" in r.message for r in caplog.records) == 1  # said once
    codes, scale = Q.quantize_activations(x, 8)
    ref = (codes.float() * scale) @ q.dequantize_weight(torch.float32).T + q.bias
    assert torch.allclose(slow, ref, atol=1e-5)
    assert not torch.equal(slow, fast) and torch.allclose(slow, fast, atol=0.02)


def test_weight_only_layer_off_the_int4_kernel_says_so(caplog):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)  # 24 output channels: the int4 kernel needs a multiple of 16
    with caplog.at_level(logging.INFO, logger="lowbit.modules"):
        q = QuantLinear.from_linear(linear, 4, 32, solver="rtn")
    assert q.layout == "packed"
    assert any("int4 kernel does not take this shape" in r.message for r in caplog.records)
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), x @ q.dequantize_weight(torch.float32).T + q.bias, atol=1e-5)
