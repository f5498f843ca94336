// UNet / VAE building blocks without weights: timestep embedding values, attention
// against a plain formula, config parsing and rejection, checkpoint names and shapes.
#include <c10/core/CPUAllocator.h>
#include <c10/core/InferenceMode.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <thread>

#include "arena.h"
#include "autoencoder_kl.h"
#include "cpu_kernels.h"
#include "layers.h"
#include "profile.h"
#include "runtime.h"
#include "string_util.h"
#include "test_util.h"
#include "unet_2d_condition.h"

namespace fairdiff {
namespace {

std::set<std::string> parameter_names(torch::nn::Module& module) {
  std::set<std::string> names;
  for (const auto& p : module.named_parameters()) names.insert(p.key());
  return names;
}

// Linear / conv weights are uninitialised until loaded: give every parameter small values.
void randomize(torch::nn::Module& module, uint64_t seed = 0) {
  at::NoGradGuard no_grad;
  at::manual_seed(seed);
  for (auto& p : module.parameters()) p.uniform_(-0.2, 0.2);
}

at::Tensor parameter_named(const torch::nn::Module& module, const std::string& name) {
  for (const auto& p : module.named_parameters())
    if (p.key() == name) return p.value();
  return {};
}

std::vector<int64_t> shape_of(torch::nn::Module& module, const std::string& name) {
  for (const auto& p : module.named_parameters())
    if (p.key() == name) return p.value().sizes().vec();
  return {};
}

// The tiny-sd1 UNet layout (fixtures/models/tiny-sd1/unet/config.json, trimmed).
nlohmann::json tiny_unet_json() {
  return nlohmann::json::parse(R"({
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 32, "sample_size": 8
  })");
}

nlohmann::json tiny_vae_json() {
  return nlohmann::json::parse(R"({
    "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "sample_size": 16
  })");
}

// ---------------------------------------------------------------------------
// Timestep embedding

TEST(TimestepEmbedding, MatchesTheFormula) {
  // dim 4: half 2, freqs exp(-ln(1e4) * i / 2) = [1, 0.01]
  const at::Tensor t = at::tensor({0.0, 1.0, 10.0, 999.0}, at::kDouble);
  const at::Tensor emb = get_timestep_embedding(t, 4, /*flip_sin_to_cos=*/false, /*shift=*/0);
  ASSERT_EQ(emb.sizes(), (at::IntArrayRef{4, 4}));
  EXPECT_EQ(emb.scalar_type(), at::kFloat);
  const double ts[] = {0, 1, 10, 999};
  for (int i = 0; i < 4; ++i) {
    const double expected[] = {std::sin(ts[i]), std::sin(0.01 * ts[i]), std::cos(ts[i]), std::cos(0.01 * ts[i])};
    for (int j = 0; j < 4; ++j) EXPECT_NEAR(emb[i][j].item<double>(), expected[j], 2e-4) << "t " << ts[i] << " j " << j;
  }
}

TEST(TimestepEmbedding, FlipShiftAndOddWidth) {
  const at::Tensor t = at::tensor({3}, at::kLong);
  const at::Tensor plain = get_timestep_embedding(t, 6, false, 1);
  const at::Tensor flipped = get_timestep_embedding(t, 6, true, 1);
  // flip_sin_to_cos swaps the halves: [cos, sin]
  EXPECT_TRUE(at::equal(flipped.slice(1, 0, 3), plain.slice(1, 3, 6)));
  EXPECT_TRUE(at::equal(flipped.slice(1, 3, 6), plain.slice(1, 0, 3)));
  // downscale_freq_shift 1: freqs exp(-ln(1e4) * i / (3 - 1)) = [1, 0.01, 1e-4]
  EXPECT_NEAR(plain[0][2].item<double>(), std::sin(3e-4), 1e-6);
  // odd width: one zero column at the end
  const at::Tensor odd = get_timestep_embedding(t, 5, true, 0);
  ASSERT_EQ(odd.size(1), 5);
  EXPECT_EQ(odd[0][4].item<float>(), 0.0f);
}

// ---------------------------------------------------------------------------
// Attention

at::Tensor naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads) {
  const int64_t B = q.size(0), N = q.size(1), L = k.size(1), d = q.size(2) / heads;
  auto split = [&](const at::Tensor& x, int64_t n) { return x.view({B, n, heads, d}).permute({0, 2, 1, 3}); };
  const at::Tensor w = at::softmax(at::matmul(split(q, N), split(k, L).transpose(-1, -2)) / std::sqrt(double(d)), -1);
  return at::matmul(w, split(v, L)).permute({0, 2, 1, 3}).reshape({B, N, heads * d});
}

TEST(Attention, MatchesPlainSoftmaxAndSlicesGiveTheSameNumbers) {
  at::manual_seed(0);
  const at::Tensor q = at::randn({2, 12, 16}), k = at::randn({2, 7, 16}), v = at::randn({2, 7, 16});
  const at::Tensor expected = naive_attention(q, k, v, 4);
  const double scale = 1.0 / std::sqrt(4.0);
  const at::Tensor whole = multi_head_attention(q, k, v, 4, scale, false, false);
  EXPECT_LT((whole - expected).abs().max().item<double>(), 1e-5);
  // one image and head at a time (max 12*7 score elements) ...
  const at::Tensor sliced = multi_head_attention(q, k, v, 4, scale, false, false, 12 * 7);
  EXPECT_TRUE(at::allclose(sliced, whole, 1e-6, 1e-6));
  // ... and in blocks of 3, 3, 3, 3 query rows, or 5, 5, 2
  EXPECT_TRUE(at::allclose(multi_head_attention(q, k, v, 4, scale, false, false, 3 * 7), whole, 1e-6, 1e-6));
  EXPECT_TRUE(at::allclose(multi_head_attention(q, k, v, 4, scale, false, false, 5 * 7 + 1), whole, 1e-6, 1e-6));
  // upcast flags change nothing in float32
  EXPECT_TRUE(at::allclose(multi_head_attention(q, k, v, 4, scale, true, true), whole, 1e-6, 1e-6));
}

TEST(Attention, UpcastInBfloat16StaysCloseToFloat) {
  at::manual_seed(1);
  const at::Tensor q = at::randn({1, 9, 8}) * 4, k = at::randn({1, 9, 8}) * 4, v = at::randn({1, 9, 8});
  const double scale = 1.0 / std::sqrt(4.0);
  const at::Tensor ref = multi_head_attention(q, k, v, 2, scale, false, false);
  const at::Tensor bf =
      multi_head_attention(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), 2, scale, true, true);
  EXPECT_EQ(bf.scalar_type(), at::kBFloat16);
  EXPECT_LT((bf.to(at::kFloat) - ref).abs().max().item<double>(), 0.1);
}

TEST(CpuKernels, ExpRowsDividedBySumsIsTheSoftmax) {
  at::manual_seed(7);
  for (int64_t L : {5, 16, 77, 1000, 4096, 1, 8, 15, 17}) {  // and the tails of 8 and 16 lanes
    const at::Tensor scores = at::randn({33, L}) * 6;  // scores of a sharp softmax
    const at::Tensor expected = scores.softmax(-1);
    at::Tensor scalar = scores.clone(), scalar_sums = at::empty({33});
    cpu::exp_rows(scalar, scalar_sums, cpu::Isa::kPortable);  // the reference: std::exp, double sums
    for (cpu::Isa isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kPortable}) {
      if (!cpu::supported(isa)) {
        std::printf("[ SKIPPED  ] the %s kernel: this CPU cannot run it\n", cpu::isa_name(isa));
        continue;
      }
      at::Tensor x = scores.clone(), sums = at::empty({33});
      cpu::exp_rows(x, sums, isa);
      const std::string what = "L = " + std::to_string(L) + " (" + cpu::isa_name(isa) + ")";
      EXPECT_LT((x / sums.unsqueeze(1) - expected).abs().max().item<double>(), 1e-6) << what;
      EXPECT_LT((x - scalar).abs().max().item<double>(), 1e-6) << what << " against the scalar exponentials";
      EXPECT_LT(((sums - scalar_sums) / scalar_sums).abs().max().item<double>(), 1e-6) << what << ": sums";
      EXPECT_TRUE(at::allclose(std::get<0>(x.max(-1)), at::ones({33}))) << "each row's largest entry is exp(0)";
    }
  }
}

