"""NVFP4 rounding, scales and storage against the format's definition and a brute-force reference."""
import pytest
import torch

from lowbit import nvfp4 as F

MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest magnitude by exhaustive distance, a tie going to the even code; sign bit for negatives."""
    dist = (scaled.abs().unsqueeze(-1) - MAGNITUDES).abs()
    is_min = dist == dist.amin(-1, keepdim=True)
    even_min = is_min & (torch.arange(8) % 2 == 0)
    mag = torch.where(even_min.any(-1), even_min.int().argmax(-1), is_min.int().argmax(-1))
    return mag | ((scaled < 0).long() << 3)


def codes_match(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Codes equal, except that -0 (code 8) may come back as +0 (code 0)."""
    got, expected = got.long(), expected.long()
    return (got == expected) | ((got | 8) == 8) & ((expected | 8) == 8)


def test_grid_constants():
    assert F.E2M1_VALUES.dtype == torch.float32 and F.E2M1_VALUES.shape == (16,)
    assert torch.equal(F.E2M1_VALUES[:8], MAGNITUDES) and torch.equal(F.E2M1_VALUES[8:], -MAGNITUDES)
    assert F.E2M1_VALUES[8].item() == 0.0 and torch.signbit(F.E2M1_VALUES[8])
    assert F.E2M1_VALUES.abs().max() == F.E2M1_MAX
    assert torch.tensor(F.E4M3_MAX).to(torch.float8_e4m3fn).float() == F.E4M3_MAX
    assert F.BLOCK_SIZE == 16


def test_every_representable_value_round_trips():
    block_scales = torch.tensor([448.0, 1.0, 0.75, 1.25, 3.5, 2.0 ** -6, 2.0 ** -9, 96.0])
    assert torch.equal(block_scales.to(torch.float8_e4m3fn).float(), block_scales)  # all exact in E4M3
    tensor_scale = torch.tensor(0.25)
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, len(block_scales), 1)  # [3, 8 blocks, 16]
    x = F.E2M1_VALUES[codes.long()] * block_scales.unsqueeze(-1) * tensor_scale
    x = x.reshape(3, -1)
    packed, scales, ts = F.quantize(x, tensor_scale)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 64)
    assert scales.dtype == torch.float8_e4m3fn and torch.equal(scales.float(), block_scales.expand(3, -1))
    assert ts.dtype == torch.float32 and ts.dim() == 0 and ts.item() == 0.25
    assert codes_match(F.unpack(packed), codes.reshape(3, -1)).all()
    assert torch.equal(F.dequantize(packed, scales, ts), x)


def test_ties_round_to_even():
    midpoints = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = torch.tensor(midpoints + [6.0] + [-m for m in midpoints] + [0.0])  # 6.0 makes the block scale 1
    packed, scales, ts = F.quantize(row.unsqueeze(0), torch.tensor(1.0))
    assert scales.float().item() == 1.0
    out = F.dequantize(packed, scales, ts)[0]
    assert out.tolist() == expected + [6.0] + [-e for e in expected] + [0.0]
    assert codes_match(F.unpack(packed)[0], torch.tensor([0, 2, 2, 4, 4, 6, 6, 7, 8, 10, 10, 12, 12, 14, 14, 0])).all()


def test_round_to_nearest_matches_brute_force():
    torch.manual_seed(0)
    # Block scale 1 (a 6.0 in each block, tensor scale 1): random values and every tie on the quarter grid.
    x = torch.empty(64, 64).uniform_(-6.0, 6.0)
    x[::2] = torch.randint(-24, 25, (32, 64)) / 4.0
    x[:, ::16] = 6.0
    packed, scales, ts = F.quantize(x, torch.tensor(1.0))
    assert (scales.float() == 1.0).all()
    assert torch.equal(F.unpack(packed).long(), reference_codes(x))
    # Every bfloat16 value in [-6, 6] (every exponent the step rule reads), 15 to a block beside a 6.0.
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every = every[every.abs() <= 6.0]
    every = torch.cat([every, every.new_zeros(-every.numel() % 15)]).reshape(-1, 15)
    x = torch.cat([torch.full((every.shape[0], 1), 6.0), every], 1).reshape(1, -1)
    packed, scales, ts = F.quantize(x, torch.tensor(1.0))
    assert (scales.float() == 1.0).all()
    assert codes_match(F.unpack(packed), reference_codes(x)).all()
    # Any scales: the codes are the nearest to x / (block scale · tensor scale), clamped to the grid.
    y = torch.randn(8, 4, 256) * torch.logspace(-3, 3, 8).reshape(8, 1, 1)
    packed, scales, ts = F.quantize(y)
    divisor = scales.float().unsqueeze(-1) * ts
    assert (divisor == 0).any() and (divisor > 0).any()  # six decades: the smallest blocks flush to scale 0
    scaled = torch.where(divisor > 0, y.reshape(8, 4, 16, 16) / divisor, 0.0)
    expected = reference_codes(scaled.clamp(-6, 6)).reshape(y.shape)
    assert codes_match(F.unpack(packed), expected).all()
    grid = F.E2M1_VALUES[expected].reshape(scaled.shape)
    assert torch.equal(F.dequantize(packed, scales, ts), (grid * scales.float().unsqueeze(-1) * ts).reshape(y.shape))


