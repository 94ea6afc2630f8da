"""Householder rotations: the reflection primitive, the PCA init, layer-wise optimization, reload."""
import json
import re

import pytest
import torch
from conftest import CALIBRATION_TEXTS, build_tiny, check_generation, cli_refuses, forward_logits, random_ids, run_python
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import evaluate, hadamard, householder, reflections
from lowbit.modules import HouseholderRotation, QuantLinear, RotatedNorm


def test_output_error_weighs_every_token_by_its_own_output():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 4, 32, generator=g)
    target[0, 0] *= 1000  # an attention sink's massive activations
    noise = torch.randn(1, 4, 32, generator=g)
    relative = target + 0.1 * noise * target.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
    assert householder.output_error(relative, target).item() == pytest.approx(0.01, rel=1e-4)
    sink_only = target.clone()
    sink_only[0, 0] *= 1.1  # 10% relative error on the sink, none elsewhere: a quarter of the mean
    assert householder.output_error(sink_only, target).item() == pytest.approx(0.01 / 4, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_llama_hh(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama-hh"), intermediate_size=256)


@pytest.mark.parametrize("k", [1, 3, 17, 64])
def test_reflections_are_orthogonal_and_rank1_updates_equal_the_dense_product(k):
    g = torch.Generator().manual_seed(k)
    v = torch.randn(k, 64, generator=g)
    q = reflections.matrix(v)
    assert torch.allclose(q @ q.T, torch.eye(64), atol=1e-5)
    dense = torch.eye(64)
    for i in range(k):  # Q = H_k…H_1, built the slow way
        u = v[i] / v[i].norm()
        dense = (torch.eye(64) - 2 * torch.outer(u, u)) @ dense
    x = torch.randn(5, 64, generator=g)
    assert torch.allclose(reflections.apply(x, v), x @ dense.T, atol=1e-5)
    assert torch.allclose(reflections.apply(reflections.apply(x, v), v, inverse=True), x, atol=1e-5)
    had = hadamard.hadamard_matrix(64)  # the full rotation: the reflections, then the Hadamard
    assert torch.allclose(reflections.rotate(x, v), x @ dense.T @ had, atol=1e-5)
    assert torch.allclose(reflections.rotate(reflections.rotate(x, v), v, inverse=True), x, atol=1e-5)


def test_pca_init_maps_the_top_principal_direction_onto_a_flat_one():
    g = torch.Generator().manual_seed(0)
    d = 48  # 48 = 4·12: a Paley block
    top = torch.randn(d, generator=g)
    top /= top.norm()
    x = torch.randn(4000, d, generator=g) * 0.1 + torch.randn(4000, 1, generator=g) * 5 * top
    vectors = householder.pca_reflections(x.T @ x, pca_variance=0.5)
    assert vectors.shape[0] == 1  # one axis holds more than half of the variance
    assert torch.allclose(reflections.apply(top, vectors).abs(), torch.eye(d)[0], atol=0.05)  # onto e_1
    mapped = reflections.rotate(top, vectors)  # and by the Hadamard onto a flat direction
    flat = hadamard.hadamard_matrix(d)[0]
    assert torch.allclose(mapped.abs(), flat.abs(), atol=0.05) and mapped.abs().max() < 0.2
    assert householder.pca_reflections(x.T @ x, pca_variance=1.0).shape[0] == d
    assert householder.pca_reflections(x.T @ x, pca_variance=0.5, k=5).shape[0] == 5


@pytest.mark.parametrize("kwargs,match", [
    ({"reflections": 0}, r"reflections must be an integer >= 1 or None, got 0"),
    ({"pca_variance": 0.0}, r"pca_variance must be in \(0, 1\], got 0.0"),
    ({"pca_variance": 1.5}, r"pca_variance must be in \(0, 1\], got 1.5"),
    ({"reflections": 8, "pca_variance": 0.9}, r"give one of reflections .* not both: got reflections=8"),
    ({"reflections": None}, r"give one of reflections .* not neither"),
    ({"steps": -1}, r"steps must be an integer >= 0, got -1"),
    ({"act_bits": 3}, r"act_bits must be one of \[4, 8, 16\], got 3"),
    ({"lr": 0}, r"lr must be a positive number, got 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.HouseholderConfig(**kwargs)


def test_k_is_fixed_by_default_or_chosen_by_variance_when_asked():
    assert (lowbit.HouseholderConfig().reflections, lowbit.HouseholderConfig().pca_variance) == (16, None)
    by_variance = lowbit.HouseholderConfig(pca_variance=0.9)  # alone, it replaces the default k
    assert (by_variance.reflections, by_variance.pca_variance) == (None, 0.9)
    again = lowbit.HouseholderConfig.from_dict(by_variance.to_dict())  # as a reload reads config.json
    assert (again.reflections, again.pca_variance) == (None, 0.9)


def test_too_many_reflections_and_unsupported_architecture_are_refused(tiny_llama_hh, tmp_path):
    with pytest.raises(ValueError, match=r"reflections must be in \[1, d\] for every rotation; got 200"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_hh, quantization_config=lowbit.HouseholderConfig(
            reflections=200, calibration=CALIBRATION_TEXTS))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=80)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rotations support .* got GPT2LMHeadModel"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=lowbit.HouseholderConfig())


def test_stories_optimization_beats_pca_init_beats_no_rotation(stories):
    # at 4-bit activations, where the rotation has outliers to spread (at 8 bits, the clipping search alone
    # can match the PCA init)
    cfg = lowbit.HouseholderConfig(group_size=-1, act_bits=4, steps=15, nsamples=4, cali_bsz=2, seqlen=64,
                                   num_layers=2, calibration=CALIBRATION_TEXTS * 4)
    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32)
    report = []
    householder.quantize_model(model, cfg, report=report)
    for row in report[:2]:
        assert row["error_opt"] < row["error_init"] < row["error_none"], row
    assert all(r["error_opt"] == r["error_init"] for r in report[2:])  # beyond num_layers: the PCA init
    rotations = [m for m in model.modules() if isinstance(m, HouseholderRotation)]
    assert len(rotations) == 4 * model.config.num_hidden_layers
    assert all(torch.isfinite(m.householder_vectors).all() for m in rotations)


@pytest.mark.slow
def test_quantize_save_reload_in_a_fresh_process(tiny_llama_hh, tmp_path):
    cfg = lowbit.HouseholderConfig(group_size=32, steps=4, nsamples=4, cali_bsz=2, seqlen=32,
                                   calibration=CALIBRATION_TEXTS)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_hh, dtype=torch.bfloat16, quantization_config=cfg)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(mods) == 7 * model.config.num_hidden_layers
    assert all(m.act_bits == 8 and m.act_clip_ratio is None for m in mods.values())  # ACT_CLIP: per token
    # o_proj and down_proj rotate their own input; q/k/v and gate/up share the rotation after their norm
    assert {n for n, m in mods.items() if m.input_transform == "householder"} == {
        n for n in mods if n.endswith(("o_proj", "down_proj"))}
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, RotatedNorm) and isinstance(layer.post_attention_layernorm, RotatedNorm)
    # the layers after a shared rotation quantize its output alike: one product for each group
    assert layer.self_attn.q_proj.shared_input is layer.self_attn.v_proj.shared_input is not None
    assert layer.mlp.gate_proj.shared_input is layer.mlp.up_proj.shared_input is not None
    ids = random_ids(model.config.vocab_size)
    logits = forward_logits(model, ids)
    out = tmp_path / "q"
    model.save_pretrained(out)
    torch.save(ids, tmp_path / "ids.pt")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:  # each rotation stored once, in the compute dtype
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("householder_vectors")}
    assert len(stored) == 4 * model.config.num_hidden_layers and set(stored.values()) == {"BF16"}
    assert "model.layers.0.input_layernorm.rotation.householder_vectors" in stored
    with safe_open(out / "model.safetensors", "pt") as f:  # bits per weight count what the file holds for them
        held = sum(f.get_tensor(k).nbytes for k in f.keys() if k.endswith("householder_vectors") or (
            k.rpartition(".")[0] in mods and not k.endswith(".bias")))
    numel = sum(m.in_features * m.out_features for m in mods.values())
    assert evaluate.weight_bytes(model)["bits_per_weight"] == pytest.approx(8 * held / numel)
    res = run_python(f"""
import json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    torch.save(m(ids).logits.float(), {str(tmp_path / 'reloaded.pt')!r})
layer = m.model.layers[0]
print(json.dumps({{"cls": type(layer.self_attn.q_proj).__name__, "k": layer.input_layernorm.rotation.householder_vectors.shape[0],
                  "shared": layer.mlp.gate_proj.shared_input is layer.mlp.up_proj.shared_input is not None}}))
""")
    assert res["cls"] == "QuantLinear" and res["k"] == layer.input_layernorm.rotation.householder_vectors.shape[0]
    assert res["shared"]
    assert torch.equal(torch.load(tmp_path / "reloaded.pt"), logits)

    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    # a checkpoint saved when Householder learned one activation clip per quantizer keeps its ratios
    old = {f"{n}.act_clip_ratio": torch.tensor(0.7) for n in mods}
    save_file({**tensors, **old}, out / "model.safetensors", metadata={"format": "pt"})
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ratios = {n: m.act_clip_ratio for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    assert ratios.keys() == mods.keys()
    assert all(r is not None and r.item() == pytest.approx(0.7) for r in ratios.values())
    assert not torch.equal(forward_logits(reloaded, ids), logits)  # clipped at 0.7, not per token
    del tensors["model.layers.1.post_attention_layernorm.rotation.householder_vectors"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.post_attention_layernorm\.rotation"):
        AutoModelForCausalLM.from_pretrained(out)


def test_model_generated_calibration_is_said_so(tiny_llama_hh, caplog):
    cfg = lowbit.HouseholderConfig(group_size=32, steps=0, nsamples=2, cali_bsz=2, seqlen=16)
    with caplog.at_level("WARNING", logger="lowbit.householder"):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_hh, quantization_config=cfg)
    assert "text sampled from the model itself" in caplog.text
    assert model.config.quantization_config.calibration_source == householder.GENERATED_SOURCE
    assert cfg.calibration_source is None  # recorded in the saved config, not in the caller's object


def test_generate_pipeline_and_dequantize(tiny_llama_hh):
    from transformers import AutoTokenizer, pipeline

    cfg = lowbit.HouseholderConfig(group_size=32, act_bits=16, steps=2, nsamples=2, cali_bsz=2, seqlen=32,
                                   calibration=CALIBRATION_TEXTS)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_hh, dtype=torch.float32, quantization_config=cfg)
    check_generation(model, AutoTokenizer.from_pretrained(tiny_llama_hh))
    ids = random_ids(model.config.vocab_size)
    quantized = forward_logits(model, ids)  # act_bits=16: weights only, so dequantizing must not change the function
    model.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.allclose(forward_logits(model, ids), quantized, atol=1e-3 * quantized.abs().max().item())


