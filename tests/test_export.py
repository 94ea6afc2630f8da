"""`lowbit export`: GGUF (llama.cpp) and compressed-tensors (vLLM) hold lowbit's codes exactly, load in
their engines, and every refused case fails before anything is written."""
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, STORIES, build_tiny

import lowbit
from lowbit.cli import main
from lowbit.formats import export
from lowbit.integration import quant_linears

gguf = pytest.importorskip("gguf")
STORIES_TEXT = (ROOT / "examples" / "data" / "stories.txt").read_text()


def quantize(src, dst, **settings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                                 quantization_config=lowbit.HqqConfig(**settings))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def byte_level_tokenizer(folder, pre_tokenizer: str):
    """A small byte-level BPE tokenizer trained offline on the stories, with Qwen2's split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.formats.gguf import SPLIT_PRE_TOKENIZERS

    regex = next(r for r, name in SPLIT_PRE_TOKENIZERS.items() if name == pre_tokenizer)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([STORIES_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def stories_w4(tmp_path_factory):
    return quantize(STORIES, tmp_path_factory.mktemp("s") / "stories-w4g64", bits=4, group_size=64)


def tiny_w4(root, arch: str, pre_tokenizer: str, **settings):
    """A tiny random model (odd intermediate width 176, tied head) with a byte-level tokenizer, 4-bit g32
    (HqqConfig `settings` beside those)."""
    src = build_tiny(arch, root / "src", vocab_size=400, tie_word_embeddings=True)
    byte_level_tokenizer(src, pre_tokenizer)
    return quantize(src, root / f"{arch}-w4g32", bits=4, group_size=32, **settings)


def assert_llama_cpp_logits_match(llm, model, prompt):
    """llama.cpp's logits over `prompt` against transformers': per position, cosine > 0.99 (llama.cpp
    rounds activations to 8 bits for its Q4_1 products, transformers keeps them in bf16)."""
    llm.reset()
    llm.eval(prompt)
    ours = torch.from_numpy(np.array(llm.scores[:len(prompt)]))
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].float()
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min() > 0.99


@pytest.fixture(scope="module")
def qwen2_w4(tmp_path_factory):
    return tiny_w4(tmp_path_factory.mktemp("q"), "qwen2", "qwen2")  # q/k/v biases


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, {t.name: t for t in reader.tensors}, fields


def llama_row_order(rows: int, heads: int) -> list:
    """llama.cpp row r of a q/k projection holds HF row order[r]: per head, HF keeps the first halves of
    the rotary pairs, then the second halves; llama.cpp interleaves them."""
    half = rows // heads // 2
    return [h * 2 * half + j * half + i for h in range(heads) for i in range(half) for j in range(2)]


def check_q4_1(tensor, module, order=None):
    """The file's Q4_1 blocks, dequantized by gguf's own code, equal lowbit's weights up to the fp16
    rounding of each block's d and m."""
    w = module.dequantize_weight(torch.float32)
    so = module.scale_offset.float().transpose(0, 1).repeat_interleave(module.group_size, 1)[:, :module.in_features]
    tol = (15 * so[..., 0].abs() + so[..., 1].abs() + 8 * so[..., 0].abs()) * 2.0**-11
    if order is not None:
        w, tol = w[order], tol[order]
    got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(w.shape)
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert (got - w).abs().le(tol + 1e-12).all()
    assert (got - w).abs().max() < (w.abs().max() * 2.0**-8)


