"""Householder rotations (HH): a learned orthogonal Q = Had·H_k…H_1 in front of each group of linears,
optimized layer by layer together with learnable weight clipping (FlatQuant-style).

Per decoder layer, four rotations: one shared by q/k/v, one for o_proj, one shared by gate/up, one for
down_proj. Each starts from PCA: reflections that map the top-k principal axes of its calibration
inputs onto the first k coordinate axes, which the fixed Hadamard after them turns into flat
directions, so the variance those axes carry is spread over every channel, and the Hadamard spreads
the rest of the space as QuaRot's does (k = `reflections`, or per rotation the fewest axes holding
`pca_variance` of the variance). Then Adam minimises the error of the rotated, quantized layer's output
against the fp layer's, each token's squared error relative to its own output (`output_error`), over the Householder
vectors and a clipping ratio per weight group, initialised from QuaRot's per-group search (`clip_ratios`),
with straight-through rounding. Activations are quantized as QuantLinear quantizes them at run time: per
token, at 4 bits each token's clipping searched (`modules.ACT_CLIP`). One learned ratio per activation
quantizer cannot follow how ranges vary from token to token, as the search does. The next layer is
calibrated on what the quantized layer outputs.

Inference: W' = W·Qᵀ is quantized into a QuantLinear (round-to-nearest on the learned clipping grid, or,
with weight_quantizer="gptq", GPTQ onto that same grid with the rotated inputs' Hessian Q·E[xxᵀ]·Qᵀ from
the calibration pass that fed the PCA: no extra data or forward pass), and Q is applied to the input at run time as k
rank-1 updates (no rotation folds into an RMSNorm, through attention or through the gated MLP). The
shared rotations of q/k/v and gate/up run once, right after the norm that feeds the group (`RotatedNorm`);
o_proj and down_proj carry their own (`QuantLinear(input_transform="householder")`). The checkpoint holds
the packed weights (the learned clipping is in their scales) and each rotation's vectors once, in the compute
dtype; reload sizes each rotation from the checkpoint header.
"""
import logging
import math
import time

import torch
from torch import nn

from . import calibration, integration, reflections, rotation
from .base import (CALIBRATION_OPTIONS, AfterLoadHfQuantizer, LowbitConfig, Method, Option, check_calibration,
                   check_choice)
from .modules import ACT_CLIP, HouseholderRotation, QuantLinear, RotatedNorm
from .quantize import CLIP_GRID, clip_ratios, quantize_activations, quantize_gptq, quantize_rtn_ratio

logger = logging.getLogger(__name__)

GROUPS = {"qkv": integration.SHARED_INPUT_GROUPS["qkv"], "o": ("self_attn.o_proj",),
          "gate_up": integration.SHARED_INPUT_GROUPS["gate_up"], "down": ("mlp.down_proj",)}
NORM_OF_GROUP = {"qkv": "input_layernorm", "gate_up": "post_attention_layernorm"}  # rotation stored there
GROUP_SIZES = (32, 64, 128, -1)
GENERATED_SOURCE = "text sampled from the model itself (no calibration data reachable)"


