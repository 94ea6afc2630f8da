"""QuaRot's rotations leave the fp model's function unchanged (up to float rounding)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny

from lowbit import hadamard, rotation


@pytest.fixture(scope="module")
def tiny_qwen2_tied(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2-tied"), tie_word_embeddings=True)


def _rotated_copy(src, q_kind):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rotation.fuse_norms(model, final_norm=q_kind != "hadamard")
    d = model.config.hidden_size
    if q_kind == "hadamard":
        q = hadamard.hadamard_matrix(d, torch.float64)
    else:
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotation.rotate_residual(model, q)
    rotation.rotate_values(model)
    rotation.fuse_down_proj_hadamard(model)
    if q_kind == "hadamard":
        rotation.unrotate_final_norm(model)
    for layer in model.model.layers:  # the run-time half of the down_proj rotation
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: (hadamard.hadamard_transform(args[0]),))
    return model


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_qwen2_tied", "stories"])
@pytest.mark.parametrize("q_kind", ["hadamard", "random"])
def test_rotated_model_computes_the_same_logits(request, arch, q_kind):
    src = request.getfixturevalue(arch)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rot = _rotated_copy(src, q_kind)
    ids = torch.randint(3, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits, rot(ids).logits
    assert torch.allclose(a, b, atol=2e-4 * a.abs().max().item()), (a - b).abs().max()
    assert not torch.allclose(ref.model.embed_tokens.weight, rot.model.embed_tokens.weight)
    tied = ref.lm_head.weight is ref.model.embed_tokens.weight
    assert (rot.lm_head.weight is rot.model.embed_tokens.weight) == (tied and q_kind == "hadamard")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2_tied"])
def test_folding_the_unrotated_final_norm_keeps_the_logits(request, arch):
    """A Hadamard-rotated model made hook-free again (what dequantize does) computes the same function."""
    rot = _rotated_copy(request.getfixturevalue(arch), "hadamard")
    ids = torch.randint(3, rot.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = rot(ids).logits
        rotation.fold_unrotated_final_norm(rot)
        after = rot(ids).logits
    assert not rot.model.norm._forward_hooks and not rot.model.norm._forward_pre_hooks
    assert rot.lm_head.weight is not rot.model.embed_tokens.weight and not rot.config.tie_word_embeddings
    assert torch.allclose(before, after, atol=2e-4 * before.abs().max().item()), (before - after).abs().max()


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="rotations support LlamaForCausalLM.*got GPT2LMHeadModel"):
        rotation.fuse_norms(model)
