"""Rotation-invariant rewrites of Llama-shaped decoders (QuaRot, and later Householder rotations).

An RMSNorm without a scale commutes with any orthogonal Q (rms(xQ) = rms(x)), so once each norm's
scale is folded into the linears that read its output, the residual stream can be rotated: every
writer of the residual (embeddings, o_proj, down_proj) is multiplied by Q on its output side and
every reader (q/k/v, gate/up, the head) by Q on its input side, and the model computes the same
function. Inside a layer, v_proj's output can be rotated per head with Qᵀ folded into o_proj, and
down_proj's input can be rotated online (the transform is applied at run time, `W·H` fused here).

With a Hadamard residual rotation no norm scale is folded at all: every RMSNorm keeps its scale and
runs on the unrotated stream, between an inverse and a forward Hadamard applied at run time
(`unrotate_norms`, x ↦ norm(x·Hᵀ)·H, O(n log n) per token). Folding a scale into the readers makes
their weights carry it: some models (SmolLM2) put small scales on their outlier channels, and folded
weights then put full-size rounding error on exactly those channels. A tied head also stays tied (folding the final norm would
need a second vocabulary-sized matrix). A dense rotation (PCA) has no fast transform, so there
`fuse_norms` folds every scale, the final one into an untied head.

All weight algebra runs in float64 and is cast back to each weight's dtype once, in place and a block
of rows at a time, so that rotating a 50k-row embedding never holds a float64 copy of it; the float64
scratch is handed back to the OS after each layer (glibc would otherwise keep about a layer's worth
per layer).
"""
import torch
from torch import nn

from . import hadamard
from .integration import SHARED_INPUT_GROUPS, malloc_trim, untie_head

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def check_architecture(model) -> None:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"rotations support {', '.join(SUPPORTED)} (pre-norm decoders with RMSNorm and a "
                         f"Llama-shaped MLP); got {name}")


ROW_BLOCK = 1024


def _update_rows_(weight: torch.Tensor, fn) -> None:
    """weight[rows] ← fn(weight[rows] in float64), block by block, in place."""
    for start in range(0, weight.shape[0], ROW_BLOCK):
        block = weight[start:start + ROW_BLOCK]
        block.copy_(fn(block.double()))


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.dtype).contiguous()


def _fold_norm(norm: nn.Module, readers, conjugate: bool = False) -> None:
    """Readers' input columns times the norm's scale γ (`conjugate`: γ acts in the unrotated basis of a
    Hadamard-rotated reader, rows w ↦ (w·Hᵀ ⊙ γ)·H); the scale becomes one."""
    gamma = norm.weight.data.double()
    if conjugate:
        fold = lambda w: hadamard.hadamard_transform(hadamard.hadamard_transform(w, inverse=True) * gamma)  # noqa: E731
    else:
        fold = lambda w: w * gamma  # noqa: E731
    for lin in readers:
        _update_rows_(lin.weight.data, fold)
    norm.weight.data = torch.ones_like(norm.weight.data)
    malloc_trim()()


@torch.no_grad()
def fuse_norms(model) -> None:
    """Fold every RMSNorm scale into the linears reading its output; a tied head is untied."""
    check_architecture(model)
    untie_head(model)
    for norm, readers in _norms_and_readers(model):
        _fold_norm(norm, readers)


def _norms_and_readers(model):
    """(norm, the linears reading its output) for every RMSNorm, the final norm last with the head (a
    caller folding into it unties it first: with the scale folded in, it differs from the embeddings)."""
    for layer in model.model.layers:
        yield layer.input_layernorm, [layer.get_submodule(n) for n in SHARED_INPUT_GROUPS["qkv"]]
        yield layer.post_attention_layernorm, [layer.get_submodule(n) for n in SHARED_INPUT_GROUPS["gate_up"]]
    yield model.model.norm, [model.get_output_embeddings()]


@torch.no_grad()
def rotate_residual(model, q: torch.Tensor) -> None:
    """Rotate the residual stream by the orthogonal `q` [hidden, hidden] (after `fuse_norms`)."""
    q = q.double()
    _update_rows_(model.get_input_embeddings().weight.data, lambda w: w @ q)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _update_rows_(reader.weight.data, lambda w: w @ q)
        for writer in (attn.o_proj, mlp.down_proj):  # W ← Qᵀ·W: the rows of Wᵀ times Q
            _update_rows_(writer.weight.data.T, lambda w: w @ q)
            if writer.bias is not None:
                _update_rows_(writer.bias.data.unsqueeze(0), lambda b: b @ q)
        malloc_trim()()
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:  # a tied head was rotated with the embeddings
        _update_rows_(head.weight.data, lambda w: w @ q)
    malloc_trim()()


@torch.no_grad()
def rotate_values(model) -> None:
    """Per-head Hadamard on v_proj's output, undone in o_proj's input (offline, no run-time cost)."""
    for layer in model.model.layers:
        attn = layer.self_attn
        hd = attn.head_dim
        h = hadamard.hadamard_matrix(hd, torch.float64)
        v, o = attn.v_proj, attn.o_proj
        n_kv = v.weight.shape[0] // hd
        w = v.weight.data.double().view(n_kv, hd, -1)
        _set(v, torch.einsum("ji,hjk->hik", h, w).reshape(n_kv * hd, -1),
             None if v.bias is None else (v.bias.data.double().view(n_kv, hd) @ h).reshape(-1))
        n_heads = o.weight.shape[1] // hd
        wo = o.weight.data.double().view(o.weight.shape[0], n_heads, hd)
        _set(o, (wo @ h).reshape(o.weight.shape[0], -1))
        malloc_trim()()


@torch.no_grad()
def fuse_down_proj_hadamard(model) -> None:
    """W_down ← W_down·H; the model must then apply H to down_proj's input at run time."""
    for layer in model.model.layers:
        _update_rows_(layer.mlp.down_proj.weight.data, hadamard.hadamard_transform)
        malloc_trim()()


def _unrotated(module, args):
    return (hadamard.transform_activations(args[0], inverse=True),)


def _rotated(module, args, output):
    return hadamard.transform_activations(output)


def _norms(model):
    return [norm for norm, _ in _norms_and_readers(model)]


def unrotate_norms(model) -> None:
    """Run every RMSNorm, scale kept, on the unrotated residual: x ↦ norm(x·Hᵀ)·H, H the Hadamard of
    `rotate_residual` (regenerated from the hidden size, applied in O(n log n))."""
    remove_norm_hooks(model)
    model._lowbit_norm_hooks = [h for norm in _norms(model)
                                for h in (norm.register_forward_pre_hook(_unrotated), norm.register_forward_hook(_rotated))]


def remove_norm_hooks(model) -> bool:
    hooks = getattr(model, "_lowbit_norm_hooks", None)
    if hooks is None:
        return False
    for h in hooks:
        h.remove()
    del model._lowbit_norm_hooks
    return True


@torch.no_grad()
def fold_unrotated_norms(model) -> None:
    """Make `unrotate_norms` a plain model again (its readers plain nn.Linear by now): each norm's scale,
    conjugated by H, folded into its readers (rows w ↦ (w·Hᵀ ⊙ γ)·H; the head untied), the scales set
    to one and the hooks removed."""
    if remove_norm_hooks(model):
        untie_head(model)
        for norm, readers in _norms_and_readers(model):
            _fold_norm(norm, readers, conjugate=True)
