// SDXL (issue 13): the conditioner's details, fair guidance on SDXL stated as an identity
// with CFG, and `generate` on tiny-sdxl (every sampler, metadata, manifest, shards, resume,
// fairness, refusals). The key sets of the real SDXL base 1.0 networks are checked by the
// golden parity (ctest `parity`: fairdiff-parity's keyset lines for keysets/sdxl_base).
#include <c10/core/InferenceMode.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

#include "config_json.h"
#include "fairdiff/generate.h"
#include "infotext.h"
#include "model_folder.h"
#include "pipeline.h"
#include "png_io.h"
#include "run_plan.h"
#include "scheduler.h"
#include "semantic_guidance.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

// ---------------------------------------------------------------------------------------
// The conditioner on tiny-sdxl.

StableDiffusionModel& tiny_sdxl(const std::string& fixtures) {
  static StableDiffusionModel model = load_model_folder(fixtures + "/models/tiny-sdxl", LoadOptions{});
  return model;
}

TEST(SdxlConditioner, ZeroNegativesPerImageAndEmptyTextOnRequest) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode inference;
  StableDiffusionModel& model = tiny_sdxl(fixtures);
  ASSERT_TRUE(model.xl());
  EXPECT_TRUE(model.index.force_zeros_for_empty_prompt);
  StableDiffusionPipeline pipe(model);
  const std::vector<std::string> prompts = {"a photo of a nurse", "a photo of a firefighter"};
  PromptEmbeddings e = pipe.encode_prompts(prompts, {"", "blurry"}, 0, true);
  EXPECT_EQ(e.cond.context.sizes(), (std::vector<int64_t>{2, 77, 64}));  // 32 + 32
  EXPECT_EQ(e.cond.pooled.sizes(), (std::vector<int64_t>{2, 32}));
  // Image 0 has no negative prompt: zeros; image 1's is encoded.
  EXPECT_EQ(e.uncond.context[0].abs().max().item<float>(), 0.0f);
  EXPECT_EQ(e.uncond.pooled[0].abs().max().item<float>(), 0.0f);
  EXPECT_GT(e.uncond.context[1].abs().max().item<float>(), 0.0f);
  // An image's negative does not depend on its batch.
  const PromptEmbeddings alone = pipe.encode_prompts({prompts[1]}, {"blurry"}, 0, true);
  EXPECT_TRUE(at::equal(alone.uncond.context[0], e.uncond.context[1]));
  // "" as text: encoded, not zero.
  pipe.conditioner().empty_negative_is_none = false;
  const PromptEmbeddings text = pipe.encode_prompts(prompts, {"", ""}, 0, true);
  pipe.conditioner().empty_negative_is_none = true;
  EXPECT_GT(text.uncond.context[0].abs().max().item<float>(), 0.0f);
  EXPECT_GT(text.uncond.pooled[0].abs().max().item<float>(), 0.0f);
  // Clip skip changes the context, never the pooled embedding, and not the negatives.
  const PromptEmbeddings skipped = pipe.encode_prompts(prompts, {"", "blurry"}, 1, true);
  EXPECT_FALSE(at::allclose(skipped.cond.context, e.cond.context));
  EXPECT_TRUE(at::equal(skipped.cond.pooled, e.cond.pooled));
  EXPECT_TRUE(at::equal(skipped.uncond.context, e.uncond.context));
  // Size conditioning: the reference's order, identical rows for both halves.
  pipe.condition_on_size(e, {40, 60, 4, 8, 16, 24});
  const at::Tensor expected = at::tensor(std::vector<float>{40, 60, 4, 8, 16, 24}).unsqueeze(0).repeat({2, 1});
  EXPECT_TRUE(at::equal(e.cond.time_ids, expected));
  EXPECT_TRUE(at::equal(e.uncond.time_ids, expected));
}

// The UNet refuses to run an SDXL model without its added conditioning, and an SD 1.x UNet
// refuses pooled embeddings: nothing is silently dropped.
TEST(SdxlConditioner, UNetRefusesMissingOrExtraAddedConditioning) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode inference;
  StableDiffusionModel& model = tiny_sdxl(fixtures);
  const at::Tensor x = at::randn({1, 4, 8, 8}), ctx = at::randn({1, 77, 64});
  EXPECT_THROW(model.unet->forward(x, at::scalar_tensor(10), ctx), c10::Error);
  Conditioning c(ctx);
  c.pooled = at::randn({1, 32});
  EXPECT_THROW(model.unet->forward(x, at::scalar_tensor(10), c), c10::Error);  // no time ids
  c.time_ids = at::tensor(std::vector<float>{16, 16, 0, 0, 16, 16}).unsqueeze(0);
  EXPECT_EQ(model.unet->forward(x, at::scalar_tensor(10), c).sizes(), x.sizes());
}

