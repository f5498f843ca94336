#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <limits>

namespace fairdiff::cpu {
namespace {

// Cephes expf: exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 in two parts
// (C1 + C2 = ln 2, C1 exact in few bits), exp(r) by a degree-6 polynomial on |r| <= ln2 / 2.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
// Below this exp underflows past the smallest normal float; softmax arguments are <= 0.
constexpr float kMinArg = -87.33654f;

void exp_row_portable(float* x, int64_t L, float* sum) {
  const float row_max = *std::max_element(x, x + L);
  double s = 0;  // one float accumulator over 4096 terms drifts by ~2e-6 (the vector one sums 16 lanes)
  for (int64_t j = 0; j < L; ++j) {
    x[j] = std::exp(x[j] - row_max);
    s += x[j];
  }
  *sum = static_cast<float>(s);
}

// The tiles of the fused attention, one instantiation of attention_tiles.inc per instruction
// set. AVX-512: 6 rows x 4 vectors = 24 of the 32 registers accumulate; AVX2: 6 x 2 = 12 of 16
// (the shapes of BLIS's and OpenBLAS's own kernels).
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
struct Simd {
  using In = float;
  using Reg = __m512;
  using Operand = __m512;
  static constexpr int kWidth = 16, kPack = 1, kRows = 6, kVectors = 4;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static Operand load_b(const float* p) { return _mm512_loadu_ps(p); }
  static Operand set1_a(const float* p) { return _mm512_set1_ps(*p); }
  static Reg fmadd(Operand a, Operand b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
};
#include "attention_tiles.inc"

// The exponentials: 16 lanes, the tail under a mask, 2^k by vscalefps.
struct Exp {
  using Vec = __m512;
  static constexpr int kWidth = 16, kSums = 1;
  static __mmask16 lanes(int rest) { return static_cast<__mmask16>((1u << rest) - 1); }
  static Vec set1(float v) { return _mm512_set1_ps(v); }
  static Vec loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec load_tail(const float* p, int rest, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes(rest), p);
  }
  static void store_tail(float* p, int rest, Vec v) { _mm512_mask_storeu_ps(p, lanes(rest), v); }
  static Vec keep_tail(Vec v, int rest) { return _mm512_maskz_mov_ps(lanes(rest), v); }
  static Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }
  static Vec round(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT); }
  static Vec scale(Vec y, Vec k) { return _mm512_scalef_ps(y, k); }
  static float reduce_max(Vec v) { return _mm512_reduce_max_ps(v); }
  static float reduce_add(Vec v) { return _mm512_reduce_add_ps(v); }
  static Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
  static Vec abs(Vec v) { return _mm512_abs_ps(v); }
  static Vec select_nonneg(Vec z, Vec a, Vec b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
  }
};
#include "exp_rows.inc"
#include "geglu_rows.inc"

