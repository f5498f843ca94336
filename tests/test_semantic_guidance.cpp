// Semantic guidance on hand-made tensors (warm-up, sign, threshold, ties, momentum,
// partial warm-up, cool-down, weights, which rows are evaluated), then per-image
// directions through the pipeline with the tiny-sd1 fixture model.
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include <cmath>

#include "model_folder.h"
#include "pipeline.h"
#include "scheduler.h"
#include "semantic_guidance.h"
#include "test_util.h"

namespace fairdiff {
namespace {

// Max |a - b|, with where it is, for messages.
std::string max_diff(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor d = (a.to(at::kDouble) - b.to(at::kDouble)).abs().flatten();
  const int64_t at = d.argmax().item<int64_t>();
  return "max |diff| " + std::to_string(d[at].item<double>()) + " at flat index " + std::to_string(at) + " (got " +
         std::to_string(a.flatten()[at].item<double>()) + ", expected " + std::to_string(b.flatten()[at].item<double>()) +
         ")";
}

#define EXPECT_TENSOR_EQ(a, b) EXPECT_TRUE(at::equal((a), (b))) << max_diff((a), (b))
#define EXPECT_TENSOR_NEAR(a, b, tol) \
  EXPECT_LE(((a).to(at::kDouble) - (b).to(at::kDouble)).abs().max().item<double>(), (tol)) << max_diff((a), (b))

// A concept that keeps every position (threshold 0), warm from the start.
EditConcept plain(int64_t embedding = 0, double scale = 1.0) {
  EditConcept e;
  e.embedding = embedding;
  e.guidance_scale = scale;
  e.warmup_steps = 0;
  e.threshold = 0.0;
  return e;
}

SemanticGuidanceSettings one_image(std::vector<EditConcept> concepts, double s_m = 0.0, double beta = 0.4) {
  SemanticGuidanceSettings s;
  s.images = {std::move(concepts)};
  s.momentum_scale = s_m;
  s.momentum_beta = beta;
  return s;
}

// Every (image, embedding) row, for steps where all are evaluated.
std::vector<EditRow> all_rows(const SemanticGuidanceSettings& s) { return edit_rows(s, 0, 0, /*all=*/true); }

at::Tensor randn(std::vector<int64_t> shape, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn(shape, gen, at::TensorOptions(at::kFloat));
}

// ---------------------------------------------------------------------------
// The pure step function

TEST(SemanticGuidance, WarmupGivesZeroButFeedsTheMomentum) {
  EditConcept e = plain();
  e.warmup_steps = 2;
  const auto s = one_image({e}, /*s_m=*/0.5, /*beta=*/0.6);
  const at::Tensor u = randn({1, 4, 2, 2}, 1), edit = randn({1, 4, 2, 2}, 2);
  at::Tensor m;
  for (int64_t step = 0; step < 2; ++step) {
    const SemanticStep r = semantic_guidance_step(s, step, 10, u, edit, all_rows(s), m);
    EXPECT_FALSE(r.applied[0]) << "step " << step;
    EXPECT_EQ(r.guidance.abs().max().item<float>(), 0.0f) << "step " << step;
    EXPECT_GT(r.momentum.abs().max().item<float>(), 0.0f) << "momentum accumulates during warm-up";
    m = r.momentum;
  }
  const SemanticStep r = semantic_guidance_step(s, 2, 10, u, edit, all_rows(s), m);
  EXPECT_TRUE(r.applied[0]);
  // At step 2 the applied term already holds the momentum of steps 0 and 1.
  const at::Tensor G = edit - u;
  EXPECT_TENSOR_NEAR(r.guidance, G + m * 0.5, 1e-6);
  EXPECT_GT((r.guidance - G).abs().max().item<float>(), 0.1f);
}

TEST(SemanticGuidance, ReverseFlipsTheSign) {
  EditConcept e = plain(0, 4.0);
  e.threshold = 0.5;
  const at::Tensor u = randn({1, 4, 4, 4}, 3), edit = randn({1, 4, 4, 4}, 4);
  const auto fwd = one_image({e});
  e.reverse = true;
  const auto rev = one_image({e});
  const at::Tensor gf = semantic_guidance_step(fwd, 0, 10, u, edit, all_rows(fwd), {}).guidance;
  const at::Tensor gr = semantic_guidance_step(rev, 0, 10, u, edit, all_rows(rev), {}).guidance;
  EXPECT_TENSOR_EQ(gr, -gf);
  EXPECT_GT(gf.abs().max().item<float>(), 0.0f);
}

TEST(SemanticGuidance, DirectionIsRelativeToTheUnconditionalEstimate) {
  const auto s = one_image({plain(0, 3.0)});
  const at::Tensor u = randn({1, 4, 2, 2}, 5), edit = randn({1, 4, 2, 2}, 6);
  const at::Tensor g = semantic_guidance_step(s, 0, 10, u, edit, all_rows(s), {}).guidance;
  EXPECT_TENSOR_EQ(g, (edit - u) * 3.0);
}

// |d| = 1..16 over the 16 positions of each (image, channel), scaled per (image, channel)
// so that a threshold pooled over channels or images would keep other positions.
TEST(SemanticGuidance, ThresholdKeepsTheTopSharePerImageAndChannel) {
  const int64_t B = 2, C = 4;
  at::Tensor d = at::empty({B, C, 4, 4});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      // a permutation of 1..16 with alternating signs, times 1, 10, 100, ...
      const at::Tensor v = (at::randperm(16, at::TensorOptions(at::kLong)).to(at::kFloat) + 1) *
                           std::pow(10.0, static_cast<double>(b * C + c));
      const at::Tensor sign = at::where(at::arange(16) % 2 == 0, at::ones({16}), -at::ones({16}));
      d[b][c].copy_((v * sign).view({4, 4}));
    }
  EditConcept e = plain();
  e.threshold = 0.75;  // pos = 0.75 * 15 = 11.25: q between the 12th and 13th value, keep 4 of 16
  SemanticGuidanceSettings s;
  s.images = {{e}, {e}};
  s.momentum_scale = 0;
  const at::Tensor u = at::zeros({B, C, 4, 4});
  const at::Tensor g = semantic_guidance_step(s, 0, 10, u, d, all_rows(s), {}).guidance;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const at::Tensor kept = g[b][c] != 0;
      EXPECT_EQ(kept.sum().item<int64_t>(), 4) << "image " << b << " channel " << c;
      const double unit = std::pow(10.0, static_cast<double>(b * C + c));
      EXPECT_TRUE(at::equal(kept, d[b][c].abs() > 12.5 * unit)) << "image " << b << " channel " << c;
      EXPECT_TRUE(at::equal(g[b][c].masked_select(kept), d[b][c].masked_select(kept)));
    }
}

