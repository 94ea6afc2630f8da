"""ARHQ: W = W_res + L with a low-rank branch L = B·Aᵀ in the compute dtype and the residual, as well as
its input, in NVFP4; SVDQuant (Li et al., 2024) as the baseline decomposition.

SVDQuant takes L as the best rank-r approximation of W. ARHQ chooses L for the error that activation
quantization pushes through the layer: with E_x = X − Q_x(X) and G = E_xᵀE_x / N (the activation residual
Hessian), the branch minimises ‖E_x (W − L)ᵀ‖_F over rank(L) ≤ r. Writing G = G^{1/2}·G^{1/2}, that is
the truncated SVD of W·G^{1/2}, mapped back by G^{-1/2}. G is damped by WEIGHT_NOISE·diag(XᵀX)/N: the
residual W − L is itself rounded to NVFP4 (about 1% of its energy, ~20 dB), and that error reaches the
output through XᵀX. The term keeps G well conditioned where E_x is flat and weighs each input channel
by how much signal it carries.

Optional SmoothQuant-style smoothing (per input channel s_j = max|X_j|^α / max|W_j|^(1−α)) runs first
and both decompositions see the smoothed layer. It is folded into the preceding RMSNorm for q/k/v and
gate/up, into up_proj's rows for down_proj, and kept in the module (`smooth_scale`) for o_proj: its
input comes out of attention, where a grouped-query model shares one value channel between several
o_proj inputs.

Layers whose input width is not a multiple of 16 (the NVFP4 block), and layers whose smaller side is
not above the rank (their branch would be the whole matrix), stay in the compute dtype; they are
listed in the save metadata (`layers_kept`). Reload builds the Nvfp4Linear modules from the
config alone, so transformers loads the checkpoint like any other.
"""
import logging

import torch

from . import calibration, integration, nvfp4, rotation
from .base import (CALIBRATION_OPTIONS, AfterLoadHfQuantizer, LowbitConfig, Method, Option, check_calibration,
                   check_choice)
from .modules import Nvfp4Linear

logger = logging.getLogger(__name__)

DECOMPOSITIONS = ("arhq", "svdquant")
WEIGHT_NOISE = 0.01  # NVFP4's relative rounding energy on the residual weights (the damping of G)
CALIBRATION_BATCH = 2


class ArhqConfig(LowbitConfig):
    """NVFP4 W4A4 with a low-rank branch.

    Args:
        rank: rank of the branch B·Aᵀ (0: plain NVFP4, no branch).
        decomposition: "arhq" (activation-residual Hessian, needs `calibration`) or "svdquant" (the
            best rank-r approximation of W; calibration-free unless smoothing).
        smoothing: None, or SmoothQuant's migration strength alpha in [0, 1] (needs `calibration`).
        calibration: a local text file, a list of strings, or a `datasets` name ("name[:subset]").
        nsamples, seqlen: calibration windows and their length in tokens; seed picks the windows.
        modules_to_not_convert: module names kept in the compute dtype (the head by default).
        int8_runtime: compute each layer as one int8 product (`torch._int_mm`) instead of simulating NVFP4
            exactly: the residual re-rounded once onto a per-channel int8 grid (1 more byte per weight in
            memory, the packed tensors unchanged), the input's NVFP4 values re-rounded per token onto int8.
            Faster than the model in bf16 on CPU, at a perplexity cost docs/arhq.md states. Saved in the
            config, so a reload keeps it; `lowbit.arhq.use_int8_runtime(model)` switches a loaded model.
    """

    quant_method = "lowbit_arhq"
    _fields = {"rank": 128, "decomposition": "arhq", "smoothing": None, "calibration": None, "nsamples": 128,
               "seqlen": 2048, "seed": 13, "modules_to_not_convert": ["lm_head"], "int8_runtime": False}
    _renamed = {"dequantized_residual": "int8_runtime"}

    def validate(self):
        super().validate()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative integer (0 = no low-rank branch), got {self.rank!r}")
        check_choice("decomposition", self.decomposition, DECOMPOSITIONS)
        if not isinstance(self.int8_runtime, bool):
            raise ValueError(f"int8_runtime must be True or False, got {self.int8_runtime!r}")
        alpha = self.smoothing
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
            raise ValueError(f"smoothing must be None or a migration strength alpha in [0, 1], got {alpha!r}")
        check_calibration(self)
        if self.needs_calibration and self.calibration is None:
            needs = ([f"decomposition='arhq' with rank={self.rank}"] if self.decomposition == "arhq" and self.rank
                     else []) + ([f"smoothing={alpha}"] if alpha is not None else [])
            raise ValueError(f"{' and '.join(needs)} needs calibration data: pass calibration= a text file, a list "
                             f"of strings or a datasets name (or use decomposition='svdquant' without smoothing)")

    @property
    def needs_calibration(self) -> bool:
        return (self.decomposition == "arhq" and self.rank > 0) or self.smoothing is not None