def test_gguf_holds_lowbit_codes_as_q4_1_and_keeps_odd_widths_in_16_bits(stories_w4, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = export(stories_w4, "gguf", dst=tmp_path / "s.gguf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(stories_w4)
    reader, tensors, fields = read_gguf(tmp_path / "s.gguf")
    cfg = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    assert fields["tokenizer.ggml.model"] == "llama"
    layer = model.model.layers[1]
    check_q4_1(tensors["blk.1.attn_q.weight"], layer.self_attn.q_proj,
               llama_row_order(cfg.num_attention_heads * cfg.head_dim, cfg.num_attention_heads))
    check_q4_1(tensors["blk.1.attn_k.weight"], layer.self_attn.k_proj,
               llama_row_order(cfg.num_key_value_heads * cfg.head_dim, cfg.num_key_value_heads))
    check_q4_1(tensors["blk.1.ffn_up.weight"], layer.mlp.up_proj)
    head = tensors["output.weight"]  # kept unquantized by HqqConfig's default: as it is, in BF16
    assert head.tensor_type == gguf.GGMLQuantizationType.BF16
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(head.data, head.tensor_type)).reshape(
        model.lm_head.weight.shape), model.lm_head.weight.data.float())
    # down_proj reads 172 = 5·32 + 12 inputs: no whole Q4_1 blocks, so exactly lowbit's weight in BF16
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.BF16
    expected = layer.mlp.down_proj.dequantize_weight(torch.bfloat16).float()
    got = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type)).reshape(expected.shape)
    assert torch.equal(got, expected)
    assert "blk.1.ffn_down.weight (BF16)" in summary["kept"]
    assert summary["tensor_types"]["Q4_1"] == 6 * cfg.num_hidden_layers  # q, k, v, o, gate, up
    assert torch.equal(torch.from_numpy(tensors["token_embd.weight"].data.copy()).view(torch.bfloat16).reshape(
        model.model.embed_tokens.weight.shape), model.model.embed_tokens.weight.data)