TEST(SemanticGuidance, ThresholdIsTorchQuantileWithLinearInterpolation) {
  // 1..16 in one channel: lambda 0.9 -> pos 0.9 * 15 = 13.5 -> q = 14.5: keeps 15 and 16;
  // lambda 0.5 -> q = 8.5: keeps 9..16; lambda 0 keeps all, lambda 1 the maximum only.
  const at::Tensor d = (at::arange(16, at::TensorOptions(at::kFloat)) + 1).view({1, 1, 4, 4});
  for (const auto& [lambda, keep] : std::vector<std::pair<double, int64_t>>{{0.9, 2}, {0.5, 8}, {0.0, 16}, {1.0, 1}}) {
    EditConcept e = plain();
    e.threshold = lambda;
    const auto s = one_image({e});
    const at::Tensor g = semantic_guidance_step(s, 0, 10, at::zeros_like(d), d, all_rows(s), {}).guidance;
    EXPECT_EQ((g != 0).sum().item<int64_t>(), keep) << "lambda " << lambda;
    EXPECT_EQ(g.min().item<float>() == 0 ? g.masked_select(g != 0).min().item<float>() : g.min().item<float>(),
              static_cast<float>(17 - keep))
        << "lambda " << lambda;
  }
}

TEST(SemanticGuidance, TiesAtTheQuantileAreKept) {
  // Ten 1s and six 5s: lambda 0.95 -> pos 14.25 lies among the 5s, q = 5, and all six
  // 5s are kept (far more than the top 5%).
  at::Tensor d = at::ones({1, 1, 4, 4});
  d.view({16}).narrow(0, 10, 6).fill_(5.0);
  EditConcept e = plain();
  e.threshold = 0.95;
  const auto s = one_image({e});
  const at::Tensor g = semantic_guidance_step(s, 0, 10, at::zeros_like(d), d, all_rows(s), {}).guidance;
  EXPECT_EQ((g != 0).sum().item<int64_t>(), 6);
  EXPECT_EQ(g.sum().item<float>(), 30.0f);
}