def test_block_scales_never_overflow():
    torch.manual_seed(0)
    decades = torch.logspace(-30, 30, 61).repeat_interleave(16)  # per-block amax from 1e-30 to 1e30
    x = torch.randn(4, decades.numel()) * decades
    x[0, :8] = 1e30
    x[0, 8:16] = -1e-30
    x[1, 16] = -3e30  # the tensor amax
    packed, scales, ts = F.quantize(x)
    s = scales.float()
    assert torch.isfinite(s).all() and s.max() == F.E4M3_MAX and s.min() >= 0  # the top of the E4M3 range is used
    assert ts.item() == pytest.approx(3e30 / (6 * 448), rel=1e-6)
    out = F.dequantize(packed, scales, ts)
    assert torch.isfinite(out).all()
    assert out[1, 16].item() == pytest.approx(-3e30, rel=2 ** -4)  # E4M3 keeps 3 mantissa bits
    assert out[0, :8].tolist() == pytest.approx([1e30] * 8, rel=2 ** -3)
    assert torch.isfinite(F.fake_quantize(x)).all()
    # A given tensor scale that would push block scales past 448 saturates rather than turning into NaN.
    packed, scales, ts = F.quantize(x, torch.tensor(1.0))
    out = F.dequantize(packed, scales, ts)
    assert scales.float().max() == F.E4M3_MAX and torch.isfinite(out).all()
    assert out[1, 16].item() == -6 * 448 and out[0, 0].item() == 6 * 448  # and the values saturate at ±6


def test_zeros():
    packed, scales, ts = F.quantize(torch.zeros(3, 32))
    assert torch.isfinite(ts) and ts > 0
    assert (F.unpack(packed) == 0).all() and (scales.float() == 0).all()
    assert torch.equal(F.dequantize(packed, scales, ts), torch.zeros(3, 32))
    x = torch.randn(4, 64)
    x[:, 16:32] = 0.0
    x[2] = 0.0
    x[3, 48:] = -0.0
    out = F.fake_quantize(x)
    assert not out.isnan().any()
    assert (out[:, 16:32] == 0).all() and (out[2] == 0).all() and (out[3, 48:] == 0).all()


def test_pack_unpack_and_nibble_order():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    packed = F.pack(codes)
    assert packed.tolist() == [[0x21, 0x0F, 0x87]]
    assert torch.equal(F.unpack(packed), codes)
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (2, 3, 64), dtype=torch.uint8)
    assert torch.equal(F.unpack(F.pack(codes)), codes)