// ---------------------------------------------------------------------------------------
// Fair guidance on SDXL. The check, stated precisely: with one edit concept P at scale s,
// threshold 0 (nothing cut), no warm-up and no momentum, semantic guidance adds
// s (eps(P) - eps_u); so CFG on prompt P at scale g plus that edit must equal CFG on P at
// scale g + s, step by step, provided the edit row carries P's context AND pooled embedding
// AND the image's time ids. Non-default size conditioning makes a wrong time id visible,
// and the same run with the edit row's pooled embedding zeroed must fail the identity.

at::Tensor run_edit(StableDiffusionModel& model, double g, double s, bool zero_pooled) {
  StableDiffusionPipeline pipe(model);
  const std::string P = "a photo of the face of a female firefighter";
  PromptEmbeddings emb = pipe.encode_prompts({P, P}, {"blurry", "blurry"}, 0, true);
  pipe.condition_on_size(emb, {40, 60, 4, 8, 16, 16});
  std::unique_ptr<SemanticGuidance> sega;
  if (s > 0) {
    Conditioning table = encode_edit_prompts(model, {P});
    if (zero_pooled) table.pooled.zero_();
    EditConcept c;
    c.embedding = 0;
    c.guidance_scale = s;
    c.warmup_steps = 0;
    c.threshold = 0.0;
    SemanticGuidanceSettings settings;
    settings.momentum_scale = 0.0;
    settings.images = {{c}, {c}};
    sega = std::make_unique<SemanticGuidance>(table, settings);
  }
  auto scheduler = make_scheduler(model.scheduler_config, "", "scheduler_config.json");
  scheduler->set_timesteps(4);
  std::vector<at::Generator> gens;
  const at::Tensor noise = pipe.initial_noise({7, 8}, 16, 16, &gens);
  return pipe.denoise(*scheduler, noise, emb, g, &gens, nullptr, sega.get());
}

TEST(SdxlFairGuidance, EditRowMovesTheImageAsTheSameConceptInCfg) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode inference;
  StableDiffusionModel& model = tiny_sdxl(fixtures);
  const at::Tensor cfg_only = run_edit(model, 7.0, 0.0, false);
  const at::Tensor cfg_more = run_edit(model, 9.0, 0.0, false);
  const at::Tensor edited = run_edit(model, 7.0, 2.0, false);
  const at::Tensor broken = run_edit(model, 7.0, 2.0, true);
  const double scale = cfg_more.abs().max().item<double>();
  const double err = (edited - cfg_more).abs().max().item<double>();
  const double moved = (cfg_more - cfg_only).abs().max().item<double>();
  const double broken_err = (broken - cfg_more).abs().max().item<double>();
  std::printf("latents ~%.3g: edit moved them by %.3g; edit vs CFG g+s %.3g; with the pooled embedding dropped %.3g\n",
              scale, moved, err, broken_err);
  EXPECT_GT(moved, 1e-2 * scale);        // the edit is not a no-op
  EXPECT_LT(err, 1e-5 * scale);          // the identity, to float rounding
  EXPECT_GT(broken_err, 100 * err + 1e-6 * scale);  // the check can fail
}

// ---------------------------------------------------------------------------------------
// generate on tiny-sdxl: what SD 1.x gets.

GenerateOptions tiny(const std::string& fixtures, const std::string& out) {
  static const bool configured = (configure_process(1), true);
  (void)configured;
  GenerateOptions o;
  o.model = fixtures + "/models/tiny-sdxl";
  o.prompt = "a photo of the face of a firefighter";
  o.images_per_prompt = 3;
  o.steps = 3;
  o.cfg_scale = 5.0;
  o.seed = 99;
  o.out_dir = out;
  o.device = "cpu";
  o.quiet = true;
  return o;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::map<std::string, std::string> pngs(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".png") files[e.path().filename().string()] = slurp(e.path().string());
  return files;
}

TEST(SdxlGenerate, EverySamplerRunsAndIsRecorded) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  std::set<std::string> distinct;
  for (const std::string method : {"", "pndm", "ddim", "euler", "euler_a", "dpm++2m", "lms"}) {
    GenerateOptions o = tiny(fixtures, tmp / ("s-" + (method.empty() ? std::string("default") : method)));
    o.images_per_prompt = 1;
    o.sampling_method = method;
    EXPECT_EQ(generate(o).generated, 1) << method;
    const auto manifest = read_manifest(o.out_dir + "/manifest.jsonl");
    ASSERT_EQ(manifest.size(), 1u);
    const auto& r = manifest.begin()->second;
    if (method.empty()) EXPECT_EQ(r["scheduler"], "EulerDiscreteScheduler") << r.dump();
    EXPECT_EQ(r["original_size"], nlohmann::json::array({16, 16}));
    EXPECT_EQ(r["crops_coords_top_left"], nlohmann::json::array({0, 0}));
    EXPECT_EQ(r["target_size"], nlohmann::json::array({16, 16}));
    distinct.insert(pngs(o.out_dir).begin()->second);
  }
  EXPECT_GE(distinct.size(), 5u);  // the samplers do differ
}