TEST(SemanticGuidance, MomentumFollowsBeta) {
  // A constant direction G: S_i = G + s_m m_i, m_{i+1} = beta m_i + (1 - beta) S_i, m_0 = 0.
  const double s_m = 0.3, beta = 0.6;
  const auto s = one_image({plain()}, s_m, beta);
  const at::Tensor u = at::zeros({1, 1, 1, 2});
  const at::Tensor edit = at::tensor({1.0f, -2.0f}).view({1, 1, 1, 2});
  at::Tensor m;
  double mom = 0;
  for (int64_t step = 0; step < 6; ++step) {
    const SemanticStep r = semantic_guidance_step(s, step, 10, u, edit, all_rows(s), m);
    const double S = 1.0 + s_m * mom;
    mom = beta * mom + (1 - beta) * S;
    EXPECT_NEAR(r.guidance.flatten()[0].item<double>(), S, 1e-6) << "step " << step;
    EXPECT_NEAR(r.guidance.flatten()[1].item<double>(), -2 * S, 1e-6) << "step " << step;
    EXPECT_NEAR(r.momentum.flatten()[0].item<double>(), mom, 1e-6) << "step " << step;
    m = r.momentum;
  }
}

TEST(SemanticGuidance, PartialWarmupIsNormalisedAndIgnoresMomentum) {
  EditConcept a = plain(0), b = plain(1), c = plain(2);
  a.weight = 1.0;
  b.weight = 3.0;
  c.weight = 5.0;
  c.warmup_steps = 4;  // a and b warm at step 1, c not: partial branch
  const double s_m = 0.5, beta = 0.6;
  const auto s = one_image({a, b, c}, s_m, beta);
  const at::Tensor u = randn({1, 4, 2, 2}, 7);
  const at::Tensor edit = randn({3, 4, 2, 2}, 8);
  const at::Tensor m = randn({1, 4, 2, 2}, 9);  // a momentum that must not show in the output
  const SemanticStep r = semantic_guidance_step(s, 1, 10, u, edit, all_rows(s), m);
  ASSERT_TRUE(r.applied[0]);
  const at::Tensor G0 = edit[0] - u[0], G1 = edit[1] - u[0], G2 = edit[2] - u[0];
  EXPECT_TENSOR_NEAR(r.guidance[0], G0 * 0.25 + G1 * 0.75, 1e-6);
  // The momentum still takes the unnormalised sum over every concept, warm or not.
  const at::Tensor S = G0 * 1 + G1 * 3 + G2 * 5 + m[0] * s_m;
  EXPECT_TENSOR_NEAR(r.momentum[0], m[0] * beta + S * (1 - beta), 1e-5);
  // Once all are warm: unnormalised, with momentum.
  const SemanticStep all = semantic_guidance_step(s, 4, 10, u, edit, all_rows(s), m);
  EXPECT_TENSOR_NEAR(all.guidance[0], S, 1e-5);
}