@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 48), (16,)])
def test_storage_and_shapes(shape):
    x = torch.randn(shape, dtype=torch.bfloat16)
    packed, scales, ts = F.quantize(x)
    k = shape[-1]
    assert packed.shape == (*shape[:-1], k // 2) and scales.shape == (*shape[:-1], k // 16)
    bits_per_weight = 8 * (packed.shape[-1] * packed.element_size() + scales.shape[-1] * scales.element_size()) / k
    assert bits_per_weight == 4.5
    out = F.fake_quantize(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


@pytest.mark.parametrize("k", [8, 24, 100])
def test_last_dim_must_be_multiple_of_block(k):
    with pytest.raises(ValueError, match=f"multiple of 16, got {k}"):
        F.quantize(torch.randn(2, k))


def test_gaussian_relative_error():
    torch.manual_seed(0)
    x = torch.randn(256, 1024)
    err = ((F.fake_quantize(x) - x).norm() / x.norm()).item()
    assert 0.08 < err < 0.11  # measured 0.0953 (E2M1 with E4M3 block scales of 16)


def test_per_token_rounding_is_each_row_on_its_own():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, 5)[:, None]
    rows = torch.stack([F.fake_quantize(row) for row in x])
    assert torch.equal(F.fake_quantize_per_token(x), rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_rounds_once_to_dtype(dtype):
    """The table lookup equals e2m1 · block scale · tensor scale in float32, rounded once to `dtype`."""
    x = torch.randn(6, 2, 96, generator=torch.Generator().manual_seed(1)) * torch.logspace(-5, 2, 96)
    x[0, 0, :16] = 0.0
    packed, scales, ts = F.quantize(x)
    values = F.E2M1_VALUES[F.unpack(packed).long()].reshape(*scales.shape, 16)
    expected = (values * scales.float().unsqueeze(-1) * ts).reshape(x.shape).to(dtype)
    out = F.dequantize(packed, scales, ts, dtype)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(F.dequantize(packed[:, 1], scales[:, 1], ts, dtype), expected[:, 1])  # a strided slice


def test_int8_codes_are_the_nvfp4_values_rounded_onto_each_tokens_int8_grid():
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 3, 7)[:, None]
    x[:, 40:56] *= 1e-3  # a quiet block, whose NVFP4 steps are finer than the int8 grid
    x[2] = 0.0
    codes, scale = F.int8_codes_per_token(x)
    assert codes.dtype == torch.int8 and scale.shape == (7, 1)
    nvfp4_values = F.fake_quantize_per_token(x)
    amax = x.abs().amax(-1, keepdim=True)
    nonzero = amax[:, 0] > 0
    assert torch.equal(codes.abs().amax(-1)[nonzero], torch.full((6,), 127, dtype=torch.int8))  # max|x| is 127
    assert torch.allclose(scale[nonzero], amax[nonzero] / 127, rtol=1e-6)
    assert torch.equal(codes[2], torch.zeros(96, dtype=torch.int8))
    # each code is the nearest one to its NVFP4 value (ties aside: within half a step plus float rounding)
    assert ((codes.float() * scale - nvfp4_values).abs() <= scale * (0.5 + 1e-5)).all()
    assert not torch.equal(codes.float() * scale, nvfp4_values)  # a re-rounding, not the NVFP4 values


# lowbit's CPU kernel (csrc/nvfp4_cpu.cpp): the product of a decode step and the dequantization

def _random_weight(n: int, k: int, seed: int = 0):
    """Every code byte and every finite E4M3 scale byte (NaN's two bytes replaced) where the weight [n, k]
    holds that many."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)[:codes.numel()]
    scale_bytes = torch.randint(0, 256, (n, k // 16), dtype=torch.uint8, generator=g)
    scale_bytes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)[:scale_bytes.numel()]
    scale_bytes[(scale_bytes & 0x7F) == 0x7F] = 0x38  # 0x7F/0xFF are NaN in E4M3
    return codes, scale_bytes.view(torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def kernel():
    from lowbit import kernels

    if not kernels.nvfp4_cpu_kernel():
        pytest.fail("lowbit's NVFP4 CPU kernel did not build (see the log)")
    return torch.ops.lowbit_nvfp4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ts", [1.0, 0.0123, 3e-7])
def test_kernel_dequantizes_as_the_lookup_table_bit_for_bit(kernel, dtype, ts):
    codes, scales = _random_weight(48, 16 * 7)  # an odd number of blocks per row; 336 scale bytes
    ts = torch.tensor(ts)
    out = kernel.dequantize(codes, scales, ts, dtype)
    expected = F.dequantize_lookup(codes, scales, ts, dtype)
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), expected.view(torch.uint8))  # zeros' signs too
    assert torch.equal(F.dequantize(codes, scales, ts, dtype).view(torch.uint8), expected.view(torch.uint8))


def _activations(shape, dtype, seed=0):
    """Values over seven decades, an all-zero block and an all-zero token."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-4, 3, shape[-1])
    x.view(-1, shape[-1])[0, :16] = 0.0
    x.view(-1, shape[-1])[-1] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 96), (7, 112), (3, 2, 4864)])
