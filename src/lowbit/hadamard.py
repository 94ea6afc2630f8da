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
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < k:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    return (torch.kron(sylvester, base_block(m).matrix) / math.sqrt(n)).to(dtype)


def _fwht(x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) over dim -2, whose size is a power of two.
    For a large x outside autograd the butterfly stages alternate between two buffers, x being one of
    them when `overwrite`: the transform of a prefill's activations costs two copies of them, not three
    per stage. A decode step's few rows take the functional stages, which dispatch faster."""
    lead, (n, m) = x.shape[:-2], x.shape[-2:]
    functional = (torch.is_grad_enabled() and x.requires_grad) or x.numel() < 1 << 16  # autograd: no out=
    src = x
    dst = None if functional else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = 1
    while h < n:
        a, b = src.reshape(*lead, n // (2 * h), 2, h, m).unbind(-3)
        if functional:
            src = torch.stack([a + b, a - b], dim=-3).reshape(x.shape)
        else:
            out = dst.view(*lead, n // (2 * h), 2, h, m)
            torch.add(a, b, out=out.select(-3, 0))
            torch.sub(a, b, out=out.select(-3, 1))
            src, dst = dst, (torch.empty_like(dst) if src is x and not overwrite else src)
        h *= 2
    return src


def hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x @ hadamard_matrix(n) (or its transpose, the inverse) over the last dim, in O(n log n) for the
    power-of-two part."""
    n = x.shape[-1]
    k, m = factor(n)
    y = x.reshape(*x.shape[:-1], k, m)
    if m > 1:
        block = base_block(m).matrix
        y = y @ (block.T if inverse else block).to(device=x.device, dtype=x.dtype)
    if k > 1:
        y = _fwht(y, overwrite=m > 1)  # the block product is already a copy
    if n == 1:  # nothing was computed: y is x, which is not ours to scale
        y = y.clone()
    return y.div_(math.sqrt(n)).reshape(x.shape)


ACTIVATION_ROWS = 256  # rows transformed at once: a prefill's float32 copies stay this small


def transform_activations(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`hadamard_transform` of activations at run time: computed in float32 a block of rows at a time,
    returned in x's dtype (whole-tensor float32 copies of a long prefill's MLP activations would cost
    several times their size in temporaries)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], ACTIVATION_ROWS):
        out[start:start + ACTIVATION_ROWS] = hadamard_transform(rows[start:start + ACTIVATION_ROWS].float(), inverse)
    return out.view(x.shape)