class HouseholderConfig(LowbitConfig):
    """Learned Householder rotations with learnable weight clipping, W{bits}A{act_bits}.

    Args:
        bits: 4 or 8. act_bits: 4, 8 or 16 (16: weight-only).
        group_size: input channels per weight scale/offset (32, 64, 128; -1 = per output channel).
        weight_quantizer: "gptq" (GPTQ's error feedback onto the learned clipping grid; it needs nothing the
            optimization has not already computed) or "rtn" (round to nearest on that grid).
        reflections: k for every rotation. Few suffice: the Hadamard after them spreads what they leave,
            and each one costs d numbers in the checkpoint and 2·d multiply-adds per token at run time.
        pca_variance: in (0, 1], instead of `reflections`: each rotation's k = the fewest principal axes
            explaining this share of its input variance (hundreds for an MLP-wide input). Given alone, it
            replaces the default `reflections`; give one of the two, not both.
        steps, lr: Adam steps per decoder layer and their learning rate (0 steps: PCA init only).
        nsamples, cali_bsz, seqlen: calibration windows, windows per step, tokens per window.
        num_layers: optimize only the first N decoder layers (the rest keep their PCA init).
        calibration: a local text file, a list of strings, or a `datasets` name; None or unreachable:
            text sampled from the model, said so in the log and in `calibration_source`.
    """

    quant_method = "lowbit_householder"
    _fields = {"bits": 4, "act_bits": 8, "group_size": 64, "weight_quantizer": "gptq", "reflections": 16,
               "pca_variance": None,
               "steps": 100, "lr": 1e-3, "nsamples": 32, "cali_bsz": 4, "seqlen": 512, "num_layers": None,
               "calibration": None, "seed": 13, "modules_to_not_convert": ["lm_head"], "calibration_source": None}
    _renamed = {"w_bits": "bits", "a_bits": "act_bits", "max_seq_len": "seqlen"}

    def __init__(self, **kwargs):
        if kwargs.get("pca_variance") is not None and "reflections" not in kwargs:
            kwargs["reflections"] = None  # k from the variance instead of the default fixed k
        super().__init__(**kwargs)

    def validate(self):
        super().validate()
        check_choice("bits", self.bits, (4, 8))
        check_choice("act_bits", self.act_bits, (4, 8, 16))
        check_choice("group_size", self.group_size, GROUP_SIZES)
        check_choice("weight_quantizer", self.weight_quantizer, ("rtn", "gptq"))
        for name, low in (("reflections", 1), ("steps", 0), ("cali_bsz", 1), ("num_layers", 1)):
            value = getattr(self, name)
            if value is None and name in ("reflections", "num_layers"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}"
                                 f"{' or None' if name in ('reflections', 'num_layers') else ''}, got {value!r}")
        pv = self.pca_variance
        if (pv is None) == (self.reflections is None):
            raise ValueError(f"give one of reflections (k per rotation) or pca_variance (k from each rotation's "
                             f"input variance), not {'both' if pv is not None else 'neither'}: got "
                             f"reflections={self.reflections!r}, pca_variance={pv!r}")
        if pv is not None and (isinstance(pv, bool) or not isinstance(pv, (int, float)) or not 0 < pv <= 1):
            raise ValueError(f"pca_variance must be in (0, 1], got {pv!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        check_calibration(self)

    @property
    def needs_calibration(self) -> bool:
        return True  # with no calibration data, on text the model samples itself

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def _group_of(name: str):
    return next((g for g, members in GROUPS.items() if name.endswith(members)), None)


def _norm_name(name: str, group: str) -> str:
    """The norm feeding the linear `name` of a shared-rotation group (where that rotation is stored)."""
    member = next(m for m in GROUPS[group] if name.endswith(m))
    return name[:-len(member)] + NORM_OF_GROUP[group]


def check_model(model, config: HouseholderConfig, names) -> None:
    rotation.check_architecture(model)
    integration.check_group_size(model, names, config.group_size)
    for name in names:
        d = model.get_submodule(name).in_features
        if config.reflections is not None and _group_of(name) and config.reflections > d:
            raise ValueError(f"reflections must be in [1, d] for every rotation; got {config.reflections} for "
                             f"{name} (d = {d})")


# ---------------------------------------------------------------- calibration data

def sample_text_from_model(model, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] token ids generated by the model from its BOS token (sampling, temperature 1)."""
    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    start = torch.full((nsamples, 1), bos, dtype=torch.long, device=model.device)
    with torch.no_grad():
        out = model.generate(start, do_sample=True, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                             top_k=0, pad_token_id=tokenizer.eos_token_id)
    return out[:, :seqlen].cpu()


def calibration_ids(model, config: HouseholderConfig) -> torch.Tensor | None:
    """The config's calibration tokens, or None when it names none or they are unusable (then the
    model's own samples stand in: `sample_text_from_model`)."""
    if config.calibration is None:
        return None
    try:
        return calibration.model_calibration_ids(model, config)
    except ValueError as err:
        logger.warning("Householder: calibration %r unusable (%s)", config.calibration, err)
        return None


def generated_calibration_ids(model, config: HouseholderConfig) -> torch.Tensor:
    from transformers import AutoTokenizer

    logger.warning("Householder: calibrating on %s: %d x %d tokens", GENERATED_SOURCE, config.nsamples,
                   config.seqlen)
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    return sample_text_from_model(model, tokenizer, config.nsamples, config.seqlen, config.seed)


def calibration_tokens(model, config: HouseholderConfig) -> tuple[torch.Tensor, str | None]:
    """The config's calibration tokens, else the model's own samples; with `GENERATED_SOURCE` in the
    second place when those stood in."""
    ids = calibration_ids(model, config)
    if ids is None:
        return generated_calibration_ids(model, config), GENERATED_SOURCE
    return ids, None


# ---------------------------------------------------------------- PCA initialisation

def pca_reflections(covariance: torch.Tensor, pca_variance: float, k: int | None = None) -> torch.Tensor:
    """Vectors [k, d] of the reflections mapping the top-k principal axes of the (uncentred) input
    covariance [d, d] onto the first k coordinate axes, which the Hadamard of `reflections.rotate` then
    maps onto flat directions; k = the fewest axes explaining `pca_variance` of the variance unless given."""
    values, axes = torch.linalg.eigh(covariance.float())  # float32: principal axes, not a solve
    values, axes = values.flip(0).clamp_min(0), axes.flip(1)
    d = axes.shape[0]
    if k is None:
        share = values.cumsum(0) / values.sum().clamp_min(1e-30)
        k = int((share < pca_variance - 1e-12).sum()) + 1
    k = min(k, d)
    return reflections.mapping(axes[:, :k].double(), torch.eye(d, k, dtype=torch.float64)).float()


# ---------------------------------------------------------------- differentiable quantizers

def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int, ratio: torch.Tensor) -> torch.Tensor:
    """What `quantize_rtn_ratio` stores, differentiable (straight-through rounding) in w and ratio [out, groups]."""
    out, k = w.shape
    g = w.reshape(out, k // group_size, group_size)
    lo, hi = g.amin(-1) * ratio, g.amax(-1) * ratio
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8).unsqueeze(-1)
    q = torch.clamp(_round_ste((g - lo.unsqueeze(-1)) / scale), 0, qmax)
    return (q * scale + lo.unsqueeze(-1)).reshape(out, k)


