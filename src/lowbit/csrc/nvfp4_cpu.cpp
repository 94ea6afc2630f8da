// NVFP4 on CPU: the product of an input with a packed NVFP4 weight, and the weight's dequantization,
// read straight from the packed codes (4.5 bits per weight) instead of a float copy of the weight; and
// the per-token rounding of an input through NVFP4 in one pass, where torch ops take a dozen.
//
// Layout (lowbit.nvfp4): codes uint8 [N, K/2], code 2i in the low nibble of byte i; block scales
// float8_e4m3fn [N, K/16], one per 16 codes; one float32 tensor scale. value = e2m1 * block scale *
// tensor scale. With AVX-512 VNNI the product multiplies both operands' codes as integers (see below);
// with AVX-512 alone a block's 16 codes become 16 floats with one in-register table lookup (vpermps);
// elsewhere scalar loops compute the same.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

// LOWBIT_NVFP4_SCALAR builds the scalar loops alone, LOWBIT_NVFP4_NO_VNNI leaves the VNNI product out (the
// tests compare the variants), LOWBIT_NVFP4_LIBRARY names the ops' namespace.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(LOWBIT_NVFP4_SCALAR)
#define LOWBIT_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;
constexpr int64_t kMaxRows = 8;  // input rows accumulated per pass over a weight row (AVX-512)
alignas(64) const float kE2M1[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                     -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

struct ScaleTable {  // float value of every E4M3 byte
  float value[256];
  ScaleTable() {
    for (int i = 0; i < 256; ++i) value[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
  }
};
const ScaleTable kScales;

bool has_avx512() {
#ifdef LOWBIT_X86
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

bool has_vnni() {
#if defined(LOWBIT_X86) && !defined(LOWBIT_NVFP4_NO_VNNI)
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
#else
  return false;
#endif
}

// A block's E4M3 scale under the tensor scale ts, as a float (lowbit.nvfp4._rounded_blocks).
inline float e4m3_block_scale(float block_amax, float ts) {
  return static_cast<float>(c10::Float8_e4m3fn(std::min(block_amax / 6.0f / ts, 448.0f)));
}

inline void store(float* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }  // round to nearest even, as torch
inline void store(c10::Half* p, float v) { *p = c10::Half(v); }

// ---- scalar --------------------------------------------------------------------------------------
template <typename T>
void mm_rows_scalar(const float* x, const uint8_t* codes, const uint8_t* scales, float tensor_scale, T* y,
                    int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t blocks = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* c = codes + n * (K / 2) + b * (kBlock / 2);
        const float* xb = x + m * K + b * kBlock;
        float s = 0.f;
        for (int i = 0; i < kBlock / 2; ++i)
          s += kE2M1[c[i] & 15] * xb[2 * i] + kE2M1[c[i] >> 4] * xb[2 * i + 1];
        acc += s * kScales.value[scales[n * blocks + b]];
      }
      store(y + m * N + n, acc * tensor_scale);
    }
  }
}

template <typename T>
void dequantize_rows_scalar(const uint8_t* codes, const uint8_t* scales, float tensor_scale, T* out,
                            int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t byte = codes[n * (K / 2) + k / 2];
      const float e2m1 = kE2M1[k % 2 ? byte >> 4 : byte & 15];
      store(out + n * K + k, e2m1 * kScales.value[scales[n * (K / kBlock) + k / kBlock]] * tensor_scale);
    }
}

// The nearest E2M1 value to a float32 (lowbit.nvfp4._e2m1_round, operation for operation): past +-6
// saturated, the grid's step half the value's power of two and at least 0.5, ties to even.
inline float e2m1_round(float scaled) {
  const float a = std::min(std::fabs(scaled), 6.0f);
  uint32_t bits;
  std::memcpy(&bits, &a, 4);
  bits &= 0x7F800000u;
  float step;
  std::memcpy(&step, &bits, 4);
  step = std::max(step, 1.0f) * 0.5f;
  return std::copysign(std::nearbyint(a / step) * step, scaled);
}

