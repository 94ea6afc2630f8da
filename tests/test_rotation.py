"""QuaRot's rotations leave the fp model's function unchanged (up to float rounding)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit import hadamard, rotation


def _rotated_copy(src, q_kind):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rotation.fuse_norms(model)
    d = model.config.hidden_size
    if q_kind == "hadamard":
        q = hadamard.hadamard_matrix(d, torch.float64)
    else:
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotation.rotate_residual(model, q)
    rotation.rotate_values(model)
    rotation.fuse_down_proj_hadamard(model)
    for layer in model.model.layers:  # the run-time half of the down_proj rotation
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: (hadamard.hadamard_transform(args[0]),))
    return model


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "stories"])
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


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="rotations support LlamaForCausalLM.*got GPT2LMHeadModel"):
        rotation.fuse_norms(model)