def fake_quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """QuantLinear's per-token activation quantizer (clipped as ACT_CLIP says), differentiable in x:
    each token's clipping ratio is picked without gradient, its max|x| and the rounding are straight-through."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        _, picked = quantize_activations(x.detach(), bits, ACT_CLIP[bits])
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    scale = picked * (amax / amax.detach())  # the picked scale, its gradient through max|x| as ratio / qmax
    return torch.clamp(_round_ste(x / scale), -qmax - 1, qmax) * scale


class _TrainingLinear(nn.Module):
    """Stands in for a linear during optimization: y = Q_a(Q·x) · Q_w(W·Qᵀ)ᵀ + b, all differentiable.
    `vectors`: the learnable Householder vectors of Q (None: no rotation, the clipping not learned)."""

    def __init__(self, linear: nn.Linear, vectors: nn.Parameter | None, config: HouseholderConfig):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.vectors, self.config = vectors, config
        self.group_size = config.group_size_for(linear.in_features)
        with torch.no_grad():
            w = self.weight if vectors is None else reflections.rotate(self.weight, vectors)
            self.weight_clip = nn.Parameter(clip_ratios(w, config.bits, self.group_size),
                                            requires_grad=vectors is not None)

    def clip(self) -> torch.Tensor:
        return self.weight_clip.clamp(CLIP_GRID[-1], 1.0)

    def forward(self, x):
        cfg, w, x = self.config, self.weight, x.float()
        if self.vectors is not None:
            x, w = reflections.rotate(x, self.vectors), reflections.rotate(w, self.vectors)
        if cfg.act_bits < 16:
            x = fake_quantize_activations(x, cfg.act_bits)
        w = fake_quantize_weight(w, cfg.bits, self.group_size, self.clip())
        return nn.functional.linear(x, w, self.bias)


# ---------------------------------------------------------------- layer by layer

def output_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖ŷ_t − y_t‖² / ‖y_t‖²: each token's error relative to its own output. Plain MSE
    is dominated by the few attention-sink tokens whose residual stream carries massive activations
    (output norms two orders of magnitude above the other tokens' in some models), and the rotations
    then fit those tokens at the expense of all the others."""
    target = target.float()
    err = (out.float() - target).pow(2).sum(-1)
    return (err / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def _layer_error(layer, inputs, targets) -> float:
    with torch.no_grad():
        total, count = 0.0, 0
        for (hidden, kwargs), target in zip(inputs.batches(), targets):
            out = layer(hidden, **kwargs)
            tokens = target.numel() // target.shape[-1]
            total += output_error(out[0] if isinstance(out, tuple) else out, target).item() * tokens
            count += tokens
    return total / count


def _swap(layer, modules: dict) -> dict:
    """Install `modules` {relative name: module} into the layer; returns what they replaced."""
    old = {}
    for name, module in modules.items():
        old[name] = layer.get_submodule(name)
        integration.set_module(layer, name, module)
    return old


def optimize_layer(layer, inputs, config: HouseholderConfig, steps: int, names, progress: bool = False) -> dict:
    """PCA-initialise and optimize the rotations and clipping of one decoder layer's linears `names`
    (relative to the layer), in fp32, on `inputs`. Returns the learned parts per linear and the layer
    output error with no rotation, after the PCA init and after optimization. A non-finite loss stops the
    optimization at the last finite state; a result worse than the PCA init falls back to the init."""
    from tqdm.auto import tqdm

    dtype = layer.input_layernorm.weight.dtype
    layer.float()
    inputs32 = calibration.LayerInputs([h.float() for h in inputs.hidden], inputs.kwargs)
    with torch.no_grad():
        targets = []
        for hidden, kwargs in inputs32.batches():
            out = layer(hidden, **kwargs)
            targets.append((out[0] if isinstance(out, tuple) else out).float())
    groups = sorted({_group_of(n) for n in names})
    covariances, _ = calibration.input_statistics(
        layer, inputs32, {g: layer.get_submodule(GROUPS[g][0]) for g in groups},
        calibration.gram, torch.Tensor.add_)
    rots = {g: nn.Parameter(pca_reflections(covariances[g], config.pca_variance, config.reflections))
            for g in groups}
    original = _swap(layer, {n: _TrainingLinear(layer.get_submodule(n), None, config) for n in names})
    error_none = _layer_error(layer, inputs32, targets)
    trained = {n: _TrainingLinear(original[n], rots[_group_of(n)], config) for n in names}
    _swap(layer, trained)
    error_init = _layer_error(layer, inputs32, targets)
    params = [*rots.values(), *(m.weight_clip for m in trained.values())]
    init_state = [p.detach().clone() for p in params]
    if steps:
        opt = torch.optim.Adam(params, lr=config.lr)
        batches = list(zip(inputs32.batches(), targets))
        for step in tqdm(range(steps), desc="steps", leave=False, disable=not progress):
            (hidden, kwargs), target = batches[step % len(batches)]
            out = layer(hidden, **kwargs)
            loss = output_error(out[0] if isinstance(out, tuple) else out, target)
            if not torch.isfinite(loss):
                logger.warning("Householder: non-finite loss at step %d; stopping at the last finite state", step)
                break
            last_state = [p.detach().clone() for p in params]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if not all(torch.isfinite(p).all() for p in params):
                with torch.no_grad():
                    for p, saved in zip(params, last_state):
                        p.copy_(saved)
                logger.warning("Householder: non-finite parameters after step %d; back to the state before it", step)
                break
    error_opt = _layer_error(layer, inputs32, targets)
    fell_back = not math.isfinite(error_opt) or error_opt > error_init
    if fell_back:
        logger.warning("Householder: optimization made the layer worse (output error %.3g vs %.3g at the PCA init); "
                       "keeping the PCA init", error_opt, error_init)
        with torch.no_grad():
            for p, saved in zip(params, init_state):
                p.copy_(saved)
        error_opt = error_init
    _swap(layer, original)
    layer.to(dtype)
    return {"rotations": {g: r.detach().clone() for g, r in rots.items()},
            "weight_clip": {n: m.clip().detach().clone() for n, m in trained.items()},
            "covariances": covariances,
            "error_none": error_none, "error_init": error_init, "error_opt": error_opt, "fell_back": fell_back,
            "reflections": {g: r.shape[0] for g, r in rots.items()}}


def quantized_module(linear: nn.Linear, config: HouseholderConfig, rotation: HouseholderRotation | None = None,
                     weight_clip=None, owns_rotation: bool = True, hessian: torch.Tensor | None = None) -> QuantLinear:
    """The QuantLinear of `linear` behind `rotation` with its learned weight clipping [out, groups], or RTN
    with the clipping search (no rotation).
    `owns_rotation` False: the rotation runs before the module (in a RotatedNorm), only folded here.
    `hessian`: Σxxᵀ of the rotated inputs (Q·C·Qᵀ), for weight_quantizer="gptq"."""
    gs = config.group_size_for(linear.in_features)
    if rotation is None:
        return QuantLinear.from_linear(linear, config.bits, gs, solver="rtn_clip", act_bits=config.act_bits)
    k = rotation.householder_vectors.shape[0] if owns_rotation else 0
    module = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, config.bits, gs,
                         dtype=linear.weight.dtype, device=linear.weight.device, act_bits=config.act_bits,
                         input_transform="householder" if k else None, reflections=k)
    rotated = rotation.fold(linear.weight.detach().float())  # W·Qᵀ

    def solve(w, bits, group_size, dtype):
        codes, grid = quantize_rtn_ratio(w, bits, group_size, weight_clip, dtype)
        if config.weight_quantizer == "rtn":
            return codes, grid
        return quantize_gptq(w, hessian, bits, group_size, dtype, grid=grid)
    for name, tensor in module.quantized_tensors(rotated, solve).items():
        setattr(module, name, tensor)
    if k:
        module.rotation = rotation
    if linear.bias is not None:
        module.bias.data = linear.bias.data.clone()
    return module.prepare_runtime()


