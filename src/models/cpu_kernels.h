// Hand-written CPU kernels for what LibTorch 1.13 does slowly on the hot path.
//
//   at::Tensor scores = at::mm(q_block, k_t);            // [n, L] float, contiguous
//   at::Tensor sums = at::empty({n});
//   fairdiff::cpu::exp_rows(scores, sums);              // scores <- exp(scores - row max)
//   at::Tensor out = at::mm(scores, v).div_(sums.unsqueeze(1));   // = softmax(scores) v
//
// Each has an AVX-512 version chosen at run time and a portable one; both are tested
// against LibTorch (tests/test_networks.cpp).
#pragma once

#include <ATen/ATen.h>

namespace fairdiff::cpu {

// In place on a contiguous [n, L] float32 CPU tensor: every row x becomes exp(x - max(x)),
// and sums[r] (a float32 tensor of n) its sum. The softmax without the division, which a
// caller applies to the much smaller product with v instead. One pass for the maxima and
// one for the exponentials, in cache: LibTorch's softmax makes four over memory. exp is
// Cephes' single-precision polynomial (relative error about 1e-7, as std::exp).
// `vectorized` false runs the portable version (tests compare both).
void exp_rows(at::Tensor& scores, at::Tensor& sums, bool vectorized = true);

// Whether the AVX-512 versions run on this CPU (for reports).
bool has_avx512();

}  // namespace fairdiff::cpu
