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
class AttentionHead {
 public:
  AttentionHead(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t L, int64_t d,
                Isa isa = Isa::kBest);
  void rows(const float* q, int64_t ldq, int64_t n, float* out, int64_t ldo) const;
  // Query rows per block: the grain in which to split rows over threads.
  int64_t block_rows() const;

  using GemmTile = void (*)(int mr, int nv, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                            float* c, int64_t ldc, bool accumulate);
  using ExpRow = void (*)(float* x, int64_t L, float* sum);

 private:
  int64_t L_, d_;
  int64_t width_, tile_rows_, tile_vectors_;  // the tile's vector width (floats), rows, vectors
  int64_t key_tile_;                           // keys per tile of k^T: tile_vectors_ x width_
  int64_t Lp_, dp_;                            // L and d padded to whole vectors
  int64_t key_tile_width(int64_t first_key) const;
  GemmTile gemm_;
  ExpRow exp_row_;
  std::vector<float> kt_;  // tiles [d][key_tile] (the last one narrower), zeros past L
  std::vector<float> vp_;  // [Lp][dp], zeros past L and d
};

}  // namespace fairdiff::cpu