// One token (row) of K values rounded through NVFP4 with its own tensor scale, as
// lowbit.nvfp4.fake_quantize_per_token computes it, operation for operation: the E2M1 values [K] and
// block scales [K/16] written, the tensor scale (amax / (6 · 448)) returned. value = e2m1 · scale · ts.
template <typename T>
float quantize_row(const T* x, int64_t K, float* e2m1, float* block_scale) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    e2m1[k] = static_cast<float>(x[k]);
    amax = std::max(amax, std::fabs(e2m1[k]));
  }
  float ts = amax / 2688.0f;  // E2M1_MAX * E4M3_MAX
  if (!(ts > 0.f)) ts = 1.0f;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    float* v = e2m1 + b * kBlock;
    float block_amax = 0.f;
    for (int i = 0; i < kBlock; ++i) block_amax = std::max(block_amax, std::fabs(v[i]));
    const float scale = e4m3_block_scale(block_amax, ts), divisor = scale * ts;
    block_scale[b] = scale;
    for (int i = 0; i < kBlock; ++i) v[i] = e2m1_round((divisor > 0.f ? v[i] / divisor : v[i] / INFINITY) + 0.0f);
  }
  return ts;
}

// Calls tile(m0, rows) over the M input rows in tiles of up to kMaxRows, `rows` a compile-time constant
// (std::integral_constant), so that the tile functions keep their accumulators in registers.
template <typename Tile>
void for_row_tiles(int64_t M, Tile&& tile) {
  static_assert(kMaxRows == 8, "the cases below");
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    switch (std::min(kMaxRows, M - m0)) {
      case 1: tile(m0, std::integral_constant<int, 1>{}); break;
      case 2: tile(m0, std::integral_constant<int, 2>{}); break;
      case 3: tile(m0, std::integral_constant<int, 3>{}); break;
      case 4: tile(m0, std::integral_constant<int, 4>{}); break;
      case 5: tile(m0, std::integral_constant<int, 5>{}); break;
      case 6: tile(m0, std::integral_constant<int, 6>{}); break;
      case 7: tile(m0, std::integral_constant<int, 7>{}); break;
      default: tile(m0, std::integral_constant<int, 8>{}); break;
    }
  }
}

#ifdef LOWBIT_X86
// ---- AVX-512 -------------------------------------------------------------------------------------
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// The E2M1 codes of 8 packed bytes (low 8 bytes of the result) or 16 (two blocks), in code order.
LOWBIT_AVX512 inline __m128i codes_lo(__m128i bytes) {
  const __m128i low = _mm_set1_epi8(15);
  return _mm_unpacklo_epi8(_mm_and_si128(bytes, low), _mm_and_si128(_mm_srli_epi16(bytes, 4), low));
}
LOWBIT_AVX512 inline __m128i codes_hi(__m128i bytes) {
  const __m128i low = _mm_set1_epi8(15);
  return _mm_unpackhi_epi8(_mm_and_si128(bytes, low), _mm_and_si128(_mm_srli_epi16(bytes, 4), low));
}
// 16 codes -> their E2M1 values times the block scale.
LOWBIT_AVX512 inline __m512 block_values(__m128i codes, __m512 table, float scale) {
  return _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), table), _mm512_set1_ps(scale));
}

LOWBIT_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LOWBIT_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
LOWBIT_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LOWBIT_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
LOWBIT_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {  // round to nearest even (finite values)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
LOWBIT_AVX512 inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// R input rows (a compile-time count, so that the accumulators stay in registers) against weight rows
// [n0, n1); two accumulators per input row (even and odd blocks) so that the additions overlap.
template <typename T, int R>
LOWBIT_AVX512 void mm_tile_avx512(const float* x, const uint8_t* codes, const uint8_t* scales, float tensor_scale,
                                  T* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const __m512 table = _mm512_load_ps(kE2M1);
  const int64_t blocks = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* cn = codes + n * (K / 2);
    const uint8_t* sn = scales + n * blocks;
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cn + b * (kBlock / 2)));
      const __m512 w0 = block_values(codes_lo(bytes), table, kScales.value[sn[b]]);
      const __m512 w1 = block_values(codes_hi(bytes), table, kScales.value[sn[b + 1]]);
      for (int r = 0; r < R; ++r) {
        even[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + b * kBlock), even[r]);
        odd[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + (b + 1) * kBlock), odd[r]);
      }
    }
    if (b < blocks) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cn + b * (kBlock / 2)));
      const __m512 w0 = block_values(codes_lo(bytes), table, kScales.value[sn[b]]);
      for (int r = 0; r < R; ++r) even[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + b * kBlock), even[r]);
    }
    for (int r = 0; r < R; ++r) store(y + r * N + n, _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])) * tensor_scale);
  }
}