// GEGLU's one-pass gating against value * gelu(gate) in double, for every version this CPU
// runs: the bound is 1.6e-7 on 1 + erf (the fits' 4.5e-9 and 2e-9, and the float evaluation:
// about an ulp of 1 + erf), times |x| / 2, plus a few roundings of the result; widths with the tails
// of 16 and 8 lanes; large, tiny and zero gates.
// In bf16 it rounds as LibTorch's gelu_ then mul_ on bf16 tensors: the same bits nearly
// everywhere, else a bf16 step where the two gelus straddle a rounding boundary.
TEST(CpuKernels, GegluRowsIsValueTimesExactGelu) {
  at::manual_seed(11);
  for (int64_t F : {1, 7, 8, 15, 16, 17, 40, 1280}) {
    at::Tensor h = at::randn({37, 2 * F}) * 3;
    if (F >= 16) h.index_put_({0, at::indexing::Slice(F, F + 6)}, at::tensor({-12.f, -9.f, 0.f, 1e-30f, 9.f, 40.f}));
    const at::Tensor x = h.narrow(1, F, F).to(at::kDouble), value = h.narrow(1, 0, F).to(at::kDouble);
    const at::Tensor gelu = 0.5 * x * at::erfc(-x / std::sqrt(2.0));  // no cancellation in the tail
    const at::Tensor expected = value * gelu;
    const at::Tensor bound = value.abs() * (0.5 * x.abs() * 1.6e-7 + 4 * gelu.abs() * std::ldexp(1.0, -24)) + 1e-37;
    for (cpu::Isa isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2}) {
      if (!cpu::supported(isa)) {
        std::printf("[ SKIPPED  ] the %s kernel: this CPU cannot run it\n", cpu::isa_name(isa));
        continue;
      }
      at::Tensor rows = h.clone();
      ASSERT_TRUE(cpu::geglu_rows(rows, isa));
      const std::string what = "F = " + std::to_string(F) + " (" + cpu::isa_name(isa) + ")";
      EXPECT_TRUE(((rows.narrow(1, 0, F).to(at::kDouble) - expected).abs() <= bound).all().item<bool>()) << what;
      EXPECT_TRUE(at::equal(rows.narrow(1, F, F), h.narrow(1, F, F))) << what << ": the gate half is left as it was";
    }
    if (cpu::supported(cpu::Isa::kAvx512)) {
      const at::Tensor hb = h.to(at::kBFloat16);
      at::Tensor rows = hb.clone();
      ASSERT_TRUE(cpu::geglu_rows(rows, cpu::Isa::kAvx512));
      // LibTorch's bf16 gelu_ and mul_ compute in float and round: the same, spelled in float
      // ops (its bf16 kernels go through oneDNN, which ONEDNN_MAX_CPU_ISA=AVX2 refuses).
      const at::Tensor gate = at::gelu(hb.narrow(1, F, F).to(at::kFloat)).to(at::kBFloat16).to(at::kFloat);
      const at::Tensor libtorch = (hb.narrow(1, 0, F).to(at::kFloat) * gate).to(at::kBFloat16).to(at::kFloat);
      const at::Tensor ours = rows.narrow(1, 0, F).to(at::kFloat);
      // LibTorch's float gelu forms 1 + erf(z), which cancels in the negative tail (about 6e-8
      // absolute: 0 below x = -5.9, where gelu(-7) is -9e-12; at x = -3.14 its gelu rounds to
      // the bf16 above the exact value's); ours keeps erfc(|z|) there. So against LibTorch in
      // the body only, and
      // everywhere against the exact gelu rounded as LibTorch rounds: gelu to bf16, the float
      // product to bf16. Where the exact gelu lies within the kernel's float error of a bf16
      // rounding boundary, either neighbour is right.
      const at::Tensor xb = hb.narrow(1, F, F).to(at::kFloat), vb = hb.narrow(1, 0, F).to(at::kFloat);
      const at::Tensor body = xb > -3;
      EXPECT_TRUE(((ours - libtorch).abs() <= libtorch.abs() * std::ldexp(1.0, -7)).masked_select(body).all()
                      .item<bool>())
          << "bf16, F = " << F;
      const at::Tensor xd = xb.to(at::kDouble);
      const at::Tensor exact = 0.5 * xd * at::erfc(-xd / std::sqrt(2.0));
      // the float evaluation: 1.6e-7 on 1 + erf, and in the tail the rounding of z^2 (up to
      // 72 there: 4e-6 relative through exp(-z^2))
      const at::Tensor slack = 0.5 * xd.abs() * 1.6e-7 + exact.abs() * 8e-6;
      auto rounded = [&](const at::Tensor& g) {
        return (vb * g.to(at::kFloat).to(at::kBFloat16).to(at::kFloat)).to(at::kBFloat16).to(at::kFloat);
      };
      EXPECT_TRUE(((ours == rounded(exact)) | (ours == rounded(exact - slack)) | (ours == rounded(exact + slack)))
                      .all()
                      .item<bool>())
          << "bf16 against the exact gelu, F = " << F;
      EXPECT_GT((ours == libtorch).masked_select(body).to(at::kFloat).mean().item<double>(), 0.99) << "bf16, F = " << F;
    }
  }
  at::Tensor odd = at::zeros({2, 3}), half = at::zeros({2, 4}, at::kHalf);
  EXPECT_FALSE(cpu::geglu_rows(odd)) << "an odd width is no value | gate pair";
  EXPECT_FALSE(cpu::geglu_rows(half)) << "float16 has no version";
}

// The fused head against softmax(q k^T) v in double, for every kernel this CPU can run: head
// widths and lengths with tails of every tile (6 rows; 16, 8 or 1 floats a vector; 64, 16
// or 4 keys a tile), read from and written to strided columns as multi_head_attention passes
// them. Any split of the rows gives the bits of one call (what the threads rely on).
TEST(CpuKernels, AttentionHeadIsTheSoftmaxProductForAnySplitOfRows) {
  struct Case {
    int64_t N, L, d;
  };
  for (const Case& c : {Case{37, 77, 40}, Case{13, 50, 8}, Case{70, 130, 64}, Case{9, 17, 80}, Case{5, 3, 160},
                        Case{25, 300, 5}, Case{200, 64, 48}, Case{300, 1, 40}}) {
    const int64_t ld = 3 * c.d;  // the head is the middle third of each row
    at::manual_seed(c.N * 1000 + c.L);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
    const at::Tensor q = (at::randn({c.N, ld}) * 3 * scale).contiguous();  // already scaled; sharp scores
    const at::Tensor k = at::randn({c.L, ld}), v = at::randn({c.L, ld});
    auto head_of = [&](const at::Tensor& x) { return x.narrow(1, c.d, c.d); };
    const at::Tensor expected =
        at::mm(at::mm(head_of(q).to(at::kDouble), head_of(k).to(at::kDouble).t()).softmax(-1),
               head_of(v).to(at::kDouble));  // [N,d]
    // The yardstick: how far LibTorch's own float32 softmax(q k^T) v is from the double one.
    const double libtorch_err =
        (at::mm(at::mm(head_of(q), head_of(k).t()).softmax(-1), head_of(v)).to(at::kDouble) - expected)
            .abs()
            .max()
            .item<double>();
    for (cpu::Isa isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kPortable}) {
      if (!cpu::supported(isa)) continue;  // CpuKernels.ExpRows... says which are skipped
      const std::string what = "N " + std::to_string(c.N) + ", L " + std::to_string(c.L) + ", d " +
                               std::to_string(c.d) + " (" + cpu::isa_name(isa) + ")";
      const cpu::AttentionHead head(k.data_ptr<float>() + c.d, ld, v.data_ptr<float>() + c.d, ld, c.L, c.d, isa);
      at::Tensor whole = at::full({c.N, ld}, std::nan(""));
      head.rows(q.data_ptr<float>() + c.d, ld, c.N, whole.data_ptr<float>() + c.d, ld);
      const double err = (head_of(whole).to(at::kDouble) - expected).abs().max().item<double>();
      std::printf("%s: max error %.2g, LibTorch float32 %.2g\n", what.c_str(), err, libtorch_err);
      EXPECT_LT(err, 2 * libtorch_err + 1e-6) << what << ": LibTorch's float32 is off by " << libtorch_err;
      EXPECT_TRUE(whole.narrow(1, 0, c.d).isnan().all().item<bool>()) << what << ": other heads' columns written";
      EXPECT_TRUE(whole.narrow(1, 2 * c.d, c.d).isnan().all().item<bool>()) << what << ": other heads' columns written";
      const int64_t first = c.N / 3;
      at::Tensor split = at::full({c.N, ld}, std::nan(""));
      head.rows(q.data_ptr<float>() + c.d, ld, first, split.data_ptr<float>() + c.d, ld);
      head.rows(q.data_ptr<float>() + first * ld + c.d, ld, c.N - first, split.data_ptr<float>() + first * ld + c.d,
                ld);
      EXPECT_TRUE(at::equal(head_of(split), head_of(whole))) << what << ": rows split at " << first;
    }
  }
}

