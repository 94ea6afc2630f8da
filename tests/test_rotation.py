"""QuaRot's rotations leave the fp model's function unchanged (up to float rounding)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny

from lowbit import hadamard, kvcache, rotation


@pytest.fixture(scope="module")
def tiny_qwen2_tied(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2-tied"), tie_word_embeddings=True)


def _rotated_copy(src, q_kind):
    """QuaRot's rotations in fp: a Hadamard keeps every norm's scale (run unrotated), another Q folds them."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    _random_norm_scales(model)
    d = model.config.hidden_size
    if q_kind == "hadamard":
        rotation.rotate_residual(model, hadamard.hadamard_matrix(d, torch.float64))
        rotation.unrotate_norms(model)
    else:
        rotation.fuse_norms(model)
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        rotation.rotate_residual(model, q)
    rotation.rotate_values(model)
    rotation.fuse_down_proj_hadamard(model)
    for layer in model.model.layers:  # the run-time half of the down_proj rotation
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: (hadamard.hadamard_transform(args[0]),))
    return model


def _random_norm_scales(model):
    """Trained norms are not all ones (a scale of one commutes with any rotation and proves nothing)."""
    gen = torch.Generator().manual_seed(2)
    for norm in rotation._norms(model):
        norm.weight.data = torch.rand(norm.weight.shape, generator=gen) + 0.5


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_qwen2_tied", "stories"])
@pytest.mark.parametrize("q_kind", ["hadamard", "random"])
def test_rotated_model_computes_the_same_logits(request, arch, q_kind):
    src = request.getfixturevalue(arch)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    _random_norm_scales(ref)
    rot = _rotated_copy(src, q_kind)
    ids = torch.randint(3, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits, rot(ids).logits
    assert torch.allclose(a, b, atol=2e-4 * a.abs().max().item()), (a - b).abs().max()
    assert not torch.allclose(ref.model.embed_tokens.weight, rot.model.embed_tokens.weight)
    tied = ref.lm_head.weight is ref.model.embed_tokens.weight
    assert (rot.lm_head.weight is rot.model.embed_tokens.weight) == (tied and q_kind == "hadamard")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2_tied"])
def test_folding_the_unrotated_norms_keeps_the_logits(request, arch):
    """A Hadamard-rotated model made hook-free again (what dequantize does) computes the same function."""
    rot = _rotated_copy(request.getfixturevalue(arch), "hadamard")
    ids = torch.randint(3, rot.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = rot(ids).logits
        rotation.fold_unrotated_norms(rot)
        after = rot(ids).logits
    for norm in rotation._norms(rot):
        assert not norm._forward_hooks and not norm._forward_pre_hooks and torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert rot.lm_head.weight is not rot.model.embed_tokens.weight and not rot.config.tie_word_embeddings
    assert torch.allclose(before, after, atol=2e-4 * before.abs().max().item()), (before - after).abs().max()


@pytest.mark.parametrize("q_kind", ["hadamard", "random"])
def test_key_statistics_do_not_depend_on_the_rotation(tiny_qwen2, q_kind):
    """The keys are the same function of the tokens before and after rotating, so are their statistics
    (measured through the input norm, scale folded or run unrotated)."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    _random_norm_scales(ref)
    for (c0, s0), (c1, s1) in zip(kvcache.key_statistics(ref), kvcache.key_statistics(_rotated_copy(tiny_qwen2, q_kind))):
        assert torch.allclose(c0, c1, atol=1e-5) and torch.allclose(s0, s1, rtol=1e-4)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="rotations support LlamaForCausalLM.*got GPT2LMHeadModel"):
        rotation.fuse_norms(model)
