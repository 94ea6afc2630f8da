"""QuaRot: quantize on load, native reload, the integer and KV cache paths against their references."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from conftest import build_tiny, check_generation, cli_refuses, forward_logits, random_ids, run_python
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import hadamard, kernels, kvcache, modules, quarot
from lowbit import quantize as Q
from lowbit.modules import ACT_CLIP, QuantLinear


@pytest.fixture(scope="module")
def tiny_llama_g32(tmp_path_factory):
    """intermediate 352 = 8·44: not a power of two (Paley block), and every width divides by 32."""
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama-g32"), intermediate_size=352)


@pytest.fixture(scope="module")
def tiny_qwen2_g32(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2-g32"), intermediate_size=352,
                      tie_word_embeddings=True)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("preset", ["w4a4kv4", "w4a8kv4", "w4a8kv8"])
def test_presets(preset):
    cfg = lowbit.QuaRotConfig.from_preset(preset)
    assert (cfg.bits, cfg.act_bits, cfg.kv_bits) == (4, int(preset[3]), int(preset[-1]))
    assert cfg.to_dict()["quant_method"] == "lowbit_quarot"
    assert lowbit.QuaRotConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("kwargs,match", [
    ({"act_bits": 3}, r"act_bits must be one of \[4, 8, 16\], got 3"),
    ({"kv_bits": 5}, r"kv_bits must be one of \[4, 8, 16\], got 5"),
    ({"bits": 2}, r"bits must be one of \[4, 8\], got 2"),
    ({"group_size": 48}, r"group_size must be one of \[32, 64, 128, -1\], got 48"),
    ({"rotation_method": "random"}, r"rotation_method must be one of \['hadamard', 'pca'\]"),
    ({"weight_quantizer": "gptq"}, r"weight_quantizer='gptq' needs calibration data"),
    ({"rotation_method": "pca"}, r"rotation_method='pca' needs calibration data"),
    ({"calibration": 3}, r"calibration must be None, a text file path"),
    ({"nsamples": 0}, r"nsamples must be a positive integer, got 0"),
    ({"nbits": 4}, r"unknown parameter\(s\) \['nbits'\]"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.QuaRotConfig(**kwargs)


def test_bad_preset():
    with pytest.raises(ValueError, match=r"preset must be one of \['w4a4kv4', 'w4a8kv4', 'w4a8kv8'\], got 'w4a4'"):
        lowbit.QuaRotConfig.from_preset("w4a4")


def test_group_that_does_not_divide_is_refused_before_loading(tiny_llama):
    with pytest.raises(ValueError, match=r"group_size=64 does not divide model.layers.0.mlp.down_proj.in_features=176"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=lowbit.QuaRotConfig(group_size=64))


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rotations support LlamaForCausalLM.*got GPT2LMHeadModel"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=lowbit.QuaRotConfig(group_size=-1))


@pytest.mark.parametrize("config_cls", ["QuaRotConfig", "ArhqConfig", "HouseholderConfig"])
def test_calibration_list_is_described_not_copied_into_config(config_cls):
    cfg = getattr(lowbit, config_cls)(calibration=["some text"] * 3)
    assert cfg.to_dict()["calibration"] == "<3 calibration strings>"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("transform", [None, "hadamard"])
def test_quant_linear_integer_path_equals_fake_quant_reference(bits, transform):
    torch.manual_seed(0)
    linear = torch.nn.Linear(352, 48, bias=True)
    q = QuantLinear.from_linear(linear, 4, 32, solver="rtn_clip", act_bits=bits, input_transform=transform)
    assert q.layout == "int8_channel"
    x = torch.randn(3, 5, 352)
    xt = hadamard.hadamard_transform(x) if transform else x
    w8 = kernels.unpack_int8_weight(q.int8_weight).double() * q.int8_scale[:, None].double()  # re-rounded per channel
    assert ((w8 - q.dequantize_weight(torch.float64)).abs() <= q.int8_scale[:, None] / 2 + 1e-9).all()
    ref = Q.fake_quantize_activations(xt, bits, ACT_CLIP[bits]).double() @ w8.T + linear.bias.double()
    y = q(x).double()
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    state = q.state_dict()  # the portable layout, whatever the runtime one
    assert state["qweight"].shape == (48, 352 * 4 // 8)


@pytest.mark.parametrize("n", [64, 128, 176, 352, 12 * 16, 20])
def test_inverse_hadamard_transform(n):
    x = torch.randn(3, n, dtype=torch.float64)
    h = hadamard.hadamard_matrix(n, torch.float64)
    assert torch.allclose(hadamard.hadamard_transform(x, inverse=True), x @ h.T)
    assert torch.allclose(hadamard.hadamard_transform(hadamard.hadamard_transform(x), inverse=True), x)


def test_gptq_beats_rtn_on_the_layer_output():
    torch.manual_seed(0)
    k, n = 256, 64
    basis = torch.randn(k, k) / k ** 0.5
    x = torch.randn(4096, k) @ (basis * torch.linspace(3, 0.05, k))  # correlated inputs
    w = torch.randn(n, k) * 0.05
    hessian = 2 * x.T @ x / x.shape[0]
    for bits, group in [(4, 32), (4, 128), (8, 64)]:
        rtn = Q.dequantize(*Q.quantize_rtn_clip(w, bits, group), bits, k)
        gptq = Q.dequantize(*Q.quantize_gptq(w, hessian, bits, group, torch.bfloat16), bits, k, torch.float32)
        err = lambda wq: ((x @ (wq - w).T) ** 2).mean().item()  # noqa: E731
        assert err(gptq) < 0.8 * err(rtn), (bits, group, err(gptq), err(rtn))


def test_kv_states_round_trip_and_packing():
    x = torch.randn(2, 3, 7, 64, dtype=torch.bfloat16)
    codes, so = kvcache.quantize_states(x, 4)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 7, 32) and so.shape == (2, 3, 7, 2)
    back = kvcache.dequantize_states(codes, so, 4).float()
    step = (x.float().amax(-1, keepdim=True) - x.float().amin(-1, keepdim=True)) * kvcache.KV_CLIP[4] / 15
    clipped = x.float().clamp(x.float().amin(-1, keepdim=True) * kvcache.KV_CLIP[4],
                              x.float().amax(-1, keepdim=True) * kvcache.KV_CLIP[4])
    assert ((back - clipped).abs() <= step * 0.51 + 0.02 * x.float().abs().amax()).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_cache_memory_is_the_packed_size(bits):
    batch, heads, tokens, head_dim = 1, 4, 4096, 64
    cache = lowbit.QuantizedKVCache(num_layers=2, bits=bits)
    for layer in range(2):
        for start in range(0, tokens, 1024):
            k = torch.randn(batch, heads, 1024, head_dim, dtype=torch.bfloat16)
            cache.update(k, k.clone(), layer)
    bf16 = 2 * 2 * batch * heads * tokens * head_dim * 2  # layers · (keys, values) · elements · 2 bytes
    expected = (head_dim * bits / 8 + 2 * 2) / (head_dim * 2)  # codes + bf16 scale/offset per head-token
    assert cache.get_seq_length() == tokens
    assert cache.nbytes() == pytest.approx(bf16 * expected)
    assert cache.nbytes() <= bf16 * (0.29 if bits == 4 else 0.54)


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_cache_appends_in_place_and_dequantizes_into_its_scratch(bits):
    """Decode steps write their token into buffers grown CAPACITY_BLOCK tokens at a time (no copy of the
    cache per step) and dequantize into the cache's scratch: the same codes as quantizing every token at
    once, and bit for bit the states a fresh dequantization gives."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 2, kvcache.CAPACITY_BLOCK + 40, 64, dtype=torch.bfloat16, generator=g).unbind(0)
    cache = kvcache.QuantizedKVCache(num_layers=2, bits=bits)
    layer = cache.layers[0]
    prompt = kvcache.CAPACITY_BLOCK - 8
    cache.update(k[:, :, :prompt], v[:, :, :prompt], 0)
    addresses = set()
    for t in range(prompt, k.shape[2]):
        keys, values = cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1], 0)
        addresses.add(layer.stored["codes"].data_ptr())
        fresh = layer._dequantize(layer.stored)
        assert torch.equal(keys, fresh[0]) and torch.equal(values, fresh[1])
    assert len(addresses) == 2  # one buffer per CAPACITY_BLOCK tokens
    whole = kvcache.QuantizedKVCache(num_layers=1, bits=bits).layers[0]
    whole.update(k, v)
    assert all(torch.equal(layer.stored[n], whole.stored[n]) for n in ("codes", "scale_offset"))
    held = sum(t.numel() * t.element_size() for t in layer.stored.values())  # the tokens' own bytes
    assert layer.nbytes() == held * 2 * kvcache.CAPACITY_BLOCK // k.shape[2]  # as allocated: two blocks
    # the scratch is the cache's: another layer's update overwrites what the first returned
    other, _ = cache.update(k, v, 1)
    assert other.data_ptr() == keys.data_ptr()