// bf16 rows: widened to float (a shift), gelu rounded to bf16 and then the product, as
// LibTorch's gelu_ and mul_ on bf16 tensors round (round to nearest even; NaN stays NaN).
inline Vec from_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m256i to_bf16_bits_16(Vec v) {  // 16 lanes
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0)));
}
inline Vec round_bf16(Vec v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits_16(v)), 16));
}
inline void geglu_bf16_16(uint16_t* value, const uint16_t* gate) {
  const Vec g = round_bf16(gelu_vec(from_bf16(gate)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(value), to_bf16_bits_16(_mm512_mul_ps(from_bf16(value), g)));
}
void geglu_row_bf16(uint16_t* value, const uint16_t* gate, int64_t F) {
  const int64_t full = F / 16 * 16;
  for (int64_t j = 0; j < full; j += 16) geglu_bf16_16(value + j, gate + j);
  if (const int64_t rest = F - full) {  // through a whole vector on the stack (masked 16-bit moves need AVX512BW)
    uint16_t v[16] = {}, g[16] = {};
    std::memcpy(v, value + full, static_cast<size_t>(rest) * sizeof(uint16_t));
    std::memcpy(g, gate + full, static_cast<size_t>(rest) * sizeof(uint16_t));
    geglu_bf16_16(v, g);
    std::memcpy(value + full, v, static_cast<size_t>(rest) * sizeof(uint16_t));
  }
}

// The norms' two passes over bf16 values (group_norm_bf16, layer_norm_bf16): the statistics,
// then the output, both in float32. A tail of fewer than 16 values goes through a vector on
// the stack (masked 16-bit moves need AVX512BW).
inline Vec load_bf16_tail(const uint16_t* p, int64_t rest) {
  uint16_t v[16] = {};
  std::memcpy(v, p, static_cast<size_t>(rest) * sizeof(uint16_t));
  return from_bf16(v);
}
inline void store_bf16_tail(uint16_t* p, int64_t rest, Vec y) {
  uint16_t v[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(v), to_bf16_bits_16(y));
  std::memcpy(p, v, static_cast<size_t>(rest) * sizeof(uint16_t));
}
// The mean of x[0:n] and 1 / sqrt(var + eps), the biased variance as the norms take it: the
// sum of squares about the mean in a second pass (the span is in cache by then), not E[x^2] -
// mean^2, which cancels for activations whose mean is large next to their spread.
void moments_bf16(const uint16_t* x, int64_t n, float eps, float* mean, float* rstd) {
  const int64_t full = n / 16 * 16, rest = n - full;
  Vec s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= full; j += 32) {
    s0 = _mm512_add_ps(s0, from_bf16(x + j));
    s1 = _mm512_add_ps(s1, from_bf16(x + j + 16));
  }
  if (j < full) s0 = _mm512_add_ps(s0, from_bf16(x + j));
  if (rest) s1 = _mm512_add_ps(s1, load_bf16_tail(x + full, rest));
  const float m = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(n);
  const Vec mv = _mm512_set1_ps(m);
  Vec q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
  for (j = 0; j + 32 <= full; j += 32) {
    const Vec d0 = _mm512_sub_ps(from_bf16(x + j), mv), d1 = _mm512_sub_ps(from_bf16(x + j + 16), mv);
    q0 = _mm512_fmadd_ps(d0, d0, q0);
    q1 = _mm512_fmadd_ps(d1, d1, q1);
  }
  if (j < full) {
    const Vec d = _mm512_sub_ps(from_bf16(x + j), mv);
    q0 = _mm512_fmadd_ps(d, d, q0);
  }
  if (rest) {
    const Vec d = _mm512_maskz_sub_ps(static_cast<__mmask16>((1u << rest) - 1), load_bf16_tail(x + full, rest), mv);
    q1 = _mm512_fmadd_ps(d, d, q1);
  }
  const float var = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1)) / static_cast<float>(n);
  *mean = m;
  *rstd = 1.0f / std::sqrt(var + eps);
}
// silu(y) = y / (1 + exp(-y)) in float32 of y rounded to bf16: what silu_in_float (layers.h)
// and PyTorch 2.x compute from the bf16 output of a norm (Sleef's expf to 1 ulp there,
// exp_vec is Cephes' to about as much), before the caller rounds it once. exp(-y) overflows
// to inf below y = -88: y / inf is -0, as there.
inline Vec silu_of_bf16(Vec y) {
  y = round_bf16(y);
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_vec(_mm512_sub_ps(_mm512_setzero_ps(), y))));
}
// y[0:n] = bf16(x scale + shift), or bf16(silu(that)): one channel of a group norm.
template <bool kSilu>
void scale_shift_bf16(const uint16_t* x, int64_t n, float scale, float shift, uint16_t* y) {
  const Vec a = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift);
  auto out = [](Vec v) { return kSilu ? silu_of_bf16(v) : v; };
  const int64_t full = n / 16 * 16;
  for (int64_t j = 0; j < full; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), to_bf16_bits_16(out(_mm512_fmadd_ps(from_bf16(x + j), a, b))));
  if (n > full) store_bf16_tail(y + full, n - full, out(_mm512_fmadd_ps(load_bf16_tail(x + full, n - full), a, b)));
}
// y[0:n] = bf16((x rstd - mean rstd) gamma + beta): one row of a layer norm (gamma, beta float).
void layer_norm_row_bf16(const uint16_t* x, int64_t n, float mean, float rstd, const float* gamma, const float* beta,
                         uint16_t* y) {
  const Vec a = _mm512_set1_ps(rstd), b = _mm512_set1_ps(-mean * rstd);
  const int64_t full = n / 16 * 16;
  for (int64_t j = 0; j < full; j += 16) {
    const Vec t = _mm512_fmadd_ps(from_bf16(x + j), a, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j),
                        to_bf16_bits_16(_mm512_fmadd_ps(t, _mm512_loadu_ps(gamma + j), _mm512_loadu_ps(beta + j))));
  }
  if (const int64_t rest = n - full) {
    const __mmask16 tail = static_cast<__mmask16>((1u << rest) - 1);
    const Vec t = _mm512_fmadd_ps(load_bf16_tail(x + full, rest), a, b);
    store_bf16_tail(y + full, rest,
                    _mm512_fmadd_ps(t, _mm512_maskz_loadu_ps(tail, gamma + full), _mm512_maskz_loadu_ps(tail, beta + full)));
  }
}
// y[0:n] = bf16(x / s), rounded as LibTorch's .to(kBFloat16): a bf16 head's output row.
void divide_to_bf16(const float* x, float s, int64_t n, uint16_t* y) {
  const Vec d = _mm512_set1_ps(s);
  const int64_t full = n / 16 * 16;
  for (int64_t j = 0; j < full; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), to_bf16_bits_16(_mm512_div_ps(_mm512_loadu_ps(x + j), d)));
  if (const int64_t rest = n - full) {
    const __mmask16 tail = static_cast<__mmask16>((1u << rest) - 1);
    store_bf16_tail(y + full, rest, _mm512_div_ps(_mm512_maskz_loadu_ps(tail, x + full), d));
  }
}
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Simd {
  using In = float;
  using Reg = __m256;
  using Operand = __m256;
  static constexpr int kWidth = 8, kPack = 1, kRows = 6, kVectors = 2;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static Operand load_b(const float* p) { return _mm256_loadu_ps(p); }
  static Operand set1_a(const float* p) { return _mm256_set1_ps(*p); }
  static Reg fmadd(Operand a, Operand b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
};
#include "attention_tiles.inc"

// The exponentials on AVX2 + FMA (every x86-64 CPU since Haswell and Zen): 8 lanes, two
// accumulators, the tail read and written under a lane mask, and 2^k built in the exponent
// bits (k >= -126 after the clamp, so 2^k is a normal float).
struct Exp {
  using Vec = __m256;
  static constexpr int kWidth = 8, kSums = 2;
  // Lanes 0..rest-1: all bits set.
  static __m256i lanes(int rest) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Vec set1(float v) { return _mm256_set1_ps(v); }
  static Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec load_tail(const float* p, int rest, float fill) {
    const __m256i m = lanes(rest);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static void store_tail(float* p, int rest, Vec v) { _mm256_maskstore_ps(p, lanes(rest), v); }
  static Vec keep_tail(Vec v, int rest) { return _mm256_and_ps(v, _mm256_castsi256_ps(lanes(rest))); }
  static Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
  static Vec round(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static Vec scale(Vec y, Vec k) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  }
  static float reduce(Vec v, bool max) {
    __m128 a = _mm256_castps256_ps128(v), b = _mm256_extractf128_ps(v, 1);
    a = max ? _mm_max_ps(a, b) : _mm_add_ps(a, b);
    b = _mm_movehl_ps(a, a);
    a = max ? _mm_max_ps(a, b) : _mm_add_ps(a, b);
    b = _mm_shuffle_ps(a, a, 1);
    a = max ? _mm_max_ss(a, b) : _mm_add_ss(a, b);
    return _mm_cvtss_f32(a);
  }
  static float reduce_max(Vec v) { return reduce(v, true); }
  static float reduce_add(Vec v) { return reduce(v, false); }
  static Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
  static Vec abs(Vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  static Vec select_nonneg(Vec z, Vec a, Vec b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ));
  }
};
#include "exp_rows.inc"
#include "geglu_rows.inc"
}  // namespace avx2
#pragma GCC pop_options