TEST(SemanticGuidance, CooldownZeroesAConceptThatStillCountsAsWarm) {
  EditConcept a = plain(0), b = plain(1);
  a.weight = 2.0;
  a.warmup_steps = b.warmup_steps = 1;
  b.cooldown_steps = 2;
  const double s_m = 0.5;
  const auto s = one_image({a, b}, s_m, 0.6);
  const at::Tensor u = randn({1, 4, 2, 2}, 10), edit = randn({2, 4, 2, 2}, 11), m = randn({1, 4, 2, 2}, 12);
  const SemanticStep r = semantic_guidance_step(s, 3, 10, u, edit, all_rows(s), m);
  ASSERT_TRUE(r.applied[0]);
  // b is cooled down but warm: the all-warm branch (weight 2 not normalised, momentum added).
  EXPECT_TENSOR_NEAR(r.guidance[0], (edit[0] - u[0]) * 2 + m[0] * s_m, 1e-6);
  // Its estimate is no longer evaluated, and leaving it out changes nothing.
  const auto rows = edit_rows(s, 3, 10);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].embedding, 0);
  const SemanticStep r2 = semantic_guidance_step(s, 3, 10, u, edit.narrow(0, 0, 1), rows, m);
  EXPECT_TENSOR_EQ(r2.guidance, r.guidance);
  EXPECT_TENSOR_EQ(r2.momentum, r.momentum);
}

TEST(SemanticGuidance, NegativeWeightsCountAsZero) {
  EditConcept a = plain(0), b = plain(1);
  b.weight = -3.0;
  const auto s = one_image({a, b});
  const at::Tensor u = randn({1, 4, 2, 2}, 13), edit = randn({2, 4, 2, 2}, 14);
  const at::Tensor g = semantic_guidance_step(s, 0, 10, u, edit, all_rows(s), {}).guidance;
  EXPECT_TENSOR_EQ(g, edit.narrow(0, 0, 1) - u);
  EXPECT_FALSE(edit_needed(s, 0, 1, 0, 10));
  // In a partial warm-up too (normalised over a's weight alone).
  b.warmup_steps = 0;
  a.warmup_steps = 0;
  EditConcept c = plain(2);
  c.warmup_steps = 5;
  const auto s3 = one_image({a, b, c});
  const at::Tensor g3 =
      semantic_guidance_step(s3, 0, 10, u, at::cat({edit, edit.narrow(0, 0, 1)}), all_rows(s3), {}).guidance;
  EXPECT_TENSOR_EQ(g3, edit.narrow(0, 0, 1) - u);
}

TEST(SemanticGuidance, NanWeightCountsAsZeroWhenAllAreWarm) {
  EditConcept a = plain(0), b = plain(1);
  b.weight = std::nan("");
  const auto s = one_image({a, b});
  const at::Tensor u = randn({1, 4, 2, 2}, 15), edit = randn({2, 4, 2, 2}, 16);
  const at::Tensor g = semantic_guidance_step(s, 0, 10, u, edit, all_rows(s), {}).guidance;
  EXPECT_TENSOR_EQ(g, edit.narrow(0, 0, 1) - u);
  test::expect_error([&] { validate(s, 2, "settings"); }, ErrorKind::BadInput, {"image 0 concept 1", "weight"});
}

