// Hand-written CPU kernels for what LibTorch 1.13 does slowly on the hot path.
//
//   at::Tensor scores = at::mm(q_block, k_t);            // [n, L] float, contiguous
//   at::Tensor sums = at::empty({n});
//   fairdiff::cpu::exp_rows(scores, sums);              // scores <- exp(scores - row max)
//   at::Tensor out = at::mm(scores, v).div_(sums.unsqueeze(1));   // = softmax(scores) v
//
// Each has an AVX-512, an AVX2 + FMA and a portable version, chosen at run time by what the
// CPU has (never at build time: one binary for every x86-64 CPU); every version the CPU can
// run is tested against LibTorch (tests/test_networks.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fairdiff::cpu {

// Which version of a kernel runs. kBest: the widest this CPU has (best_isa()).
enum class Isa { kPortable, kAvx2, kAvx512, kBest };

// Whether this CPU can run `isa`'s versions (cpuid, checked once).
bool supported(Isa isa);
// The widest supported, unless FAIRDIFF_CPU_ISA (avx2, portable) asks for a narrower one.
Isa best_isa();
// "avx512", "avx2", "portable" (kBest: best_isa()'s name), for logs and reports.
const char* isa_name(Isa isa);

// In place on a contiguous [n, L] float32 CPU tensor: every row x becomes exp(x - max(x)),
// and sums[r] (a float32 tensor of n) its sum. The softmax without the division, which a
// caller applies to the much smaller product with v instead. One pass for the maxima and
// one for the exponentials, in cache: LibTorch's softmax makes four over memory. exp is
// Cephes' single-precision polynomial (relative error about 1e-7, as std::exp).
// `isa` picks a version (tests compare them all); an unsupported one is an error.
void exp_rows(at::Tensor& scores, at::Tensor& sums, Isa isa = Isa::kBest);

// GEGLU's gating, in place, in one pass: h [n, 2F] contiguous, value | gate per row, becomes
// value * gelu(gate) in its first F columns (the exact erf GELU, by Abramowitz and Stegun's
// erfc to 1.5e-7 absolute, where LibTorch 1.13 calls Sleef's AVX2 erf even on AVX-512 CPUs).
// float32 on avx2 and avx512; bf16 on avx512, rounded as LibTorch's gelu_ then mul_ round.
// Returns false, touching nothing, where no version applies (the caller keeps LibTorch's).
bool geglu_rows(at::Tensor& h, Isa isa = Isa::kBest);

// GroupNorm and LayerNorm of a contiguous bf16 tensor, in float32 arithmetic as LibTorch's
// float kernels (x [B, C, ...] in `groups` groups of channels; x [..., D] over its last
// dimension), written as bf16: each group or row is read twice from cache (the statistics,
// then the output) and written once, where converting to float32 and back moves six times
// the bytes (LibTorch 1.13's own bf16 norms are slower still). The variance is the mean
// square about the mean. weight and bias: float32 or bf16, one value a channel. Returns an
// undefined tensor where no version applies (another dtype or layout, or no AVX-512).
// With silu, the group norm's output goes through SiLU in the same pass: the norm rounded to
// bf16, SiLU in float32, rounded once (as silu_in_float, layers.h, and PyTorch 2.x compute
// it): the ResNet blocks' pattern, whose separate SiLU was LibTorch 1.13's bf16 kernel, 3.3x
// slower than its float one and rounded after each operation.
at::Tensor group_norm_bf16(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, bool silu = false, Isa isa = Isa::kBest);
at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                           Isa isa = Isa::kBest);

// One head's attention, fused, in float32: out = softmax(q k^T) v for q already scaled.
//
//   cpu::AttentionHead head(k, ldk, v, ldv, L, d);   // k, v [L, d], row strides ldk, ldv
//   head.rows(q, ldq, n, out, ldo);                  // q [n, d] -> out [n, d]
//
// k^T is packed once in tiles of keys and v padded to whole vectors; then each block of
// block_rows() query rows gets its scores (block x L, kept in the L2 cache, never N x L),
// the one-pass exponentials of exp_rows, their product with v and the softmax's division,
// both products in registers by the tiles of attention_tiles.inc instead of BLAS calls on
// matrices 40 wide. A row's numbers depend only on that row: any split of the rows (into
// blocks, over threads) gives the same bits. `rows` is const, so threads may share a head.
//
// A bf16 model's head (a CPU with AVX512-BF16: bf16_products_supported()) takes its bf16
// tensors as they are, bit patterns with no float32 copies: the second constructor packs k
// and v, and the second `rows` scales q in float32, rounds it to bf16 and writes out rounded
// to bf16 as `.to(kBFloat16)` rounds. Both products run on the bf16 dot-product instructions
// at twice the float FMA's rate; the exponentials are rounded to bf16 too (as the reference
// rounds the probabilities), every sum and the division are float32. Since they are rounded
// at once, their exponentials are computed to 2.8e-6 (ten operations a vector instead of
// fifteen), straight into the bf16 operand.
class AttentionHead {
 public:
  AttentionHead(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t L, int64_t d,
                Isa isa = Isa::kBest);
  // bf16 k and v (bf16_products_supported() must hold).
  AttentionHead(const uint16_t* k, int64_t ldk, const uint16_t* v, int64_t ldv, int64_t L, int64_t d);
  static bool bf16_products_supported();
  // A float head's rows: q already scaled.
  void rows(const float* q, int64_t ldq, int64_t n, float* out, int64_t ldo) const;
  // A bf16 head's rows: q [n, d] bf16, not yet scaled -> out [n, d] bf16.
  void rows(const uint16_t* q, int64_t ldq, float scale, int64_t n, uint16_t* out, int64_t ldo) const;
  // Query rows per block: the grain in which to split rows over threads.
  int64_t block_rows() const;

  using GemmTile = void (*)(int mr, int nv, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                            float* c, int64_t ldc, bool accumulate);
  using ExpRow = void (*)(float* x, int64_t L, float* sum);
  using GemmTileBf16 = void (*)(int mr, int nv, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                                int64_t K, float* c, int64_t ldc, bool accumulate);

 private:
  int64_t L_, d_;
  int64_t width_, tile_rows_, tile_vectors_;  // the tile's vector width (floats), rows, vectors
  int64_t key_tile_;                           // keys per tile of k^T: tile_vectors_ x width_
  int64_t Lp_, dp_;                            // L and d padded to whole vectors
  int64_t key_tile_width(int64_t first_key) const;
  GemmTile gemm_ = nullptr;
  ExpRow exp_row_ = nullptr;  // float products (the bf16 ones have their own, exp_row_bf16)
  std::vector<float> kt_;  // tiles [d][key_tile] (the last one narrower), zeros past L
  std::vector<float> vp_;  // [Lp][dp], zeros past L and d
  // bf16 heads: q k^T takes the head width in pairs (d2: d rounded up to even), p v the keys.
  bool bf16_;
  int64_t d2_ = 0;
  GemmTileBf16 gemm16_ = nullptr;
  std::vector<uint16_t> kt16_;  // tiles [d2/2][key_tile][2]
  std::vector<uint16_t> vp16_;  // [Lp/2][dp][2]
  template <typename In>
  void rows_as(const In* q, int64_t ldq, float scale, int64_t n, In* out, int64_t ldo) const;
};

}  // namespace fairdiff::cpu