template <typename T>
LOWBIT_AVX512 void dequantize_rows_avx512(const uint8_t* codes, const uint8_t* scales, float tensor_scale, T* out,
                                          int64_t K, int64_t n0, int64_t n1) {
  const __m512 table = _mm512_load_ps(kE2M1);
  const __m512 ts = _mm512_set1_ps(tensor_scale);
  const int64_t blocks = K / kBlock;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < blocks; ++b) {  // (e2m1 * block scale) is exact; one rounding with the tensor scale
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + n * (K / 2) + b * (kBlock / 2)));
      const __m512 w = block_values(codes_lo(bytes), table, kScales.value[scales[n * blocks + b]]);
      store16(out + n * K + b * kBlock, _mm512_mul_ps(w, ts));
    }
}

// 16 values e · scale · ts, rounded once to T.
template <typename T>
LOWBIT_AVX512 void store_scaled16(T* out, const float* e, float scale, float ts) {
  store16(out, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(e), _mm512_set1_ps(scale)), _mm512_set1_ps(ts)));
}

// quantize_row (above), 16 values at a time.
template <typename T>
LOWBIT_AVX512 float quantize_row_avx512(const T* x, int64_t K, float* e2m1, float* block_scale) {
  const __m512i sign = _mm512_set1_epi32(INT32_MIN);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kBlock) {
    const __m512 v = load16(x + k);
    _mm512_storeu_ps(e2m1 + k, v);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  float ts = _mm512_reduce_max_ps(amax) / 2688.0f;  // E2M1_MAX * E4M3_MAX
  if (!(ts > 0.f)) ts = 1.0f;
  for (int64_t k = 0; k < K; k += kBlock) {
    const __m512 v = _mm512_loadu_ps(e2m1 + k);
    const float scale = e4m3_block_scale(_mm512_reduce_max_ps(_mm512_abs_ps(v)), ts);
    block_scale[k / kBlock] = scale;
    const float divisor = scale * ts;
    if (!(divisor > 0.f)) {  // x / inf + 0: every value +0
      _mm512_storeu_ps(e2m1 + k, _mm512_setzero_ps());
      continue;
    }
    const __m512 scaled = _mm512_add_ps(_mm512_div_ps(v, _mm512_set1_ps(divisor)), _mm512_setzero_ps());
    const __m512 a = _mm512_min_ps(_mm512_abs_ps(scaled), _mm512_set1_ps(6.0f));
    const __m512 power = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7F800000)));
    const __m512 step = _mm512_mul_ps(_mm512_max_ps(power, _mm512_set1_ps(1.0f)), _mm512_set1_ps(0.5f));
    const __m512 rounded = _mm512_mul_ps(
        _mm512_roundscale_ps(_mm512_div_ps(a, step), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), step);
    _mm512_storeu_ps(e2m1 + k, _mm512_castsi512_ps(_mm512_or_si512(  // copysign
        _mm512_castps_si512(rounded), _mm512_and_si512(sign, _mm512_castps_si512(scaled)))));
  }
  return ts;
}

// ---- AVX-512 VNNI: both operands' E2M1 codes multiplied as integers -------------------------------
// A row of the weight is read 64 codes (32 bytes, four blocks) at a time: the low nibbles of the 32
// bytes, then their high nibbles, as 64 unsigned bytes 2·e2m1 + 12 (one vpshufb lookup); the input's
// codes 2·e2m1 (signed) are laid out once per call in that same order, so that one vpdpbusd gives 16
// int32 lanes, each the dot product of 4 codes of one block. Each lane is then scaled by its block's
// two E4M3 scales and summed in float32. The +12 that makes the weight's codes unsigned is taken
// back by starting each lane from -12 times the sum of its input codes.
constexpr int64_t kChunk = 64;
#define LOWBIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