// A bf16 head (AVX512-BF16 products) against softmax(q k^T) v in double, on a bf16 model's
// tensors, read in place with q unscaled, its output written as bf16. The yardstick is
// LibTorch in bf16 as the reference runs it (scores and probabilities rounded to bf16,
// products summed in float32, a bf16 output): the kernel rounds the scaled q and the
// exponentials to bf16 but keeps the scores, sums and division in float32.
TEST(CpuKernels, AttentionHeadBf16ProductsAreAsCloseAsLibTorchInBf16) {
  if (!cpu::AttentionHead::bf16_products_supported()) {
    std::printf("[ SKIPPED  ] bf16 products: this CPU has no AVX512-BF16 (or FAIRDIFF_CPU_ISA holds it back)\n");
    return;
  }
  struct Case {
    int64_t N, L, d;
  };
  for (const Case& c : {Case{37, 77, 40}, Case{13, 50, 7}, Case{70, 130, 64}, Case{9, 17, 80}, Case{5, 3, 160},
                        Case{200, 300, 40}, Case{300, 1, 40}}) {
    const int64_t ld = 3 * c.d;  // the head is the middle third of each row
    at::manual_seed(c.N * 1000 + c.L);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
    const at::Tensor q = (at::randn({c.N, ld}) * 3).to(at::kBFloat16), k = at::randn({c.L, ld}).to(at::kBFloat16);
    const at::Tensor v = at::randn({c.L, ld}).to(at::kBFloat16);
    auto head_of = [&](const at::Tensor& x) { return x.narrow(1, c.d, c.d); };
    const at::Tensor expected = at::mm(at::mm(head_of(q).to(at::kDouble) * scale, head_of(k).to(at::kDouble).t()).softmax(-1),
                                       head_of(v).to(at::kDouble));  // [N,d]
    const at::Tensor scores = at::mm(head_of(q), head_of(k).t()) * scale;
    const at::Tensor libtorch = at::mm(scores.softmax(-1).to(at::kBFloat16), head_of(v));
    const double libtorch_err = (libtorch.to(at::kDouble) - expected).abs().max().item<double>();
    const std::string what =
        "N " + std::to_string(c.N) + ", L " + std::to_string(c.L) + ", d " + std::to_string(c.d) + " (bf16 products)";
    auto bits = [](const at::Tensor& x) { return reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>()); };
    const cpu::AttentionHead head(bits(k) + c.d, ld, bits(v) + c.d, ld, c.L, c.d);
    const float scale_f = static_cast<float>(scale);
    at::Tensor whole = at::full({c.N, ld}, 7.0, at::kBFloat16);
    head.rows(bits(q) + c.d, ld, scale_f, c.N, bits(whole) + c.d, ld);
    const double err = (head_of(whole).to(at::kDouble) - expected).abs().max().item<double>();
    std::printf("%s: max error %.2g, LibTorch bf16 %.2g\n", what.c_str(), err, libtorch_err);
    EXPECT_LT(err, libtorch_err + 1e-6) << what << ": LibTorch in bf16 is off by " << libtorch_err;
    EXPECT_TRUE((whole.narrow(1, 0, c.d) == 7).all().item<bool>()) << what << ": other heads' columns written";
    EXPECT_TRUE((whole.narrow(1, 2 * c.d, c.d) == 7).all().item<bool>()) << what << ": other heads' columns written";
    const int64_t first = c.N / 3;
    at::Tensor split = at::full({c.N, ld}, 7.0, at::kBFloat16);
    head.rows(bits(q) + c.d, ld, scale_f, first, bits(split) + c.d, ld);
    head.rows(bits(q) + first * ld + c.d, ld, scale_f, c.N - first, bits(split) + first * ld + c.d, ld);
    EXPECT_TRUE(at::equal(head_of(split), head_of(whole))) << what << ": rows split at " << first;
  }
}

// The bf16 norms (AVX-512) against LibTorch's float32 norms rounded to bf16, which is what the
// bf16 model ran before: the same bits nearly everywhere, else one bf16 step where the two
// float results straddle a rounding boundary. Inputs whose mean is large next to their spread
// (the variance is taken about the mean); widths with tails of 16 lanes; the module layers
// give the same numbers on any CPU (through float32 where the kernel does not apply).
// GroupNorm's forward_silu against LibTorch's bf16 SiLU of that rounded norm, which is what
// the ResNet blocks ran before the fused kernel; weights scaled up so that the norm's output
// reaches past where exp(-y) overflows (y < -88: SiLU gives -0) and underflows.
TEST(CpuKernels, Bf16NormsAreFloatNormsRoundedToBf16) {
  at::manual_seed(17);
  const bool avx512 = cpu::supported(cpu::Isa::kAvx512) && cpu::best_isa() == cpu::Isa::kAvx512;
  auto bf16 = [](const at::Tensor& t) { return t.to(at::kBFloat16); };
  auto set_norm_weights = [](torch::nn::Module& norm, const at::Tensor& w, const at::Tensor& b) {
    norm.to(at::kBFloat16);  // as a bf16 model's
    torch::NoGradGuard no_grad;
    norm.named_parameters()["weight"].copy_(w);
    norm.named_parameters()["bias"].copy_(b);
  };
  auto check = [](const at::Tensor& ours, const at::Tensor& expected, const std::string& what) {
    ASSERT_TRUE(ours.defined()) << what;
    ASSERT_EQ(ours.scalar_type(), at::kBFloat16) << what;
    ASSERT_EQ(ours.sizes(), expected.sizes()) << what;
    const at::Tensor a = ours.to(at::kFloat), b = expected.to(at::kFloat);
    // one bf16 step of the expected value (8 significant bits), and the float noise near 0
    const at::Tensor step = b.abs() * (1.0 / 128) + 1e-6;
    EXPECT_TRUE(((a - b).abs() <= step).all().item<bool>()) << what << ": max difference "
                                                            << (a - b).abs().max().item<double>();
    EXPECT_GT((a == b).to(at::kFloat).mean().item<double>(), 0.99) << what << ": same bits";
  };
  struct GroupCase {
    std::vector<int64_t> shape;
    int64_t groups;
    double weight_scale = 1;
  };
  for (const GroupCase& c : {GroupCase{{2, 320, 8, 8}, 32}, GroupCase{{1, 64, 5, 3}, 8}, GroupCase{{2, 6, 1, 1}, 3},
                             GroupCase{{1, 128, 17}, 32}, GroupCase{{1, 32, 9, 9}, 8, 60}}) {
    const int64_t C = c.shape[1];
    const at::Tensor x = bf16(at::randn(c.shape) * 3 + 40), w = bf16(at::randn({C}) * c.weight_scale),
                     b = bf16(at::randn({C}));
    const at::Tensor expected = bf16(at::group_norm(x.to(at::kFloat), c.groups, w.to(at::kFloat), b.to(at::kFloat), 1e-5));
    const std::string what = "group_norm " + std::to_string(x.numel()) + " values, " + std::to_string(c.groups) + " groups";
    leaf::GroupNorm norm(c.groups, C, 1e-5);
    set_norm_weights(*norm, w, b);
    check(norm(x), expected, what + " (module)");
    const at::Tensor with_silu = bf16(at::silu(expected.to(at::kFloat))), x_before = x.clone();
    check(norm->forward_silu(x), with_silu, what + ", silu (module)");
    EXPECT_TRUE(at::equal(x, x_before)) << "forward_silu leaves its input alone";
    if (c.weight_scale > 1) EXPECT_LT(expected.min().item<double>(), -88) << "the case reaches exp's overflow";
    if (!avx512) continue;
    check(cpu::group_norm_bf16(x, c.groups, w, b, 1e-5), expected, what);
    check(cpu::group_norm_bf16(x, c.groups, w, b, 1e-5, /*silu=*/true), with_silu, what + ", silu");
    EXPECT_FALSE(cpu::group_norm_bf16(x.to(at::kFloat), c.groups, w, b, 1e-5).defined()) << "float32 is not its case";
    EXPECT_FALSE(cpu::group_norm_bf16(x.transpose(0, 1), c.groups, w, b, 1e-5).defined()) << "nor a strided view";
  }
  {  // float32 keeps LibTorch's norm and a separate SiLU: the same bits
    leaf::GroupNorm norm(8, 32, 1e-5);
    const at::Tensor x = at::randn({2, 32, 5, 5});
    EXPECT_TRUE(at::equal(norm->forward_silu(x), at::silu(norm(x)))) << "float32 forward_silu";
  }
  {  // the unfused bf16 SiLU (the time embeddings'; the norms' without AVX-512): rounded once
    const at::Tensor t = bf16(at::randn({4, 1280}) * 3), once = bf16(at::silu(t.to(at::kFloat))), kept = t.clone();
    EXPECT_TRUE(at::equal(silu_in_float(t), once)) << "silu_in_float";
    EXPECT_TRUE(at::equal(t, kept)) << "silu_in_float leaves its input alone";
    EXPECT_TRUE(at::equal(silu_fresh(t.clone()), once)) << "silu_fresh";
    if (at::equal(at::silu(t), once)) std::printf("note: this LibTorch's bf16 SiLU rounds once itself (1.13's does not)\n");
  }
  for (const std::vector<int64_t>& shape : std::vector<std::vector<int64_t>>{{2, 77, 320}, {3, 5, 40}, {4, 17}, {1, 1, 1280}}) {
    const int64_t D = shape.back();
    const at::Tensor x = bf16(at::randn(shape) * 0.5 - 7), w = bf16(at::randn({D})), b = bf16(at::randn({D}));
    const at::Tensor expected = bf16(at::layer_norm(x.to(at::kFloat), {D}, w.to(at::kFloat), b.to(at::kFloat), 1e-5));
    const std::string what = "layer_norm " + std::to_string(x.numel()) + " values, width " + std::to_string(D);
    leaf::LayerNorm norm(D, 1e-5);
    set_norm_weights(*norm, w, b);
    check(norm(x), expected, what + " (module)");
    if (!avx512) continue;
    check(cpu::layer_norm_bf16(x, w, b, 1e-5), expected, what);
  }
  if (!avx512) std::printf("[ SKIPPED  ] the bf16 norm kernels: the avx512 kernels do not run here (the modules' float32 path was checked)\n");
}

