"""ARHQ / SVDQuant: the decomposition against its objective, the NVFP4 module against its reference,
smoothing folded without changing the fp model, quantize on load, native reload."""
import json
import logging
import re

import pytest
import torch
from conftest import CALIBRATION_TEXTS, build_tiny, check_generation, cli_refuses, forward_logits, random_ids, run_python
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import arhq, calibration, kernels, nvfp4
from lowbit.modules import Nvfp4Linear

@pytest.fixture(scope="module")
def tiny_llama_16(tmp_path_factory):
    """Every width a multiple of 16 except down_proj's input (intermediate 200): that one stays fp."""
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama-16"), intermediate_size=200)


def _outlier_layer(n=2048, k=128, out=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, :4] *= 40  # a few outlier channels, as LLM activations have
    w = torch.randn(out, k, generator=g) / k**0.5
    return x, w


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": -1}, r"rank must be a non-negative integer"),
    ({"rank": True}, r"rank must be a non-negative integer"),
    ({"decomposition": "svd"}, r"decomposition must be one of \['arhq', 'svdquant'\], got 'svd'"),
    ({"smoothing": 1.5, "calibration": CALIBRATION_TEXTS}, r"smoothing must be None or a migration strength alpha in \[0, 1\]"),
    ({}, r"decomposition='arhq' with rank=128 needs calibration data"),
    ({"decomposition": "svdquant", "smoothing": 0.5}, r"smoothing=0.5 needs calibration data"),
    ({"nsamples": 0, "calibration": CALIBRATION_TEXTS}, r"nsamples must be a positive integer, got 0"),
    ({"rank": 0, "int8_runtime": "yes"}, r"int8_runtime must be True or False, got 'yes'"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.ArhqConfig(**kwargs)


def test_calibration_free_settings_need_no_calibration():
    assert not lowbit.ArhqConfig(decomposition="svdquant").needs_calibration
    assert not lowbit.ArhqConfig(rank=0).needs_calibration


def test_layers_no_wider_than_the_rank_stay_in_the_compute_dtype(tiny_llama_16):
    cfg = lowbit.ArhqConfig(rank=64, decomposition="svdquant")  # k_proj, v_proj: 128 -> 64
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_16, quantization_config=cfg)
    attn = model.model.layers[0].self_attn
    assert type(attn.k_proj) is torch.nn.Linear and type(attn.v_proj) is torch.nn.Linear
    assert isinstance(attn.q_proj, Nvfp4Linear) and attn.q_proj.lora_down.shape[0] == 64


def test_a_rank_no_layer_can_take_is_refused_before_loading(tiny_llama_16):
    cfg = lowbit.ArhqConfig(rank=128, decomposition="svdquant")  # every layer has a side of 128 or less
    with pytest.raises(ValueError, match=r"rank=128 must be below min\(in_features, out_features\) of some "
                                         r"layer; the largest is 128, of model\.layers\.0\.self_attn\.q_proj"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_16, quantization_config=cfg)


def test_the_rank_rule_only_counts_layers_nvfp4_can_tile(tmp_path):
    path = build_tiny("llama", tmp_path / "untiled", hidden_size=72, intermediate_size=200)  # no width % 16 == 0
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.ArhqConfig(rank=4,
                                                                                          decomposition="svdquant"))
    assert not any(isinstance(m, Nvfp4Linear) for m in model.modules())


def test_arhq_minimises_its_objective():
    x, w = _outlier_layer()
    hessian = arhq.activation_residual_hessian(x)
    objective = {0: arhq.arhq_objective(w, None, x)}
    for rank in (8, 32):
        svd = arhq.low_rank_branch(w, rank)
        ours = arhq.low_rank_branch(w, rank, arhq.hessian_roots(hessian))
        for name, branch in (("svdquant", svd), ("arhq", ours)):
            assert torch.linalg.matrix_rank(branch[0].double() @ branch[1].double()) == rank
            objective[name, rank] = arhq.arhq_objective(w, branch, x)
        assert objective["arhq", rank] <= objective["svdquant", rank] <= objective[0], objective
    assert objective["arhq", 32] < objective["arhq", 8] < 0.9 * objective[0], objective


def test_svdquant_branch_is_the_best_rank_r_approximation():
    _, w = _outlier_layer()
    up, down = arhq.low_rank_branch(w, 16)
    s = torch.linalg.svdvals(w.double())
    assert torch.isclose((w.double() - up.double() @ down.double()).norm(), s[16:].norm(), rtol=1e-5)


