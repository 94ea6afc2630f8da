"""Activation quantization and the integer matmul path against the fake-quant float reference."""
import copy
import io

import pytest
import torch

from lowbit import kernels
from lowbit import quantize as Q


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_codes_and_clipping(bits):
    x = torch.randn(5, 64)
    x[0, 3] = 50.0
    codes, scale = Q.quantize_activations(x, bits, clip_ratio=0.9)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.min() >= -qmax - 1 and codes.max() <= qmax
    assert torch.allclose(scale[0], torch.tensor(50.0 * 0.9 / qmax))
    assert codes[0, 3] == qmax  # the outlier saturates at the clipped range
    ref = Q.fake_quantize_activations(x, bits, 1.0)
    assert (ref - x).abs().max() <= (x.abs().amax(-1, keepdim=True) / qmax / 2 + 1e-6).max()


def test_searched_clip_has_the_least_error_of_the_grid():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    x[:8] = torch.randn(8, 256).sign()  # ±1 tokens: exact unclipped, any clipping hurts them
    err = lambda y: (y.float() - x).pow(2).sum(-1)  # noqa: E731
    searched = err(Q.fake_quantize_activations(x, 4, None))
    each = torch.stack([err(Q.fake_quantize_activations(x, 4, r)) for r in Q.ACT_CLIP_GRID])
    assert torch.allclose(searched, each.min(0).values)
    assert (each[0, 8:] > searched[8:]).all()  # Gaussian tokens: some clipping beats none
    assert (searched[:8] == 0).all() and (each[1:, :8] > 0).all()
    codes, scale = Q.quantize_activations(x, 4, None)
    assert torch.equal(Q.quantize_activations(x, 4, None)[0], codes)


def test_the_clip_search_gives_each_token_its_own_codes_whatever_the_block():
    """A wide input is searched in blocks of fewer tokens (ACT_CLIP_ELEMENTS): every token gets what it gets alone."""
    torch.manual_seed(1)
    x = (torch.randn(45, 4864) * torch.rand(45, 1) * 3).to(torch.bfloat16)
    assert Q.ACT_CLIP_ELEMENTS // x.shape[1] < Q.ACT_CLIP_BLOCK < x.shape[0]  # several blocks, a partial last one
    codes, scale = Q.quantize_activations(x, 4, None)
    alone = [Q.quantize_activations(row[None], 4, None) for row in x]
    assert torch.equal(codes, torch.cat([c for c, _ in alone])) and torch.equal(scale, torch.cat([s for _, s in alone]))


@pytest.mark.parametrize("bits,clip", [(8, 1.0), (4, 0.9), (4, None)])
def test_bfloat16_input_quantizes_as_its_float32_copy(bits, clip):
    """The bf16 path divides in float32 by promotion; it must give the codes of the float32 input,
    and no tokens give empty codes."""
    torch.manual_seed(0)
    x = (torch.randn(70, 96) * torch.rand(96) * 4).to(torch.bfloat16)  # more than one search block
    codes, scale = Q.quantize_activations(x, bits, clip)
    ref_codes, ref_scale = Q.quantize_activations(x.float(), bits, clip)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    empty, empty_scale = Q.quantize_activations(x[:0], bits, clip)
    assert empty.shape == (0, 96) and empty_scale.shape == (0, 1)


def test_bad_activation_bits():
    with pytest.raises(ValueError, match="activation bits must be 4 or 8, got 3"):
        Q.quantize_activations(torch.randn(2, 8), 3)


@pytest.mark.parametrize("w_bits,a_bits,group,m", [(4, 4, 32, 7), (4, 8, 64, 1), (8, 8, 64, 7), (4, 8, 128, 7),
                                                  (3, 4, 32, 7), (4, 4, 64, 600), (4, 8, 256, 600)])