namespace portable {
struct Simd {  // one float a "vector": any x86-64 CPU, and the reference for the others in tests
  using In = float;
  using Reg = float;
  using Operand = float;
  static constexpr int kWidth = 1, kPack = 1, kRows = 6, kVectors = 4;
  static Reg zero() { return 0.0f; }
  static Reg load(const float* p) { return *p; }
  static void store(float* p, Reg x) { *p = x; }
  static Operand load_b(const float* p) { return *p; }
  static Operand set1_a(const float* p) { return *p; }
  static Reg fmadd(Operand a, Operand b, Reg c) { return a * b + c; }
};
#include "attention_tiles.inc"
}  // namespace portable

// Both products on AVX512-BF16's dot products (vdpbf16ps: 32 bf16 products a vector summed
// pairwise into 16 float lanes, twice the float FMA's work an instruction), for bf16 models.
// Operands are bf16 bit patterns; b's rows hold each lane's pair of consecutive k.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16")
namespace avx512_bf16 {
struct Simd {
  using In = uint16_t;
  using Reg = __m512;
  using Operand = __m512bh;
  static constexpr int kWidth = 16, kPack = 2, kRows = 6, kVectors = 4;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static Operand load_b(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Operand set1_a(const uint16_t* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  static Reg fmadd(Operand a, Operand b, Reg c) { return _mm512_dpbf16_ps(c, a, b); }
};
#include "attention_tiles.inc"

// x [n] bf16 -> bf16(x s) [n], the product in float32 rounded to nearest even
// (vcvtneps2bf16): a bf16 model's q row, scaled.
void scale_to_bf16(const uint16_t* x, float s, uint16_t* y, int64_t n) {
  const __m512 scale = _mm512_set1_ps(s);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(avx512::from_bf16(x + i), scale)));
  if (i < n) {
    uint16_t last[16];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(last),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(avx512::load_bf16_tail(x + i, n - i), scale)));
    std::memcpy(y + i, last, static_cast<size_t>(n - i) * sizeof(uint16_t));
  }
}
// The exponentials of a row for the bf16 product: p[0:L] = bf16(exp(x - max x)), p[L:Lp] = 0,
// *sum = the sum of the float exponentials. They are rounded to bf16 (8 bits) at once, so
// exp needs 2.8e-6, not 1e-7: 2^t for t = (x - max) log2 e, 2^t = 2^k 2^f, k = round(t),
// 2^f = 1 + f (c1 + ...) of degree 4, fitted for relative error on |f| <= 1/2 (Lawson's
// algorithm) with 2^0 = 1 kept exact: a row's largest term is exactly 1, as in bf16, so that
// a single key's output is exactly its v. Ten operations a vector where Cephes takes fifteen.
constexpr float kE1 = 6.931241751e-01f, kE2 = 2.402409911e-01f, kE3 = 5.590642616e-02f, kE4 = 9.582852945e-03f;
inline __m512 exp2_vec(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-127.0f));  // 2^-127 is 0 in bf16; and no inf - inf
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(kE4), f, _mm512_set1_ps(kE3));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kE2));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kE1));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, k);
}
void exp_row_bf16(const float* x, int64_t L, float* sum, uint16_t* p, int64_t Lp) {
  const int64_t full = L / 16 * 16;
  const int rest = static_cast<int>(L - full);
  const __mmask16 tail = static_cast<__mmask16>((1u << rest) - 1);
  const __m512 log2e = _mm512_set1_ps(kLog2e), row_max = _mm512_set1_ps(avx512::max_of_row(x, L));
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < full; j += 16) {
    const __m512 e = exp2_vec(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), row_max), log2e));
    s = _mm512_add_ps(s, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  if (rest) {
    const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + full), row_max), log2e);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp2_vec(t));
    s = _mm512_add_ps(s, e);
    avx512::store_bf16_tail(p + full, rest, e);
  }
  std::fill(p + L, p + Lp, uint16_t{0});
  *sum = _mm512_reduce_add_ps(s);
}
}  // namespace avx512_bf16
#pragma GCC pop_options

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Scores of one block of query rows: 96 Ki floats (384 KiB), in the L2 cache of every x86
// core since Zen 2 and Skylake-SP (512 KiB - 2 MiB) beside the packed k^T and v slices.
constexpr int64_t kBlockScores = 96 * 1024;
// At most this many query rows a block (the rows of a short key sequence, cross-attention's
// 77, would otherwise make one block of the whole image and leave the threads nothing to share).
constexpr int64_t kMaxBlockRows = 192;
// Keys per pass of p v: this many rows of v's current vectors (24 KiB at 3 AVX-512 vectors)
// stay in the 32-48 KiB L1 cache while every row group of the block runs over them.
constexpr int64_t kKeyBlock = 128;

}  // namespace