@pytest.mark.parametrize("rank,smooth", [(0, False), (16, False), (16, True)])
def test_nvfp4_linear_equals_its_reference(rank, smooth):
    x, w = _outlier_layer(n=64)
    bias = torch.randn(w.shape[0])
    branch = arhq.low_rank_branch(w, rank) if rank else (None, None)
    s = torch.rand(w.shape[1]) + 0.5 if smooth else None
    m = Nvfp4Linear.from_weight(w, bias, *branch, smooth_scale=s, dtype=torch.float32)
    assert m.qweight.dtype == torch.uint8 and m.qweight.shape == (96, 64)
    assert m.block_scales.dtype == torch.float8_e4m3fn and m.block_scales.shape == (96, 8)
    xs = x / s if smooth else x
    residual = w - (branch[0] @ branch[1] if rank else 0)
    ref = nvfp4.fake_quantize_per_token(xs) @ nvfp4.fake_quantize(residual).T + bias
    if rank:
        ref = ref + xs @ (branch[0] @ branch[1]).T
    assert torch.allclose(m(x), ref, atol=1e-4, rtol=1e-4)
    # without its input rounding, the module is the plain layer of `dequantize_weight`
    assert torch.allclose(m.dequantize_weight() * (s if smooth else 1), nvfp4.fake_quantize(residual)
                          + (branch[0] @ branch[1] if rank else 0), atol=1e-5)


def test_per_token_activation_rounding_is_independent_of_the_batch():
    x, _ = _outlier_layer(n=8)
    batch = nvfp4.fake_quantize_per_token(x)
    assert torch.equal(batch[3], nvfp4.fake_quantize_per_token(x[3:4])[0])


def test_smoothing_folds_without_changing_the_fp_model(tiny_llama_16):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_16, dtype=torch.float32)
    ids = random_ids(model.config.vocab_size)
    ref = forward_logits(model, ids)
    hooks = []
    for _, layer, inputs in calibration.layer_by_layer(model, ids, 2, progress=False):
        before = layer.self_attn.q_proj.weight.clone()
        hooks.append(arhq._smooth_layer(layer, inputs, 0.5)["hook"])
        assert not torch.equal(before, layer.self_attn.q_proj.weight)
    assert torch.allclose(forward_logits(model, ids), ref, atol=1e-4 * ref.abs().max().item())
    for h in hooks:
        h.remove()


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{"rank": 8, "smoothing": 0.5}, {"rank": 0}])
def test_quantize_save_reload_in_a_fresh_process(tiny_llama_16, tmp_path, kwargs):
    cfg = lowbit.ArhqConfig(**kwargs, calibration=CALIBRATION_TEXTS, nsamples=4, seqlen=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_16, dtype=torch.bfloat16, quantization_config=cfg)
    layers = model.config.num_hidden_layers
    modules = [m for m in model.modules() if isinstance(m, Nvfp4Linear)]
    assert len(modules) == 6 * layers and all(m.rank == kwargs["rank"] for m in modules)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # 200 is not a multiple of 16
    assert sum(m.smooth_scale is not None for m in modules) == (layers if kwargs.get("smoothing") else 0)
    ids = random_ids(model.config.vocab_size)
    logits = forward_logits(model, ids)
    out = tmp_path / "q"
    model.save_pretrained(out)
    torch.save(ids, tmp_path / "ids.pt")
    res = run_python(f"""
import json, torch
from transformers import AutoModelForCausalLM
from safetensors import safe_open
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    torch.save(m(ids).logits.float(), {str(tmp_path / 'reloaded.pt')!r})
with safe_open({str(out / 'model.safetensors')!r}, "pt") as f:
    dtypes = {{k: str(f.get_slice(k).get_dtype()) for k in f.keys() if ".q_proj." in k and "layers.0." in k}}
print(json.dumps({{"cls": type(m.model.layers[0].self_attn.q_proj).__name__, "dtypes": dtypes}}))
""")
    assert res["cls"] == "Nvfp4Linear"
    prefix = "model.layers.0.self_attn.q_proj."
    assert res["dtypes"][prefix + "qweight"] == "U8" and res["dtypes"][prefix + "block_scales"] == "F8_E4M3"
    assert (prefix + "lora_up" in res["dtypes"]) == bool(kwargs["rank"])
    assert torch.equal(torch.load(tmp_path / "reloaded.pt"), logits)


