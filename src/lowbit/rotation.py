"""Rotation-invariant rewrites of Llama-shaped decoders (QuaRot, and later Householder rotations).

An RMSNorm without a scale commutes with any orthogonal Q (rms(xQ) = rms(x)), so once each norm's
scale is folded into the linears that read its output, the residual stream can be rotated: every
writer of the residual (embeddings, o_proj, down_proj) is multiplied by Q on its output side and
every reader (q/k/v, gate/up, the head) by Q on its input side, and the model computes the same
function. Inside a layer, v_proj's output can be rotated per head with Qᵀ folded into o_proj, and
down_proj's input can be rotated online (the transform is applied at run time, `W·H` fused here).

The final norm is the exception when the residual rotation is a Hadamard: folding its scale into the
head would make the head differ from the (rotated) input embeddings, so a tied head would have to be
untied: one more vocabulary-sized matrix in memory and on disk (SmolLM2-135M: +21% of the bf16 model).
Instead it keeps its scale and runs in the unrotated basis, between an inverse and a forward Hadamard
applied at run time (`unrotate_final_norm`), and the head stays tied.

All weight algebra runs in float64 and is cast back to each weight's dtype once, in place and a block
of rows at a time, so that rotating a 50k-row embedding never holds a float64 copy of it; the float64
scratch is handed back to the OS after each layer (glibc would otherwise keep ~a layer's worth per
layer: +120% of SmolLM2-135M's size over norm fusion alone).
"""
import torch
from torch import nn

from . import hadamard
from .integration import malloc_trim

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


def _fold_norm(norm: nn.Module, readers) -> None:
    gamma = norm.weight.data.double()
    for lin in readers:
        _update_rows_(lin.weight.data, lambda w: w * gamma)
    norm.weight.data = torch.ones_like(norm.weight.data)


def _untie_head(model) -> nn.Module:
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    return head


@torch.no_grad()
def fuse_norms(model, final_norm: bool = True) -> None:
    """Fold every RMSNorm scale into the linears reading its output. `final_norm=False` leaves the
    final norm (and a tied head) alone, for `unrotate_final_norm`; otherwise a tied head is untied."""
    check_architecture(model)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        malloc_trim()()
    if final_norm:
        _fold_norm(model.model.norm, [_untie_head(model)])
        malloc_trim()()


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
    return (hadamard.hadamard_transform(args[0].float(), inverse=True).to(args[0].dtype),)


def _rotated(module, args, output):
    return hadamard.hadamard_transform(output.float()).to(output.dtype)


def unrotate_final_norm(model) -> None:
    """Run the final norm, scale kept, on the unrotated residual: x ↦ norm(x·Hᵀ)·H, H the Hadamard
    of `rotate_residual` (regenerated from the hidden size, applied in O(n log n))."""
    remove_final_norm_hooks(model)
    norm = model.model.norm
    model._lowbit_final_norm_hooks = (norm.register_forward_pre_hook(_unrotated),
                                      norm.register_forward_hook(_rotated))


def remove_final_norm_hooks(model) -> bool:
    hooks = getattr(model, "_lowbit_final_norm_hooks", None)
    if hooks is None:
        return False
    for h in hooks:
        h.remove()
    del model._lowbit_final_norm_hooks
    return True


@torch.no_grad()
def fold_unrotated_final_norm(model) -> None:
    """Make `unrotate_final_norm` a plain model again: the norm's scale, conjugated by H, folded into
    an untied head (rows w ↦ (w·Hᵀ ⊙ γ)·H), the scale set to one and the hooks removed."""
    if not remove_final_norm_hooks(model):
        return
    norm = model.model.norm
    gamma = norm.weight.data.double()
    _update_rows_(_untie_head(model).weight.data,
                  lambda w: hadamard.hadamard_transform(hadamard.hadamard_transform(w, inverse=True) * gamma))
    norm.weight.data = torch.ones_like(norm.weight.data)
