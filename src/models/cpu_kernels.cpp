#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
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

__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kMinArg));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kC1), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kC2), r);
  __m512 y = _mm512_set1_ps(kP0);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP1));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP2));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP3));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP4));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP5));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, k);  // y 2^k
}

__attribute__((target("avx512f"))) void exp_row_avx512(float* x, int64_t L, float* sum) {
  const int64_t full = L / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (L - full)) - 1);
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < full; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + j));
  if (tail) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, x + full));
  const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < full; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), row_max));
    _mm512_storeu_ps(x + j, e);
    s = _mm512_add_ps(s, e);
  }
  if (tail) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + full), row_max));
    _mm512_mask_storeu_ps(x + full, tail, e);
    s = _mm512_mask_add_ps(s, tail, s, e);
  }
  *sum = _mm512_reduce_add_ps(s);
}

void exp_row_portable(float* x, int64_t L, float* sum) {
  const float row_max = *std::max_element(x, x + L);
  double s = 0;  // one float accumulator over 4096 terms drifts by ~2e-6 (the vector one sums 16 lanes)
  for (int64_t j = 0; j < L; ++j) {
    x[j] = std::exp(x[j] - row_max);
    s += x[j];
  }
  *sum = static_cast<float>(s);
}

}  // namespace

bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

void exp_rows(at::Tensor& scores, at::Tensor& sums, bool vectorized) {
  // scores [n,L] float32 contiguous; sums [n] float32
  TORCH_CHECK(scores.is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2 && scores.is_contiguous(),
              "exp_rows: expected a contiguous [n, L] float32 CPU tensor, got ", scores.sizes());
  TORCH_CHECK(sums.is_contiguous() && sums.scalar_type() == at::kFloat && sums.numel() == scores.size(0),
              "exp_rows: sums must be a float32 tensor of ", scores.size(0));
  const int64_t n = scores.size(0), L = scores.size(1);
  float* s = scores.data_ptr<float>();
  float* out = sums.data_ptr<float>();
  const auto row = vectorized && has_avx512() ? exp_row_avx512 : exp_row_portable;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(s + r * L, L, out + r);
  });
}

}  // namespace fairdiff::cpu