struct VnniInput {  // one input row in the kernel's order, per chunk of 64 codes
  std::vector<int8_t> codes;      // [chunks * 64]
  std::vector<int32_t> start;     // [chunks * 16]: -12 · the lane's input codes
  std::vector<float> lane_scale;  // [chunks * 16]: the input's block scale of each lane
  float tensor_scale = 1.f;
};

// lane l of a chunk holds codes of block (l % 8) / 2: lanes 0-7 the even codes, 8-15 the odd ones
void prepare_vnni_input(const float* e2m1, const float* block_scale, float ts, int64_t K, VnniInput& in) {
  const int64_t chunks = (K + kChunk - 1) / kChunk, blocks = K / kBlock;
  in.codes.assign(chunks * kChunk, 0);
  in.start.assign(chunks * 16, 0);
  in.lane_scale.assign(chunks * 16, 0.f);
  in.tensor_scale = ts;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < kChunk; ++j) {
      const int64_t k = c * kChunk + (j < 32 ? 2 * j : 2 * (j - 32) + 1);
      const int8_t code = k < K ? static_cast<int8_t>(2.f * e2m1[k]) : 0;
      in.codes[c * kChunk + j] = code;
      in.start[c * 16 + j / 4] -= 12 * code;
    }
  for (int64_t c = 0; c < chunks; ++c)
    for (int l = 0; l < 16; ++l) {
      const int64_t block = c * 4 + (l % 8) / 2;
      in.lane_scale[c * 16 + l] = block < blocks ? block_scale[block] : 0.f;
    }
}

template <typename T, int R>
LOWBIT_VNNI void mm_tile_vnni(const VnniInput* in, const uint8_t* codes, const uint8_t* scales, float tensor_scale,
                              T* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  // code -> 2·e2m1 + 12: 12 + {0, 1, 2, 3, 4, 6, 8, 12} for codes 0-7, 12 - the same for 8-15
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m128i spread = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i low = _mm256_set1_epi8(15);
  const __m512 e4m3_bias = _mm512_set1_ps(0x1p120f);  // E4M3 bits placed in a float32's exponent and mantissa
  const int64_t chunks = (K + kChunk - 1) / kChunk, row_bytes = K / 2, blocks = K / kBlock;
  float out_scale[R];
  for (int r = 0; r < R; ++r) out_scale[r] = tensor_scale * in[r].tensor_scale * 0.25f;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* cn = codes + n * row_bytes;
    const uint8_t* sn = scales + n * blocks;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      __m256i bytes;
      __m128i scale_bytes;
      if ((c + 1) * 32 <= row_bytes) {
        bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cn + c * 32));
        int32_t four;
        std::memcpy(&four, sn + c * 4, 4);
        scale_bytes = _mm_cvtsi32_si128(four);
      } else {  // the row's last, partial chunk: read only its own bytes (the input's codes there are 0)
        bytes = _mm256_maskz_loadu_epi8((1u << (row_bytes - c * 32)) - 1, cn + c * 32);
        scale_bytes = _mm_maskz_loadu_epi8((1u << (blocks - c * 4)) - 1, sn + c * 4);
      }
      const __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
      const __m512i w = _mm512_shuffle_epi8(lut, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
      // each lane's E4M3 byte, sign-extended, moved into float32's fields: sign to bit 31, exponent and
      // mantissa to bits 20-26 (the extension's copies of the sign cleared), then rebiased by 2^120
      const __m512i lanes = _mm512_slli_epi32(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(scale_bytes, spread)), 20);
      const __m512 w_scale = _mm512_mul_ps(
          _mm512_castsi512_ps(_mm512_and_si512(lanes, _mm512_set1_epi32(static_cast<int32_t>(0x87F00000u)))), e4m3_bias);
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(in[r].start.data() + c * 16), w,
                                                _mm512_loadu_si512(in[r].codes.data() + c * kChunk));
        const __m512 scale = _mm512_mul_ps(w_scale, _mm512_loadu_ps(in[r].lane_scale.data() + c * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) store(y + r * N + n, _mm512_reduce_add_ps(acc[r]) * out_scale[r]);
  }
}

