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

}  // namespace fairdiff::cpu
