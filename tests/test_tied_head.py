"""A head tied to the input embeddings: kept (the default) or quantized as its own copy when the config
targets it, and either way reloaded as it was saved."""
import pytest
import torch
from conftest import CALIBRATION_TEXTS, build_tiny
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.integration import QUANTIZED_MODULES
from lowbit.modules import QuantLinear

CONFIGS = {
    "hqq": lambda **kw: lowbit.HqqConfig(bits=4, group_size=32, **kw),
    "quarot": lambda **kw: lowbit.QuaRotConfig.from_preset("w4a8kv8", group_size=32, **kw),
    "quarot-pca": lambda **kw: lowbit.QuaRotConfig.from_preset("w4a8kv8", group_size=32, rotation_method="pca",
                                                               calibration=CALIBRATION_TEXTS, nsamples=2, seqlen=32, **kw),
    "householder": lambda **kw: lowbit.HouseholderConfig(act_bits=8, group_size=32, weight_quantizer="rtn", steps=1,
                                                         nsamples=2, cali_bsz=1, seqlen=32,
                                                         calibration=CALIBRATION_TEXTS, **kw),
    "arhq": lambda **kw: lowbit.ArhqConfig(rank=0, **kw),
}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-tied"), tie_word_embeddings=True, intermediate_size=192)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_targeted_tied_head_is_quantized_untied_and_reloads(tied, tmp_path, method):
    model = AutoModelForCausalLM.from_pretrained(tied, quantization_config=CONFIGS[method](modules_to_not_convert=[]))
    assert isinstance(model.lm_head, QUANTIZED_MODULES)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert not model.config.tie_word_embeddings
    ids = torch.randint(3, 80, (1, 12))
    before = _logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    assert any(k.startswith("lm_head.") for k in load_file(tmp_path / "q" / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.lm_head, QUANTIZED_MODULES) and not reloaded.config.tie_word_embeddings
    assert torch.equal(_logits(reloaded, ids), before)


def test_hqq_quantizes_a_tied_head_from_the_embedding_matrix_and_leaves_the_embeddings(tied):
    """The head's codes are those of quantizing the embedding matrix itself; the lookup table is untouched."""
    plain = AutoModelForCausalLM.from_pretrained(tied)
    model = AutoModelForCausalLM.from_pretrained(tied, quantization_config=CONFIGS["hqq"](modules_to_not_convert=[]))
    emb = plain.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb)
    head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, dtype=emb.dtype)
    head.weight.data = emb.data.clone()
    expected = QuantLinear.from_linear(head, bits=4, group_size=32, solver="hqq")
    assert torch.equal(model.lm_head.codes(), expected.codes())
    assert torch.equal(model.lm_head.scale_offset, expected.scale_offset)


@pytest.mark.parametrize("method", ["hqq", "quarot"])
def test_by_default_a_tied_head_stays_tied(tied, method):
    model = AutoModelForCausalLM.from_pretrained(tied, quantization_config=CONFIGS[method]())
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