#endif  // LOWBIT_X86

// ---- ops -----------------------------------------------------------------------------------------
void check_weight(const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(codes.device().is_cpu() && scales.device().is_cpu(), "lowbit nvfp4: tensors must be on the CPU");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "lowbit nvfp4: codes must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kFloat8_e4m3fn && scales.is_contiguous() &&
                  scales.size(0) == codes.size(0) && scales.size(1) * kBlock == codes.size(1) * 2,
              "lowbit nvfp4: block scales must be contiguous float8_e4m3fn [N, K/16]");
}

// Rows of the weight per task: about 64 KiB of codes, so that two threads split even a small layer.
int64_t grain(int64_t K) { return std::max<int64_t>(1, 131072 / std::max<int64_t>(1, K)); }

// Each input row quantized: its E2M1 values and block scales, and its tensor scale.
struct QuantizedRows {
  std::vector<float> e2m1, block_scale, tensor_scale;
};

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  QuantizedRows q{std::vector<float>(M * K), std::vector<float>(M * K / kBlock), std::vector<float>(M)};
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* e = q.e2m1.data() + m * K;
      float* s = q.block_scale.data() + m * K / kBlock;
#ifdef LOWBIT_X86
      if (has_avx512()) {
        q.tensor_scale[m] = quantize_row_avx512<T>(x + m * K, K, e, s);
        continue;
      }
#endif
      q.tensor_scale[m] = quantize_row<T>(x + m * K, K, e, s);
    }
  });
  return q;
}

// The rows' NVFP4 values, (e2m1 · block scale) · tensor scale, each rounded once to Out.
template <typename Out>
void write_values(const QuantizedRows& q, int64_t M, int64_t K, Out* out) {
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < K / kBlock; ++b) {
        const float* e = q.e2m1.data() + m * K + b * kBlock;
        const float scale = q.block_scale[m * K / kBlock + b], ts = q.tensor_scale[m];
        Out* o = out + m * K + b * kBlock;
#ifdef LOWBIT_X86
        if (has_avx512()) {
          store_scaled16(o, e, scale, ts);
          continue;
        }
#endif
        for (int i = 0; i < kBlock; ++i) store(o + i, e[i] * scale * ts);
      }
  });
}

template <typename T>
void mm_typed(const at::Tensor& x, const uint8_t* c, const uint8_t* s, float ts, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const QuantizedRows q = quantize_rows<T>(x.const_data_ptr<T>(), M, K);
  T* yp = y.mutable_data_ptr<T>();
#ifdef LOWBIT_X86
  if (has_vnni()) {
    std::vector<VnniInput> in(M);
    for (int64_t m = 0; m < M; ++m)
      prepare_vnni_input(q.e2m1.data() + m * K, q.block_scale.data() + m * K / kBlock, q.tensor_scale[m], K, in[m]);
    at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
      for_row_tiles(M, [&](int64_t m0, auto rows) {
        mm_tile_vnni<T, decltype(rows)::value>(in.data() + m0, c, s, ts, yp + m0 * N, N, K, n0, n1);
      });
    });
    return;
  }
#endif
  std::vector<float> values(M * K);  // the input's NVFP4 values, in float32
  write_values<float>(q, M, K, values.data());
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
#ifdef LOWBIT_X86
    if (has_avx512())
      return for_row_tiles(M, [&](int64_t m0, auto rows) {
        mm_tile_avx512<T, decltype(rows)::value>(values.data() + m0 * K, c, s, ts, yp + m0 * N, N, K, n0, n1);
      });
#endif
    mm_rows_scalar<T>(values.data(), c, s, ts, yp, M, N, K, n0, n1);
  });
}

template <typename T>
void dequantize_typed(const uint8_t* c, const uint8_t* s, float ts, at::Tensor& out) {
  const int64_t N = out.size(0), K = out.size(1);
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
#ifdef LOWBIT_X86
    if (has_avx512()) return dequantize_rows_avx512<T>(c, s, ts, op, K, n0, n1);
#endif
    dequantize_rows_scalar<T>(c, s, ts, op, K, n0, n1);
  });
}