// Above max_score_elements the blocked CPU path (float32 throughout) runs: the numbers of
// the batched path, for float32 and, through float32, for bfloat16 inputs.
TEST(Attention, BlockedPathMatchesTheBatchedOne) {
  at::manual_seed(8);
  const at::Tensor q = at::randn({2, 40, 32}), k = at::randn({2, 50, 32}), v = at::randn({2, 50, 32});
  const double scale = 1.0 / std::sqrt(8.0);
  const at::Tensor whole = multi_head_attention(q, k, v, 4, scale, false, false);
  for (int64_t budget : {int64_t(50), int64_t(7 * 50), int64_t(1000)}) {
    const at::Tensor blocked = multi_head_attention(q, k, v, 4, scale, false, false, budget);
    EXPECT_LT((blocked - whole).abs().max().item<double>(), 1e-6) << "max_score_elements " << budget;
  }
  const at::Tensor bf = multi_head_attention(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), 4,
                                             scale, false, false, 100);
  EXPECT_EQ(bf.scalar_type(), at::kBFloat16);
  EXPECT_LT((bf.to(at::kFloat) - whole).abs().max().item<double>(), 0.05);
}

// The library's own at::parallel_for loops (the attention's heads and rows) run on the threads.
// They are OpenMP regions compiled into our translation units: built without -fopenmp, as the
// library was until the third session of issue 15, they ran on one thread and this fails.
TEST(Runtime, TheLibrarysParallelLoopsRunOnTheThreads) {
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  const int threads = library_parallel_threads();
  at::set_num_threads(before);
  EXPECT_EQ(threads, 2) << "the library's at::parallel_for ran on " << threads << " thread(s) of 2";
}

// After configure_threads, OpenBLAS's idle workers sleep as soon as a call is done: left to
// its default they spin for about a tenth of a second, on a core that the next convolution
// needs (runtime.cpp, stop_openblas_spinning). The process's CPU time over the 100 ms after
// a threaded GEMM tells: a spinning worker burns most of it, a sleeping one almost none.
TEST(Runtime, OpenBlasWorkersSleepAfterACall) {
  if (available_cpus() < 2) GTEST_SKIP() << "one CPU: OpenBLAS runs no workers";
  if (thread_summary().find("in its own pthread pool") == std::string::npos)
    GTEST_SKIP() << "the BLAS is not OpenBLAS's pthread build: " << thread_summary();
  const int before = at::get_num_threads();
  configure_threads(2);
  auto cpu_seconds = [] {
    timespec t{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
  };
  const at::Tensor a = at::randn({768, 768});
  double worst = 0;
  for (int i = 0; i < 3; ++i) {
    const at::Tensor p = at::mm(a, a);  // big enough for OpenBLAS's workers
    const double start = cpu_seconds();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    worst = std::max(worst, cpu_seconds() - start);
  }
  configure_threads(before);
  EXPECT_LT(worst, 0.03) << "the process used " << worst << " s of CPU in the 100 ms after a GEMM";
}

// The huge-page arena's bookkeeping (arena.h): best fit, split, merged on free, the top.
TEST(Arena, BlockRangesTakeTheBestFitAndMergeFreedNeighbours) {
  constexpr size_t P = 4096;
  BlockRanges r(100 * P, P);
  const size_t a = *r.take(20 * P), b = *r.take(1), c = *r.take(10 * P - 5), d = *r.take(P);
  EXPECT_EQ(a, 0u);
  EXPECT_EQ(b, 20 * P);
  EXPECT_EQ(c, 21 * P) << "sizes are rounded up to the granule";
  EXPECT_EQ(d, 31 * P);
  EXPECT_EQ(r.top(), 32 * P);
  EXPECT_EQ(r.in_use(), 32 * P);
  EXPECT_EQ(r.give_back(a), 20 * P);
  EXPECT_EQ(r.give_back(c), 10 * P);
  EXPECT_EQ(r.give_back(12345), 0u) << "not a block";
  EXPECT_EQ(r.free_ranges(), 2u);
  EXPECT_EQ(*r.take(8 * P), 21 * P) << "the best fit (10 pages), not the first (20 pages at 0)";
  EXPECT_EQ(*r.take(15 * P), 0u) << "the 2 pages left at 29 are too few: the 20-page range";
  EXPECT_EQ(*r.take(2 * P), 29 * P) << "the rest of the 10-page range, exactly";
  EXPECT_EQ(r.free_ranges(), 1u) << "pages 15-19";
  // A freed block merges with the free ranges beside it; one that ends at the top lowers it.
  r.give_back(d);
  EXPECT_EQ(r.top(), 31 * P);
  r.give_back(0);  // pages 0-14, beside 15-19
  EXPECT_EQ(r.free_ranges(), 1u);
  EXPECT_EQ(*r.take(20 * P), 0u) << "0-14 and 15-19 are one range";
  r.give_back(0);
  r.give_back(b);  // 0-19, 20 and 21-28 (in use): one range 0-20
  EXPECT_EQ(*r.take(21 * P), 0u);
  r.give_back(0);
  r.give_back(21 * P);
  r.give_back(29 * P);  // everything: the top goes back to 0
  EXPECT_EQ(r.top(), 0u);
  EXPECT_EQ(r.free_ranges(), 0u);
  EXPECT_EQ(r.in_use(), 0u);
  EXPECT_EQ(r.high_water(), 32 * P);
  const auto used = r.free_used_ranges();
  ASSERT_EQ(used.size(), 1u);
  EXPECT_EQ(used[0], std::make_pair(size_t(0), 32 * P)) << "touched once, free now";
  r.forget_used();
  EXPECT_TRUE(r.free_used_ranges().empty());
  EXPECT_FALSE(r.take(101 * P).has_value()) << "more than the region";
  EXPECT_EQ(*r.take(100 * P), 0u);
  EXPECT_FALSE(r.take(1).has_value()) << "the region is full";
}

TEST(Arena, LargeTensorsComeFromHugePagesAndAreReused) {
  if (!install_huge_page_arena()) GTEST_SKIP() << "transparent huge pages are off here, or the region could not be reserved";
  const size_t n = size_t(4) << 20;  // floats: 16 MiB, several whole huge pages
  void* first = nullptr;
  {
    at::Tensor big = at::ones({int64_t(n)});
    first = big.data_ptr();
    EXPECT_TRUE(arena_owns(first));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 64, 0u) << "c10's alignment";
    EXPECT_FALSE(arena_owns(at::ones({16}).data_ptr())) << "small blocks stay with glibc";
    EXPECT_EQ(big.sum().item<double>(), double(n));
  }
  {
    at::Tensor again = at::empty({int64_t(n)});
    EXPECT_EQ(again.data_ptr(), first) << "a freed block is reused";
  }
  // oneDNN's buffers take the raw interface: one deleter for both kinds of block.
  c10::Allocator* cpu = c10::GetCPUAllocator();
  void* raw_big = cpu->raw_allocate(size_t(3) << 20);
  void* raw_small = cpu->raw_allocate(100);
  EXPECT_TRUE(arena_owns(raw_big));
  EXPECT_FALSE(arena_owns(raw_small));
  cpu->raw_deallocate(raw_big);
  cpu->raw_deallocate(raw_small);
  // Released, the free pages are no longer resident (mincore), and come back as zeros.
  const int64_t page = sysconf(_SC_PAGESIZE);
  auto resident_pages = [&](void* p, size_t bytes) {
    std::vector<unsigned char> in(bytes / size_t(page));
    EXPECT_EQ(mincore(p, bytes, in.data()), 0);
    return std::count_if(in.begin(), in.end(), [](unsigned char v) { return v & 1; });
  };
  char* middle = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(first) + (size_t(4) << 20)) & ~((size_t(2) << 20) - 1));
  EXPECT_GT(resident_pages(middle, size_t(8) << 20), 0) << "touched by at::ones";
  release_free_memory();
  EXPECT_EQ(resident_pages(middle, size_t(8) << 20), 0) << "resident after release_free_memory";
}