bool supported(Isa isa) {
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  static const bool avx512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  switch (isa) {
    case Isa::kPortable: return true;
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512: return avx512;
    case Isa::kBest: return true;
  }
  return false;
}

Isa best_isa() {
  static const Isa isa = [] {
    // FAIRDIFF_CPU_ISA=avx2|portable runs the narrower kernels on a wider CPU (tests, and to
    // measure what an AVX2-only machine would get from them); never a wider one than the CPU has.
    const char* env = std::getenv("FAIRDIFF_CPU_ISA");
    const std::string want = env ? env : "";
    if (want == "portable") return Isa::kPortable;
    if (want != "avx2" && supported(Isa::kAvx512)) return Isa::kAvx512;
    return supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kPortable;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kBest: return isa_name(best_isa());
  }
  return "?";
}

void exp_rows(at::Tensor& scores, at::Tensor& sums, Isa isa) {
  // scores [n,L] float32 contiguous; sums [n] float32
  TORCH_CHECK(scores.is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2 && scores.is_contiguous(),
              "exp_rows: expected a contiguous [n, L] float32 CPU tensor, got ", scores.sizes());
  TORCH_CHECK(sums.is_contiguous() && sums.scalar_type() == at::kFloat && sums.numel() == scores.size(0),
              "exp_rows: sums must be a float32 tensor of ", scores.size(0));
  const int64_t n = scores.size(0), L = scores.size(1);
  float* s = scores.data_ptr<float>();
  float* out = sums.data_ptr<float>();
  if (isa == Isa::kBest) isa = best_isa();
  TORCH_CHECK(supported(isa), "exp_rows: this CPU cannot run the ", isa_name(isa), " kernel");
  const auto row = isa == Isa::kAvx512 ? avx512::exp_row : isa == Isa::kAvx2 ? avx2::exp_row : exp_row_portable;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(s + r * L, L, out + r);
  });
}