def test_kv_cache_batch_operations_follow_the_batch():
    """Keys and values are stored stacked ahead of the batch: beam search's reorder, select and repeat must
    act on the batch, not on the keys/values axis."""
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 2, 5, 64, dtype=torch.bfloat16).unbind(0)
    layer = kvcache.QuantizedKVCache(num_layers=1, bits=4).layers[0]
    keys, values = layer.update(k, v)

    def restored():
        return layer._dequantize(layer.stored)

    order = torch.tensor([2, 0, 1])
    layer.reorder_cache(order)
    assert all(torch.equal(a, b[order]) for a, b in zip(restored(), (keys, values)))
    keys, values = restored()
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert all(torch.equal(a, b[[0, 2]]) for a, b in zip(restored(), (keys, values)))
    keys, values = restored()
    layer.batch_repeat_interleave(2)
    assert all(torch.equal(a, b.repeat_interleave(2, 0)) for a, b in zip(restored(), (keys, values)))


def test_kv_cache_keys_quantized_in_the_hadamard_basis():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 5, 64)
    k[..., 3] += 30  # an outlier channel, as RoPE'd keys have
    rotated = kvcache.QuantizedKVCache(1, 4, rotate_keys=True).update(k, k, 0)[0]
    plain = kvcache.QuantizedKVCache(1, 4, rotate_keys=False).update(k, k, 0)[0]
    ref = hadamard.hadamard_transform(
        kvcache.dequantize_states(*kvcache.quantize_states(hadamard.hadamard_transform(k), 4), 4), inverse=True)
    assert torch.allclose(rotated, ref, atol=1e-5)
    assert (rotated - k).norm() < 0.5 * (plain - k).norm()


