"""Products of Householder reflections, Q = H_k…H_1 with H_i = I − 2·v_i v_iᵀ / ‖v_i‖².

Orthogonal by construction for any vectors (so gradient descent on the v_i never leaves the orthogonal
group), stored as k·d numbers instead of d², applied to a vector in O(k·d) as k rank-1 updates.
`rotate` is the rotation Householder quantization runs: the reflections, then a fixed Hadamard.
"""
import torch

from . import hadamard


def wy_factors(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, S): the unit vectors [k, d] and the upper-triangular S = striu(VVᵀ) + I/2 [k, k] of the
    compact WY form H_1…H_k = I − Vᵀ·S⁻¹·V (Joffrain et al., 2006). A runtime computes them once."""
    v = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = torch.triu(v @ v.T, diagonal=1) + 0.5 * torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    return v, s


def apply(x: torch.Tensor, vectors: torch.Tensor, inverse: bool = False, factors=None) -> torch.Tensor:
    """Q·x for every row x of `x` [..., d] (H_1 first); `inverse`: Qᵀ·x (H_k first). Differentiable in
    both `x` and `vectors` [k, d]; `factors`: `wy_factors(vectors)` when already computed (V may be in x's
    dtype and S in float32: the products run in x's dtype, the solve in S's).

    The k rank-1 updates are applied in their blocked (compact WY) form, so Q·x costs two [*, d]×[d, k]
    products and a k×k triangular solve instead of k sequential updates (and autograd keeps O(k)
    values per token, not k copies of x)."""
    if vectors.shape[0] == 0:
        return x
    v, s = factors if factors is not None else wy_factors(vectors)
    flat = (x @ v.T).reshape(-1, v.shape[0])
    # rows: Q·x = x − (x·Vᵀ)·S⁻¹·V (Qᵀ = H_1…H_k) and Qᵀ·x = x − (x·Vᵀ)·S⁻ᵀ·V; the k×k solve in S's dtype
    y = torch.linalg.solve_triangular(s.T if inverse else s, flat.to(s.dtype), upper=not inverse, left=False)
    return x - (y.to(x.dtype) @ v).reshape(x.shape)


def rotate(x: torch.Tensor, vectors: torch.Tensor, inverse: bool = False, factors=None) -> torch.Tensor:
    """Q·x over the last dim for Q = Had·H_k…H_1 (`inverse`: Qᵀ·x). The reflections are learned; the
    Hadamard after them (regenerated from d, O(d log d)) spreads every direction they leave alone, so
    a few reflections that place the principal axes on coordinate axes e_i (which the Hadamard makes
    flat) make the whole space flat, not only those axes."""
    if inverse:
        return apply(hadamard.hadamard_transform(x, inverse=True), vectors, inverse=True, factors=factors)
    return hadamard.hadamard_transform(apply(x, vectors, factors=factors))


def matrix(vectors: torch.Tensor) -> torch.Tensor:
    """The dense Q [d, d] (for tests and folding; never what runs)."""
    return apply(torch.eye(vectors.shape[1], dtype=vectors.dtype, device=vectors.device), vectors).T


@torch.no_grad()
def mapping(sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Vectors [k, d] of reflections with Q·s_i = ±t_i for the orthonormal columns s_i, t_i of
    `sources`, `targets` [d, k]. Step i maps H_{i−1}…H_1·s_i onto t_i with v ⊥ t_1..t_{i−1}, so earlier
    columns stay in place; the sign of t_i is the one farther from the current vector (a stable v, with
    ‖v‖² ≥ 2). Each new reflection is applied to the columns still to come, as Householder QR does:
    O(d·k²) in all (for an MLP-wide down_proj with k in the thousands: seconds, not minutes)."""
    d, k = sources.shape
    vectors = torch.zeros(k, d, dtype=sources.dtype, device=sources.device)
    rest = sources.clone()  # column j: H_{i}…H_1·s_j once step i is done
    for i in range(k):
        a = rest[:, i]
        t = targets[:, i] * (-1.0 if float(a @ targets[:, i]) > 0 else 1.0)
        v = a - t
        vectors[i] = v
        tail = rest[:, i + 1:]
        tail -= torch.outer(v, (2 / (v @ v)) * (v @ tail))
    return vectors