bool geglu_rows(at::Tensor& h, Isa isa) {
  // h [n, 2F] contiguous: value | gate, in place; float32 on avx2 or avx512, bf16 on avx512.
  if (!h.is_cpu() || h.dim() != 2 || !h.is_contiguous() || h.size(1) % 2 != 0) return false;
  if (isa == Isa::kBest) isa = best_isa();
  TORCH_CHECK(supported(isa), "geglu_rows: this CPU cannot run the ", isa_name(isa), " kernel");
  const bool fp32 = h.scalar_type() == at::kFloat, bf16 = h.scalar_type() == at::kBFloat16;
  if (!(fp32 && (isa == Isa::kAvx512 || isa == Isa::kAvx2)) && !(bf16 && isa == Isa::kAvx512)) return false;
  const int64_t n = h.size(0), F = h.size(1) / 2;
  // A row is thousands of values: a few rows a task keeps the threads' shares even.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1));
  if (bf16) {
    auto* p = reinterpret_cast<uint16_t*>(h.data_ptr<at::BFloat16>());
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) avx512::geglu_row_bf16(p + r * 2 * F, p + r * 2 * F + F, F);
    });
    return true;
  }
  float* p = h.data_ptr<float>();
  const auto row = isa == Isa::kAvx512 ? avx512::geglu_row : avx2::geglu_row;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(p + r * 2 * F, p + r * 2 * F + F, F);
  });
  return true;
}

namespace {

// A bf16 norm's operands: x and its output as bf16 bits, the weights as float32 (a bf16
// model's are bf16), one value a channel.
struct Bf16Norm {
  Bf16Norm(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, int64_t channels)
      : gamma(float_values(weight, channels)), beta(float_values(bias, channels)), out(at::empty_like(x_in)),
        x(reinterpret_cast<const uint16_t*>(x_in.data_ptr<at::BFloat16>())),
        y(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>())),
        g(gamma.data_ptr<float>()),
        b(beta.data_ptr<float>()) {}
  static at::Tensor float_values(const at::Tensor& t, int64_t n) {
    TORCH_CHECK(t.numel() == n, "norm: ", t.numel(), " weights for ", n, " channels");
    return t.to(at::kFloat).contiguous();
  }
  at::Tensor gamma, beta, out;
  const uint16_t* x;
  uint16_t* y;
  const float* g;
  const float* b;
};