// With enough (image, head) pairs, the blocked path runs whole heads on the OpenMP threads,
// each with single-threaded BLAS: the bits of the one-thread run, which takes the serial loop.
TEST(Attention, HeadsOnThreadsGiveTheBitsOfOneThread) {
  at::manual_seed(9);
  const at::Tensor q = at::randn({2, 64, 64}), k = at::randn({2, 80, 64}), v = at::randn({2, 80, 64});
  const double scale = 1.0 / std::sqrt(8.0);
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor serial = multi_head_attention(q, k, v, 8, scale, false, false, 16 * 80);
  at::set_num_threads(2);  // 16 pairs for 2 threads: the threaded loop
  const at::Tensor threaded = multi_head_attention(q, k, v, 8, scale, false, false, 16 * 80);
  at::set_num_threads(before);
  EXPECT_TRUE(at::equal(serial, threaded)) << "max |diff| " << (serial - threaded).abs().max().item<double>();
  EXPECT_LT((threaded - naive_attention(q, k, v, 8)).abs().max().item<double>(), 1e-5);
}

// Large feature maps are convolved in bands of rows when generating (inference mode): the
// same numbers as one call, for every kernel, stride and padding the networks use.
TEST(Conv2d, BandsOfRowsGiveTheNumbersOfOneCall) {
  struct Case {
    int64_t in, out, kernel, stride, padding, size;
  };
  // inputs of 17-21 MiB per image: above the 16 MiB at which banding starts
  for (const Case& c : {Case{64, 16, 3, 1, 1, 260}, Case{64, 24, 3, 2, 0, 261}, Case{80, 8, 1, 1, 0, 240}}) {
    leaf::Conv2d conv(c.in, c.out, c.kernel, c.stride, c.padding);
    randomize(*conv, 3);
    at::manual_seed(4);
    const at::Tensor x = at::randn({2, c.in, c.size, c.size});
    at::Tensor whole;
    {
      at::NoGradGuard no_grad;  // outside inference mode: one at::conv2d call on the batch
      whole = conv(x);
    }
    c10::InferenceMode guard;
    const at::Tensor banded = conv(x);
    ASSERT_EQ(banded.sizes(), whole.sizes());
    const double err = (banded - whole).abs().max().item<double>(), top = whole.abs().max().item<double>();
    EXPECT_LE(err, 1e-6 * top) << "kernel " << c.kernel << " stride " << c.stride << ": max error " << err;
    // ... and with the weight prepacked (bands are row slices: strided inputs to oneDNN)
    ASSERT_TRUE(conv->prepack());
    conv->release_weight();
    const at::Tensor packed = conv(x);
    const double packed_err = (packed - whole).abs().max().item<double>();
    EXPECT_LE(packed_err, 1e-6 * top) << "prepacked, kernel " << c.kernel << " stride " << c.stride << ": max error "
                                      << packed_err;
  }
}

// The convolution path of gemm_convolutions() chosen for one scope, then the previous one again.
class ConvolutionPath {
 public:
  explicit ConvolutionPath(bool gemm) : previous_(leaf::gemm_convolutions()) { leaf::use_gemm_convolutions(gemm); }
  ~ConvolutionPath() { leaf::use_gemm_convolutions(previous_); }

 private:
  bool previous_;
};

// Convolutions as matrix products (im2col, bands of output rows, OpenBLAS): the numbers of a
// float64 convolution to float rounding, for every kernel, stride and padding the networks
// use, one band or several, square or not; each image's bits the same alone or in a batch.
TEST(Conv2d, MatrixProductsAreTheConvolution) {
  struct Case {
    int64_t in, out, kernel, stride, padding, height, width;
    int64_t bands;  // ceil(H' / rows per band), a band being at most 16 MiB of columns: C k k W' floats a row
  };
  const Case cases[] = {
      {32, 64, 3, 1, 1, 15, 22, 1},     // resnet convolution, odd sizes
      {64, 64, 3, 1, 1, 128, 128, 3},   // 56-row bands: 56, 56, 16
      {128, 64, 3, 2, 1, 255, 255, 5},  // the UNet's downsampler (padding 1), 28-row bands of 128
      {64, 96, 3, 2, 0, 33, 40, 1},     // the VAE's (padding 0; it pads the input itself)
      {96, 64, 1, 1, 0, 16, 12, 1},     // 1x1 (shortcuts, proj_in / proj_out): the input is the columns
      {8, 64, 3, 1, 1, 9, 9, 1},        // conv_in-like: few input channels
  };
  ConvolutionPath gemm(true);
  for (const Case& c : cases) {
    leaf::Conv2d conv(c.in, c.out, c.kernel, c.stride, c.padding);
    randomize(*conv, 11);
    at::manual_seed(12);
    const at::Tensor x = at::randn({3, c.in, c.height, c.width});
    const at::Tensor bias = parameter_named(*conv, "bias");
    const at::Tensor reference = at::conv2d(x.to(at::kDouble), conv->weight().to(at::kDouble), bias.to(at::kDouble),
                                            c.stride, c.padding);
    c10::InferenceMode guard;
    const at::Tensor out = conv(x);
    ASSERT_EQ(out.sizes(), reference.sizes());
    const int64_t Ho = out.size(2), Wo = out.size(3);
    const int64_t band = std::max<int64_t>(1, (int64_t(16) << 20) / (c.in * c.kernel * c.kernel * Wo * 4));
    EXPECT_EQ((Ho + band - 1) / band, c.bands) << "the case no longer covers the bands it names";
    // Each output is a sum of C k k products: its float rounding, here 0.1-0.7 millionths of the
    // largest output, as LibTorch's; one misplaced column (a wrong offset, pad or stride) is of
    // the output's own size.
    const double top = reference.abs().max().item<double>();
    const double err = (out.to(at::kDouble) - reference).abs().max().item<double>();
    const double float_err = (at::conv2d(x, conv->weight(), bias, c.stride, c.padding).to(at::kDouble) - reference)
                                 .abs().max().item<double>();
    EXPECT_LE(err, 2e-6 * top) << c.kernel << "x" << c.kernel << " stride " << c.stride << " padding " << c.padding
                               << ": max |error| " << err << " of " << top << " (LibTorch's float32 " << float_err << ")";
    for (int64_t i = 0; i < 3; ++i)
      EXPECT_TRUE(at::equal(out[i], conv(x.narrow(0, i, 1))[0])) << "image " << i << " alone";
    // Without a bias (conv2d_gemm takes an undefined one), on the batch and on one image (the
    // product straight into the output).
    const at::Tensor unbiased = at::conv2d(x.to(at::kDouble), conv->weight().to(at::kDouble), {}, c.stride, c.padding);
    for (const int64_t n : {int64_t(3), int64_t(1)}) {
      at::Tensor plain = at::full({n, c.out, Ho, Wo}, std::nan(""));
      leaf::conv2d_gemm(x.narrow(0, 0, n), conv->weight(), at::Tensor(), c.stride, c.padding, plain);
      const at::Tensor expected = unbiased.narrow(0, 0, n);
      EXPECT_LE((plain.to(at::kDouble) - expected).abs().max().item<double>(), 2e-6 * expected.abs().max().item<double>())
          << c.kernel << "x" << c.kernel << " stride " << c.stride << " without a bias, " << n << " image(s)";
    }
  }
}