def quantized_names(model, config: ArhqConfig) -> list[str]:
    """The linears that become Nvfp4Linear: those the config targets whose input width NVFP4's blocks
    tile and whose smaller side exceeds the rank (deterministic rules, so quantize and reload agree).
    A rank-r branch of a matrix with min(in, out) ≤ r is the whole matrix: the compute dtype holds it
    exactly and in fewer bytes (e.g. a grouped-query model's narrow k_proj/v_proj at a large rank)."""
    names = integration.linears_to_quantize(model, config.modules_to_not_convert)
    tiled = [n for n in names if model.get_submodule(n).in_features % nvfp4.BLOCK_SIZE == 0]
    side = {n: min(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in tiled}
    quantized = [n for n in tiled if config.rank < side[n]]
    if tiled and not quantized:
        widest = max(tiled, key=side.get)
        raise ValueError(f"rank={config.rank} must be below min(in_features, out_features) of some layer; the "
                         f"largest is {side[widest]}, of {widest}")
    untiled, narrow = [n for n in names if n not in side], [n for n in tiled if n not in quantized]
    if untiled:
        logger.info("ARHQ: %s kept in the compute dtype (input width not a multiple of %d)", ", ".join(untiled),
                    nvfp4.BLOCK_SIZE)
    if narrow:
        logger.info("ARHQ: %s kept in the compute dtype (min(in_features, out_features) <= rank=%d)",
                    ", ".join(narrow), config.rank)
    return quantized


def check_model(model, config: ArhqConfig) -> None:
    if config.smoothing is not None:
        rotation.check_architecture(model)  # folding needs to know which norm feeds which linear


def _keeps_smooth_scale(config: ArhqConfig, name: str) -> bool:
    return config.smoothing is not None and name.endswith("self_attn.o_proj")


@torch.no_grad()
def hessian_roots(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^{1/2}, G^{-1/2}) of the damped G, in float32 (the damping keeps its condition number within
    what float32 resolves; float64 eigendecompositions of MLP-wide matrices are many times slower)."""
    e, v = torch.linalg.eigh(hessian.float())
    e = e.clamp_min(e.max().clamp_min(1e-30) * 1e-7)  # channels that never fire, and eigh's own rounding
    return (v * e.sqrt()) @ v.T, (v * e.rsqrt()) @ v.T


@torch.no_grad()
def low_rank_branch(weight: torch.Tensor, rank: int, roots: tuple | None = None):
    """(B [out, rank], Aᵀ [rank, in]) in float32. `roots` None: SVDQuant, the top-rank SVD of W; else
    ARHQ with `roots = hessian_roots(G)`: argmin ‖(W − B·Aᵀ)·G^{1/2}‖_F = SVD_r(W·G^{1/2})·G^{-1/2}."""
    w = weight.float()
    if roots is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    root, inv_root = roots
    u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank] @ inv_root


def arhq_objective(weight: torch.Tensor, branch, x: torch.Tensor) -> float:
    """(‖E_x Rᵀ‖_F² + WEIGHT_NOISE·Σ_j ‖X_j‖²·‖R_j‖²) / N for the inputs `x` [N, in] and the residual
    R = W − L: what ARHQ minimises (the activation error, and the residual's own rounding)."""
    e = (x - nvfp4.fake_quantize_per_token(x)).double()
    residual = weight.double() - (branch[0].double() @ branch[1].double() if branch else 0)
    weight_noise = WEIGHT_NOISE * (x.double().pow(2).sum(0) * residual.pow(2).sum(0)).sum()
    return float(((e @ residual.T).pow(2).sum() + weight_noise) / x.shape[0])


def activation_residual_hessian(x: torch.Tensor) -> torch.Tensor:
    """E_xᵀE_x + WEIGHT_NOISE·diag(XᵀX) (summed over tokens, float32) for the inputs x [N, in]."""
    x = x.float()
    e = x - nvfp4.fake_quantize_per_token(x)
    g = e.T @ e
    g.diagonal().add_(WEIGHT_NOISE * x.pow(2).sum(0))
    return g


def smoothing_scales(act_absmax: torch.Tensor, weights, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1−α) over every weight reading channel j."""
    w_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = act_absmax.float().clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@torch.no_grad()
def _smooth_layer(layer, inputs, alpha: float, smooth_o_proj: bool = True) -> dict | None:
    """Fold smoothing into one decoder layer (the fp function is unchanged). o_proj's scale stays in its
    module, so it is only applied when o_proj is being quantized (`smooth_o_proj`): then it is returned,
    and until the module holds it a pre-hook divides o_proj's input (call `remove` on it)."""
    attn, mlp = layer.self_attn, layer.mlp
    readers = {"attn": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj],
               "mlp": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}
    absmax, _ = calibration.input_statistics(layer, inputs, {k: v[0] for k, v in readers.items()},
                                             lambda x: x.abs().amax(0).float(), torch.maximum)
    for norm, key in ((layer.input_layernorm, "attn"), (layer.post_attention_layernorm, "mlp")):
        s = smoothing_scales(absmax[key], [m.weight for m in readers[key]], alpha)
        norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)
        for m in readers[key]:
            m.weight.data = (m.weight.data.float() * s).to(m.weight.dtype)
    s = smoothing_scales(absmax["down"], [mlp.down_proj.weight], alpha)
    mlp.up_proj.weight.data = (mlp.up_proj.weight.data.float() / s[:, None]).to(mlp.up_proj.weight.dtype)
    if mlp.up_proj.bias is not None:
        mlp.up_proj.bias.data = (mlp.up_proj.bias.data.float() / s).to(mlp.up_proj.bias.dtype)
    mlp.down_proj.weight.data = (mlp.down_proj.weight.data.float() * s).to(mlp.down_proj.weight.dtype)
    if not smooth_o_proj:
        return None
    s_o = smoothing_scales(absmax["o"], [attn.o_proj.weight], alpha).to(attn.o_proj.weight.dtype)
    attn.o_proj.weight.data = (attn.o_proj.weight.data.float() * s_o.float()).to(attn.o_proj.weight.dtype)
    hook = attn.o_proj.register_forward_pre_hook(lambda m, args: (args[0] / s_o.to(args[0].dtype),))
    return {"scale": s_o, "hook": hook}