def test_cli_householder_writes_the_tagged_folder(tiny_llama_hh, tmp_path, monkeypatch):
    from lowbit.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIBRATION_TEXTS))
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--method", "householder", "-q", "--src", str(tiny_llama_hh), "--group-size", "32",
                 "--steps", "1", "--nsamples", "2", "--cali-bsz", "2", "--calib-seqlen", "16",
                 "--calib", str(calib)]) == 0
    out = tmp_path / f"{tiny_llama_hh.name}-HH_w4_g32_a8_headfp16"
    meta = json.loads((out / "quantization_metadata.json").read_text())
    assert meta["method"] == "lowbit_householder" and meta["settings"]["steps"] == 1


@pytest.mark.parametrize("args,match", [
    (["--method", "householder", "--pca-variance", "2"], r"pca_variance must be in \(0, 1\]"),
    (["--method", "householder", "--reflections", "0"], "reflections must be an integer >= 1"),
    (["--method", "householder", "--reflections", "4", "--pca-variance", "0.9"], "not both"),
    (["--method", "quarot", "--steps", "3"], "--steps cannot be used with --method quarot"),
])
def test_cli_householder_bad_input_writes_nothing(tiny_llama_hh, tmp_path, capsys, args, match):
    assert re.search(match, cli_refuses(tiny_llama_hh, tmp_path, capsys, args))


