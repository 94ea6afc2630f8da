import pytest
import torch

from lowbit import hadamard

# every base order the module builds a true Hadamard block for, up to 200, and real model sizes
HADAMARD_ORDERS = [m for m in range(4, 201, 4) if hadamard.base_block(m).is_hadamard]
MODEL_SIZES = [64, 172, 576, 896, 1536, 4864]


def test_paley_orders_cover_the_usual_ones():
    assert {12, 20, 28, 36, 40 // 2, 44, 60, 76, 108, 140} <= set(HADAMARD_ORDERS)


@pytest.mark.parametrize("m", HADAMARD_ORDERS)
def test_base_blocks_are_hadamard(m):
    b = hadamard.base_block(m).matrix
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(b @ b.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n", MODEL_SIZES + [1, 2, 3, 12, 24, 43, 100])
def test_transform_is_orthogonal_and_fast_path_equals_dense(n):
    h = hadamard.hadamard_matrix(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    before = x.clone()
    assert torch.allclose(hadamard.hadamard_transform(x), x @ h, atol=1e-10)
    assert torch.allclose(hadamard.hadamard_transform(x, inverse=True), x @ h.T, atol=1e-10)
    assert torch.equal(x, before)  # the transform works in its own buffers
    big = torch.randn((1 << 16) // n + 1, n, dtype=torch.float64)  # many rows
    big_before = big.clone()
    assert torch.allclose(hadamard.hadamard_transform(big), big @ h, atol=1e-10)
    assert torch.equal(big, big_before)
    row = torch.randn(1, 1, n, dtype=torch.float64)  # a decode step's single row (its own mm path)
    assert torch.allclose(hadamard.hadamard_transform(row), row @ h, atol=1e-10)
    assert torch.allclose(hadamard.hadamard_transform(row, inverse=True), row @ h.T, atol=1e-10)
    strided = torch.randn(n, 4, dtype=torch.float64).T  # a non-contiguous input
    assert torch.allclose(hadamard.hadamard_transform(strided), strided @ h, atol=1e-10)
    trained = x.clone().requires_grad_()  # the autograd path (Householder training) agrees
    hadamard.hadamard_transform(trained).pow(2).sum().backward()
    assert torch.allclose(trained.grad, 2 * x, atol=1e-10)  # ‖xH‖² = ‖x‖² for an orthogonal H


def test_factorisation_prefers_a_true_hadamard_block():
    assert hadamard.factor(11008) == (256, 43) and hadamard.factor(14336) == (512, 28)
    assert hadamard.factor(576) == (16, 36)
    assert hadamard.factor(1536) == (128, 12)
    assert hadamard.factor(896) == (32, 28)
    assert hadamard.factor(4864) == (64, 76)
    assert hadamard.factor(172) == (4, 43) and not hadamard.base_block(43).is_hadamard


def test_transform_spreads_an_outlier():
    x = torch.zeros(576)
    x[7] = 100.0
    y = hadamard.hadamard_transform(x)
    assert torch.allclose(y.norm(), x.norm()) and y.abs().max() < 100.0 / 576 ** 0.5 * 1.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_transform_is_the_transform_block_by_block(dtype):
    """A prompt runs block by block in `activation_dtype` (bfloat16 for a bfloat16 prompt where the CPU has
    native bfloat16 GEMMs), within bfloat16 rounding of the float32 transform; a decode step in float32."""
    rows = 2 * hadamard.ACTIVATION_ROWS + 5  # blocks, and a partial last one
    x = torch.randn(rows, 3, 576).to(dtype)  # leading dims of any shape
    compute = hadamard.activation_dtype(x)
    native = dtype == torch.bfloat16 and hadamard._native_bf16_cpu()
    assert compute == (torch.bfloat16 if native else torch.float32)
    for inverse in (False, True):
        y = hadamard.transform_activations(x, inverse=inverse)
        assert y.dtype == dtype and y.shape == x.shape
        blocks = [hadamard.hadamard_transform(b.to(compute), inverse=inverse)
                  for b in x.reshape(-1, 576).split(hadamard.ACTIVATION_ROWS)]
        assert torch.equal(y, torch.cat(blocks).to(dtype).view(x.shape))
        reference = hadamard.hadamard_transform(x.float(), inverse=inverse)
        assert (y.float() - reference).abs().max() <= 2 ** -6 * reference.abs().max()
        step = x[:hadamard.BF16_MIN_ROWS // 3 - 1]  # fewer rows than a prompt: float32
        assert hadamard.activation_dtype(step) == torch.float32
        assert torch.equal(hadamard.transform_activations(step, inverse=inverse),
                           hadamard.hadamard_transform(step.float(), inverse=inverse).to(dtype))
    trained = torch.randn(5, 64, requires_grad=True)  # Householder training differentiates through it
    hadamard.transform_activations(trained).pow(2).sum().backward()
    assert torch.allclose(trained.grad, 2 * trained.detach(), atol=1e-5)