def quantize_layer(layer, index: int, inputs, names, config: HouseholderConfig, progress: bool = False) -> dict:
    """Optimize one decoder layer and swap its linears for QuantLinear modules; its report row."""
    prefix = f"model.layers.{index}."
    mine = [n[len(prefix):] for n in names if n.startswith(prefix) and _group_of(n)]
    steps = config.steps if config.num_layers is None or index < config.num_layers else 0
    start = time.perf_counter()
    with torch.enable_grad():
        res = optimize_layer(layer, inputs, config, steps, mine, progress)
    dtype = layer.input_layernorm.weight.dtype
    rotations = {}
    for group, vectors in res["rotations"].items():
        rotations[group] = HouseholderRotation(*vectors.shape, dtype=dtype, device=vectors.device)
        rotations[group].householder_vectors.copy_(vectors)  # rounded to the storage dtype before folding
    hessians = {}  # of the rotated inputs, Q·C·Qᵀ, once per group
    if config.weight_quantizer == "gptq":
        hessians = {g: r.fold(r.fold(res["covariances"][g].float()).T) for g, r in rotations.items()}
    for rel in mine:
        group = _group_of(rel)
        integration.set_module(layer, rel, quantized_module(
            layer.get_submodule(rel), config, rotations[group], res["weight_clip"][rel],
            owns_rotation=group not in NORM_OF_GROUP, hessian=hessians.get(group)))
    for group, norm in NORM_OF_GROUP.items():
        if group not in rotations:
            continue
        for rel in GROUPS[group]:  # a reader the config keeps in fp still sees the rotated norm output
            linear = layer.get_submodule(rel)
            if not isinstance(linear, QuantLinear):
                linear.weight.data = rotations[group].fold(linear.weight.data)
        integration.set_module(layer, norm, RotatedNorm(layer.get_submodule(norm), rotations[group]))
    integration.malloc_trim()()
    return {"layer": index, "steps": steps, "seconds": time.perf_counter() - start,
            **{k: v for k, v in res.items() if k not in ("rotations", "weight_clip", "covariances")}}