def test_gptq_onto_the_learned_grid_lowers_the_output_error():
    g = torch.Generator().manual_seed(3)
    d, out, n = 64, 48, 512
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # correlated inputs: GPTQ has work to do
    linear = torch.nn.Linear(d, out, bias=False)
    linear.weight.data = torch.randn(out, d, generator=g)
    rotation = HouseholderRotation(5, d, dtype=torch.float32)
    rotation.householder_vectors.copy_(torch.randn(5, d, generator=g))
    ratio = torch.full((out, d // 32), 0.9)
    made = {}
    for wq in ("rtn", "gptq"):
        cfg = lowbit.HouseholderConfig(group_size=32, act_bits=16, weight_quantizer=wq)
        made[wq] = householder.quantized_module(linear, cfg, rotation, weight_clip=ratio,
                                                hessian=rotation.fold(rotation.fold(x.T @ x).T))
    assert torch.equal(made["rtn"].scale_offset, made["gptq"].scale_offset)  # the same learned grid
    err = {k: (m(x) - linear(x)).pow(2).mean().item() for k, m in made.items()}
    assert err["gptq"] < 0.8 * err["rtn"], err
    with pytest.raises(ValueError, match="weight_quantizer must be one of"):
        lowbit.HouseholderConfig(weight_quantizer="awq")


@pytest.mark.parametrize("bits", [4, 8])
def test_training_quantizers_compute_what_the_runtime_stores(bits):
    from lowbit import quantize
    from lowbit.modules import ACT_CLIP

    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 40, 64, generator=g) * torch.rand(3, 40, 1, generator=g) * 4).requires_grad_()
    fake = householder.fake_quantize_activations(x, bits)
    assert torch.equal(fake, quantize.fake_quantize_activations(x.detach(), bits, ACT_CLIP[bits]))
    fake.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    w = torch.randn(24, 128, generator=g)
    ratio = 0.6 + 0.4 * torch.rand(24, 2, generator=g)
    stored = quantize.dequantize(*quantize.quantize_rtn_ratio(w, bits, 64, ratio), bits, 128)
    assert torch.allclose(householder.fake_quantize_weight(w, bits, 64, ratio), stored, atol=1e-5)


