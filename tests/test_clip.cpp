// CLIPModel folders, the CLIP zero-shot classifier and generate --verify (the golden
// numbers of CLIPModel are the clip/ parity cases; these tests are about behaviour).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "clip_folder.h"
#include "fairdiff/audit.h"
#include "fairdiff/generate.h"
#include "run_plan.h"
#include "safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

// A copy of tiny-clip whose weights file holds the original tensors, less `drop`, plus `extra`.
std::string clip_copy(const std::string& fixtures, const test::TempDir& tmp, const std::string& drop = "",
                      std::vector<TensorData> extra = {}) {
  const std::string dir = tmp / "clip";
  fs::copy(fixtures + "/models/tiny-clip", dir, fs::copy_options::recursive);
  std::vector<TensorData> tensors = std::move(extra);
  {
    const SafeTensors st(fixtures + "/models/tiny-clip/model.safetensors");
    for (const TensorView& t : st.tensors())
      if (t.name != drop) tensors.push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes)});
  }
  write_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  return dir;
}

TEST(ClipFolder, LoadsStrictlyAndSkipsTheLegacyPositionIds) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  // transformers < 4.31 saved embeddings.position_ids; the real OpenAI and SD 1.x files carry it.
  std::vector<uint8_t> ids(77 * 8, 0);
  const std::string dir = clip_copy(fixtures, tmp, "", {{"text_model.embeddings.position_ids", DType::I64, {1, 77}, ids}});
  const CLIPFolder clip = load_clip_folder(dir, {});
  EXPECT_EQ(clip.model->config().projection_dim, 16);
  EXPECT_EQ(clip.model->config().text_config.eos_token_id, 49407);  // CLIPTextConfig's default
  EXPECT_EQ(clip.processor.shortest_edge, 32);

  test::TempDir tmp2;
  const std::string missing = clip_copy(fixtures, tmp2, "visual_projection.weight");
  test::expect_error([&] { load_clip_folder(missing, {}); }, ErrorKind::BadInput,
                     {"model.safetensors", "1 CLIP model tensors are missing", "visual_projection.weight"});
  test::TempDir tmp3;
  std::vector<uint8_t> four(16, 0);
  const std::string unexpected = clip_copy(fixtures, tmp3, "", {{"vision_model.extra", DType::F32, {4}, four}});
  test::expect_error([&] { load_clip_folder(unexpected, {}); }, ErrorKind::BadInput,
                     {"not part of the CLIP model", "vision_model.extra"});
}

TEST(ClipFolder, UnsupportedConfigsAndMissingFilesAreRefusedByName) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  const std::string dir = clip_copy(fixtures, tmp);
  fs::remove(dir + "/preprocessor_config.json");
  test::expect_error([&] { load_clip_folder(dir, {}); }, ErrorKind::BadInput, {"has no preprocessor_config.json"});
  fs::copy_file(fixtures + "/models/tiny-clip/preprocessor_config.json", dir + "/preprocessor_config.json");
  std::ifstream in(dir + "/config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  config["vision_config"]["image_size"] = 30;  // not a multiple of the patch
  std::ofstream(dir + "/config.json") << config.dump();
  test::expect_error([&] { load_clip_folder(dir, {}); }, ErrorKind::Unsupported,
                     {"config.json", "vision_config.image_size", "multiple of patch_size 8"});
  config["vision_config"]["image_size"] = 32;
  config["model_type"] = "siglip";
  std::ofstream(dir + "/config.json") << config.dump();
  test::expect_error([&] { load_clip_folder(dir, {}); }, ErrorKind::Unsupported, {"model_type", "\"clip\""});
}