// Whether the bf16 norms run: a contiguous bf16 CPU tensor and the avx512 kernels.
bool bf16_norm_applies(const at::Tensor& x, Isa& isa) {
  if (isa == Isa::kBest) isa = best_isa();
  TORCH_CHECK(supported(isa), "norm: this CPU cannot run the ", isa_name(isa), " kernel");
  return x.is_cpu() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && isa == Isa::kAvx512 && x.numel() > 0;
}

}  // namespace

at::Tensor group_norm_bf16(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, bool silu, Isa isa) {
  if (!bf16_norm_applies(x, isa) || x.dim() < 2 || groups <= 0 || x.size(1) % groups != 0) return {};
  const int64_t B = x.size(0), C = x.size(1), HW = x.numel() / (B * C), Cg = C / groups;
  const Bf16Norm n(x, weight, bias, C);
  const auto scale_shift = silu ? avx512::scale_shift_bf16<true> : avx512::scale_shift_bf16<false>;
  // One (image, group) a task: its Cg x HW values are contiguous, and stay in cache from the
  // statistics to the output.
  at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t first = item * Cg * HW, c0 = (item % groups) * Cg;
      float mean, rstd;
      avx512::moments_bf16(n.x + first, Cg * HW, static_cast<float>(eps), &mean, &rstd);
      for (int64_t c = 0; c < Cg; ++c) {
        // As LibTorch's float kernel: y = x scale + (beta - scale mean), scale = rstd gamma.
        const float scale = rstd * n.g[c0 + c], shift = n.b[c0 + c] - scale * mean;
        scale_shift(n.x + first + c * HW, HW, scale, shift, n.y + first + c * HW);
      }
    }
  });
  return n.out;
}

at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                           Isa isa) {
  if (!bf16_norm_applies(x, isa)) return {};
  const int64_t D = x.size(-1), rows = x.numel() / D;
  const Bf16Norm n(x, weight, bias, D);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float mean, rstd;
      avx512::moments_bf16(n.x + r * D, D, static_cast<float>(eps), &mean, &rstd);
      avx512::layer_norm_row_bf16(n.x + r * D, D, mean, rstd, n.g, n.b, n.y + r * D);
    }
  });
  return n.out;
}

bool AttentionHead::bf16_products_supported() {
  static const bool bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return bf16 && best_isa() == Isa::kAvx512;
}

AttentionHead::AttentionHead(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t L, int64_t d, Isa isa)
    : L_(L), d_(d), bf16_(false) {
  TORCH_CHECK(L > 0 && d > 0, "AttentionHead: empty keys or head width (L = ", L, ", d = ", d, ")");
  if (isa == Isa::kBest) isa = best_isa();
  TORCH_CHECK(supported(isa), "AttentionHead: this CPU cannot run the ", isa_name(isa), " kernel");
  switch (isa) {
    case Isa::kAvx512:
      width_ = avx512::Simd::kWidth, tile_rows_ = avx512::Simd::kRows, tile_vectors_ = avx512::Simd::kVectors;
      gemm_ = avx512::gemm_tile<>, exp_row_ = avx512::exp_row;
      break;
    case Isa::kAvx2:
      width_ = avx2::Simd::kWidth, tile_rows_ = avx2::Simd::kRows, tile_vectors_ = avx2::Simd::kVectors;
      gemm_ = avx2::gemm_tile<>, exp_row_ = avx2::exp_row;
      break;
    default:
      width_ = portable::Simd::kWidth, tile_rows_ = portable::Simd::kRows, tile_vectors_ = portable::Simd::kVectors;
      gemm_ = portable::gemm_tile<>, exp_row_ = exp_row_portable;
  }
  key_tile_ = tile_vectors_ * width_;
  Lp_ = round_up(L, width_);
  dp_ = round_up(d, width_);
  // k^T in tiles: the tile of keys [t, t + w) is d rows of w floats at kt_[t d], so the
  // product reads one contiguous 5-40 KiB tile for every row group. w is key_tile_, or for
  // the last tile the whole vectors left (cross-attention's 77 keys: 64 + 16, not 2 x 64).
  kt_.assign(static_cast<size_t>(Lp_ * d_), 0.0f);
  for (int64_t t = 0; t < L; t += key_tile_) {
    const int64_t w = key_tile_width(t);
    for (int64_t j = t; j < std::min(L, t + w); ++j)
      for (int64_t c = 0; c < d; ++c) kt_[t * d + c * w + (j - t)] = k[j * ldk + c];
  }
  vp_.assign(static_cast<size_t>(Lp_ * dp_), 0.0f);
  for (int64_t j = 0; j < L; ++j) std::copy(v + j * ldv, v + j * ldv + d, vp_.data() + j * dp_);
}