TEST(SemanticGuidance, EachImageFollowsItsOwnConcepts) {
  // Image 0 toward concept 1, image 1 toward concept 0, image 2 with one concept of its
  // own settings, image 3 unedited: each equals the step computed for it alone.
  EditConcept base = plain();
  base.threshold = 0.8;
  base.guidance_scale = 4;
  base.warmup_steps = 1;
  EditConcept solo = plain(1, 2.5);
  solo.threshold = 0.5;
  SemanticGuidanceSettings s;
  s.images = {steer_toward(1, 2, base), steer_toward(0, 2, base), {solo}, {}};
  s.momentum_scale = 0.3;
  s.momentum_beta = 0.6;
  const at::Tensor u = randn({4, 4, 4, 4}, 17);
  const at::Tensor table_eps = randn({4, 2, 4, 4, 4}, 18);  // [image, embedding, ...]: estimates per latents
  at::Tensor m;
  std::vector<at::Tensor> m_alone(4);
  for (int64_t step = 0; step < 4; ++step) {
    const auto rows = edit_rows(s, step, 10);
    std::vector<at::Tensor> eps;
    for (const auto& r : rows) eps.push_back(table_eps[r.image][r.embedding]);
    const SemanticStep batch = semantic_guidance_step(s, step, 10, u, eps.empty() ? at::Tensor() : at::stack(eps),
                                                      rows, m);
    m = batch.momentum;
    for (int64_t b = 0; b < 4; ++b) {
      SemanticGuidanceSettings alone = s;
      alone.images = {s.images[static_cast<size_t>(b)]};
      const auto rows1 = edit_rows(alone, step, 10);
      std::vector<at::Tensor> eps1;
      for (const auto& r : rows1) eps1.push_back(table_eps[b][r.embedding]);
      const SemanticStep one = semantic_guidance_step(alone, step, 10, u.narrow(0, b, 1),
                                                      eps1.empty() ? at::Tensor() : at::stack(eps1), rows1,
                                                      m_alone[static_cast<size_t>(b)]);
      m_alone[static_cast<size_t>(b)] = one.momentum;
      EXPECT_TENSOR_EQ(batch.guidance.narrow(0, b, 1), one.guidance);
      EXPECT_TENSOR_EQ(batch.momentum.narrow(0, b, 1), one.momentum);
      EXPECT_EQ(batch.applied[static_cast<size_t>(b)], one.applied[0]) << "image " << b << " step " << step;
    }
  }
  // Opposite directions really differ: the guidance of images 0 and 1 on the same estimates flips.
  SemanticGuidanceSettings two = s;
  two.images = {steer_toward(1, 2, base), steer_toward(0, 2, base)};
  const at::Tensor u2 = u.narrow(0, 0, 1).repeat({2, 1, 1, 1});
  const at::Tensor e2 = at::stack({table_eps[0][0], table_eps[0][1], table_eps[0][0], table_eps[0][1]});
  const auto g = semantic_guidance_step(two, 1, 10, u2, e2, {{0, 0}, {0, 1}, {1, 0}, {1, 1}}, {}).guidance;
  EXPECT_TENSOR_EQ(g[0], -g[1]);
}

TEST(SemanticGuidance, AMissingEstimateThatMattersIsAnError) {
  const auto s = one_image({plain()});
  EXPECT_THROW(semantic_guidance_step(s, 0, 10, at::zeros({1, 4, 2, 2}), {}, {}, {}), c10::Error);
}

// ---------------------------------------------------------------------------
// Which rows are evaluated

TEST(SemanticGuidanceRows, OnlyWhereTheyCanChangeTheResult) {
  EditConcept e = plain();
  e.warmup_steps = 2;
  // s_m = 0: nothing before the warm-up.
  auto s = one_image({e}, 0.0);
  EXPECT_TRUE(edit_rows(s, 0, 10).empty());
  EXPECT_TRUE(edit_rows(s, 1, 10).empty());
  EXPECT_EQ(edit_rows(s, 2, 10).size(), 1u);
  // s_m != 0: from step 0 (the momentum reaches the output at step 2).
  s.momentum_scale = 0.3;
  EXPECT_EQ(edit_rows(s, 0, 10).size(), 1u);
  // ... unless no step is ever all-warm: then only warm concepts matter (partial branch).
  EditConcept late = plain(1);
  late.warmup_steps = 10;
  s.images[0].push_back(late);
  EXPECT_TRUE(edit_rows(s, 0, 10).empty());
  EXPECT_EQ(edit_rows(s, 2, 10).size(), 1u);
  EXPECT_EQ(edit_rows(s, 0, /*unknown*/ 0).size(), 2u);
  // Cool-down, weight 0 and scale 0: never.
  EditConcept cool = plain(), light = plain(), flat = plain();
  cool.cooldown_steps = 3;
  light.weight = 0;
  flat.guidance_scale = 0;
  EXPECT_EQ(edit_rows(one_image({cool}, 0.3), 2, 10).size(), 1u);
  EXPECT_TRUE(edit_rows(one_image({cool}, 0.3), 3, 10).empty());
  EXPECT_TRUE(edit_rows(one_image({light}, 0.3), 3, 10).empty());
  EXPECT_TRUE(edit_rows(one_image({flat}, 0.3), 3, 10).empty());
  // The reference's cost: everything, always.
  EXPECT_EQ(edit_rows(one_image({cool, light, flat}, 0.3), 5, 10, true).size(), 1u);  // one embedding
}