TEST(ClipClassifier, RegisteredBatchedAndMarginLeavesImagesUnclassified) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  register_clip_classifier();
  ClassifierOptions o;
  o.attribute = "gender";
  o.model = fixtures + "/models/tiny-clip";
  const auto clip = make_classifier("clip", o);
  EXPECT_EQ(clip->groups(), (std::vector<std::string>{"female", "male"}));
  std::vector<RgbImage> images;
  for (int i = 0; i < 5; ++i) {
    RgbImage image{20 + 3 * i, 16 + 5 * i, {}};
    for (int k = 0; k < image.width * image.height * 3; ++k) image.rgb.push_back(static_cast<uint8_t>((k * (7 + i)) % 256));
    images.push_back(image);
  }
  std::vector<const RgbImage*> batch;
  for (const auto& image : images) batch.push_back(&image);
  const std::vector<int> together = clip->classify_batch(batch);
  for (size_t i = 0; i < images.size(); ++i) {
    EXPECT_EQ(together[i], clip->classify(images[i].rgb.data(), images[i].width, images[i].height));
    const std::vector<double> p = clip->probabilities(images[i].rgb.data(), images[i].width, images[i].height);
    ASSERT_EQ(p.size(), 2u);
    EXPECT_NEAR(p[0] + p[1], 1.0, 1e-6);  // a float32 softmax
    EXPECT_EQ(together[i], p[0] >= p[1] ? 0 : 1);
    const GroupClassifier::Judgement j = clip->judge(images[i].rgb.data(), images[i].width, images[i].height);
    EXPECT_EQ(j.group, together[i]);
    EXPECT_EQ(j.probabilities, p);
  }
  o.margin = 1.0;  // nothing is that sure
  const auto strict = make_classifier("clip", o);
  for (const auto& image : images) EXPECT_EQ(strict->classify(image.rgb.data(), image.width, image.height), -1);

  o.margin = 0;
  o.model.clear();
  test::expect_error([&] { make_classifier("clip", o); }, ErrorKind::BadInput, {"needs a CLIP model", "--clip-model"});
  test::TempDir attrs;
  std::ofstream(attrs / "plain.json") << R"({"groups": [{"name": "a", "edit_prompts": ["x"]}, {"name": "b", "edit_prompts": ["y"]}]})";
  o.model = fixtures + "/models/tiny-clip";
  o.attribute = "plain";
  o.attributes_dir = attrs.path.string();
  test::expect_error([&] { make_classifier("clip", o); }, ErrorKind::BadInput,
                     {"attribute \"plain\" has no classifier_prompts", "plain.json"});
}

// --- generate --verify on tiny-sd1, judged by the random tiny-clip: the judgements are
// arbitrary but deterministic, which is what these mechanics need.

GenerateOptions verified_run(const std::string& fixtures, const std::string& out, const std::string& fair_file) {
  static const bool configured = (configure_process(1), true);
  (void)configured;
  std::ofstream(fair_file) << R"({"attributes": [{"name": "gender", "targets": {"female": 50, "male": 50},
      "edit_warmup_steps": 1}]})";
  GenerateOptions o;
  o.model = fixtures + "/models/tiny-sd1";
  o.prompt = "a photo of the face of a firefighter";
  o.images_per_prompt = 6;
  o.steps = 3;
  o.seed = 77;
  o.out_dir = out;
  o.device = "cpu";
  o.quiet = true;
  o.fairness_file = fair_file;
  o.verify = true;
  o.clip_model = fixtures + "/models/tiny-clip";
  o.max_retries = 2;
  return o;
}

// The PNG files' bytes, and the manifest's records less what depends on the machine and
// the shard (seconds, shard), by file name.
std::map<std::string, std::string> files_of(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".png") {
      std::ifstream in(e.path(), std::ios::binary);
      out[e.path().filename().string()] = std::string(std::istreambuf_iterator<char>(in), {});
    }
  for (auto [index, r] : read_manifest(dir + "/manifest.jsonl")) {
    r.erase("seconds");
    r.erase("shard");
    out["record " + std::to_string(index)] = r.dump();
  }
  return out;
}