// FAIRDIFF_CONV: gemm, onednn, or an error that names the variable and the values it takes.
TEST(Conv2d, ConvolutionPathFollowsTheEnvironment) {
  const bool previous = leaf::gemm_convolutions();
  const char* saved = std::getenv("FAIRDIFF_CONV");
  const std::string saved_value = saved ? saved : "";
  auto decide = [](const char* value) {
    setenv("FAIRDIFF_CONV", value, 1);
    leaf::reset_convolution_path();
    return leaf::gemm_convolutions();
  };
  EXPECT_TRUE(decide("gemm"));
  EXPECT_STREQ(leaf::convolution_path(), "gemm");
  EXPECT_FALSE(decide("onednn"));
  EXPECT_STREQ(leaf::convolution_path(), "onednn");
  EXPECT_FALSE(decide(""));  // unset: oneDNN
  try {
    decide("fast");
    ADD_FAILURE() << "FAIRDIFF_CONV=fast was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("FAIRDIFF_CONV"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("gemm or onednn"), std::string::npos) << e.what();
  }
  if (saved)
    setenv("FAIRDIFF_CONV", saved_value.c_str(), 1);
  else
    unsetenv("FAIRDIFF_CONV");
  leaf::use_gemm_convolutions(previous);
}

TEST(RowGroups, CallsFollowTheGroupsThatCoverTheBatch) {
  using Calls = std::vector<std::pair<int64_t, int64_t>>;
  const Calls one_by_one{{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}};
  EXPECT_EQ(leaf::row_calls(5), one_by_one);  // no scope: one row per call
  {
    leaf::RowGroups groups({2, 3});
    EXPECT_EQ(leaf::row_calls(5), (Calls{{0, 2}, {2, 3}}));
    EXPECT_EQ(leaf::row_calls(5, /*grouped=*/false), one_by_one);
    EXPECT_EQ(leaf::row_calls(4), (Calls{{0, 1}, {1, 1}, {2, 1}, {3, 1}}));  // other rows: one per call
    {
      leaf::RowGroups inner({1});
      EXPECT_EQ(leaf::row_calls(5), one_by_one);
    }
    EXPECT_EQ(leaf::row_calls(5), (Calls{{0, 2}, {2, 3}}));  // the outer scope again
  }
  EXPECT_EQ(leaf::row_calls(5), one_by_one);
}

TEST(RowGroups, LinearAndConvolutionTakeEachGroupInOneCall) {
  c10::InferenceMode guard;
  // Linear: each group's rows are one product, whose row count BLAS sees (16 rows per image
  // here, 32 for a group of two: OpenBLAS rounds those differently on some CPUs).
  leaf::Linear linear(64, 64);
  randomize(*linear, 5);
  at::manual_seed(6);
  const at::Tensor x = at::randn({3, 16, 64});  // [B,N,in]
  const at::Tensor bias = parameter_named(*linear, "bias");
  at::Tensor grouped;
  {
    leaf::RowGroups groups({2, 1});
    grouped = linear(x);
  }
  const at::Tensor pair = at::addmm(bias, x.narrow(0, 0, 2).reshape({32, 64}), linear->weight().t());
  EXPECT_TRUE(at::equal(grouped.narrow(0, 0, 2).reshape({32, 64}), pair));
  EXPECT_TRUE(at::equal(grouped[2], at::addmm(bias, x[2], linear->weight().t())));

  // Conv2d: a weight larger than an image's maps is shared by the group's call; small weights
  // on large maps stay one image per call (a shared call would only hold more maps at once).
  struct Case {
    int64_t in, out, size;
    bool shared;
  };
  for (const bool gemm : {false, true}) {
    ConvolutionPath path(gemm);
    for (const Case& c : {Case{64, 64, 4, true}, Case{4, 4, 32, false}}) {
      leaf::Conv2d conv(c.in, c.out, 3, 1, 1);
      randomize(*conv, 7);
      const at::Tensor maps = at::randn({3, c.in, c.size, c.size});
      const at::Tensor bias = parameter_named(*conv, "bias");
      at::Tensor out;
      {
        leaf::RowGroups groups({2, 1});
        out = conv(maps);
      }
      // One call per group (shared) or per image: matrix products for 64 output channels or
      // more on the gemm path, at::conv2d otherwise.
      std::vector<at::Tensor> parts;
      for (const auto& [first, count] : c.shared ? std::vector<std::pair<int64_t, int64_t>>{{0, 2}, {2, 1}}
                                                 : std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {1, 1}, {2, 1}}) {
        const at::Tensor rows = maps.narrow(0, first, count);
        if (gemm && c.out >= 64) {
          at::Tensor part = at::empty({count, c.out, c.size, c.size});
          leaf::conv2d_gemm(rows, conv->weight(), bias, 1, 1, part);
          parts.push_back(part);
        } else {
          parts.push_back(at::conv2d(rows, conv->weight(), bias, 1, 1));
        }
      }
      const at::Tensor expected = at::cat(parts);
      EXPECT_TRUE(at::equal(out, expected))
          << c.in << " channels at " << c.size << "x" << c.size << (gemm ? ", matrix products" : ", oneDNN");
    }
  }
}

TEST(PlaceholderParameters, LeafWeightsTakeNoMemoryUntilLoaded) {
  {
    leaf::PlaceholderParameters placeholders;
    leaf::Linear linear(1024, 512);
    leaf::Conv2d conv(320, 320, 3, 1, 1);
    EXPECT_EQ(linear->weight().sizes(), (std::vector<int64_t>{512, 1024}));
    EXPECT_EQ(conv->weight().sizes(), (std::vector<int64_t>{320, 320, 3, 3}));
    for (const auto& p : linear->parameters()) EXPECT_EQ(p.storage().nbytes(), sizeof(float));
    for (const auto& p : conv->parameters()) EXPECT_EQ(p.storage().nbytes(), sizeof(float));
  }
  leaf::Linear linear(1024, 512);  // outside the scope: real tensors (training, random weights)
  EXPECT_EQ(linear->weight().storage().nbytes(), size_t{512} * 1024 * sizeof(float));
}

TEST(Profile, CountsCallsAndFlopsOfTheLeafLayers) {
  leaf::Linear linear(16, 8);
  randomize(*linear);
  const at::Tensor x = at::randn({3, 5, 16});
  linear(x);  // no session: nothing recorded anywhere
  {
    profile::Session session;
    EXPECT_THROW(profile::Session second, std::logic_error);
    linear(x);
    linear(x);
    multi_head_attention(at::randn({1, 6, 8}), at::randn({1, 4, 8}), at::randn({1, 4, 8}), 2, 0.5, false, false);
    const profile::Totals& t = session.totals();
    EXPECT_EQ(t[profile::kLinear].calls, 2);
    EXPECT_DOUBLE_EQ(t[profile::kLinear].flops, 2 * (2.0 * 15 * 16 * 8));
    EXPECT_EQ(t[profile::kAttention].calls, 1);
    EXPECT_DOUBLE_EQ(t[profile::kAttention].flops, 4.0 * 2 * 6 * 4 * 4);  // 2 heads of width 4
    EXPECT_EQ(t[profile::kConv2d].calls, 0);
    EXPECT_GE(t[profile::kLinear].seconds, 0.0);
  }
  {
    // Each scope also takes the process's CPU time: a product large enough to be measured.
    profile::Session session;
    leaf::Linear big(512, 512);
    const at::Tensor rows = at::randn({512, 512});
    big(rows);
    const profile::OpTotals& t = session.totals()[profile::kLinear];
    EXPECT_GT(t.cpu_seconds, 0.0);
    EXPECT_LT(t.cpu_seconds, 60.0);
  }
  profile::Session again;  // the first one ended
  EXPECT_EQ(again.totals()[profile::kLinear].calls, 0);
  // Generating (inference mode), the batched attention runs one image at a time through itself:
  // still one call, its FLOPs counted once.
  c10::InferenceMode guard;
  multi_head_attention(at::randn({2, 6, 8}), at::randn({2, 4, 8}), at::randn({2, 4, 8}), 2, 0.5, false, false);
  EXPECT_EQ(again.totals()[profile::kAttention].calls, 1);
  EXPECT_DOUBLE_EQ(again.totals()[profile::kAttention].flops, 4.0 * 2 * 2 * 6 * 4 * 4);  // 2 images, 2 heads
}