def unrotate(model) -> None:
    """Undo what `quantize_layer` did to the norms, once the linears are plain again (dequantize): the
    shared rotation folded back out of the readers' weights, the bare norm in place of the RotatedNorm."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, RotatedNorm):
            continue
        layer_name, _, norm = name.rpartition(".")
        layer = model.get_submodule(layer_name)
        group = next(g for g, n in NORM_OF_GROUP.items() if n == norm)
        for rel in GROUPS[group]:
            linear = layer.get_submodule(rel)
            linear.weight.data = module.rotation.inverse(linear.weight.data)
        integration.set_module(model, name, module.norm)


@torch.no_grad()
def quantize_model(model, config: HouseholderConfig, report: list | None = None, ids: torch.Tensor | None = None
                   ) -> None:
    """Optimize and quantize every targeted linear in place; `report` collects each layer's row; `ids`:
    the calibration tokens (default: `calibration_tokens`)."""
    names = integration.linears_to_quantize(model, config.modules_to_not_convert)
    check_model(model, config, names)
    integration.untie_head(model, names)
    progress = integration.progress_enabled()
    if ids is None:
        ids, _ = calibration_tokens(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for index, layer, inputs in calibration.layer_by_layer(model, ids, config.cali_bsz, progress=progress):
        row = quantize_layer(layer, index, inputs, names, config)
        if report is not None:
            report.append(row)
    for name in names:  # outside the rotated groups (a head the user chose to quantize): RTN, no rotation
        if not isinstance(model.get_submodule(name), QuantLinear):
            integration.set_module(model, name, quantized_module(model.get_submodule(name), config))
    integration.prepare_runtime(model)


def _modules_with(header: dict, suffix: str) -> dict:
    """{module name: the shape of its tensor `suffix`} for the header's tensors named <module>.<suffix>."""
    return {k[:-len(suffix) - 1]: v["shape"] for k, v in header.items() if k.endswith("." + suffix)}