def test_arhq_beats_svdquant_and_rank0_on_the_model(tiny_llama_16):
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_16, dtype=torch.float32)
    ids = random_ids(ref.config.vocab_size)
    errs = {}
    for name, kwargs in (("rank0", {"rank": 0}), ("svdquant", {"rank": 16, "decomposition": "svdquant"}),
                         ("arhq", {"rank": 16})):
        cfg = lowbit.ArhqConfig(**kwargs, calibration=CALIBRATION_TEXTS, nsamples=4, seqlen=64)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_16, dtype=torch.float32, quantization_config=cfg)
        errs[name] = ((forward_logits(model, ids) - forward_logits(ref, ids)).norm() / forward_logits(ref, ids).norm()).item()
    assert errs["svdquant"] < errs["rank0"] and errs["arhq"] < errs["rank0"], errs


def test_generate_and_pipeline_after_reload_continue_as_before(tiny_llama_16, tmp_path):
    from transformers import AutoTokenizer

    cfg = lowbit.ArhqConfig(rank=4, decomposition="svdquant")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_16, quantization_config=cfg)
    model.save_pretrained(tmp_path)
    check_generation(model, AutoTokenizer.from_pretrained(tiny_llama_16),
                     reloaded=AutoModelForCausalLM.from_pretrained(tmp_path))


def test_int8_runtime_layer_is_one_integer_product_near_the_simulation():
    x, w = _outlier_layer(n=256)
    u, s, vh = torch.linalg.svd(w)
    lora_up, lora_down = u[:, :4] * s[:4], vh[:4]
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1))
    layer = Nvfp4Linear.from_weight(w, bias, lora_up, lora_down)
    simulated = layer(x)
    layer.use_int8_runtime()
    fast = layer(x)
    residual = layer.dequantize_residual(torch.float32)
    step = residual.abs().amax(-1, keepdim=True) / 127
    int8_weight = kernels.unpack_int8_weight(layer.int8_weight)
    assert int8_weight.dtype == torch.int8 and torch.allclose(layer.int8_scale, step[:, 0])
    assert ((int8_weight.float() * step - residual).abs() <= step * (0.5 + 1e-5)).all()
    codes, scale = nvfp4.int8_codes_per_token(x)
    w8 = int8_weight.double() * layer.int8_scale.double()[:, None]
    reference = (codes.double() * scale.double()) @ w8.T + bias.double() + x.double() @ (lora_up @ lora_down).double().T
    assert torch.allclose(fast.double(), reference, rtol=1e-5, atol=1e-4)
    # the re-rounding adds little to NVFP4's own error (measured 0.15 of it in norm with these outliers)
    exact = x @ w.T + bias
    assert (fast - simulated).norm() < 0.25 * (simulated - exact).norm()


def test_int8_runtime_falls_back_to_float32_where_int_mm_refuses(monkeypatch, caplog):

    x, w = _outlier_layer(n=8)
    layer = Nvfp4Linear.from_weight(w, None)
    layer.use_int8_runtime()
    fast = layer(x)
    monkeypatch.setattr(kernels, "int8_mm_supported", lambda *a: False)
    with caplog.at_level(logging.INFO, logger="lowbit.modules"):
        slow = layer(x)
        layer(x)
    assert sum("computing it in float32" in r.message for r in caplog.records) == 1  # said once
    assert torch.allclose(slow, fast, rtol=1e-5, atol=1e-5)