TEST(Verify, RetriesOnlyMissesRecordsEveryTryAndIsDeterministic) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions a = verified_run(fixtures, tmp / "a", tmp / "fair.json");
  const RunSummary sa = generate(a);
  EXPECT_EQ(sa.verified + sa.unverified, 6);
  EXPECT_GT(sa.retries, 0) << "the test needs at least one miss";

  int64_t retries = 0;
  for (const auto& [index, r] : read_manifest(tmp / "a/manifest.jsonl")) {
    const nlohmann::json& v = r.at("verify");
    const auto tries = v.at("tries");
    EXPECT_EQ(v.at("attempts"), tries.size());
    EXPECT_EQ(v.at("planned_seed"), 77 + index);
    EXPECT_EQ(v.at("settings").at("classifier"), "clip");
    retries += static_cast<int64_t>(tries.size()) - 1;
    const std::string assigned = r.at("fairness").at("groups").at("gender");
    const int64_t kept = v.at("kept");
    for (size_t k = 0; k < tries.size(); ++k) {
      // Only a miss is retried; the kept try is the first that saw the assigned group.
      const bool hit = tries[k].at("seen").at("gender") == assigned;
      EXPECT_EQ(hit, v.at("verified").get<bool>() && static_cast<int64_t>(k) == kept) << r.dump();
      EXPECT_EQ(tries[k].at("edit_scale"), std::pow(2.0, static_cast<double>(k)));
    }
    // The image and its record are the kept try's: its seed, its edit scale.
    EXPECT_EQ(r.at("seed"), tries[static_cast<size_t>(kept)].at("seed"));
    EXPECT_EQ(r.at("fairness").at("edits").at(0).at("guidance_scale"), 4.0 * std::pow(2.0, static_cast<double>(kept)));
    if (!v.at("verified").get<bool>()) EXPECT_EQ(tries.size(), 3u);
  }
  EXPECT_EQ(retries, sa.retries);

  // The same bytes with another batch size, in two shards, and resumed after a partial run.
  GenerateOptions b = verified_run(fixtures, tmp / "b", tmp / "fair.json");
  b.batch_size = 4;
  generate(b);
  EXPECT_EQ(files_of(tmp / "a"), files_of(tmp / "b"));

  for (int64_t shard = 0; shard < 2; ++shard) {
    GenerateOptions c = verified_run(fixtures, tmp / "c", tmp / "fair.json");
    c.shard_index = shard;
    c.num_shards = 2;
    generate(c);
  }
  merge_manifests(tmp / "c");
  EXPECT_EQ(files_of(tmp / "a"), files_of(tmp / "c"));

  GenerateOptions d = verified_run(fixtures, tmp / "d", tmp / "fair.json");
  d.images_per_prompt = 6;
  d.shard_index = 0;
  d.num_shards = 1;
  generate(d);
  fs::remove(tmp / "d/00005-82.png");  // as if killed before the last image
  std::ifstream in(tmp / "d/manifest.jsonl");
  std::string line, kept;
  for (int i = 0; i < 5 && std::getline(in, line); ++i) kept += line + "\n";
  in.close();
  std::ofstream(tmp / "d/manifest.jsonl") << kept;
  const RunSummary sd = generate(d);
  EXPECT_EQ(sd.generated, 1);
  EXPECT_EQ(files_of(tmp / "a"), files_of(tmp / "d"));

  // Other verify settings on a folder made with these: another run, refused.
  GenerateOptions e = verified_run(fixtures, tmp / "a", tmp / "fair.json");
  e.max_retries = 1;
  test::expect_error([&] { generate(e); }, ErrorKind::BadInput, {"--verify settings", "another run"});
}

TEST(Verify, AuditCountsUnverifiedImagesApart) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions o = verified_run(fixtures, tmp / "run", tmp / "fair.json");
  o.max_retries = 0;  // every miss stays a miss
  const RunSummary s = generate(o);
  EXPECT_EQ(s.retries, 0);
  AuditOptions a;
  a.dir = tmp / "run";
  a.classifier = "clip";
  a.classifier_options.model = fixtures + "/models/tiny-clip";
  const AuditReport r = audit(a);
  EXPECT_EQ(r.verified, s.verified);
  EXPECT_EQ(r.unverified, s.unverified);
  // The same classifier judges as the verifier did: its hits are the verified images.
  EXPECT_EQ(r.assigned_hits, s.verified);
  EXPECT_NE(audit_text(r).find(std::to_string(s.unverified) + " unverified"), std::string::npos) << audit_text(r);
  EXPECT_EQ(nlohmann::json::parse(audit_json(r))["overall"]["unverified"], s.unverified);
}

TEST(Verify, BadSettingsAreRefusedBeforeAnythingIsWritten) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions o = verified_run(fixtures, tmp / "out", tmp / "fair.json");
  o.max_retries = -1;
  test::expect_error([&] { generate(o); }, ErrorKind::BadInput, {"--max-retries", "-1"});
  o.max_retries = 2;
  o.clip_model.clear();
  test::expect_error([&] { generate(o); }, ErrorKind::BadInput, {"--verify", "--clip-model"});
  o.clip_model = fixtures + "/models/tiny-clip";
  o.fairness_file.clear();
  test::expect_error([&] { generate(o); }, ErrorKind::BadInput, {"--verify", "without a fairness instruction"});
  o.fairness_file = tmp / "fair.json";
  o.verify_classifier = "hue";  // tells colour only
  test::expect_error([&] { generate(o); }, ErrorKind::BadInput, {"hue classifier cannot tell", "colour"});
  EXPECT_FALSE(fs::exists(tmp / "out"));
}

}  // namespace
}  // namespace fairdiff