template <typename T>
void round_typed(const at::Tensor& x, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1);
  write_values<T>(quantize_rows<T>(x.const_data_ptr<T>(), M, K), M, K, out.mutable_data_ptr<T>());
}

const uint8_t* scale_bytes(const at::Tensor& scales) { return reinterpret_cast<const uint8_t*>(scales.const_data_ptr()); }

float scalar(const at::Tensor& tensor_scale) {
  TORCH_CHECK(tensor_scale.numel() == 1 && tensor_scale.scalar_type() == at::kFloat && tensor_scale.device().is_cpu(),
              "lowbit nvfp4: the tensor scale must be one float32 value on the CPU");
  return tensor_scale.item<float>();
}

bool float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// x [..., K] rounded through NVFP4 with one tensor scale per row (token), in x's dtype.
at::Tensor round_per_token(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) % kBlock == 0 && float_type(x.scalar_type()),
              "lowbit nvfp4: x must be float32, bfloat16 or float16 [..., K] on the CPU, K a multiple of 16");
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor out = at::empty(x2.sizes(), x2.options());
  switch (x.scalar_type()) {
    case at::kFloat: round_typed<float>(x2, out); break;
    case at::kBFloat16: round_typed<c10::BFloat16>(x2, out); break;
    default: round_typed<c10::Half>(x2, out); break;
  }
  return out.view(x.sizes());
}

// x [M, K] rounded through NVFP4 per token (round_per_token) times the NVFP4 weight [N, K], transposed:
// [M, N] in x's dtype, the exact products of the two operands' values summed in float32 (as integer
// dot products per block of 16 on AVX-512 VNNI), times the two tensor scales at the end.
at::Tensor mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& tensor_scale) {
  check_weight(codes, scales);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == codes.size(1) * 2 && float_type(x.scalar_type()),
              "lowbit nvfp4: x must be float32, bfloat16 or float16 [M, K] on the CPU");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), codes.size(0)}, x.options());
  const uint8_t* c = codes.const_data_ptr<uint8_t>();
  const float ts = scalar(tensor_scale);
  switch (x.scalar_type()) {
    case at::kFloat: mm_typed<float>(xc, c, scale_bytes(scales), ts, y); break;
    case at::kBFloat16: mm_typed<c10::BFloat16>(xc, c, scale_bytes(scales), ts, y); break;
    default: mm_typed<c10::Half>(xc, c, scale_bytes(scales), ts, y); break;
  }
  return y;
}

// The weight [N, K] in `dtype`: e2m1 * block scale * tensor scale in float32, rounded once (as lowbit.nvfp4's
// lookup table computes it, bit for bit).
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& tensor_scale,
                      at::ScalarType dtype) {
  check_weight(codes, scales);
  TORCH_CHECK(float_type(dtype), "lowbit nvfp4: dtype must be float32, bfloat16 or float16");
  at::Tensor out = at::empty({codes.size(0), codes.size(1) * 2}, codes.options().dtype(dtype));
  const uint8_t* c = codes.const_data_ptr<uint8_t>();
  const float ts = scalar(tensor_scale);
  switch (dtype) {
    case at::kFloat: dequantize_typed<float>(c, scale_bytes(scales), ts, out); break;
    case at::kBFloat16: dequantize_typed<c10::BFloat16>(c, scale_bytes(scales), ts, out); break;
    default: dequantize_typed<c10::Half>(c, scale_bytes(scales), ts, out); break;
  }
  return out;
}

}  // namespace

#ifndef LOWBIT_NVFP4_LIBRARY
#define LOWBIT_NVFP4_LIBRARY lowbit_nvfp4
#endif

TORCH_LIBRARY(LOWBIT_NVFP4_LIBRARY, m) {
  m.def("mm(Tensor x, Tensor codes, Tensor block_scales, Tensor tensor_scale) -> Tensor");
  m.def("dequantize(Tensor codes, Tensor block_scales, Tensor tensor_scale, ScalarType dtype) -> Tensor");
  m.def("round_per_token(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(LOWBIT_NVFP4_LIBRARY, CPU, m) {
  m.impl("mm", &mm);
  m.impl("dequantize", &dequantize);
  m.impl("round_per_token", &round_per_token);
}