@pytest.fixture(scope="module")
def biased_keys_qwen2(tmp_path_factory):
    """A tiny Qwen2 whose k_proj has a large bias (Qwen2.5-0.5B's reach |b| ≈ 200) in the channels
    RoPE turns slowly (the last quarter of each half of a head), where it stays an offset."""
    path = tmp_path_factory.mktemp("biased-keys-qwen2")
    build_tiny("qwen2", path, intermediate_size=352)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        k, hd = layer.self_attn.k_proj, layer.self_attn.head_dim
        slow = (torch.arange(hd) % (hd // 2) >= 3 * hd // 8).repeat(k.out_features // hd)
        k.bias.data = torch.randn(k.bias.shape, generator=gen) * torch.where(slow, 100.0, 5.0)
        k.weight.data[::16] *= 8
    model.save_pretrained(path)
    return path


def test_key_statistics_match_rope_of_the_bias(biased_keys_qwen2):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(biased_keys_qwen2, dtype=torch.float32)
    gamma = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) + 0.5
    model.model.layers[1].input_layernorm.weight.data = gamma
    stats = kvcache.key_statistics(model)
    attn, hd = model.model.layers[1].self_attn, model.model.layers[1].self_attn.head_dim
    positions = torch.arange(model.config.max_position_embeddings)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1), positions)
    bias = attn.k_proj.bias.view(1, -1, 1, hd).expand(1, -1, positions.shape[1], hd)
    _, turned = apply_rotary_pos_emb(bias, bias, cos, sin)  # RoPE of the bias at every position
    centre, scale = stats[1]
    assert torch.allclose(centre, turned[0].mean(1), atol=1e-4)
    rows = (attn.k_proj.weight * gamma).pow(2).sum(-1).view(-1, 2, hd // 2).mean(1).sqrt()  # k_proj after the norm
    assert torch.allclose(scale, rows.repeat(1, 2), rtol=1e-5)


def test_normalised_keys_lose_less_to_4_bits(biased_keys_qwen2):
    """The cache with the model's key statistics returns exactly Q((K − c)/s·H)·Hᵀ·s + c, and on keys
    with a large bias it is much closer to K than the plain per-token quantizer. (What the scale buys is
    not a smaller error of K but of the attention scores on real models: the benchmark measures it.)"""
    model = AutoModelForCausalLM.from_pretrained(biased_keys_qwen2, dtype=torch.float32)
    keys = {}
    model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.setdefault("k", out))
    ids = random_ids(model.config.vocab_size, (1, 64))
    with torch.no_grad():
        model(ids)
    hd = model.model.layers[1].self_attn.head_dim
    k = keys["k"].view(1, 64, -1, hd).transpose(1, 2)  # [batch, kv_heads, tokens, head_dim], before RoPE
    cos, sin = model.model.rotary_emb(k, torch.arange(64)[None])
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    stats = kvcache.key_statistics(model)
    normalised = kvcache.QuantizedKVCache(2, 4, key_stats=stats).update(k, k, 1)[0]
    centred = kvcache.QuantizedKVCache(2, 4, key_stats=[(c, torch.ones_like(s)) for c, s in stats]).update(k, k, 1)[0]
    plain = kvcache.QuantizedKVCache(2, 4).update(k, k, 1)[0]
    centre, scale = (t.unsqueeze(1) for t in stats[1])
    ref = hadamard.hadamard_transform(kvcache.dequantize_states(
        *kvcache.quantize_states(hadamard.hadamard_transform((k - centre) / scale), 4), 4), inverse=True) * scale + centre
    assert torch.allclose(normalised, ref, atol=1e-4 * k.abs().max().item())
    assert (centred - k).norm() < 0.25 * (plain - k).norm()
    # in bf16 the inverse map runs as one bf16 matmul: the stored keys restored to bf16's resolution
    cache = kvcache.QuantizedKVCache(2, 4, key_stats=stats)
    half = cache.update(k.bfloat16(), k.bfloat16(), 1)[0]
    stored = cache.layers[1].stored
    keys = kvcache.dequantize_states(stored["codes"][0], stored["scale_offset"][0], 4, torch.float32)  # [0]: keys
    exact = hadamard.hadamard_transform(keys, inverse=True) * scale + centre
    assert half.dtype == torch.bfloat16
    assert (half.float() - exact).abs().max() < 2**-7 * exact.abs().max()


