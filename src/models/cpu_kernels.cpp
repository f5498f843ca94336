#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
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

// The same on AVX2 + FMA (every x86-64 CPU since Haswell and Zen): 8 lanes, 2^k built in
// the exponent bits (k >= -126 after the clamp, so 2^k is a normal float), and the tail
// read with a mask, its missing lanes -inf for the maximum and 0 for the sum.
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kMinArg));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kC1), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kC2), r);
  __m256 y = _mm256_set1_ps(kP0);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));  // y 2^k
}

__attribute__((target("avx2,fma"))) inline float reduce256(__m256 v, bool max) {
  __m128 a = _mm256_castps256_ps128(v), b = _mm256_extractf128_ps(v, 1);
  a = max ? _mm_max_ps(a, b) : _mm_add_ps(a, b);
  b = _mm_movehl_ps(a, a);
  a = max ? _mm_max_ps(a, b) : _mm_add_ps(a, b);
  b = _mm_shuffle_ps(a, a, 1);
  a = max ? _mm_max_ss(a, b) : _mm_add_ss(a, b);
  return _mm_cvtss_f32(a);
}

__attribute__((target("avx2,fma"))) void exp_row_avx2(float* x, int64_t L, float* sum) {
  const int64_t full = L / 8 * 8;
  const int rest = static_cast<int>(L - full);
  // Lanes 0..rest-1 of the tail: all bits set where a lane is in the row.
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m = minus_inf;
  for (int64_t j = 0; j < full; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  if (rest) m = _mm256_max_ps(m, _mm256_blendv_ps(minus_inf, _mm256_maskload_ps(x + full, tail), _mm256_castsi256_ps(tail)));
  const __m256 row_max = _mm256_set1_ps(reduce256(m, true));
  // Two accumulators, alternating: 16 partial sums as the AVX-512 version has (each sums
  // L / 16 terms, so the float rounding of a 4096-long row stays near 1e-7 relative).
  __m256 s[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t j = 0; j < full; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), row_max));
    _mm256_storeu_ps(x + j, e);
    s[(j / 8) & 1] = _mm256_add_ps(s[(j / 8) & 1], e);
  }
  if (rest) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(x + full, tail), row_max));
    _mm256_maskstore_ps(x + full, tail, e);
    s[0] = _mm256_add_ps(s[0], _mm256_and_ps(e, _mm256_castsi256_ps(tail)));
  }
  *sum = reduce256(_mm256_add_ps(s[0], s[1]), false);
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
  const auto row = isa == Isa::kAvx512 ? exp_row_avx512 : isa == Isa::kAvx2 ? exp_row_avx2 : exp_row_portable;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(s + r * L, L, out + r);
  });
}

}  // namespace fairdiff::cpu