def test_gguf_qwen2_biases_tied_head_and_byte_level_vocabulary(qwen2_w4, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export(qwen2_w4, "gguf", dst=tmp_path / "q.gguf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(qwen2_w4)
    reader, tensors, fields = read_gguf(tmp_path / "q.gguf")
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    tok = AutoTokenizer.from_pretrained(qwen2_w4)
    assert fields["tokenizer.ggml.tokens"][:len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    attn = model.model.layers[0].self_attn
    check_q4_1(tensors["blk.0.attn_q.weight"], attn.q_proj)  # qwen2 rotates halves, as HF: no permutation
    bias = tensors["blk.0.attn_q.bias"]
    assert bias.tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(torch.from_numpy(bias.data.copy()), attn.q_proj.bias.data.float())


def test_gguf_q8_0_for_the_unquantized_tensors_is_stated(stories_w4, tmp_path):
    summary = export(stories_w4, "gguf", dst=tmp_path / "s.gguf", unquantized_type="q8_0", progress=False)
    _, tensors, _ = read_gguf(tmp_path / "s.gguf")
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.BF16  # 172: not whole blocks
    assert any("Q8_0" in note for note in summary["notes"])


def test_llama_cpp_runs_the_export_like_transformers(stories_w4, qwen2_w4, tmp_path):
    """llama.cpp tokenizes like the HF tokenizer and continues greedily with the same tokens. llama.cpp
    quantizes activations to 8 bits for its Q4_1 products while transformers keeps them in bf16, so the
    two can part at a near tie: 24 tokens of stories260K (a trained model, clear margins) must agree;
    for the random tiny Qwen2, where near ties are everywhere, the next-token logits must agree closely."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `llama` extra) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder, new_tokens in ((stories_w4, 24), (qwen2_w4, 0)):
        path = tmp_path / f"{folder.name}.gguf"
        export(folder, "gguf", dst=path, progress=False)
        llm = llama_cpp.Llama(str(path), n_batch=1, n_threads=2, n_ctx=256, logits_all=True, verbose=False)
        tok = AutoTokenizer.from_pretrained(folder)
        text = STORIES_TEXT[:400]
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=tok.bos_token_id is not None) == ids
        model = AutoModelForCausalLM.from_pretrained(folder)
        prompt = ids[:24]
        if new_tokens:
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)[0, 24:].tolist()
            got = []
            for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                got.append(t)
                if len(got) == new_tokens:
                    break
            assert got == hf
        else:
            assert_llama_cpp_logits_match(llm, model, prompt)


def test_a_quantized_tied_head_exports_as_its_own_tensor(tmp_path):
    """A tied head the config quantized (untied): GGUF holds it as output.weight in Q4_1 beside the
    16-bit token_embd, and llama.cpp, where installed, computes the same next-token logits;
    compressed-tensors writes it dense (vLLM reads the head unquantized) and lists it as ignored."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = tiny_w4(tmp_path, "qwen2", "qwen2", zero_point="integer", modules_to_not_convert=[])
    model = AutoModelForCausalLM.from_pretrained(folder)
    export(folder, "gguf", dst=tmp_path / "q.gguf", progress=False)
    _, tensors, _ = read_gguf(tmp_path / "q.gguf")
    check_q4_1(tensors["output.weight"], model.lm_head)
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    export(folder, "compressed-tensors", dst=tmp_path / "ct", progress=False)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    state = load_file(tmp_path / "ct" / "model.safetensors")
    assert "lm_head" in config["quantization_config"]["ignore"] and not config["tie_word_embeddings"]
    assert torch.equal(state["lm_head.weight"], model.lm_head.dequantize_weight())
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `llama` extra) is not installed")
    llm = llama_cpp.Llama(str(tmp_path / "q.gguf"), n_batch=1, n_threads=2, n_ctx=64, logits_all=True, verbose=False)
    assert_llama_cpp_logits_match(llm, model, list(range(20, 44)))


@pytest.mark.parametrize("arch, pre_tokenizer, q_norm", [("qwen3", "qwen2", True), ("mistral", "llama-bpe", False)])
def test_gguf_other_architectures(arch, pre_tokenizer, q_norm, tmp_path):
    """Qwen3 (q/k norms) and Mistral (llama.cpp's llama architecture, so q/k rows in its RoPE order):
    the file holds them, and llama.cpp, where installed, computes the same next-token logits."""
    from transformers import AutoModelForCausalLM

    folder = tiny_w4(tmp_path, arch, pre_tokenizer)
    export(folder, "gguf", dst=tmp_path / "m.gguf", progress=False)
    _, tensors, fields = read_gguf(tmp_path / "m.gguf")
    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg = model.config
    assert fields["general.architecture"] == ("qwen3" if arch == "qwen3" else "llama")
    assert fields["tokenizer.ggml.pre"] == pre_tokenizer
    assert ("blk.0.attn_q_norm.weight" in tensors) == q_norm
    order = None if arch == "qwen3" else llama_row_order(cfg.num_attention_heads * cfg.head_dim,
                                                          cfg.num_attention_heads)
    check_q4_1(tensors["blk.0.attn_q.weight"], model.model.layers[0].self_attn.q_proj, order)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `llama` extra) is not installed")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_batch=1, n_threads=2, n_ctx=64, logits_all=True, verbose=False)
    assert_llama_cpp_logits_match(llm, model, list(range(5, 29)))


@pytest.fixture(scope="module")
def stories_zint(tmp_path_factory):
    return quantize(STORIES, tmp_path_factory.mktemp("z") / "stories-w4g32-zint", bits=4, group_size=32,
                    zero_point="integer")


def test_integer_zero_points_are_integers_and_float_ones_are_not(stories_zint, stories_w4):
    from transformers import AutoModelForCausalLM

    from lowbit.quantize import integer_zero_points

    zint = AutoModelForCausalLM.from_pretrained(stories_zint)
    assert zint.config.quantization_config.zero_point == "integer"
    for _, m in quant_linears(zint):
        z = integer_zero_points(m.scale_offset, m.bits)
        assert z is not None and int(z.max()) <= 15
    floats = AutoModelForCausalLM.from_pretrained(stories_w4)
    assert any(integer_zero_points(m.scale_offset, m.bits) is None for _, m in quant_linears(floats))
    with pytest.raises(ValueError, match="zero_point must be one of"):
        lowbit.HqqConfig(zero_point="half")


def test_compressed_tensors_decompresses_to_lowbit_weights(stories_zint, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowbit.quantize import integer_zero_points

    out = tmp_path / "ct"
    summary = export(stories_zint, "compressed-tensors", dst=out, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    state = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(stories_zint)
    checked = 0
    for name, module in quant_linears(model):
        if f"{name}.weight_packed" not in state:
            assert name in config["ignore"] and f"{name}.weight" in state  # 172 rows: kept, dequantized
            continue
        local = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
        decompressed = PackedQuantizationCompressor.decompress(local, scheme)
        zero = integer_zero_points(module.scale_offset, module.bits).t().float()
        exact = ((module.codes().float() - zero.repeat_interleave(32, 1)) * module.scale_offset[..., 0].t().float()
                 .repeat_interleave(32, 1))
        assert torch.equal(decompressed["weight_zero_point"].to(torch.int16) + 8, zero.to(torch.int16))
        assert torch.equal(decompressed["weight"].float(), exact.to(decompressed["weight"].dtype).float())
        # lowbit's own weight: the same up to the storage rounding of its offset (half a bf16 step)
        lowbit_w = module.dequantize_weight(torch.float32)
        assert (decompressed["weight"].float() - lowbit_w).abs().max() <= lowbit_w.abs().max() * 2.0**-8
        checked += 1
    assert checked == summary["tensor_types"]["W4A16 linears (packed int4)"] > 0


def test_transformers_loads_the_compressed_tensors_export(stories_zint, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    export(stories_zint, "compressed-tensors", dst=tmp_path / "ct", progress=False)
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True),
                                              dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(stories_zint, dtype=torch.float32)
    ids = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]])
    with torch.no_grad():
        a, b = ct(ids).logits, ours(ids).logits
    assert (a - b).abs().max() < 0.02 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("fmt, settings, message", [
    ("gguf", dict(bits=3, group_size=64), "4-bit HQQ"),
    ("gguf", dict(bits=8, group_size=64), "4-bit HQQ"),
    ("compressed-tensors", dict(bits=4, group_size=64), "integer zero points"),
])
def test_refused_checkpoints_write_nothing(fmt, settings, message, tmp_path):
    src = quantize(STORIES, tmp_path / "src", **settings)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=message):
        export(src, fmt, dst=out / "x", progress=False)
    assert list(out.iterdir()) == []