def test_rotated_model_without_quantization_noise_is_close(tiny_llama_g32):
    """8-bit weights, no activation or KV quantization: QuaRot's model stays close to the fp model,
    so the rotation plumbing (norm fusion, residual/value/down_proj rotations, online Hadamard) holds."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32)
    cfg = lowbit.QuaRotConfig(bits=8, act_bits=16, kv_bits=16, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32, quantization_config=cfg)
    ids = random_ids(ref.config.vocab_size)
    assert _rel(forward_logits(model, ids), forward_logits(ref, ids)) < 0.01


def test_rotation_lowers_the_error_of_w4a4kv4(tiny_llama_g32):
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32)
    ref.model.layers[0].mlp.down_proj.weight.data[:, 5] *= 40  # outlier input channels, as real models have
    ref.model.embed_tokens.weight.data[:, 7] *= 40
    ids = random_ids(ref.config.vocab_size)
    errors = {}
    for rotate in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32)
        model.load_state_dict(ref.state_dict())
        quarot.quantize_model(model, lowbit.QuaRotConfig(group_size=32), rotate=rotate)
        errors[rotate] = _rel(forward_logits(model, ids), forward_logits(ref, ids))
    assert errors[True] < 0.7 * errors[False], errors


@pytest.mark.slow
@pytest.mark.parametrize("arch,group", [("tiny_llama_g32", 32), ("tiny_qwen2_g32", 32), ("tiny_llama", -1)])
def test_quantize_save_reload_in_a_fresh_process(request, tmp_path, arch, group):
    src = request.getfixturevalue(arch)
    cfg = lowbit.QuaRotConfig(group_size=group)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, quantization_config=cfg)
    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) == 7 * model.config.num_hidden_layers
    assert all(m.act_bits == 4 for m in qlinears)
    assert [m.input_transform for m in qlinears].count("hadamard") == model.config.num_hidden_layers
    ids = random_ids(model.config.vocab_size)
    logits = forward_logits(model, ids)
    out = tmp_path / "q"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "lowbit_quarot"
    tied = json.loads((src / "config.json").read_text())["tie_word_embeddings"]
    assert saved["tie_word_embeddings"] == tied  # the Hadamard-rotated final norm keeps a tied head tied
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied
    torch.save(ids, tmp_path / "ids.pt")
    res = run_python(f"""
