import pytest
import torch

from lowbit import QuantLinear, kernels


def _layer(n, k, bits, g, bias=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    return QuantLinear.from_linear(lin, bits, g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,g", [(64, 128, 64), (48, 96, 32), (32, 172, 64), (64, 576, 128)])
def test_int4_cpu_kernel_matches_dequantize_path(bits, n, k, g):
    layer = _layer(n, k, bits, g)
    assert layer.layout == "int4_cpu"
    x = torch.randn(5, k, dtype=torch.bfloat16)
    y_kernel = layer(x).float()
    w = layer.dequantize_weight(torch.float32)
    y_ref = x.float() @ w.T + layer.bias.float()
    # the kernel accumulates in fp32 and rounds the output to bf16
    assert torch.allclose(y_kernel, y_ref, rtol=1e-2, atol=1e-2 * y_ref.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_a_prompt_runs_on_the_dequantized_weight(bits):
    """Above INT4_CPU_MAX_ROWS rows the layer dequantizes its weight and runs one float GEMM: exactly that
    product, and the kernel's result to its rounding."""
    layer = _layer(64, 128, bits, 64)
    x = torch.randn(2, kernels.INT4_CPU_MAX_ROWS // 2 + 1, 128, dtype=torch.bfloat16)
    y = layer(x)
    w = layer.dequantize_weight(torch.bfloat16)
    assert torch.equal(y, torch.nn.functional.linear(x, w) + layer.bias)
    y_kernel = torch.cat([layer(row) for row in x.split(1, dim=1)], dim=1)  # one row at a time: the kernel
    assert torch.allclose(y.float(), y_kernel.float(), rtol=1e-2, atol=1e-2 * y.abs().max().item())


def test_a_prompt_keeps_the_kernel_where_the_weight_would_unpack_slowly(monkeypatch):
    """48 rows is not whole 64-row blocks: unpacking would go through the permutation, so the kernel
    stays, and the result is the row-by-row kernel's."""
    layer = _layer(48, 128, 4, 64)
    calls = []
    monkeypatch.setattr(layer, "dequantize_weight", lambda *a: calls.append(a))
    x = torch.randn(1, kernels.INT4_CPU_MAX_ROWS + 1, 128, dtype=torch.bfloat16)
    y = layer(x)
    assert calls == []
    assert torch.equal(y[:, :3], layer(x[:, :3]))


@pytest.mark.parametrize("n", [64, 192, 48, 80, 144])
def test_the_int4_kernel_layout_unpacks_to_its_codes(n):
    """Whole 64-row blocks take the strided unpack, other heights the permutation: both give the codes back."""
    codes = torch.randint(0, 16, (n, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert torch.equal(kernels.from_int4_cpu_layout(kernels.to_int4_cpu_layout(codes), n, 96), codes)


def test_state_dict_is_the_portable_layout_and_reloads_bit_identical():
    layer = _layer(64, 172, 3, 64)
    sd = layer.state_dict()
    assert sd["qweight"].shape == (64, 192 * 3 // 8)
    fresh = QuantLinear(172, 64, True, 3, 64)
    fresh.load_state_dict(sd)
    assert fresh.layout == "packed"
    x = torch.randn(2, 172, dtype=torch.bfloat16)
    y_dequant_path = fresh(x)
    assert torch.equal(fresh.prepare_runtime()(x), layer(x))
    assert torch.allclose(y_dequant_path.float(), layer(x).float(), rtol=2e-2, atol=2e-2)


def test_layers_the_kernel_cannot_take_use_the_dequantize_path():
    layer = _layer(40, 64, 4, 32)  # out_features not a multiple of 16
    assert layer.layout == "packed"
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantize_weight(x.dtype), layer.bias))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_leaving_the_cpu_layout_keeps_the_weights(bits):
    layer = _layer(64, 128, bits, 64)
    assert layer.layout == "int4_cpu"
    w = layer.dequantize_weight()
    sd = layer.state_dict()
    layer._to_packed_layout()
    assert torch.equal(layer.dequantize_weight(), w)
    assert all(torch.equal(sd[k], v) for k, v in layer.state_dict().items())