def _quantize_linear(model, name: str, rank: int, roots=None, smooth_scale=None) -> None:
    linear = model.get_submodule(name)
    branch = low_rank_branch(linear.weight, rank, roots) if rank else (None, None)
    module = Nvfp4Linear.from_weight(linear.weight.data, linear.bias, *branch, smooth_scale=smooth_scale,
                                     dtype=linear.weight.dtype)
    integration.set_module(model, name, module)


@torch.no_grad()
def quantize_model(model, config: ArhqConfig, calibration_ids=None) -> None:
    """Smooth (optionally), decompose and quantize every targeted linear in place. `calibration_ids`: the
    config's calibration tokens when already at hand (`calibration.model_calibration_ids`)."""
    names = quantized_names(model, config)
    check_model(model, config)
    integration.untie_head(model, names)
    progress = integration.progress_enabled()
    trim = integration.malloc_trim()
    if not config.needs_calibration:
        from tqdm.auto import tqdm

        for name in tqdm(names, desc="quantizing", disable=not progress):
            _quantize_linear(model, name, config.rank, None)
            trim()
        return
    ids = calibration_ids if calibration_ids is not None else calibration.model_calibration_ids(model, config)
    index = {id(layer): i for i, layer in enumerate(model.model.layers)}
    done = set()
    for _, layer, inputs in calibration.layer_by_layer(model, ids, CALIBRATION_BATCH, progress=progress):
        prefix = f"model.layers.{index[id(layer)]}."
        mine = [n for n in names if n.startswith(prefix)]
        smooth = None
        if config.smoothing is not None:
            smooth = _smooth_layer(layer, inputs, config.smoothing, any(_keeps_smooth_scale(config, n) for n in mine))
        try:
            hessians = {}
            if config.decomposition == "arhq" and config.rank:
                hessians, _ = calibration.input_statistics(
                    layer, inputs, {n: model.get_submodule(n) for n in mine}, activation_residual_hessian, torch.Tensor.add_)
            roots = {}  # q/k/v (gate/up) share one G object: one eigendecomposition
            for name in mine:
                kept_scale = smooth["scale"] if smooth and _keeps_smooth_scale(config, name) else None
                g = hessians.get(name)
                if g is not None and id(g) not in roots:
                    roots[id(g)] = hessian_roots(g)
                _quantize_linear(model, name, config.rank, roots.get(id(g)), kept_scale)
                done.add(name)
        finally:
            if smooth:
                smooth["hook"].remove()
        trim()
    rest = [n for n in names if n not in done]
    if rest:  # outside the decoder layers (a head the user chose to quantize): no statistics there
        logger.info("ARHQ: %s decomposed without calibration statistics (SVD, no smoothing)", ", ".join(rest))
        for name in rest:
            _quantize_linear(model, name, config.rank, None)