import json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    torch.save(m(ids).logits.float(), {str(tmp_path / 'reloaded.pt')!r})
print(json.dumps({{"cls": type(m.model.layers[0].mlp.down_proj).__name__,
                  "tied": m.lm_head.weight is m.model.embed_tokens.weight}}))
""")
    assert res["cls"] == "QuantLinear" and res["tied"] == tied
    assert torch.equal(torch.load(tmp_path / "reloaded.pt"), logits)


def test_cached_decoding_matches_a_full_forward(tiny_llama_g32):
    cfg = lowbit.QuaRotConfig(group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32, quantization_config=cfg)
    ids = random_ids(model.config.vocab_size, (1, 12))
    full = forward_logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, lowbit.QuantizedKVCache)
        steps = [out.logits]
        for t in range(8, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    stepwise = torch.cat(steps, dim=1).float()
    assert torch.allclose(stepwise, full, atol=1e-3 * full.abs().max().item())


@pytest.mark.parametrize("layout", ["onednn", "plain"])
@pytest.mark.parametrize("preset", ["w4a8kv8", "w4a4kv4"])
def test_layers_reading_one_input_share_one_product(tiny_qwen2_g32, preset, layout, monkeypatch):
    """q/k/v and gate/up quantize their input once: bit-identical to each layer computing alone, recomputed
    when the input changes in place. Plain int8 weights (`torch._int_mm`) are stacked into one product (a
    long input: one quantization, a product each) and a member repacked on its own leaves; oneDNN-packed
    ones keep their own weights and share the codes."""
    if layout == "plain":
        monkeypatch.setattr(kernels, "pack_int8_weight", lambda weight: weight)
    elif not kernels.onednn_int8_available():
        pytest.skip("this torch build has no oneDNN int8 GEMM")
    else:
        monkeypatch.setattr(kernels, "onednn_layout_for", lambda out_features: True)  # any CPU, any width
    cfg = lowbit.QuaRotConfig.from_preset(preset, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_g32, dtype=torch.bfloat16, quantization_config=cfg)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    shared = attn.q_proj.shared_input
    assert shared is not None and shared is attn.k_proj.shared_input is attn.v_proj.shared_input
    assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not None and attn.o_proj.shared_input is None
    if layout == "plain":
        assert attn.k_proj.int8_weight._base is shared.weight  # a view: no second copy of the weights
    else:
        assert attn.k_proj.int8_weight.is_mkldnn and shared.weight is None
    groups = {m: m.shared_input for m in model.modules() if getattr(m, "shared_input", None) is not None}
    ids = random_ids(model.config.vocab_size, (2, 12))
    together = forward_logits(model, ids)

    def alone(module, x):
        return modules._integer_product(module, x, module.int8_weight, module.int8_scale) + module.bias.to(x.dtype)

    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.bfloat16)
    width = sum(m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    with torch.no_grad():
        assert torch.equal(attn.q_proj(x), alone(attn.q_proj, x))
        assert isinstance(shared._state[2], tuple) == (layout == "onednn")  # the codes, or the stacked product
        x.mul_(2)  # the same tensor, changed: k must not take the product of the old values
        assert torch.equal(attn.k_proj(x), alone(attn.k_proj, x))
        assert torch.equal(attn.v_proj(x), alone(attn.v_proj, x))
        # too large a product to share: the members share the input's codes, each runs its own product
        long = torch.randn(shared.MAX_ELEMENTS // width + 1, x.shape[-1], dtype=x.dtype)
        assert torch.equal(attn.q_proj(long), alone(attn.q_proj, long))
        codes = shared._state[2]
        assert isinstance(codes, tuple) and codes[0].dtype == torch.int8 and codes[0].shape == long.shape
        assert torch.equal(attn.k_proj(long), alone(attn.k_proj, long)) and shared._state[2] is codes
        long.mul_(2)
        assert torch.equal(attn.v_proj(long), alone(attn.v_proj, long)) and shared._state[2] is not codes
    for m in groups:
        m.shared_input = None
    assert torch.equal(forward_logits(model, ids), together)
    for m, group in groups.items():
        m.shared_input = group
    if layout == "plain":
        attn.k_proj._to_packed_layout()
        attn.k_proj.prepare_runtime()  # its own int8 weight again: it computes alone, q and v still share
        assert attn.k_proj.int8_weight._base is None
        assert torch.equal(forward_logits(model, ids), together)


@pytest.mark.parametrize("preset", ["w4a8kv8", "w4a4kv4"])
def test_generate_and_pipeline_after_reload_continue_as_before(tiny_llama_g32, tmp_path, preset):
    from transformers import AutoTokenizer

    cfg = lowbit.QuaRotConfig.from_preset(preset, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, quantization_config=cfg)
    model.save_pretrained(tmp_path)
    check_generation(model, AutoTokenizer.from_pretrained(tiny_llama_g32),
                     reloaded=AutoModelForCausalLM.from_pretrained(tmp_path))


def test_filled_foreign_cache_is_refused(tiny_llama_g32):
    from transformers import DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, quantization_config=lowbit.QuaRotConfig(group_size=32))
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 32), torch.zeros(1, 2, 3, 32), 0)
    with pytest.raises(ValueError, match="quantizes its KV cache to 4 bits"):
        model(random_ids(model.config.vocab_size, (1, 2)), past_key_values=cache)


def test_gptq_and_pca_with_calibration(tiny_llama_g32, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 5)
    from transformers import AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(tiny_llama_g32)(text.read_text()[:200], return_tensors="pt").input_ids
    errs = {}
    for wq, rot in [("rtn", "hadamard"), ("gptq", "hadamard"), ("rtn", "pca")]:
        cfg = lowbit.QuaRotConfig(group_size=32, act_bits=8, kv_bits=8, weight_quantizer=wq, rotation_method=rot,
                                  calibration=str(text), nsamples=4, seqlen=64)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32, quantization_config=cfg)
        errs[wq, rot] = _rel(forward_logits(model, ids), forward_logits(ref, ids))
    assert all(e < 0.5 for e in errs.values()), errs
    assert errs["gptq", "hadamard"] < 0.8 * errs["rtn", "hadamard"], errs


def test_pca_rotation_is_orthogonal_and_sorted(tiny_llama_g32):
    """Q = U·H with U's columns the principal axes of the layers' (RMS-normalised) inputs, largest
    variance first: checked against the inputs captured here by hooks on an ordinary forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32)
    ids = random_ids(model.config.vocab_size, (4, 32))
    q = quarot.pca_rotation(model, ids, progress=False)
    assert torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-10)

    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(
        (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()), with_kwargs=True)
        for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in inputs]).double()
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    cov = x.T @ x
    u = q @ hadamard.hadamard_matrix(q.shape[0], torch.float64).T
    variance = torch.diagonal(u.T @ cov @ u)
    eigenvalues = torch.linalg.eigvalsh(cov).flip(0)
    assert torch.allclose(variance, eigenvalues, rtol=1e-6, atol=1e-6 * eigenvalues[0].item())
    assert variance[0] > 2 * variance[-1]  # the test would not see a wrong order on flat data