def test_weight_clipping_starts_at_the_search_and_learns():
    from lowbit.quantize import clip_ratios

    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(64, 32, bias=False)
    linear.weight.data = torch.randn(32, 64, generator=g)
    vectors = torch.nn.Parameter(torch.randn(4, 64, generator=g))
    cfg = lowbit.HouseholderConfig(group_size=32, act_bits=4)
    trained = householder._TrainingLinear(linear, vectors, cfg)
    init = trained.clip().detach().clone()
    assert torch.equal(init, clip_ratios(reflections.rotate(linear.weight.detach(), vectors.detach()), 4, 32))
    x = torch.randn(256, 64, generator=g)
    opt = torch.optim.Adam([vectors, trained.weight_clip], lr=cfg.lr)
    for _ in range(10):
        opt.zero_grad()
        householder.output_error(trained(x), linear(x).detach()).backward()
        opt.step()
    assert (trained.clip() - init).abs().max() > 5e-3  # ten steps of lr 1e-3 move a ratio by up to 0.01


def test_a_bfloat16_prompt_is_rotated_in_bfloat16_within_its_rounding():
    """A prompt's rotation runs in `hadamard.activation_dtype` (bfloat16 where the CPU has native bfloat16
    GEMMs): within bfloat16 rounding of the float32 rotation, which a decode step still runs exactly."""
    g = torch.Generator().manual_seed(5)
    d = 192
    rotation = HouseholderRotation(6, d, dtype=torch.bfloat16)
    rotation.householder_vectors.copy_(torch.randn(6, d, generator=g))
    x = (torch.randn(2, 100, d, generator=g) * 3).bfloat16()
    exact = reflections.rotate(x.float(), rotation.householder_vectors.float())
    prompt = rotation(x)
    assert prompt.dtype == torch.bfloat16
    assert (prompt.float() - exact).abs().max() <= 2 ** -6 * exact.abs().max()
    if hadamard.activation_dtype(x) == torch.bfloat16:
        assert not torch.equal(prompt, exact.bfloat16())  # it did take the bfloat16 path
    step = x[:, :1]
    assert torch.equal(rotation(step), exact[:, :1].bfloat16())