def test_kernel_rounds_each_token_as_the_torch_ops_bit_for_bit(kernel, dtype, shape):
    x = _activations(shape, dtype)
    out = F.fake_quantize_per_token(x)
    expected = F.fake_quantize_per_token_torch(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


def _exact_layer(x, codes, scales, ts):
    """x rounded through NVFP4 per token (its values in float32) times the weight, in float64."""
    return F.fake_quantize_per_token_torch(x.float()).double() @ F.dequantize_lookup(codes, scales, ts, torch.float64).T


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [16 * 7, 16 * 8])
def test_kernel_product_is_the_exact_nvfp4_product_summed_in_float32(kernel, rows, dtype, k):
    """Rows past 8 take a second pass of the kernel's row tiles; 7 blocks leave a partial chunk of 64 codes."""
    codes, scales = _random_weight(40, k, seed=rows)
    ts = torch.tensor(1e-4)  # products within float16's range
    x = _activations((rows, k), dtype, seed=rows)
    y = kernel.mm(x, codes, scales, ts)
    exact = _exact_layer(x, codes, scales, ts)
    assert y.dtype == dtype and y.shape == (rows, 40)
    # float32 sums of k products; then one rounding to the output dtype
    bound = exact.abs().amax(-1, keepdim=True) * 1e-5 + exact.abs() * torch.finfo(dtype).eps / 2
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("module", ["self_attn.q_proj", "mlp.gate_proj"])
def test_kernel_on_stories260k_layers_and_activations(kernel, stories, module):
    """Real weights and the hidden states that reach them: a decode row on the kernel equals the same
    row in a prompt (the input rounded and the weight dequantized to the input's dtype, one GEMM)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32)
    layer = model.model.layers[2]
    seen = {}
    handle = layer.get_submodule(module).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(0)))
    handle.remove()
    codes, scales, ts = F.quantize(layer.get_submodule(module).weight.data)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = seen["x"][0].to(dtype)  # [12, 64]
        reference = F.linear(x, codes, scales, ts)  # 12 rows: rounded input times the dequantized weight
        for row in range(x.shape[0]):
            y = F.linear(x[row:row + 1], codes, scales, ts)  # one row: the kernel
            assert torch.allclose(y.float(), reference[row:row + 1].float(), rtol=tol, atol=tol * reference.abs().max())


def test_linear_takes_the_kernel_for_decode_rows_and_a_gemm_for_prompts(kernel, monkeypatch):
    from lowbit import kernels

    codes, scales = _random_weight(32, 64)
    ts, bias = torch.tensor(0.02), torch.randn(32)
    calls = []
    real_mm = torch.ops.lowbit_nvfp4.mm
    monkeypatch.setattr(F.torch.ops.lowbit_nvfp4, "mm", lambda *a: calls.append(a[0].shape) or real_mm(*a),
                        raising=False)
    for rows in (1, kernels.NVFP4_MM_MAX_ROWS, kernels.NVFP4_MM_MAX_ROWS + 1):
        x = torch.randn(1, rows, 64)
        y = F.linear(x, codes, scales, ts, bias)
        exact = _exact_layer(x[0], codes, scales, ts) + bias.double()
        assert y.shape == (1, rows, 32) and torch.allclose(y[0].double(), exact, rtol=1e-5, atol=1e-5)
    assert calls == [(1, 64), (kernels.NVFP4_MM_MAX_ROWS, 64)]


def test_without_the_kernel_nvfp4_says_so_once_and_computes_with_torch_ops(monkeypatch, caplog):
    from lowbit import kernels

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'lowbit_nvfp4'\nc++: not found")

    monkeypatch.setattr(kernels, "_nvfp4_built", None)
    monkeypatch.setattr(kernels, "build_nvfp4_extension", no_compiler)
    codes, scales = _random_weight(32, 64)
    ts, x = torch.tensor(0.02), torch.randn(1, 64)
    with caplog.at_level("WARNING", logger="lowbit.kernels"):
        y = F.linear(x, codes, scales, ts)
        F.dequantize(codes, scales, ts)
        rounded = F.fake_quantize_per_token(x)
    assert torch.equal(rounded, F.fake_quantize_per_token_torch(x))
    assert torch.equal(y, rounded @ F.dequantize_lookup(codes, scales, ts).T)
    warnings = [r.getMessage() for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "c++: not found" in warnings[0]


@pytest.mark.parametrize("variant", ["scalar", "no_vnni"])
def test_the_kernels_other_code_paths_compute_the_same(kernel, tmp_path, monkeypatch, variant):
    """The kernel built without its AVX-512 code (what a CPU without AVX-512 runs), or without the VNNI
    product (AVX-512 alone), under another op namespace."""
    from lowbit import kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = f"lowbit_nvfp4_{variant}"
    kernels.build_nvfp4_extension(name, ("LOWBIT_NVFP4_" + variant.upper(), f"LOWBIT_NVFP4_LIBRARY={name}"))
    other = getattr(torch.ops, name)
    codes, scales = _random_weight(24, 16 * 5)
    ts = torch.tensor(0.3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(other.dequantize(codes, scales, ts, dtype).view(torch.uint8),
                           kernel.dequantize(codes, scales, ts, dtype).view(torch.uint8))
        x = _activations((3, 16 * 5), dtype)
        assert torch.equal(other.round_per_token(x).view(torch.uint8), kernel.round_per_token(x).view(torch.uint8))
    x = _activations((3, 16 * 5), torch.float32)
    exact = _exact_layer(x, codes, scales, ts)
    for y in (other.mm(x, codes, scales, ts), kernel.mm(x, codes, scales, ts)):
        assert ((y.double() - exact).abs() <= exact.abs().amax(-1, keepdim=True) * 1e-5).all()