def test_integer_path_against_fake_quant_reference(w_bits, a_bits, group, m):
    """One int8 product per layer: exact against its own per-channel weight, and within the re-rounding
    bound (each weight moves by at most half a per-channel step) of the group-quantized reference."""
    torch.manual_seed(0)
    n, k = 48, 256
    w = torch.randn(n, k) * 0.05
    codes, so = Q.quantize_rtn(w, w_bits, group)
    w_ref = Q.dequantize(codes, so, w_bits, k).double()
    w8, w_scale = kernels.int8_channel_weight(w_ref)
    assert w8.dtype == torch.int8 and w8.abs().max() == 127
    assert ((w8.double() * w_scale[:, None].double() - w_ref).abs() <= w_scale[:, None] / 2 + 1e-9).all()
    x = torch.randn(m, k)
    xc, xs = Q.quantize_activations(x, a_bits)
    y_int = kernels.int8_linear(xc, xs, w8, w_scale).double()
    x_ref = Q.fake_quantize_activations(x, a_bits).double()
    exact = x_ref @ (w8.double() * w_scale[:, None].double()).T
    assert torch.allclose(y_int, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    bound = x_ref.abs() @ (w_scale[:, None].double() / 2).expand(n, k).T
    assert ((y_int - x_ref @ w_ref.T).abs() <= bound * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("m", [1, kernels.EPILOGUE_ROWS, 3 * kernels.EPILOGUE_ROWS + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_product_epilogue_in_row_blocks_equals_whole(m, dtype):
    """A prompt's epilogue, run EPILOGUE_ROWS rows at a time: the whole product's float32 result rounded to
    `dtype`, bit for bit (sums large enough that their float32 conversion rounds), the last block partial."""
    g = torch.Generator().manual_seed(1)
    n, k = 96, 320
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    codes = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w_scale, scale = torch.rand(n, generator=g) + 0.5, torch.rand(m, 1, generator=g) + 0.5
    whole = (codes.double() @ w8.double().T).float().mul_(scale).mul_(w_scale)
    y = kernels.int8_linear(codes, scale, w8, w_scale, dtype=dtype)
    assert y.dtype == dtype and torch.equal(y, whole.to(dtype))


@pytest.mark.skipif(not kernels.onednn_int8_available(), reason="this torch build has no oneDNN int8 GEMM")
@pytest.mark.parametrize("m,n,k", [(1, 512, 256), (3, 640, 96), (600, 512, 448)])
def test_onednn_layout_gives_the_same_product_as_int_mm(m, n, k, monkeypatch):
    """The prepacked oneDNN weight: bit-identical products to `torch._int_mm` on the plain weight (sums large
    enough that their float32 conversion rounds), and it unpacks to the same int8 weight."""
    monkeypatch.setattr(kernels, "onednn_layout_for", lambda out_features: True)  # on any x86 CPU
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) + 0.5
    packed = kernels.pack_int8_weight(w8)
    assert packed.is_mkldnn and torch.equal(kernels.unpack_int8_weight(packed), w8)
    codes = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    scale = torch.rand(m, 1, generator=g) + 0.5
    plain = kernels.int8_linear(codes, scale, w8, w_scale)
    assert torch.equal(kernels.int8_linear(codes, scale, packed, w_scale, packed=True), plain)
    assert torch.equal(plain, (codes.double() @ w8.double().T).float().mul_(scale).mul_(w_scale))


def test_int8_weights_take_onednn_layout_only_where_it_is_faster():
    """oneDNN's layout on a CPU with AMX and for layers of at least ONEDNN_MIN_OUT_FEATURES outputs; the
    plain one (`torch._int_mm`) for narrower layers, on CPUs without AMX, and off the CPU."""
    amx = kernels.onednn_int8_available() and torch.cpu._is_amx_tile_supported()
    wide = torch.ones(kernels.ONEDNN_MIN_OUT_FEATURES, 64, dtype=torch.int8)
    assert kernels.pack_int8_weight(wide).is_mkldnn == amx
    assert not kernels.pack_int8_weight(wide[:-1]).is_mkldnn
    assert not kernels.pack_int8_weight(wide.to("meta")).is_mkldnn


@pytest.mark.skipif(not kernels.onednn_int8_available(), reason="this torch build has no oneDNN int8 GEMM")
def test_a_packed_layer_moves_changes_dtype_and_copies(monkeypatch):
    """`.to()`, deepcopy and pickle on a layer holding oneDNN's opaque weight: the same outputs after each."""
    from lowbit.modules import QuantLinear

    monkeypatch.setattr(kernels, "onednn_layout_for", lambda out_features: True)
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), 4, 32, solver="rtn", act_bits=8)
    assert q.int8_packed and q.int8_weight.is_mkldnn
    x = torch.randn(3, 64)
    y = q(x)
    q.to(torch.bfloat16).to("cpu")
    assert q.int8_packed and q.int8_weight.is_mkldnn and q.scale_offset.dtype == torch.bfloat16
    assert torch.allclose(q(x.bfloat16()).float(), y, rtol=0.02, atol=0.02)
    twin = copy.deepcopy(q)  # an opaque tensor has no storage: copied through its plain form, packed again
    assert twin.int8_packed and twin.int8_weight.is_mkldnn and torch.equal(twin(x.bfloat16()), q(x.bfloat16()))
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.int8_weight.is_mkldnn and torch.equal(loaded(x.bfloat16()), q(x.bfloat16()))