TEST(SemanticGuidanceRows, EachImageAndEmbeddingOnce) {
  EditConcept a = plain(0), a_rev = plain(0), b = plain(1);
  a_rev.reverse = true;
  SemanticGuidanceSettings s;
  s.images = {{a, a_rev, b}, {b}};
  const auto rows = edit_rows(s, 0, 10);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_TRUE((rows[0] == EditRow{0, 0}) && (rows[1] == EditRow{0, 1}) && (rows[2] == EditRow{1, 1}));
}

// UNet rows per image at the original Fair Diffusion settings: SD 1.5's PNDM at 50 steps
// (51 loop indices), two groups, warm-up 5, momentum 0.5 / 0.6.
TEST(SemanticGuidanceRows, FairDiffusionCost) {
  const int64_t T = 51;
  EditConcept base;
  base.guidance_scale = 4;
  base.warmup_steps = 5;
  base.threshold = 0.95;
  SemanticGuidanceSettings s;
  s.images = {steer_toward(0, 2, base)};
  s.momentum_scale = 0.5;
  s.momentum_beta = 0.6;
  auto unet_rows = [&](const SemanticGuidanceSettings& settings) {
    int64_t n = 0;
    for (int64_t i = 0; i < T; ++i) n += 2 + static_cast<int64_t>(edit_rows(settings, i, T).size());
    return n;
  };
  EXPECT_EQ(unet_rows(s), 4 * T);  // momentum from step 0: every estimate matters, as in the reference
  s.momentum_scale = 0;
  EXPECT_EQ(unet_rows(s), 2 * T + 2 * (T - 5));  // without momentum the warm-up is free
  s.images = {{}};
  EXPECT_EQ(unet_rows(s), 2 * T);  // plain CFG
}

TEST(SemanticGuidanceRows, SettingsAreValidated) {
  EditConcept e = plain();
  e.threshold = 1.5;
  test::expect_error([&] { validate(one_image({e}), 1, "sega"); }, ErrorKind::BadInput,
                     {"sega", "image 0 concept 0", "threshold"});
  test::expect_error([&] { validate(one_image({plain(3)}), 2, "sega"); }, ErrorKind::BadInput,
                     {"embedding row 3", "2 concept embeddings"});
  test::expect_error([&] { steer_toward(2, 2, e); }, ErrorKind::BadInput, {"target group 2"});
  SemanticGuidance sega(at::zeros({1, 77, 8}), one_image({plain()}));
  test::expect_error([&] { sega.begin(10, 2); }, ErrorKind::BadInput, {"1 images", "batch has 2"});
}

// ---------------------------------------------------------------------------
// Through the pipeline, with the tiny-sd1 fixture model

struct TinyRun {
  at::Tensor latents;
  std::vector<int64_t> rows_per_step;
  int64_t unet_rows = 0;
};

class SemanticGuidancePipeline : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string fixtures = test::fixtures_dir();
    if (fixtures.empty()) GTEST_SKIP() << "golden fixtures not found: set FAIRDIFF_FIXTURES";
    model_ = std::make_unique<StableDiffusionModel>(load_model_folder(fixtures + "/models/tiny-sd1", LoadOptions{}));
  }

  // Images with the given seeds, prompts and concept lists, in one batch.
  TinyRun run(const std::vector<int64_t>& seeds, const std::vector<std::string>& prompts,
              const std::vector<std::vector<EditConcept>>& concepts, bool evaluate_all = false) {
    c10::InferenceMode guard;
    StableDiffusionPipeline pipe(*model_);
    const Conditioning table = encode_edit_prompts(*model_, {"male person", "female person"});
    SemanticGuidanceSettings s;
    s.images = concepts;
    s.momentum_scale = 0.3;
    s.momentum_beta = 0.6;
    SemanticGuidance sega(table, s);
    sega.set_evaluate_all(evaluate_all);
    const PromptEmbeddings emb =
        pipe.encode_prompts(prompts, std::vector<std::string>(prompts.size(), ""), 0, /*cfg=*/true);
    auto sched = make_scheduler(model_->scheduler_config, "", "scheduler_config.json");
    sched->set_timesteps(10);
    const at::Tensor noise = pipe.initial_noise(seeds, 16, 16, nullptr);
    TinyRun r;
    r.latents = pipe.denoise(*sched, noise, emb, 7.5, nullptr, nullptr, &sega);
    r.rows_per_step = sega.edit_rows_per_step();
    r.unet_rows = sega.unet_rows_total();
    return r;
  }

  std::unique_ptr<StableDiffusionModel> model_;
};