def test_stories_quantizes_and_reloads(stories, tmp_path):
    """stories260K: hidden 64 and intermediate 172 = 4·43 (no Hadamard block of order 172 or 43: the
    documented orthogonal fallback)."""
    cfg = lowbit.QuaRotConfig(group_size=-1)
    model = AutoModelForCausalLM.from_pretrained(stories, quantization_config=cfg)
    ids = random_ids(model.config.vocab_size, (1, 16))
    logits = forward_logits(model, ids)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(forward_logits(again, ids), logits)


def test_cli_quarot_writes_the_tagged_folder(tiny_llama_g32, tmp_path, monkeypatch):
    from lowbit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--method", "quarot", "-q", "--src", str(tiny_llama_g32), "--bits", "4",
                 "--acts-bits", "4", "--kv-bits", "4", "--group-size", "32", "--rotation", "hadamard"]) == 0
    out = tmp_path / f"{tiny_llama_g32.name}-QuaRot_w4_g32_a4_kv4_headfp16"
    meta = json.loads((out / "quantization_metadata.json").read_text())
    assert meta["method"] == "lowbit_quarot" and meta["settings"]["act_bits"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * model.config.num_hidden_layers


@pytest.mark.parametrize("args,match", [
    (["--method", "quarot", "--acts-bits", "3"], r"act_bits must be one of \[4, 8, 16\], got 3"),
    (["--method", "quarot", "--kv-bits", "5"], r"kv_bits must be one of \[4, 8, 16\], got 5"),
    (["--method", "quarot", "--weight-quantizer", "gptq"], "needs calibration data"),
    (["--method", "quarot", "--group-size", "64"], "group_size=64 does not divide"),
    (["--method", "hqq", "--acts-bits", "4"], "--acts-bits cannot be used with --method hqq"),
])
def test_cli_quarot_bad_input_writes_nothing(tiny_llama, tmp_path, capsys, args, match):
    assert re.search(match, cli_refuses(tiny_llama, tmp_path, capsys, args))


def test_dequantize_folds_the_online_hadamard_back(tiny_llama_g32):
    cfg = lowbit.QuaRotConfig(bits=4, act_bits=16, kv_bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_g32, dtype=torch.float32, quantization_config=cfg)
    ids = random_ids(model.config.vocab_size)
    kvcache.uninstall(model)  # compare the weights alone
    quantized = forward_logits(model, ids)
    model.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # the norms' Hadamards folded
    assert torch.allclose(forward_logits(model, ids), quantized, atol=1e-4 * quantized.abs().max().item())