def test_bad_input_is_refused_before_any_work(stories_w4, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="format must be one of"):
        export(stories_w4, "onnx", dst=out / "x")
    with pytest.raises(ValueError, match="not quantized"):
        export(STORIES, "gguf", dst=out / "x")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        export(tmp_path / "missing", "gguf", dst=out / "x")
    with pytest.raises(ValueError, match="unquantized_type must be one of"):
        export(stories_w4, "gguf", dst=out / "x", unquantized_type="q4_0")
    (out / "x.gguf").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(stories_w4, "gguf", dst=out / "x.gguf")
    assert (out / "x.gguf").read_text() == "keep me"
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((stories_w4 / f).read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        export(no_tok, "gguf", dst=out / "y.gguf")
    assert sorted(p.name for p in out.iterdir()) == ["x.gguf"]
    # the CLI: exit code 2 and one line naming the problem
    assert main(["export", "-q", "--src", str(STORIES), "--format", "gguf", "--dst", str(out / "z.gguf")]) == 2
    assert "not quantized" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["x.gguf"]


def test_quantize_for_an_engine_picks_exportable_settings(tmp_path, capsys):
    assert main(["quantize", "-q", "--for", "vllm", "--src", str(STORIES), "--dst", str(tmp_path / "v")]) == 0
    settings = json.loads((tmp_path / "v" / "config.json").read_text())["quantization_config"]
    assert (settings["quant_method"], settings["bits"], settings["zero_point"]) == ("lowbit_hqq", 4, "integer")
    assert main(["export", "-q", "--src", str(tmp_path / "v"), "--format", "compressed-tensors",
                 "--dst", str(tmp_path / "v-ct")]) == 0
    assert (tmp_path / "v-ct" / "model.safetensors").is_file()
    assert main(["quantize", "-q", "--for", "gguf", "--bits", "3", "--src", str(STORIES),
                 "--dst", str(tmp_path / "g")]) == 2
    assert "--for gguf needs --bits 4" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_model_in_memory_exports_like_its_saved_folder(stories_w4, tmp_path):
    """`lowbit.export(model)` on the model quantized on load (its runtime layout) writes the tensors the
    saved folder's export writes; the tokenizer comes from the model's `name_or_path`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.bfloat16,
                                                 quantization_config=lowbit.HqqConfig(bits=4, group_size=64))
    export(model, "gguf", dst=tmp_path / "memory.gguf", progress=False)
    export(stories_w4, "gguf", dst=tmp_path / "folder.gguf", progress=False)
    _, from_memory, fields = read_gguf(tmp_path / "memory.gguf")
    _, from_folder, _ = read_gguf(tmp_path / "folder.gguf")
    assert sorted(from_memory) == sorted(from_folder)
    for name, t in from_folder.items():
        assert np.array_equal(from_memory[name].data, t.data), name
    assert fields["tokenizer.ggml.model"] == "llama"