// The UNet's rows depend slightly on what else is in the batch (GEMM blocking): with
// plain CFG, image 0 of a batch of 2 and the same image alone already differ by ~1e-4
// after 10 steps of this tiny random model (latents ~10..40). The recorded fixture
// tolerance for these latents (sega_main) is the bound; a wrong direction or row
// mapping moves them by whole units. The step function itself is checked bit-exactly
// per image above (EachImageFollowsItsOwnConcepts).
constexpr double kBatchTolerance = 5e-4;

EditConcept fair_settings() {
  EditConcept e;
  e.guidance_scale = 4;
  e.warmup_steps = 2;
  e.threshold = 0.95;
  return e;
}

TEST_F(SemanticGuidancePipeline, OppositeDirectionsInOneBatchEqualSeparateRuns) {
  const auto toward_female = steer_toward(1, 2, fair_settings()), toward_male = steer_toward(0, 2, fair_settings());
  const std::vector<std::string> prompts = {"a photo of the face of a firefighter", "a photo of the face of a nurse"};
  const TinyRun batch = run({7, 8}, prompts, {toward_female, toward_male});
  const TinyRun first = run({7}, {prompts[0]}, {toward_female});
  const TinyRun second = run({8}, {prompts[1]}, {toward_male});
  EXPECT_TENSOR_NEAR(batch.latents.narrow(0, 0, 1), first.latents, kBatchTolerance);
  EXPECT_TENSOR_NEAR(batch.latents.narrow(0, 1, 1), second.latents, kBatchTolerance);
  // The direction matters: the same image steered the other way ends far away.
  const TinyRun flipped = run({7}, {prompts[0]}, {toward_male});
  EXPECT_GT((flipped.latents - first.latents).abs().max().item<double>(), 100 * kBatchTolerance);
  // 2 images x 2 concepts at every one of PNDM's 11 steps (momentum from step 0).
  EXPECT_EQ(batch.rows_per_step, std::vector<int64_t>(11, 4));
  EXPECT_EQ(batch.unet_rows, 11 * (2 * 2 + 4));
}

TEST_F(SemanticGuidancePipeline, ImagesWithDifferentConceptCounts) {
  EditConcept only_female = fair_settings();
  only_female.embedding = 1;
  only_female.cooldown_steps = 6;
  const std::vector<std::string> prompts = {"a photo of a doctor", "a photo of a doctor", "a photo of a doctor"};
  const TinyRun batch = run({3, 4, 5}, prompts, {steer_toward(0, 2, fair_settings()), {only_female}, {}});
  const TinyRun a = run({3}, {prompts[0]}, {steer_toward(0, 2, fair_settings())});
  const TinyRun b = run({4}, {prompts[1]}, {{only_female}});
  const TinyRun c = run({5}, {prompts[2]}, {{}});
  EXPECT_TENSOR_NEAR(batch.latents.narrow(0, 0, 1), a.latents, kBatchTolerance);
  EXPECT_TENSOR_NEAR(batch.latents.narrow(0, 1, 1), b.latents, kBatchTolerance);
  EXPECT_TENSOR_NEAR(batch.latents.narrow(0, 2, 1), c.latents, kBatchTolerance);
  // 2 + 1 rows until the cool-down at step 6, then 2.
  EXPECT_EQ(batch.rows_per_step, (std::vector<int64_t>{3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2}));
  // Evaluating everything, as the reference does, gives the same images.
  const TinyRun all = run({3, 4, 5}, prompts, {steer_toward(0, 2, fair_settings()), {only_female}, {}}, true);
  EXPECT_EQ(all.rows_per_step, std::vector<int64_t>(11, 3));
  EXPECT_TENSOR_NEAR(all.latents, batch.latents, kBatchTolerance);
}

}  // namespace
}  // namespace fairdiff