AttentionHead::AttentionHead(const uint16_t* k, int64_t ldk, const uint16_t* v, int64_t ldv, int64_t L, int64_t d)
    : L_(L), d_(d), bf16_(true) {
  TORCH_CHECK(L > 0 && d > 0, "AttentionHead: empty keys or head width (L = ", L, ", d = ", d, ")");
  TORCH_CHECK(bf16_products_supported(), "AttentionHead: bf16 inputs need AVX512-BF16 and the avx512 kernels");
  width_ = avx512_bf16::Simd::kWidth, tile_rows_ = avx512_bf16::Simd::kRows;
  tile_vectors_ = avx512_bf16::Simd::kVectors;
  gemm16_ = avx512_bf16::gemm_tile<>;
  key_tile_ = tile_vectors_ * width_;
  Lp_ = round_up(L_, width_);  // even: p v takes the keys in pairs
  dp_ = round_up(d_, width_);
  d2_ = round_up(d_, 2);  // q k^T takes the head width in pairs
  // k^T in tiles as for float, each tile d2/2 rows of w pairs: lane j of row c/2 holds
  // (k[j][c], k[j][c + 1]).
  kt16_.assign(static_cast<size_t>(Lp_ * d2_), 0);
  for (int64_t t = 0; t < L_; t += key_tile_) {
    const int64_t w = key_tile_width(t);
    for (int64_t j = t; j < std::min(L_, t + w); ++j)
      for (int64_t c = 0; c < d_; ++c)
        kt16_[t * d2_ + (c / 2) * 2 * w + (j - t) * 2 + c % 2] = k[j * ldk + c];
  }
  // v in pairs of keys: row j/2 holds, for every column c, (v[j][c], v[j + 1][c]).
  vp16_.assign(static_cast<size_t>(Lp_ * dp_), 0);
  for (int64_t j = 0; j < L_; ++j)
    for (int64_t c = 0; c < d_; ++c) vp16_[(j / 2) * 2 * dp_ + c * 2 + j % 2] = v[j * ldv + c];
}

int64_t AttentionHead::key_tile_width(int64_t t) const { return std::min(key_tile_, Lp_ - t); }

int64_t AttentionHead::block_rows() const {
  return std::min(kMaxBlockRows, std::max(tile_rows_, kBlockScores / Lp_ / tile_rows_ * tile_rows_));
}

void AttentionHead::rows(const float* q, int64_t ldq, int64_t n, float* out, int64_t ldo) const {
  // q [n,d] (row stride ldq, scaled) -> out [n,d] (row stride ldo)
  TORCH_CHECK(!bf16_, "AttentionHead: float rows need a head made from float k and v");
  rows_as<float>(q, ldq, 1.0f, n, out, ldo);
}

void AttentionHead::rows(const uint16_t* q, int64_t ldq, float scale, int64_t n, uint16_t* out, int64_t ldo) const {
  // q [n,d] bf16 (row stride ldq) -> out [n,d] bf16 (row stride ldo)
  TORCH_CHECK(bf16_, "AttentionHead: bf16 rows need a head made from bf16 k and v");
  rows_as<uint16_t>(q, ldq, scale, n, out, ldo);
}

