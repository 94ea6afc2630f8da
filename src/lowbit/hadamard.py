"""Hadamard transforms of any size real models have, built deterministically (never stored).

An orthogonal transform of size n = 2^k · m is applied as (H_{2^k} ⊗ B_m) / √n, with the 2^k part
as a fast Walsh–Hadamard transform (O(n log n)) and B_m, a small m×m base block, as a dense product:
- m = 1, 2: Sylvester.
- m = q + 1, q a prime ≡ 3 (mod 4): Paley's first construction (12, 20, 24, 44, 48, 60, 68, 72, 80, 84,
  104, 108, 132, 140, ...).
- m = 2(q + 1), q a prime ≡ 1 (mod 4): Paley's second construction (12, 28, 36, 60, 76, 84, 108, 124,
  148, 180, 196, ...).
- otherwise (no Hadamard matrix of that order is built here, e.g. 172 = 4·43 or an odd m): the
  orthonormal discrete Hartley matrix, cas(2πij/m)/√m, scaled by √m to sit beside the ±1 blocks. It
  is orthogonal and as flat as a real matrix can be up to a factor √2, so it spreads outliers almost
  as well; `base_block(m).is_hadamard` tells which one a size got.
The factorisation picks the largest power of two whose cofactor (at most MAX_BLOCK) has a base block
of the first three kinds, else the largest power of two (Hartley cofactor).
"""
import functools
import math
from dataclasses import dataclass

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) for the quadratic character χ of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 (mod 4): I + S, S skew-symmetric with a Jacobsthal core."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 (mod 4), from the symmetric conference matrix of order q + 1."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)


