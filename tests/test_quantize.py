import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

from lowbit import quantize as Q


def _mse(w_hat, w):
    return ((w_hat.float() - w) ** 2).mean().item()


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, :3] *= 8  # outlier input channels, as real LLM weights have
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_hqq_not_worse_than_hqq_package_and_better_than_rtn(bits, group_size):
    n, k = 128, 256
    w = _weight(n, k)
    codes, so = Q.quantize_hqq(w, bits, group_size, torch.bfloat16)
    # what the int4 kernel computes with: bf16 scale/offset, the affine map evaluated in fp32
    ours = _mse(Q.dequantize(codes, so, bits, k, torch.float32), w)

    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = w.clone()
    ref = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1),
                    compute_dtype=torch.bfloat16, device="cpu")
    theirs = _mse(ref.dequantize(), w)  # what HQQLinear multiplies with

    rc, rso = Q.quantize_rtn(w, bits, group_size)
    rtn = _mse(Q.dequantize(rc, rso.to(torch.bfloat16), bits, k), w)
    assert ours <= theirs, (ours, theirs)
    assert ours < rtn, (ours, rtn)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_clipping_search_never_loses_to_plain_rtn(bits):
    w = _weight(64, 192, seed=1)
    plain = _mse(Q.dequantize(*Q.quantize_rtn(w, bits, 64), bits, 192), w)
    clipped = _mse(Q.dequantize(*Q.quantize_rtn_clip(w, bits, 64), bits, 192), w)
    assert clipped <= plain * 1.0001
    if bits <= 4:  # outlier channels make shrinking the range worth it at low bits
        assert clipped < 0.97 * plain


def test_dequantize_follows_the_documented_formula():
    bits, g = 4, 32
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    so = torch.randn(2, 3, 2)
    w = Q.dequantize(codes, so, bits, 64)
    i, j = 2, 40
    expected = (codes[i, j].float() - 8) * so[j // g, i, 0] + so[j // g, i, 1]
    assert torch.allclose(w[i, j], expected)


@pytest.mark.parametrize("solver", [Q.quantize_hqq, Q.quantize_rtn, Q.quantize_rtn_clip])
def test_padding_rule_for_widths_the_group_does_not_divide(solver):
    n, k, g = 16, 172, 64
    w = _weight(n, k)
    codes, so = solver(w, 4, g)
    assert Q.padded_in_features(k, g) == 192
    assert codes.shape == (n, 192) and so.shape == (3, n, 2)
    w_hat = Q.dequantize(codes, so, 4, k)
    assert w_hat.shape == (n, k)
    # the last group holds 44 real channels + 20 padded zeros; it is fit on the real ones only
    assert _mse(w_hat, w) < 2e-4


def test_invalid_bits_and_group_size():
    with pytest.raises(ValueError, match="bits"):
        Q.quantize_rtn(torch.randn(4, 64), 5, 32)
    with pytest.raises(ValueError, match="group_size"):
        Q.quantize_rtn(torch.randn(4, 64), 4, 0)


@pytest.mark.parametrize("bits", [3, 4])
def test_hqq_storage_keeps_the_solver_scale_and_searches_the_offset(bits):
    """hqq's solver fixes each group's scale: storage rounds it to nearest (never the narrower
    neighbour a free search prefers) and takes the offset neighbour that reconstructs the group best."""
    w = _weight(96, 256, seed=2).to(torch.bfloat16)
    codes, exact = Q.quantize_hqq(w, bits, 64)
    codes_b, stored = Q.quantize_hqq(w, bits, 64, torch.bfloat16)
    assert torch.equal(codes, codes_b)
    assert torch.equal(stored[..., 0], exact[..., 0].to(torch.bfloat16))
    nearest = exact.to(torch.bfloat16)
    moved = stored[..., 1] != nearest[..., 1]
    assert moved.any()  # the offset search does something on this data
    step = (torch.nextafter(nearest[..., 1], torch.full_like(nearest[..., 1], float("inf"))).float()
            - nearest[..., 1].float()).abs()
    assert ((stored[..., 1].float() - nearest[..., 1].float()).abs() <= 2 * step).all()
    err = lambda so: _mse(Q.dequantize(codes, so, bits, 256), w.float())  # noqa: E731
    assert err(stored) < err(nearest)