TEST(Attention, VaeVariantIsResidualOverChannels) {
  AttentionOptions o;
  o.query_dim = 32;
  o.heads = 1;
  o.dim_head = 32;
  o.bias = true;
  o.norm_num_groups = 8;
  o.eps = 1e-6;
  o.residual_connection = true;
  o.upcast_softmax = true;
  Attention attention(o);
  randomize(*attention);
  EXPECT_EQ(parameter_names(*attention),
            (std::set<std::string>{"group_norm.weight", "group_norm.bias", "to_q.weight", "to_q.bias", "to_k.weight",
                                   "to_k.bias", "to_v.weight", "to_v.bias", "to_out.0.weight", "to_out.0.bias"}));
  c10::InferenceMode guard;
  // With a zero output projection, the block is the identity (residual only).
  for (auto& p : attention->named_parameters())
    if (starts_with(p.key(), "to_out")) p.value().zero_();
  const at::Tensor x = at::randn({2, 32, 3, 5});
  EXPECT_TRUE(at::equal(attention->forward(x), x));
}

// ---------------------------------------------------------------------------
// UNet config

TEST(UNetConfig, DefaultsAndLegacyHeadCount) {
  const auto c = UNet2DConditionConfig::from_json(nlohmann::json::object(), "config.json");
  EXPECT_EQ(c.block_out_channels, (std::vector<int64_t>{320, 640, 1280, 1280}));
  EXPECT_EQ(c.layers_per_block, (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(c.cross_attention_dim, (std::vector<int64_t>{1280, 1280, 1280, 1280}));
  EXPECT_EQ(c.num_heads(), (std::vector<int64_t>{8, 8, 8, 8}));
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-5);
  EXPECT_TRUE(c.sample_size.empty());

  nlohmann::json j = tiny_unet_json();
  j["attention_head_dim"] = {2, 4, 4, 8};
  j["down_block_types"] = {"DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
  const auto sd2 = UNet2DConditionConfig::from_json(j, "config.json");
  EXPECT_EQ(sd2.num_heads(), (std::vector<int64_t>{2, 4, 4, 8}));
  EXPECT_EQ(sd2.cross_attention_dim, (std::vector<int64_t>{32, 32, 32, 32}));
}

TEST(UNetConfig, RejectsWhatWeDoNotImplement) {
  using test::expect_error;
  auto with = [](const std::string& key, const nlohmann::json& value) {
    nlohmann::json j = tiny_unet_json();
    j[key] = value;
    return [j] { UNet2DConditionConfig::from_json(j, "unet/config.json"); };
  };
  expect_error(with("addition_embed_type", "text_image"), ErrorKind::Unsupported,
               {"unet/config.json", "addition_embed_type", "\"text_time\""});
  expect_error(with("addition_embed_type", "text_time"), ErrorKind::BadInput,
               {"unet/config.json", "needs addition_time_embed_dim"});
  expect_error(with("class_embed_type", "timestep"), ErrorKind::Unsupported, {"class_embed_type", "null"});
  expect_error(with("dual_cross_attention", true), ErrorKind::Unsupported, {"dual_cross_attention"});
  expect_error(with("attention_type", "gated"), ErrorKind::Unsupported, {"attention_type", "\"gated\"", "default"});
  expect_error(with("resnet_time_scale_shift", "scale_shift"), ErrorKind::Unsupported, {"resnet_time_scale_shift"});
  expect_error(with("time_embedding_type", "fourier"), ErrorKind::Unsupported, {"time_embedding_type"});
  expect_error(with("only_cross_attention", {false, true, false, false}), ErrorKind::Unsupported,
               {"only_cross_attention"});
  expect_error(with("time_cond_proj_dim", 256), ErrorKind::Unsupported, {"time_cond_proj_dim"});
  expect_error(with("num_attention_heads", 8), ErrorKind::Unsupported, {"num_attention_heads"});
  expect_error(with("act_fn", "gelu"), ErrorKind::Unsupported, {"act_fn", "silu"});
  expect_error(with("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ErrorKind::Unsupported, {"mid_block_type"});
  expect_error(with("up_block_types", {"UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}),
               ErrorKind::Unsupported, {"AttnUpBlock2D"});
  expect_error(with("transformer_layers_per_block", nlohmann::json::parse("[[1],[2],[3],[4]]")), ErrorKind::Unsupported,
               {"transformer_layers_per_block"});
  // malformed values are bad input
  expect_error(with("block_out_channels", {32, 64}), ErrorKind::BadInput, {"block_out_channels", "2"});
  expect_error(with("layers_per_block", "two"), ErrorKind::BadInput, {"layers_per_block"});
  expect_error(with("attention_head_dim", {8, 8}), ErrorKind::BadInput, {"attention_head_dim"});
  expect_error(with("attention_head_dim", 5), ErrorKind::BadInput, {"divisible"});
}

// ---------------------------------------------------------------------------
// UNet module

TEST(UNet, NamesShapesAndOddSizes) {
  UNet2DConditionModel unet(UNet2DConditionConfig::from_json(tiny_unet_json(), "config.json"));
  const auto names = parameter_names(*unet);
  for (const char* key : {"conv_in.weight", "time_embedding.linear_2.bias",
                          "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight",
                          "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
                          "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.bias",
                          "down_blocks.2.downsamplers.0.conv.weight", "down_blocks.3.resnets.1.conv2.weight",
                          "mid_block.attentions.0.proj_in.weight", "mid_block.resnets.1.conv2.bias",
                          "up_blocks.0.resnets.2.conv_shortcut.weight", "up_blocks.2.upsamplers.0.conv.weight",
                          "up_blocks.3.attentions.2.norm.weight", "conv_norm_out.weight", "conv_out.bias"})
    EXPECT_TRUE(names.count(key)) << key;
  for (const char* key :
       {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias", "down_blocks.3.downsamplers.0.conv.weight",
        "up_blocks.3.upsamplers.0.conv.weight", "down_blocks.0.resnets.0.conv_shortcut.weight"})
    EXPECT_FALSE(names.count(key)) << key;
  // conv projections (use_linear_projection false) and GEGLU's doubled width
  EXPECT_EQ(shape_of(*unet, "mid_block.attentions.0.proj_in.weight"), (std::vector<int64_t>{64, 64, 1, 1}));
  EXPECT_EQ(shape_of(*unet, "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"),
            (std::vector<int64_t>{256, 32}));
  EXPECT_EQ(shape_of(*unet, "up_blocks.1.resnets.0.conv1.weight"), (std::vector<int64_t>{64, 128, 3, 3}));

  randomize(*unet);
  c10::InferenceMode guard;
  // 9x13 is not a multiple of 8: the upsamplers follow the skips' sizes.
  const at::Tensor out =
      unet->forward(at::randn({2, 4, 9, 13}), at::scalar_tensor(10, at::kLong), at::randn({2, 5, 32}));
  EXPECT_EQ(out.sizes(), (at::IntArrayRef{2, 4, 9, 13}));
  const at::Tensor per_sample = unet->forward(at::randn({2, 4, 8, 8}), at::tensor({1.5, 700.0}), at::randn({2, 5, 32}));
  EXPECT_EQ(per_sample.sizes(), (at::IntArrayRef{2, 4, 8, 8}));
  EXPECT_TRUE(at::isfinite(out).all().item<bool>() && at::isfinite(per_sample).all().item<bool>());
}

TEST(UNet, LinearProjectionAndPerBlockTransformerDepth) {
  nlohmann::json j = tiny_unet_json();
  j["use_linear_projection"] = true;
  j["transformer_layers_per_block"] = {1, 2, 1, 3};
  UNet2DConditionModel unet(UNet2DConditionConfig::from_json(j, "config.json"));
  const auto names = parameter_names(*unet);
  EXPECT_EQ(shape_of(*unet, "down_blocks.0.attentions.0.proj_in.weight"), (std::vector<int64_t>{32, 32}));
  EXPECT_TRUE(names.count("down_blocks.1.attentions.0.transformer_blocks.1.norm3.weight"));
  EXPECT_FALSE(names.count("down_blocks.0.attentions.0.transformer_blocks.1.norm3.weight"));
  // up block i mirrors down block n-1-i; the mid block takes the last entry
  EXPECT_TRUE(names.count("up_blocks.2.attentions.2.transformer_blocks.1.norm1.weight"));
  EXPECT_TRUE(names.count("mid_block.attentions.0.transformer_blocks.2.attn2.to_k.weight"));
}

TEST(UNet, RowsThatRepeatTheirSampleShareTheLayersBeforeTheContext) {
  UNet2DConditionModel unet(UNet2DConditionConfig::from_json(tiny_unet_json(), "config.json"));
  randomize(*unet);
  c10::InferenceMode guard;
  const at::Tensor x = at::randn({1, 4, 8, 8}), y = at::randn({1, 4, 8, 8});
  const at::Tensor sample = at::cat({x, x, y, y, y, x});  // runs of equal rows: {0,1}, {2,3,4}, {5}
  const at::Tensor context = at::randn({6, 5, 32});
  const at::Tensor t = at::scalar_tensor(10, at::kLong);
  auto flops = [&](const at::Tensor& s, const at::Tensor& timestep, at::Tensor* out) {
    profile::Session session;
    *out = unet->forward(s, timestep, context);
    double total = 0;
    for (auto op : profile::kOps) total += session.totals()[op].flops;
    return total;
  };
  at::Tensor shared, distinct;
  const double shared_flops = flops(sample, t, &shared);
  const double distinct_flops = flops(at::randn({6, 4, 8, 8}), t, &distinct);
  // Each row as a batch of one: the same bits (every layer takes one row per call here).
  for (int64_t b = 0; b < 6; ++b) {
    const at::Tensor alone = unet->forward(sample.narrow(0, b, 1), t, context.narrow(0, b, 1));
    EXPECT_TRUE(at::equal(shared.narrow(0, b, 1), alone)) << "row " << b;
  }
  // Three runs for six rows: the prefix ran three times fewer.
  EXPECT_LT(shared_flops, distinct_flops);
  // Rows with a timestep each share nothing (their time embeddings may differ): the same work
  // as for six distinct samples.
  const at::Tensor timesteps = at::tensor({10, 10, 10, 10, 10, 20});
  at::Tensor ignored;
  EXPECT_EQ(flops(sample, timesteps, &ignored), flops(at::randn({6, 4, 8, 8}), timesteps, &ignored));
}

// ---------------------------------------------------------------------------
// VAE

TEST(VAEConfig, DefaultsAndRejections) {
  const auto d = AutoencoderKLConfig::from_json(nlohmann::json::object(), "vae/config.json");
  EXPECT_EQ(d.block_out_channels, (std::vector<int64_t>{64}));
  EXPECT_DOUBLE_EQ(d.scaling_factor, 0.18215);
  EXPECT_TRUE(d.use_quant_conv && d.use_post_quant_conv && d.mid_block_add_attention && d.force_upcast);
  using test::expect_error;
  auto with = [](const std::string& key, const nlohmann::json& value) {
    nlohmann::json j = tiny_vae_json();
    j[key] = value;
    return [j] { AutoencoderKLConfig::from_json(j, "vae/config.json"); };
  };
  expect_error(with("shift_factor", 0.0609), ErrorKind::Unsupported, {"vae/config.json", "shift_factor"});
  expect_error(with("latents_mean", {0.1, 0.2, 0.3, 0.4}), ErrorKind::Unsupported, {"latents_mean"});
  expect_error(with("down_block_types", {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}), ErrorKind::Unsupported,
               {"AttnDownEncoderBlock2D"});
  expect_error(with("block_out_channels", {32, 64, 64}), ErrorKind::BadInput, {"block_out_channels"});
}

TEST(VAE, NamesShapesAndRoundTripSizes) {
  AutoencoderKL vae(AutoencoderKLConfig::from_json(tiny_vae_json(), "config.json"));
  const auto names = parameter_names(*vae);
  for (const char* key :
       {"encoder.mid_block.attentions.0.to_q.weight", "encoder.mid_block.attentions.0.group_norm.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight", "encoder.conv_out.bias",
        "decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.mid_block.resnets.1.norm2.bias", "quant_conv.weight", "post_quant_conv.bias"})
    EXPECT_TRUE(names.count(key)) << key;
  for (const char* key :
       {"encoder.down_blocks.1.downsamplers.0.conv.weight", "decoder.up_blocks.1.upsamplers.0.conv.weight",
        "decoder.mid_block.resnets.0.time_emb_proj.weight"})
    EXPECT_FALSE(names.count(key)) << key;
  EXPECT_EQ(shape_of(*vae, "encoder.conv_out.weight"), (std::vector<int64_t>{8, 64, 3, 3}));

  randomize(*vae);
  c10::InferenceMode guard;
  const LatentDistribution d = vae->encode(at::rand({2, 3, 16, 12}) * 2 - 1);
  EXPECT_EQ(d.mean.sizes(), (at::IntArrayRef{2, 4, 8, 6}));
  EXPECT_EQ(d.moments.sizes(), (at::IntArrayRef{2, 8, 8, 6}));
  EXPECT_TRUE(at::allclose(d.std, at::exp(0.5 * d.logvar)));
  EXPECT_EQ(vae->decode(d.mean).sizes(), (at::IntArrayRef{2, 3, 16, 12}));

  nlohmann::json j = tiny_vae_json();
  j["use_quant_conv"] = false;
  j["mid_block_add_attention"] = false;
  AutoencoderKL lean(AutoencoderKLConfig::from_json(j, "config.json"));
  const auto lean_names = parameter_names(*lean);
  EXPECT_FALSE(lean_names.count("quant_conv.weight"));
  EXPECT_FALSE(lean_names.count("encoder.mid_block.attentions.0.to_q.weight"));
  EXPECT_TRUE(lean_names.count("encoder.mid_block.resnets.1.conv1.weight"));
}

// The reference's tiled_decode written out step by step: tiles of T latents every
// 0.75 T, decoded alone; each tile's first rows, then columns, faded over the previous
// tile's last ones (in place, in this order); the first T f - extent rows and columns kept.
at::Tensor reference_tiled_decode(AutoencoderKL& vae, const at::Tensor& z, int64_t T, int64_t f) {
  const int64_t stride = static_cast<int64_t>(T * 0.75), extent = static_cast<int64_t>(T * f * 0.25);
  const int64_t limit = T * f - extent;
  std::vector<std::vector<at::Tensor>> rows;
  for (int64_t i = 0; i < z.size(2); i += stride) {
    rows.emplace_back();
    for (int64_t j = 0; j < z.size(3); j += stride)
      rows.back().push_back(vae->decode(z.slice(2, i, i + T).slice(3, j, j + T)).clone());
  }
  std::vector<at::Tensor> out_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<at::Tensor> row;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      at::Tensor b = rows[i][j];
      if (i > 0) {
        const at::Tensor a = rows[i - 1][j];
        const int64_t e = std::min({a.size(2), b.size(2), extent});
        for (int64_t y = 0; y < e; ++y)
          b.select(2, y).copy_(a.select(2, a.size(2) - e + y) * (1.0 - double(y) / e) + b.select(2, y) * (double(y) / e));
      }
      if (j > 0) {
        const at::Tensor a = rows[i][j - 1];
        const int64_t e = std::min({a.size(3), b.size(3), extent});
        for (int64_t x = 0; x < e; ++x)
          b.select(3, x).copy_(a.select(3, a.size(3) - e + x) * (1.0 - double(x) / e) + b.select(3, x) * (double(x) / e));
      }
      row.push_back(b.slice(2, 0, limit).slice(3, 0, limit));
    }
    out_rows.push_back(at::cat(row, 3));
  }
  return at::cat(out_rows, 2);
}

TEST(VAE, TiledDecodeBlendsTilesAsTheReference) {
  AutoencoderKL vae(AutoencoderKLConfig::from_json(tiny_vae_json(), "config.json"));
  randomize(*vae, 5);
  c10::InferenceMode guard;
  at::manual_seed(6);
  const at::Tensor z = at::randn({1, 4, 10, 7});
  const at::Tensor plain = vae->decode(z);
  // The default tile is sample_size / scale factor = 16 / 2 = 8 latents.
  vae->enable_tiling();
  EXPECT_EQ(vae->tile_latent_size(), 8);
  vae->enable_tiling(4);  // tiles of 4 latents every 3, blended over 2 pixels, 6 kept
  const at::Tensor tiled = vae->decode(z);
  ASSERT_EQ(tiled.sizes(), plain.sizes());  // [1,3,20,14]
  const at::Tensor expected = reference_tiled_decode(vae, z, 4, 2);
  EXPECT_LT((tiled - expected).abs().max().item<double>(), 1e-6);
  EXPECT_GT((tiled - plain).abs().max().item<double>(), 1e-3);  // tiles see less context
  // Latents that fit in one tile decode in one call.
  const at::Tensor small = z.slice(2, 0, 4).slice(3, 0, 4);
  const at::Tensor small_tiled = vae->decode(small);
  vae->enable_tiling(0);
  EXPECT_FALSE(vae->tiling());
  EXPECT_TRUE(at::equal(small_tiled, vae->decode(small)));
  EXPECT_TRUE(at::equal(vae->decode(z), plain));
}

}  // namespace
}  // namespace fairdiff