class HouseholderHfQuantizer(AfterLoadHfQuantizer):
    """Quantize on load: `quantize_model` optimizes and quantizes the loaded fp model layer by layer.
    Reload: RotatedNorm and QuantLinear modules sized from the checkpoint's Householder vectors. Checkpoints
    written before the activation clipping was searched per token hold one learned ratio per activation
    quantizer (`act_clip_ratio`); their layers keep it."""

    def target_names(self, model):
        names = integration.linears_to_quantize(model, self.quantization_config.modules_to_not_convert)
        check_model(model, self.quantization_config, names)
        return names

    def replace_for_reload(self, model, names, checkpoint_files):
        cfg, header = self.quantization_config, integration.checkpoint_header(checkpoint_files) or {}
        ks = {name: shape[0] for name, shape in _modules_with(header, "rotation.householder_vectors").items()}
        learned_act_clip = _modules_with(header, "act_clip_ratio")

        def spec(name, linear):
            group = _group_of(name)
            holder = None if group is None else _norm_name(name, group) if group in NORM_OF_GROUP else name
            if holder is not None and holder not in ks:  # every targeted group was given a rotation
                raise ValueError(f"lowbit checkpoint is missing tensor '{holder}.rotation.householder_vectors': "
                                 f"the checkpoint is incomplete or was tampered with")
            k = ks[name] if holder == name else 0
            return {"bits": cfg.bits, "group_size": cfg.group_size_for(linear.in_features),
                    "act_bits": cfg.act_bits, "input_transform": "householder" if k else None,
                    "reflections": k, "learned_act_clip": name in learned_act_clip}

        integration.replace_with_quant_linear(model, names, self.dtype, with_placeholder=False, spec=spec)
        for name, k in ks.items():
            norm = model.get_submodule(name)
            if not isinstance(norm, QuantLinear):
                width = norm.weight.shape[0]
                rotation = HouseholderRotation(k, width, dtype=self.dtype, device=norm.weight.device)
                integration.set_module(model, name, RotatedNorm(norm, rotation))

    def calibration_ids(self, model):
        return calibration_ids(model, self.quantization_config)

    def quantize(self, model):
        cfg, ids = self.quantization_config, self.take_calibration_ids()
        if ids is None:  # the config's text was tried before loading: absent or unusable (logged then)
            ids = generated_calibration_ids(model, cfg)
            # recorded in the quantizer's copy of the config, which is the one saved with the model
            cfg.calibration_source = GENERATED_SOURCE
        quantize_model(model, cfg, ids=ids)

    def _dequantize(self, model, dtype=None):
        integration.dequantize_model(model, dtype or self.dtype)
        unrotate(model)
        return model


METHOD = Method(
    name="householder", config=HouseholderConfig, quantizer=HouseholderHfQuantizer, title="HH",
    summary="learned Householder rotations Q = Had·H_k…H_1 (PCA-initialised, optimized layer by layer with "
            "learnable clipping) in front of each group of linears, applied at run time as k rank-1 updates; "
            "packed weights and per-token quantized activations multiplied in integers.",
    options=(Option("--bits", "bits", int, "weight bits: 4 or 8"),
             Option("--group-size", "group_size", int, "input channels per scale/offset: 32, 64, 128, -1 = per "
                    "channel"),
             Option("--acts-bits", "act_bits", int, "activation bits: 4, 8 or 16 (off)"),
             Option("--weight-quantizer", "weight_quantizer", str, "gptq or rtn, both on the learned "
                    "clipping grid"),
             Option("--reflections", "reflections", int, "reflections per rotation"),
             Option("--pca-variance", "pca_variance", float, "instead of --reflections: each rotation's k "
                    "from this share of its input variance"),
             Option("--steps", "steps", int, "Adam steps per decoder layer"),
             Option("--lr", "lr", float, "learning rate"),
             Option("--cali-bsz", "cali_bsz", int, "calibration windows per step"),
             Option("--num-layers", "num_layers", int, "optimize only the first N decoder layers"),
             *CALIBRATION_OPTIONS),
    tag=lambda c: f"HH_w{c.bits}_g{c.group_size}_a{c.act_bits}",
)
