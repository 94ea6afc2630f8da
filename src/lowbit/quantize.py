"""Affine group quantization of weight matrices: the one group quantizer every method shares.

A weight W [out, in] is zero-padded on the right to `padded_in_features(in, group_size)` columns, so
groups never straddle rows and any in_features works (the pad is a pure function of the shape and
the group size, applied identically when quantizing and when reloading; padded inputs are zero at run
time, so the pad never changes a result). Each group of `group_size` consecutive input channels of a
row has a scale and an offset:

    w ≈ (q - 2**(bits-1)) * scale + offset,   q in [0, 2**bits - 1]

stored as `scale_offset` [groups, out, 2], the layout torch's int4 kernels read directly.

Quantizers work on blocks of rows of about `BLOCK_ELEMENTS` weights, writing into outputs allocated
up front: the fp32 temporaries stay small and of one size, which keeps the heap from fragmenting
while a whole model is quantized on load (with whole-matrix temporaries, glibc can keep as much
freed memory as the bf16 model's size).
"""
import torch

from .packing import SUPPORTED_BITS, packed_width


def padded_in_features(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] float -> zero-padded [out, groups, group_size] float32."""
    pad = padded_in_features(w.shape[1], group_size) - w.shape[1]
    w = torch.nn.functional.pad(w.float(), (0, pad))
    return w.view(w.shape[0], -1, group_size)


def _valid_mask(in_features: int, group_size: int, device) -> torch.Tensor:
    """[groups, group_size] True where a column is a real input channel, False where it is padding."""
    cols = torch.arange(padded_in_features(in_features, group_size), device=device)
    return (cols < in_features).view(-1, group_size)


def _finish(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """[out, groups, g] codes, [out, groups] scale/offset -> (uint8 codes [out, in_pad], [groups, out, 2])."""
    codes = q.reshape(q.shape[0], -1).to(torch.uint8)
    scale_offset = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous()
    return codes, scale_offset


BLOCK_ELEMENTS = 1 << 18


def _blockwise(fixed_scale: bool = False, integer_zero: bool = False):
    """Decorator: run `quantize_block(w_rows, bits, group_size)` over row blocks into preallocated
    outputs, rounding each block's scale/offset to the storage `dtype` (see `_round_for_storage`)."""

    def wrap(quantize_block):
        def quantize(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.float32):
            _check(bits, group_size)
            out, in_features = w.shape
            k_pad = padded_in_features(in_features, group_size)
            codes = torch.empty(out, k_pad, dtype=torch.uint8, device=w.device)
            scale_offset = torch.empty(k_pad // group_size, out, 2, dtype=dtype, device=w.device)
            step = max(1, BLOCK_ELEMENTS // k_pad)
            for start in range(0, out, step):
                rows = w[start:start + step]
                c, so = quantize_block(rows, bits, group_size)
                codes[start:start + step] = c
                scale_offset[:, start:start + step] = _round_for_storage(rows, c, so, bits, group_size, dtype,
                                                                         fixed_scale, integer_zero)
            return codes, scale_offset

        quantize.__doc__ = quantize_block.__doc__
        quantize.__name__ = quantize_block.__name__
        return quantize

    return wrap


def _round_for_storage(w, codes, scale_offset, bits, group_size, dtype, fixed_scale: bool = False,
                       integer_zero: bool = False):
    """Per group, the storage-dtype neighbours of scale and offset (nearest, one step up or down each)
    that reconstruct the group best: the grid moves by less than one storage step, where a
    least-squares refit would move it far enough to clip the group's largest weights.

    `fixed_scale` (for a solver that fixes the scale and optimizes only the zero point, as hqq's does):
    the scale is rounded to nearest, as hqq rounds it, and only the offset's neighbours are searched.
    A free search would shrink most of those scales by one step, clipping each group's largest weights,
    and cost perplexity.

    `integer_zero`: the offset stays an integer multiple of the rounded scale, (2^(bits−1) − zero)·scale,
    itself rounded to nearest (what an export with integer zero points reads back, see `integer_zero_points`)."""
    if dtype == torch.float32:
        return scale_offset
    if integer_zero:
        scale = scale_offset[..., 0].to(dtype)
        steps = torch.round(scale_offset[..., 1] / scale_offset[..., 0])
        return torch.stack([scale, (steps * scale.float()).to(dtype)], -1)
    g = _grouped(w, group_size)
    mask = _valid_mask(w.shape[1], group_size, w.device)
    t = (codes.view_as(g).float() - 2 ** (bits - 1))
    nearest = scale_offset.transpose(0, 1).to(dtype)  # [out, groups, 2]

    def neighbours(x):
        return [x, torch.nextafter(x, torch.full_like(x, float("inf"))),
                torch.nextafter(x, torch.full_like(x, float("-inf")))]

    scales = [nearest[..., 0]] if fixed_scale else neighbours(nearest[..., 0])
    best_err, best = None, nearest.clone()
    for s in scales:
        for o in neighbours(nearest[..., 1]):
            w_hat = t * s.float().unsqueeze(-1) + o.float().unsqueeze(-1)
            err = (((w_hat - g) ** 2) * mask).sum(-1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[..., 0] = torch.where(better, s, best[..., 0])
            best[..., 1] = torch.where(better, o, best[..., 1])
    return best.transpose(0, 1)


def _masked_range(g: torch.Tensor, mask: torch.Tensor):
    return g.masked_fill(~mask, float("inf")).amin(-1), g.masked_fill(~mask, float("-inf")).amax(-1)


def round_to_grid(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Codes, scale and offset of the uniform grid spanning [lo, hi] per group."""
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    q = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, qmax)
    return q, scale, lo + 2 ** (bits - 1) * scale


def _rtn_at(w: torch.Tensor, bits: int, group_size: int, ratio):
    """Round-to-nearest on each group's min/max range shrunk by `ratio` (a number or [out, groups])."""
    mask = _valid_mask(w.shape[1], group_size, w.device)
    g = _grouped(w, group_size)
    lo, hi = _masked_range(g, mask)
    return _finish(*round_to_grid(g, lo * ratio, hi * ratio, bits))


@_blockwise()
def quantize_rtn(w: torch.Tensor, bits: int, group_size: int):
    """Plain round-to-nearest on the min/max grid of each group (the baseline)."""
    return _rtn_at(w, bits, group_size, 1.0)


CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(26))  # shrink factors 1.0 .. 0.5
CLIP_NORM = 2.4


def clip_ratios(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per group [out, groups], the factor in CLIP_GRID shrinking the min/max range that minimises
    Σ|W − Ŵ|^2.4 over the group (the first on ties)."""
    mask = _valid_mask(w.shape[1], group_size, w.device)
    g = _grouped(w, group_size)
    lo0, hi0 = _masked_range(g, mask)
    best_err = best = None
    for r in CLIP_GRID:
        q, scale, offset = round_to_grid(g, lo0 * r, hi0 * r, bits)
        w_hat = (q - 2 ** (bits - 1)) * scale.unsqueeze(-1) + offset.unsqueeze(-1)
        err = ((w_hat - g).abs().pow(CLIP_NORM) * mask).sum(-1)
        if best is None:
            best_err, best = err, torch.full_like(err, r)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, r, best)
    return best


@_blockwise()
def quantize_rtn_clip(w: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest with a per-group clipping search (calibration-free, as QuaRot's RTN): each
    group's range shrunk by its `clip_ratios` factor."""
    return _rtn_at(w, bits, group_size, clip_ratios(w, bits, group_size))


def quantize_rtn_ratio(w: torch.Tensor, bits: int, group_size: int, ratio: torch.Tensor,
                       dtype: torch.dtype = torch.float32):
    """Round-to-nearest on each group's min/max range shrunk by its `ratio` [out, groups] (learned
    clipping: Householder optimizes these ratios through the same grid)."""
    _check(bits, group_size)
    codes, scale_offset = _rtn_at(w, bits, group_size, ratio.float())
    return codes, _round_for_storage(w, codes, scale_offset, bits, group_size, dtype)


@_blockwise(fixed_scale=True)
def quantize_hqq(w: torch.Tensor, bits: int, group_size: int):
    """Half-quadratic quantization: hqq's proximal solver with hqq's own default settings picks codes,
    scale and zero point per group; they are stored as scale and offset = (2^(bits−1) − zero)·scale.

    A least-squares refit of scale and offset would lower ‖W − Ŵ‖² further, but it does so by
    shrinking the range and clipping the largest weights of each group, and perplexity suffers."""
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    out = w.shape[0]
    g = _grouped(w, group_size)
    params = hqq_base_quant_config(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]
    params.pop("view_as_float", None)  # hqq's defaults otherwise, e.g. a rounded initial zero at 4 bits
    q, meta = Quantizer.quantize(g.reshape(-1, group_size), bitpack=False, device=w.device, **params)
    scale = meta["scale"].view(out, -1).float()
    offset = (2 ** (bits - 1) - meta["zero"].view(out, -1).float()) * scale
    return _finish(q.view_as(g), scale, offset)


HQQ_PROXIMAL = {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20}  # hqq's defaults for its solver


@_blockwise(fixed_scale=True, integer_zero=True)
def quantize_hqq_integer_zero(w: torch.Tensor, bits: int, group_size: int):
    """HQQ with integer zero points (what compressed-tensors and most integer kernels store): hqq's
    proximal loop, with its shrinkage operator and default settings, rounding the zero point to an
    integer at every step instead of once at the end; each group keeps its best zero point."""
    from hqq.core.optimize import shrink_lp_op

    qmax = 2**bits - 1
    g = _grouped(w, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    inv = torch.where((hi - lo).abs() <= 1e-4, torch.ones_like(lo), qmax / (hi - lo)).clamp(max=2e4)
    zero = torch.round(-lo * inv).clamp(0, qmax)
    best_zero, best_err = zero, torch.full_like(zero, float("inf"))
    beta = HQQ_PROXIMAL["beta"]
    for _ in range(HQQ_PROXIMAL["iters"]):
        q = torch.round(g * inv + zero).clamp(0, qmax)
        r = (q - zero) / inv
        err = (g - r).abs().mean(-1, keepdim=True)
        better = err < best_err
        best_zero, best_err = torch.where(better, zero, best_zero), torch.where(better, err, best_err)
        e = shrink_lp_op(g - r, beta, HQQ_PROXIMAL["lp_norm"])
        zero = torch.round((q - (g - e) * inv).mean(-1, keepdim=True)).clamp(0, qmax)
        beta *= HQQ_PROXIMAL["kappa"]
    q = torch.round(g * inv + best_zero).clamp(0, qmax)
    scale = (1 / inv).squeeze(-1)
    return _finish(q, scale, (2 ** (bits - 1) - best_zero.squeeze(-1)) * scale)


def integer_zero_points(scale_offset: torch.Tensor, bits: int) -> torch.Tensor | None:
    """The integer zero points z (w = (q − z)·scale) of a scale_offset table [groups, out, 2], or None
    when an offset is not the storage rounding of an integer multiple of its scale."""
    scale, offset = scale_offset.float().unbind(-1)
    steps = torch.round(offset / scale)
    zero = 2 ** (bits - 1) - steps
    exact = ((steps * scale).to(scale_offset.dtype) == scale_offset[..., 1]) & (zero >= 0) & (zero <= 2**bits - 1)
    return zero.to(torch.uint8) if bool(exact.all()) else None


DEQUANTIZE_CHUNK = 2 ** 18  # weights dequantized at a time on CPU: a 1 MiB float32 buffer that stays in cache


def dequantize(codes: torch.Tensor, scale_offset: torch.Tensor, bits: int, in_features: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 codes [out, in_pad] + scale_offset [groups, out, 2] -> W [out, in_features]."""
    dtype = dtype or scale_offset.dtype
    out_features, padded = codes.shape
    groups = scale_offset.shape[0]
    so = scale_offset.float().transpose(0, 1)  # [out, groups, 2]; evaluated in fp32 as the kernels do
    weight = torch.empty(out_features, in_features, dtype=dtype, device=codes.device)
    # on CPU in chunks; an accelerator takes the whole weight at once (each chunk would cost launches)
    rows = max(1, DEQUANTIZE_CHUNK // padded if codes.device.type == "cpu" else out_features)
    for start in range(0, out_features, rows):  # each chunk in float32, in place
        w = codes[start:start + rows].reshape(-1, groups, padded // groups).to(torch.float32, copy=True)
        chunk = so[start:start + rows]
        w.sub_(2 ** (bits - 1)).mul_(chunk[..., :1]).add_(chunk[..., 1:])
        weight[start:start + rows] = w.view(w.shape[0], padded)[:, :in_features]
    return weight


def _check(bits, group_size):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    packed_width(group_size, bits)  # a group must fill whole packed words


ACT_CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(9))  # per-token clipping ratios searched: 1.0 .. 0.6


def quantize_activations(x: torch.Tensor, bits: int, clip_ratio: float | None = 1.0):
    """Per-token symmetric quantization of activations: int8 codes in [-2^(b-1), 2^(b-1) - 1] and a
    float32 scale per token (x ≈ codes * scale), the range clipped to `clip_ratio` of max|x|, or with
    `clip_ratio=None` to the ratio in ACT_CLIP_GRID that gives each token the least squared error."""
    if bits not in (4, 8):
        raise ValueError(f"activation bits must be 4 or 8, got {bits!r}")
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True).float()  # exact in x's dtype: no float32 copy of x
    if clip_ratio is None:
        return _least_error_codes(x, amax, qmax)
    unclipped = isinstance(clip_ratio, float) and clip_ratio >= 1  # then |x| / scale <= qmax already
    bound = amax if unclipped and clip_ratio == 1.0 else amax * clip_ratio
    scale = (bound / qmax).clamp_min(1e-8)
    codes = torch.div(x, scale).round_()  # computed in float32 (type promotion), one pass
    if not unclipped:
        codes.clamp_(-qmax - 1, qmax)
    return codes.to(torch.int8), scale


# tokens whose candidate roundings are held at once: at most ACT_CLIP_BLOCK, and at most ACT_CLIP_ELEMENTS
# inputs per block, so that the candidates of a wide input (an MLP-wide down_proj) stay in a core's L2 cache
ACT_CLIP_BLOCK, ACT_CLIP_ELEMENTS = 32, 2 ** 15
_CLIP_GRIDS = {}  # device -> ACT_CLIP_GRID [candidates, 1, 1] float32 (a plain dict: constants to torch.compile)


def _least_error_codes(x: torch.Tensor, amax: torch.Tensor, qmax: int):
    """Per token, the codes and scale of the ratio in ACT_CLIP_GRID with the least squared rounding error
    (the first on ties). Every candidate is rounded in one batched pass per block of tokens, and the
    winner's codes are kept from it: a decode step is a handful of ops."""
    grid = _CLIP_GRIDS.get(x.device)
    if grid is None:
        grid = _CLIP_GRIDS[x.device] = torch.tensor(ACT_CLIP_GRID, device=x.device).view(-1, 1, 1)
    x2, a2 = x.reshape(-1, x.shape[-1]), amax.reshape(-1, 1)
    codes = torch.empty(x2.shape, dtype=torch.int8, device=x.device)  # each block's winners written in place
    scales = torch.empty(a2.shape, dtype=torch.float32, device=x.device)
    block = max(1, min(ACT_CLIP_BLOCK, ACT_CLIP_ELEMENTS // x2.shape[1]))
    for start in range(0, x2.shape[0], block):
        xb, ab = x2[start:start + block].float(), a2[start:start + block]
        scale = (ab * grid / qmax).clamp_min(1e-8)  # [candidates, tokens, 1]
        # in place where it can: two [candidates, tokens, d] temporaries per block, not four
        q = torch.div(xb, scale).round_().clamp_(-qmax - 1, qmax)
        best = torch.mul(q, scale).sub_(xb).pow_(2).sum(-1).argmin(0)  # [tokens]
        tokens = torch.arange(xb.shape[0], device=x.device)
        codes[start:start + block] = q[best, tokens]
        scales[start:start + block] = scale[best, tokens]
    return codes.view(x.shape), scales.view(amax.shape)


def fake_quantize_activations(x: torch.Tensor, bits: int, clip_ratio: float | None = 1.0) -> torch.Tensor:
    """The float reference of `quantize_activations`: what the integer path must reproduce."""
    codes, scale = quantize_activations(x, bits, clip_ratio)
    return (codes.float() * scale).to(x.dtype)


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  dtype: torch.dtype = torch.float32, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = True, grid: torch.Tensor | None = None):
    """GPTQ (Frantar et al., 2022): quantize columns one at a time, spreading each column's rounding
    error over the columns not yet quantized through the inverse Hessian (`hessian` = E[x xᵀ] of the
    layer's inputs, [in, in]). Scale/offset are rounded to `dtype` before use, so the storage rounding
    is compensated too. `act_order`: columns in order of decreasing Hessian diagonal, each group's
    scale/offset fixed beforehand ("static groups", as the order mixes groups: `grid` [groups, out, 2]
    in `dtype` when given, else `quantize_rtn_clip` of the original weights); otherwise in storage order,
    a group's scale/offset taken from its columns as they stand when the group is reached. Requires
    in_features % group_size == 0."""
    _check(bits, group_size)
    out, k = w.shape
    if k % group_size:
        raise ValueError(f"GPTQ needs group_size to divide in_features, got {group_size} and {k}")
    if grid is not None and not act_order:
        raise ValueError("a fixed grid needs act_order=True (in storage order each group is fitted as reached)")
    W = w.float().clone()
    # [in, in] matrices are the memory peak (an MLP-wide down_proj's is ~100 MB in fp32): at most two are alive
    # here, and a caller that keeps no reference to `hessian` has it freed once it is reordered
    H = hessian.float()
    del hessian
    diag = H.diagonal().clone()
    dead = diag == 0
    diag[dead] = 1
    W[:, dead] = 0
    order = torch.arange(k, device=w.device)
    if act_order:
        scale_offset = grid if grid is not None else quantize_rtn_clip(W, bits, group_size, dtype)[1]
        static = scale_offset.float()
        order = torch.argsort(diag, descending=True)
        W, H, diag = W[:, order], H[order.unsqueeze(1), order], diag[order]
    else:
        scale_offset = torch.empty(k // group_size, out, 2, dtype=dtype, device=w.device)
        H = H.clone()
    H.diagonal().copy_(diag + damp * diag.mean())
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    del H
    codes = torch.empty(out, k, dtype=torch.uint8, device=w.device)
    mid, qmax = 2 ** (bits - 1), 2**bits - 1
    block_size = max(block_size // group_size, 1) * group_size  # groups never straddle blocks
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        err = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = int(order[b0 + i])
            if act_order:
                scale, offset = static[col // group_size].unbind(-1)
            elif col % group_size == 0:
                _, so = quantize_rtn_clip(W1[:, i:i + group_size], bits, group_size, dtype)
                scale_offset[col // group_size] = so[0]
                scale, offset = so[0].float().unbind(-1)
            q = torch.clamp(torch.round((W1[:, i] - offset) / scale) + mid, 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            e = (W1[:, i] - ((q - mid) * scale + offset)) / Hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]
    return codes, scale_offset