def test_int8_runtime_model_shares_products_and_saves_the_packed_tensors(tiny_llama_16, tmp_path):
    def load(path, **kw):
        cfg = lowbit.ArhqConfig(rank=4, decomposition="svdquant", **kw)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=cfg)

    simulated, fast = load(tiny_llama_16), load(tiny_llama_16, int8_runtime=True)
    layers = [m for m in fast.modules() if isinstance(m, Nvfp4Linear)]
    assert layers and all(m.int8_weight is not None for m in layers)
    extra = sum(m.out_features * (m.in_features + 4) for m in layers)  # int8 weights, a float32 scale per row
    assert fast.get_memory_footprint() == simulated.get_memory_footprint() + extra
    attn = fast.model.layers[0].self_attn
    assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
    x = torch.randn(2, 5, attn.q_proj.in_features, dtype=torch.bfloat16)
    together = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    shared, attn.q_proj.shared_input = attn.q_proj.shared_input, None
    assert torch.equal(attn.q_proj(x), together[0])  # each entry an exact integer dot product
    attn.q_proj.shared_input = shared
    ids = torch.randint(3, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, reference = fast(ids).logits.float(), simulated(ids).logits.float()
    assert not torch.equal(logits, reference)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.99
    simulated.save_pretrained(tmp_path / "simulated")
    fast.save_pretrained(tmp_path / "fast")  # the int8 copy is runtime only: the same tensors on disk
    assert ((tmp_path / "fast/model.safetensors").read_bytes()
            == (tmp_path / "simulated/model.safetensors").read_bytes())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fast")  # the config says to use it
    assert torch.equal(reloaded(ids).logits, fast(ids).logits)
    arhq.use_int8_runtime(simulated)  # on a loaded model
    assert torch.equal(simulated(ids).logits, fast(ids).logits)
    assert simulated.get_memory_footprint() == fast.get_memory_footprint()


def test_the_int8_runtimes_former_name_still_works():
    with pytest.warns(DeprecationWarning, match=r"dequantized_residual=\.\.\.\) is deprecated, use int8_runtime"):
        assert lowbit.ArhqConfig(rank=0, dequantized_residual=True).int8_runtime is True
    with pytest.raises(ValueError, match="got both 'dequantized_residual' and 'int8_runtime'"):
        lowbit.ArhqConfig(rank=0, dequantized_residual=True, int8_runtime=True)


def test_dequantize_gives_the_layer_without_input_rounding(tiny_llama_16):
    cfg = lowbit.ArhqConfig(rank=4, smoothing=0.5, calibration=CALIBRATION_TEXTS, nsamples=2, seqlen=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_16, dtype=torch.float32, quantization_config=cfg)
    o_proj = model.model.layers[0].self_attn.o_proj
    x = torch.randn(3, o_proj.in_features)
    expected = torch.nn.functional.linear(x, o_proj.dequantize_weight())
    model.dequantize()
    assert not any(isinstance(m, Nvfp4Linear) for m in model.modules())
    assert torch.allclose(model.model.layers[0].self_attn.o_proj(x), expected, atol=1e-5)


def test_cli_arhq_writes_the_tagged_folder(tiny_llama_16, tmp_path, monkeypatch):
    from lowbit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--method", "arhq", "-q", "--src", str(tiny_llama_16), "--rank", "4",
                 "--decomposition", "svdquant"]) == 0
    out = tmp_path / f"{tiny_llama_16.name}-SVDQuant_nvfp4_r4_headfp16"
    meta = json.loads((out / "quantization_metadata.json").read_text())
    assert meta["method"] == "lowbit_arhq" and meta["settings"]["rank"] == 4
    assert "model.layers.0.mlp.down_proj" in meta["layers_kept"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, Nvfp4Linear) for m in model.modules()) == 6 * model.config.num_hidden_layers


@pytest.mark.parametrize("args,match", [
    (["--method", "arhq", "--bits", "3"], "--bits cannot be used with --method arhq"),
    (["--method", "arhq", "--rank", "4"], "needs calibration data"),
    (["--method", "arhq", "--rank", "-1", "--decomposition", "svdquant"], "rank must be a non-negative integer"),
    (["--method", "hqq", "--rank", "4"], "--rank cannot be used with --method hqq"),
])
def test_cli_arhq_bad_input_writes_nothing(tiny_llama_16, tmp_path, capsys, args, match):
    assert re.search(match, cli_refuses(tiny_llama_16, tmp_path, capsys, args))


def test_smoothing_leaves_an_unquantized_o_proj_untouched(tiny_llama_16):
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_16, dtype=torch.float32)
    cfg = lowbit.ArhqConfig(rank=4, smoothing=0.5, calibration=CALIBRATION_TEXTS, nsamples=2, seqlen=64,
                            modules_to_not_convert=["lm_head", "o_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_16, dtype=torch.float32, quantization_config=cfg)
    for layer, ref_layer in zip(model.model.layers, ref.model.layers):
        assert type(layer.self_attn.o_proj) is torch.nn.Linear
        assert torch.equal(layer.self_attn.o_proj.weight, ref_layer.self_attn.o_proj.weight)
        assert not layer.self_attn.o_proj._forward_pre_hooks