// q, out and the products' operands are In: float (q already scaled), or bf16 bit patterns
// taken in pairs (P = 2 values a 32-bit lane), in which case q is scaled here and rounded, the
// exponentials are rounded to bf16 and out is rounded at the end; the scores, the
// exponentials' sums, the products' sums and the division are float32 either way.
template <typename In>
void AttentionHead::rows_as(const In* q, int64_t ldq, float scale, int64_t n, In* out, int64_t ldo) const {
  constexpr int64_t P = sizeof(float) / sizeof(In);
  const auto gemm = [this] {
    if constexpr (P == 1) return gemm_; else return gemm16_;
  }();
  const In* kt = [this] {
    if constexpr (P == 1) return kt_.data(); else return kt16_.data();
  }();
  const In* vp = [this] {
    if constexpr (P == 1) return vp_.data(); else return vp16_.data();
  }();
  const int64_t dq = P == 1 ? d_ : d2_;  // a q row as the product reads it
  const int64_t block = block_rows();
  std::vector<float> scores(static_cast<size_t>(block * Lp_));  // [block,Lp]
  std::vector<float> prod(static_cast<size_t>(block * dp_));    // [block,dp]
  std::vector<float> sums(static_cast<size_t>(block));
  // bf16 only: q's rows and the exponentials as the dot products read them.
  std::vector<In> q_in(P == 1 ? 0 : static_cast<size_t>(block * dq), 0);  // [block,d2]
  std::vector<In> p_in(P == 1 ? 0 : static_cast<size_t>(block * Lp_));    // [block,Lp]
  // v's vectors in chunks of at most tile_vectors_, as even as they go (5 -> 3 + 2).
  const int64_t vectors = dp_ / width_, chunks = (vectors + tile_vectors_ - 1) / tile_vectors_;
  for (int64_t i = 0; i < n; i += block) {
    const int64_t m = std::min(block, n - i);
    const In* qa;
    int64_t lda;
    if constexpr (P == 1) {
      qa = q + i * ldq, lda = ldq;
    } else {
      for (int64_t r = 0; r < m; ++r) avx512_bf16::scale_to_bf16(q + (i + r) * ldq, scale, q_in.data() + r * dq, d_);
      qa = q_in.data(), lda = dq;
    }
    // s = q k^T, one tile of keys at a time: its k^T stays in L1 for every group of rows.
    for (int64_t t = 0; t < Lp_; t += key_tile_) {
      const int64_t w = key_tile_width(t);
      for (int64_t g = 0; g < m; g += tile_rows_)
        gemm(static_cast<int>(std::min(tile_rows_, m - g)), static_cast<int>(w / width_), qa + g * lda, lda,
             kt + t * dq, w * P, dq / P, scores.data() + g * Lp_ + t, Lp_, false);
    }
    // p = exp(s - max) and its row sums; the padding keys get 0, so they add nothing to p v.
    // bf16: straight to the bf16 operand, by exponentials as precise as that rounding needs.
    for (int64_t r = 0; r < m; ++r) {
      float* s = scores.data() + r * Lp_;
      if constexpr (P == 1) {
        exp_row_(s, L_, &sums[r]);
        std::fill(s + L_, s + Lp_, 0.0f);
      } else {
        avx512_bf16::exp_row_bf16(s, L_, &sums[r], p_in.data() + r * Lp_, Lp_);
      }
    }
    const In* pa = [&] {
      if constexpr (P == 1) return scores.data(); else return p_in.data();
    }();
    // p v, a chunk of v's vectors and a block of keys at a time (the partial sums go through
    // `prod`, so the key blocks do not change the numbers).
    for (int64_t c = 0, first = 0; c < chunks; ++c) {
      const int64_t nv = vectors / chunks + (c < vectors % chunks ? 1 : 0);
      for (int64_t kb = 0; kb < Lp_; kb += kKeyBlock)
        for (int64_t g = 0; g < m; g += tile_rows_)
          gemm(static_cast<int>(std::min(tile_rows_, m - g)), static_cast<int>(nv), pa + g * Lp_ + kb, Lp_,
               vp + kb * dp_ + first * width_ * P, dp_ * P, std::min(kKeyBlock, Lp_ - kb) / P,
               prod.data() + g * dp_ + first * width_, dp_, kb > 0);
      first += nv;
    }
    // The softmax's division, on the n x d product instead of the n x L probabilities.
    for (int64_t r = 0; r < m; ++r) {
      if constexpr (P == 1) {
        for (int64_t c = 0; c < d_; ++c) out[(i + r) * ldo + c] = prod[r * dp_ + c] / sums[r];
      } else {
        avx512::divide_to_bf16(prod.data() + r * dp_, sums[r], d_, out + (i + r) * ldo);
      }
    }
  }
}


}  // namespace fairdiff::cpu