class ArhqHfQuantizer(AfterLoadHfQuantizer):
    """Quantize on load: `quantize_model` smooths, decomposes and quantizes the loaded fp model.
    Reload: the Nvfp4Linear modules from the config alone."""

    def target_names(self, model):
        names = quantized_names(model, self.quantization_config)
        check_model(model, self.quantization_config)
        return names

    def replace_for_reload(self, model, names, checkpoint_files):
        cfg = self.quantization_config
        integration.replace_with_quant_linear(
            model, names, self.dtype, with_placeholder=False, module_cls=Nvfp4Linear,
            spec=lambda name, linear: {"rank": cfg.rank, "smooth": _keeps_smooth_scale(cfg, name)})

    def quantize(self, model):
        quantize_model(model, self.quantization_config, calibration_ids=self.take_calibration_ids())
        self.prepare_runtime(model)

    def prepare_runtime(self, model):
        if self.quantization_config.int8_runtime:
            use_int8_runtime(model)
        else:
            integration.prepare_runtime(model)


def use_int8_runtime(model) -> None:
    """Switch every Nvfp4Linear of a loaded model to its int8 runtime (`ArhqConfig.int8_runtime`)."""
    trim = integration.malloc_trim()
    for _, module in integration.quant_linears(model):
        module.use_int8_runtime()
        trim()
    integration.share_input_products(model)


METHOD = Method(
    name="arhq", config=ArhqConfig, quantizer=ArhqHfQuantizer, title="ARHQ",
    summary="NVFP4 weights and activations (E2M1 values, FP8 E4M3 scales per 16) with a low-rank branch in the "
            "compute dtype, chosen under the activation-residual Hessian (ARHQ) or as the weight's top singular "
            "directions (SVDQuant).",
    options=(Option("--rank", "rank", int, "rank of the low-rank branch, 0 = plain NVFP4"),
             Option("--decomposition", "decomposition", str, "arhq or svdquant"),
             Option("--smoothing", "smoothing", float, "SmoothQuant migration strength alpha in [0, 1] "
                    "(needs --calib)"),
             *CALIBRATION_OPTIONS),
    tag=lambda c: (f"{'ARHQ' if c.decomposition == 'arhq' else 'SVDQuant'}_nvfp4_r{c.rank}"
                   + (f"_sq{c.smoothing:g}" if c.smoothing is not None else "")),
)