// No negative prompt is zeros (negative_prompt=None); -n "" given explicitly is the empty
// text encoded (negative_prompt=""): a different unconditional row, so other pixels.
TEST(SdxlGenerate, AnExplicitEmptyNegativeIsEncodedNotZeroed) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions none = tiny(fixtures, tmp / "none");
  none.images_per_prompt = 1;
  GenerateOptions empty = none;
  empty.out_dir = tmp / "empty";
  empty.encode_empty_negative = true;
  generate(none);
  generate(empty);
  EXPECT_NE(pngs(tmp / "none").begin()->second, pngs(tmp / "empty").begin()->second);
}

TEST(SdxlGenerate, MetadataShardsResumeAndSizeConditioning) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions full = tiny(fixtures, tmp / "full");
  EXPECT_EQ(generate(full).generated, 3);
  const auto texts = read_png_text(tmp / "full/00000-99.png");
  ASSERT_EQ(texts.size(), 2u);
  const Infotext info = parse_infotext(texts[0].text);
  std::map<std::string, std::string> p(info.params.begin(), info.params.end());
  EXPECT_EQ(p["Model"], "tiny-sdxl");
  EXPECT_EQ(p["Sampler"], "Euler");
  EXPECT_EQ(p["Size"], "16x16");
  // Shards: the union is the full run, byte for byte.
  for (int64_t k = 0; k < 2; ++k) {
    GenerateOptions s = tiny(fixtures, tmp / "sharded");
    s.shard_index = k;
    s.num_shards = 2;
    s.batch_size = 1;
    generate(s);
  }
  EXPECT_EQ(merge_manifests(tmp / "sharded"), 3);
  EXPECT_EQ(pngs(tmp / "full"), pngs(tmp / "sharded"));
  // Resume: a lost image is made again, identical.
  const auto before = pngs(tmp / "full");
  fs::remove(tmp / "full/00001-100.png");
  const RunSummary again = generate(full);
  EXPECT_EQ(again.generated, 1);
  EXPECT_EQ(pngs(tmp / "full"), before);
  // Size conditioning changes the image and is recorded.
  GenerateOptions sized = tiny(fixtures, tmp / "sized");
  sized.original_size = "60x40";
  sized.crop_top_left = "4,8";
  sized.target_size = "24x16";
  generate(sized);
  const auto r = read_manifest(tmp / "sized/manifest.jsonl").at(0);
  EXPECT_EQ(r["original_size"], nlohmann::json::array({40, 60}));
  EXPECT_EQ(r["crops_coords_top_left"], nlohmann::json::array({4, 8}));
  EXPECT_EQ(r["target_size"], nlohmann::json::array({16, 24}));
  EXPECT_NE(pngs(tmp / "sized").at("00000-99.png"), before.at("00000-99.png"));
}

TEST(SdxlGenerate, FairnessSteersOnSdxl) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  std::ofstream(tmp / "fair.json") << R"({"attributes": [{"name": "gender", "targets": {"female": 50, "male": 50},
      "edit_warmup_steps": 1}]})";
  GenerateOptions plain = tiny(fixtures, tmp / "plain");
  plain.images_per_prompt = 2;
  GenerateOptions fair = plain;
  fair.out_dir = tmp / "fair";
  fair.fairness_file = tmp / "fair.json";
  EXPECT_EQ(generate(plain).generated, 2);
  EXPECT_EQ(generate(fair).generated, 2);
  std::set<std::string> groups;
  for (const auto& [index, line] : read_manifest(tmp / "fair/manifest.jsonl")) {
    ASSERT_TRUE(line.contains("fairness")) << line.dump();
    groups.insert(line["fairness"]["groups"]["gender"].get<std::string>());
  }
  EXPECT_EQ(groups, (std::set<std::string>{"female", "male"}));
  const auto a = pngs(tmp / "plain"), b = pngs(tmp / "fair");
  for (const auto& [name, png] : a) EXPECT_NE(png, b.at(name)) << name << " was not edited";
  // Shards and resume with fairness: the union equals the run.
  for (int64_t k = 0; k < 2; ++k) {
    GenerateOptions s = fair;
    s.out_dir = tmp / "fair-sharded";
    s.shard_index = k;
    s.num_shards = 2;
    s.batch_size = 1;
    generate(s);
  }
  EXPECT_EQ(merge_manifests(tmp / "fair-sharded"), 2);
  EXPECT_EQ(pngs(tmp / "fair-sharded"), b);
}

TEST(SdxlGenerate, RefusalsByName) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions sd1 = tiny(fixtures, tmp / "sd1");
  sd1.model = fixtures + "/models/tiny-sd1";
  sd1.original_size = "1024x1024";
  test::expect_error([&] { generate(sd1); }, ErrorKind::BadInput, {"--original-size", "SDXL"});
  EXPECT_FALSE(fs::exists(tmp / "sd1/manifest.jsonl"));
  GenerateOptions bad = tiny(fixtures, tmp / "bad");
  bad.crop_top_left = "4;8";
  test::expect_error([&] { generate(bad); }, ErrorKind::BadInput, {"--crop-top-left", "TOP,LEFT"});
  EXPECT_FALSE(fs::exists(tmp / "bad/manifest.jsonl"));
}

}  // namespace
}  // namespace fairdiff