def _hartley(m: int) -> torch.Tensor:
    i = torch.arange(m, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(i, i) / m
    return torch.cos(angle) + torch.sin(angle)  # orthogonal with rows of norm √m, like a ±1 matrix


@dataclass(frozen=True)
class BaseBlock:
    matrix: torch.Tensor  # m×m float64, rows of norm √m
    is_hadamard: bool


@functools.lru_cache(maxsize=None)
def base_block(m: int) -> BaseBlock:
    if m in (1, 2):
        return BaseBlock(torch.tensor([[1.0]] if m == 1 else [[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), True)
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return BaseBlock(_paley1(m - 1), True)
    if m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return BaseBlock(_paley2(m // 2 - 1), True)
    return BaseBlock(_hartley(m), False)


def _has_hadamard_block(m: int) -> bool:
    return m in (1, 2) or base_block(m).is_hadamard


MAX_BLOCK = 256  # the dense part of a transform costs m multiply-adds per element


@functools.lru_cache(maxsize=None)
def factor(n: int) -> tuple[int, int]:
    """n = 2^k · m: the base block size m (see the module docstring for the rule)."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    pow2 = n & -n
    k = pow2
    while k >= 1 and n // k <= MAX_BLOCK:
        if _has_hadamard_block(n // k):
            return k, n // k
        k //= 2
    return pow2, n // pow2


def hadamard_matrix(n: int, dtype=torch.float32) -> torch.Tensor:
    """The dense orthonormal transform of size n (for tests and offline fusion into weights)."""
    k, m = factor(n)
    return (torch.kron(_sylvester(k), base_block(m).matrix) / math.sqrt(n)).to(dtype)


SYLVESTER_FACTOR = 64  # the power-of-two part is applied as Sylvester factors of at most this size


def _sylvester(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_FACTORS = {}  # (n, inverse, dtype, device) -> _factors(...): a plain dict, which torch.compile reads as constants


def _factors(n: int, inverse: bool, dtype: torch.dtype, device: torch.device) -> tuple:
    """(size, matrix) of each Kronecker factor of the size-n transform, in axis order, each the matrix
    its axis is multiplied by from the right: Sylvester blocks (symmetric) then B_m (transposed for the
    inverse); 1/√n folded into the first."""
    k, m = factor(n)
    sizes = []
    while k > 1:
        sizes.append(min(k, SYLVESTER_FACTOR))
        k //= sizes[-1]
    mats = [_sylvester(s) for s in sizes]
    if m > 1:
        sizes.append(m)
        mats.append(base_block(m).matrix.T if inverse else base_block(m).matrix)
    if mats:
        mats[0] = mats[0] / math.sqrt(n)
    return tuple(zip(sizes, (t.to(dtype=dtype, device=device) for t in mats)))


def _cached_factors(n: int, inverse: bool, dtype: torch.dtype, device: torch.device) -> tuple:
    key = (n, inverse, dtype, device)
    if key not in _FACTORS:
        _FACTORS[key] = _factors(*key)
    return _FACTORS[key]


def hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x @ hadamard_matrix(n) (or its transpose, the inverse) over the last dim. The transform is a
    Kronecker product of small factors, so it runs as one small matmul per factor, each along its axis
    of x viewed [rows, f1, ..., fk]: the last axis as [rows·f1···fk−1, fk] @ F, an inner one as
    Fᵀ @ [rows·f1···, f, (the axes after it)], so no factor moves any data. A few ops per call whatever
    the size, autograd included, and per element as many multiply-adds as the factor sizes add up to."""
    n = x.shape[-1]
    factors = _cached_factors(n, inverse, x.dtype, x.device)
    if not factors:  # n == 1
        return x.clone()
    y, after = x, 1
    for size, matrix in reversed(factors):
        if after == 1:
            y = y.reshape(-1, size) @ matrix
        elif y.numel() == size * after:  # the outermost axis of a single row (a decode step): a plain mm
            y = matrix.T @ y.reshape(size, after)
        else:
            y = matrix.T @ y.reshape(-1, size, after)
        after *= size
    return y.reshape(x.shape)


ACTIVATION_ROWS = 256  # rows transformed at once: a prefill's temporaries stay this small
BF16_MIN_ROWS = 64  # from this many rows (a prompt) a bfloat16 input is transformed in bfloat16, where native


@functools.lru_cache(maxsize=None)
def _native_bf16_cpu() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype run-time transforms compute in: float32, except for a bfloat16 prompt of at least
    BF16_MIN_ROWS rows on a CPU with native bfloat16 GEMMs (AVX512-BF16 or AMX). There float32's small
    matmuls run on MKL, whose generic x86 path (AMD EPYC) makes a prompt's transform cost as much as the
    int8 product it feeds, and oneDNN's bfloat16 ones are faster (`scripts/kernel_benchmark.py --rows 512`).
    The factors' products accumulate in float32; what changes is one more bfloat16 rounding between
    factors, ahead of a quantization step of 1/127 or 1/7 of the token's range. A decode step's few rows
    stay float32, where small bfloat16 matmuls are the slower ones."""
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= BF16_MIN_ROWS * x.shape[-1]
            and _native_bf16_cpu()):
        return torch.bfloat16
    return torch.float32


def in_row_blocks(x: torch.Tensor, transform) -> torch.Tensor:
    """`transform` (rows [n, d] -> [n, d], in `activation_dtype(x)`) of activations at run time, a block
    of rows at a time, returned in x's dtype. Whole-tensor float32 copies of a long prefill's MLP
    activations would cost several times their size in fresh temporaries; a block's stay small and
    are reused. Row by row the result is the same (each row is transformed on its own)."""
    dtype = activation_dtype(x)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= ACTIVATION_ROWS:
        return transform(rows.to(dtype)).to(x.dtype).view(x.shape)
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], ACTIVATION_ROWS):
        out[start:start + ACTIVATION_ROWS] = transform(rows[start:start + ACTIVATION_ROWS].to(dtype))
    return out.view(x.shape)


def transform_activations(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`hadamard_transform` of activations at run time (`in_row_blocks`)."""
    return in_row_blocks(x, lambda rows: hadamard_transform(rows, inverse))
