// `fairdiff generate` end to end on the tiny fixture model: determinism across
// batch sizes, shards, resume, and the PNG metadata A1111 readers see.
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "fairdiff/generate.h"
#include "run_plan.h"
#include "fs_util.h"
#include "infotext.h"
#include "png_io.h"
#include "test_util.h"

#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC
#include <stb/stb_image.h>

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

GenerateOptions tiny(const std::string& fixtures, const std::string& out) {
  // Once per test process: 16x16 tensors gain nothing from more threads, and on a busy
  // machine idle workers spin (runtime.h).
  static const bool configured = (configure_process(1), true);
  (void)configured;
  GenerateOptions o;
  o.model = fixtures + "/models/tiny-sd1";
  o.prompt = "a photo of the face of a firefighter";
  o.negative_prompt = "blurry, low quality";
  o.images_per_prompt = 5;
  o.steps = 4;
  o.seed = 1234;
  o.out_dir = out;
  o.device = "cpu";
  o.quiet = true;
  return o;
}

std::map<std::string, std::string> pngs(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".png") files[e.path().filename().string()] = slurp(e.path().string());
  return files;
}

// Decoded RGB pixels of a PNG held in memory.
std::vector<uint8_t> pixels(const std::string& png) {
  int w = 0, h = 0, n = 0;
  uint8_t* data = stbi_load_from_memory(reinterpret_cast<const uint8_t*>(png.data()), static_cast<int>(png.size()),
                                        &w, &h, &n, 3);
  std::vector<uint8_t> out(data, data + (data ? w * h * 3 : 0));
  stbi_image_free(data);
  return out;
}

// A batched convolution can round differently from the same image alone (LibTorch
// picks its algorithm by shape), so when generating every convolution runs one image
// at a time (leaf::Conv2d): an image's bytes do not depend on the batch it was in.
TEST(Generate, SameSeedGivesIdenticalBytesWithBatchSize1And4) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions a = tiny(fixtures, tmp / "b1");
  a.batch_size = 1;
  GenerateOptions b = tiny(fixtures, tmp / "b4");
  b.batch_size = 4;
  EXPECT_EQ(generate(a).generated, 5);
  EXPECT_EQ(generate(b).generated, 5);
  const auto one = pngs(tmp / "b1"), four = pngs(tmp / "b4");
  ASSERT_EQ(one.size(), 5u);
  ASSERT_EQ(four.size(), 5u);
  // The whole files: pixels and metadata (which records nothing that varies between runs).
  for (const auto& [name, png] : one) EXPECT_TRUE(png == four.at(name)) << name << " differs between batch sizes";
  EXPECT_TRUE(one.count("00003-1237.png"));  // image i has seed S + i
  // Any single image regenerates alone from its seed.
  GenerateOptions single = tiny(fixtures, tmp / "single");
  single.images_per_prompt = 1;
  single.seed = 1237;
  generate(single);
  // (Alone, the image has the same pixels; the file names its own index.)
  EXPECT_EQ(pixels(pngs(tmp / "single").at("00000-1237.png")), pixels(one.at("00003-1237.png")));
}

// --vae-tiling: an image larger than the tile is decoded in tiles, and the record says so.
TEST(Generate, VaeTilingIsRecordedAndDecodesInTiles) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions plain = tiny(fixtures, tmp / "plain");
  plain.images_per_prompt = 1;
  plain.width = plain.height = 48;  // 24x24 latents; the tiny VAE's own tile is 16 / 2 = 8
  GenerateOptions tiled = plain;
  tiled.out_dir = tmp / "tiled";
  tiled.vae_tile = -1;
  generate(plain);
  generate(tiled);
  const auto a = read_manifest(tmp / "plain/manifest.jsonl"), b = read_manifest(tmp / "tiled/manifest.jsonl");
  EXPECT_FALSE(a.at(0).contains("vae_tile"));
  EXPECT_EQ(b.at(0).value("vae_tile", 0), 16);
  const auto pa = pixels(pngs(tmp / "plain").begin()->second), pb = pixels(pngs(tmp / "tiled").begin()->second);
  ASSERT_EQ(pa.size(), 48u * 48u * 3u);
  ASSERT_EQ(pb.size(), pa.size());
  EXPECT_NE(pa, pb);
}

// --prepack-weights: the same images to float rounding (tiny shapes take another oneDNN path).
TEST(Generate, PrepackedWeightsGiveTheSameImages) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions plain = tiny(fixtures, tmp / "plain");
  plain.images_per_prompt = 2;
  GenerateOptions packed = plain;
  packed.out_dir = tmp / "packed";
  packed.prepack_weights = true;
  generate(plain);
  generate(packed);
  const auto a = pngs(tmp / "plain"), b = pngs(tmp / "packed");
  ASSERT_EQ(a.size(), 2u);
  for (const auto& [name, png] : a) {
    const auto pa = pixels(png), pb = pixels(b.at(name));
    ASSERT_EQ(pa.size(), pb.size());
    int worst = 0;
    for (size_t i = 0; i < pa.size(); ++i) worst = std::max(worst, std::abs(int(pa[i]) - int(pb[i])));
    EXPECT_LE(worst, 1) << name << ": a pixel value differs by " << worst << " levels";
  }
}

// --fp16-weights: recorded, float32 arithmetic, and the images near the float32 ones (the
// weights' rounding to float16 only: README "Performance" measures it on the toy model).
TEST(Generate, Fp16WeightsAreRecordedAndCloseToFloat32) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions plain = tiny(fixtures, tmp / "plain");
  plain.dtype = "fp32";
  GenerateOptions half = plain;
  half.out_dir = tmp / "half";
  half.dtype = "auto";  // resolves to fp32 with --fp16-weights, on any CPU
  half.fp16_weights = true;
  generate(plain);
  generate(half);
  const auto ma = read_manifest(tmp / "plain/manifest.jsonl"), mb = read_manifest(tmp / "half/manifest.jsonl");
  EXPECT_FALSE(ma.at(0).contains("weight_dtype"));
  EXPECT_EQ(mb.at(0).value("weight_dtype", ""), "fp16");
  EXPECT_EQ(mb.at(0).value("dtype", ""), "fp32");
  const auto pa = pixels(pngs(tmp / "plain").begin()->second), pb = pixels(pngs(tmp / "half").begin()->second);
  ASSERT_EQ(pa.size(), pb.size());
  double sum = 0;
  for (size_t i = 0; i < pa.size(); ++i) sum += std::abs(int(pa[i]) - int(pb[i]));
  EXPECT_LT(sum / static_cast<double>(pa.size()), 1.0) << "mean difference in levels of 255";
  GenerateOptions bad = half;
  bad.dtype = "bf16";
  bad.out_dir = tmp / "never";
  EXPECT_THROW(generate(bad), Error);
  EXPECT_FALSE(std::filesystem::exists(tmp / "never"));
}

TEST(Generate, ShardsUnionEqualsTheFullRun) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions full = tiny(fixtures, tmp / "full");
  generate(full);
  for (int64_t k = 0; k < 3; ++k) {
    GenerateOptions s = tiny(fixtures, tmp / "sharded");
    s.shard_index = k;
    s.num_shards = 3;
    s.batch_size = 1;  // the same batch composition as the full run: bytes must be identical
    generate(s);
  }
  EXPECT_EQ(merge_manifests(tmp / "sharded"), 5);
  EXPECT_EQ(pngs(tmp / "full"), pngs(tmp / "sharded"));
  const auto full_manifest = read_manifest(tmp / "full/manifest.jsonl");
  const auto merged = read_manifest(tmp / "sharded/manifest.jsonl");
  ASSERT_EQ(merged.size(), full_manifest.size());
  for (const auto& [index, entry] : full_manifest) EXPECT_EQ(merged.at(index)["file"], entry["file"]);
}

TEST(Generate, ResumeRegeneratesOnlyWhatIsMissing) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions o = tiny(fixtures, tmp / "run");
  generate(o);
  const auto before = pngs(tmp / "run");
  // A crash: image 4's PNG half written under its temporary name, image 3's
  // PNG truncated, the manifest's last line torn.
  const std::string dir = tmp / "run";
  fs::remove(dir + "/00004-1238.png");
  // The temporary of this shard's image 4 (NAME.tmp.0-of-1.PID), its process gone: the pid
  // is ours here, which counts as gone (nothing of ours is in flight when a run starts).
  const std::string stale = temporary_path(dir + "/00004-1238.png", "0-of-1");
  std::ofstream(stale, std::ios::binary) << "\x89PNG";
  const std::string cut = before.at("00003-1237.png").substr(0, 50);
  std::ofstream(dir + "/00003-1237.png", std::ios::binary | std::ios::trunc) << cut;
  std::string manifest = slurp(dir + "/manifest.jsonl");
  manifest.resize(manifest.size() - 20);
  std::ofstream(dir + "/manifest.jsonl", std::ios::trunc) << manifest;

  const RunSummary s = generate(o);
  EXPECT_EQ(s.planned, 5);
  EXPECT_EQ(s.skipped, 3);
  EXPECT_EQ(s.generated, 2);
  EXPECT_EQ(pngs(dir), before);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_EQ(read_manifest(dir + "/manifest.jsonl").size(), 5u);
  // Nothing left to do: a third run generates nothing.
  EXPECT_EQ(generate(o).generated, 0);
}

TEST(Generate, MetadataParsesAsA1111Parameters) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions o = tiny(fixtures, tmp / "meta");
  o.images_per_prompt = 1;
  o.sampling_method = "dpm++2m";
  o.scheduler = "karras";
  o.clip_skip = 1;
  o.cfg_scale = 7.0;
  generate(o);
  const auto texts = read_png_text(tmp / "meta/00000-1234.png");
  ASSERT_EQ(texts.size(), 2u);
  EXPECT_EQ(texts[0].keyword, "parameters");
  const Infotext info = parse_infotext(texts[0].text);
  EXPECT_EQ(info.prompt, o.prompt);
  EXPECT_EQ(info.negative_prompt, o.negative_prompt);
  std::map<std::string, std::string> p(info.params.begin(), info.params.end());
  EXPECT_EQ(p["Steps"], "4");
  EXPECT_EQ(p["Sampler"], "DPM++ 2M");
  EXPECT_EQ(p["Schedule type"], "Karras");
  EXPECT_EQ(p["CFG scale"], "7.0");
  EXPECT_EQ(p["Seed"], "1234");
  EXPECT_EQ(p["Size"], "16x16");
  EXPECT_EQ(p["Model"], "tiny-sd1");
  EXPECT_EQ(p["Clip skip"], "2");
  EXPECT_EQ(p["Model hash"].size(), 10u);
  const auto record = nlohmann::json::parse(texts[1].text);
  EXPECT_EQ(record["seed"], 1234);
  EXPECT_EQ(record["scheduler"], "DPMSolverMultistepScheduler");
  const auto manifest = read_manifest(tmp / "meta/manifest.jsonl");
  ASSERT_EQ(manifest.size(), 1u);
  EXPECT_EQ(manifest.at(0)["file"], "00000-1234.png");
  EXPECT_TRUE(manifest.at(0).contains("seconds"));
}

TEST(Generate, PromptsFileWithOverrides) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  std::ofstream(tmp / "prompts.txt") << "a red kite\n\n{\"prompt\": \"a boat\", \"count\": 2, \"seed\": 7, \"steps\": 3}\n";
  GenerateOptions o = tiny(fixtures, tmp / "out");
  o.prompt.clear();
  o.prompts_file = tmp / "prompts.txt";
  o.images_per_prompt = 2;
  const RunPlan plan = plan_run(o, 16, 16);
  ASSERT_EQ(plan.images.size(), 4u);
  EXPECT_EQ(plan.images[1].seed, 1235);
  EXPECT_EQ(plan.images[2].prompt, "a boat");
  EXPECT_EQ(plan.images[2].seed, 7);
  EXPECT_EQ(plan.images[3].seed, 8);
  EXPECT_EQ(plan.images[3].steps, 3);
  EXPECT_EQ(generate(o).generated, 4);

  std::ofstream(tmp / "bad.jsonl") << "ok prompt\n{\"prompt\": \"x\", \"colour\": 1}\n";
  o.prompts_file = tmp / "bad.jsonl";
  test::expect_error([&] { validate(o); }, ErrorKind::BadInput, {"bad.jsonl:2", "unknown key \"colour\""});
}

// gender=50:50 with the edits acting from step 1 (the tiny runs have 4 steps; the library's
// warm-up is 5).
void write_gender_50_50_warmup_1(const std::string& path) {
  std::ofstream(path) << R"({"attributes": [{"name": "gender", "targets": {"female": 50, "male": 50},
      "edit_warmup_steps": 1}]})";
}

// Fair Diffusion end to end: gender=50:50 over 2 images gives one of each group, recorded
// in the manifest, the PNG record and the A1111 parameters, and the edit changes the image.
// The tiny run has 4 steps, so the library's 5-step warm-up is overridden to 1.
TEST(Generate, FairnessSteersEachImageTowardItsGroup) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  write_gender_50_50_warmup_1(tmp / "fair.json");
  GenerateOptions plain = tiny(fixtures, tmp / "plain");
  plain.images_per_prompt = 2;
  GenerateOptions fair = tiny(fixtures, tmp / "fair");
  fair.images_per_prompt = 2;
  fair.fairness_file = tmp / "fair.json";
  EXPECT_EQ(generate(plain).generated, 2);
  EXPECT_EQ(generate(fair).generated, 2);

  const auto manifest = read_manifest(tmp / "fair/manifest.jsonl");
  ASSERT_EQ(manifest.size(), 2u);
  std::set<std::string> groups;
  for (const auto& [index, line] : manifest) {
    ASSERT_TRUE(line.contains("fairness")) << line.dump();
    const auto& f = line["fairness"];
    const std::string group = f["groups"]["gender"];
    groups.insert(group);
    ASSERT_EQ(f["edits"].size(), 2u);
    for (const auto& e : f["edits"]) {
      EXPECT_EQ(e["reverse"].get<bool>(), e["group"] != group) << e.dump();  // toward the group, away from the other
      EXPECT_EQ(e["prompt"], e["group"] == "female" ? "female person" : "male person");
      EXPECT_EQ(e["warmup_steps"], 1);
      EXPECT_EQ(e["guidance_scale"], 4.0);
    }
    EXPECT_EQ(f["momentum_beta"], 0.6);
    const auto texts = read_png_text(tmp / ("fair/" + line["file"].get<std::string>()));
    ASSERT_EQ(texts.size(), 2u);
    const Infotext info = parse_infotext(texts[0].text);
    std::map<std::string, std::string> p(info.params.begin(), info.params.end());
    EXPECT_EQ(p["Fairness"], "gender=" + group);
    EXPECT_EQ(nlohmann::json::parse(texts[1].text)["fairness"], f);
  }
  EXPECT_EQ(groups, (std::set<std::string>{"female", "male"}));
  EXPECT_FALSE(read_manifest(tmp / "plain/manifest.jsonl").at(0).contains("fairness"));

  const auto a = pngs(tmp / "plain"), b = pngs(tmp / "fair");
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 2u);
  for (const auto& [name, png] : a) EXPECT_NE(pixels(png), pixels(b.at(name))) << name << " was not edited";

  // The command-line form parses the same way, and needs classifier-free guidance.
  fair.fairness_file.clear();
  fair.fairness = {"gender=50:50"};
  fair.cfg_scale = 1.0;
  test::expect_error([&] { validate(fair); }, ErrorKind::BadInput, {"--fairness", "classifier-free guidance"});
}

// The fast mode evaluates the assigned group's concept only, and records that it did.
TEST(Generate, FastFairnessModeUsesTheAssignedGroupOnly) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  write_gender_50_50_warmup_1(tmp / "fair.json");
  GenerateOptions exact = tiny(fixtures, tmp / "exact");
  exact.images_per_prompt = 2;
  exact.fairness_file = tmp / "fair.json";
  GenerateOptions fast = exact;
  fast.out_dir = tmp / "fast";
  fast.fairness_mode = "fast";
  EXPECT_EQ(generate(exact).generated, 2);
  EXPECT_EQ(generate(fast).generated, 2);
  const auto e = read_manifest(tmp / "exact/manifest.jsonl"), f = read_manifest(tmp / "fast/manifest.jsonl");
  for (const auto& [index, line] : f) {
    const auto& r = line["fairness"];
    EXPECT_EQ(r["mode"], "fast");
    EXPECT_EQ(r["groups"], e.at(index)["fairness"]["groups"]);  // same assignment as the exact run
    ASSERT_EQ(r["edits"].size(), 1u);
    EXPECT_EQ(r["edits"][0]["group"], r["groups"]["gender"]);
    EXPECT_FALSE(r["edits"][0]["reverse"].get<bool>());
    EXPECT_EQ(e.at(index)["fairness"]["mode"], "exact");
  }
  // Fewer concepts, other pixels (the reversed concept no longer pushes).
  const auto a = pngs(tmp / "exact"), b = pngs(tmp / "fast");
  for (const auto& [name, png] : a) EXPECT_NE(pixels(png), pixels(b.at(name))) << name;
  fast.fairness_mode = "quick";
  test::expect_error([&] { validate(fast); }, ErrorKind::BadInput, {"--fairness-mode", "quick"});
}

// Fair Diffusion over a prompts file with a joint target and per-attribute overrides: exact
// cells per prompt, the union of two shards is the unsharded run (bytes and groups), and a
// resumed run makes only the missing image again, for the same group.
TEST(Generate, FairnessWithPromptsShardsAndResume) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  std::ofstream(tmp / "prompts.txt") << "a kite\na boat\n";
  std::ofstream(tmp / "fair.json") << R"({"attributes": [{"name": "gender", "edit_warmup_steps": 1},
      {"name": "colour", "edit_warmup_steps": 1, "edit_guidance_scale": 3}],
    "joint": {"attributes": ["gender", "colour"],
      "targets": {"female,red": 1, "female,blue": 1, "male,red": 1, "male,blue": 1}}})";
  auto run = [&](const std::string& out) {
    GenerateOptions o = tiny(fixtures, tmp / out);
    o.prompt.clear();
    o.prompts_file = tmp / "prompts.txt";
    o.images_per_prompt = 4;
    o.fairness_file = tmp / "fair.json";
    o.steps = 2;  // 17 images in all: kept short
    return o;
  };
  EXPECT_EQ(generate(run("full")).generated, 8);
  const auto full = read_manifest(tmp / "full/manifest.jsonl");
  ASSERT_EQ(full.size(), 8u);
  std::map<std::string, std::multiset<std::string>> cells;  // prompt -> the joint cell of each image
  for (const auto& [index, r] : full) {
    const auto& g = r["fairness"]["groups"];
    cells[r["prompt"]].insert(g["gender"].get<std::string>() + "," + g["colour"].get<std::string>());
    EXPECT_EQ(r["fairness"]["joint"]["targets"]["female,red"], 0.25) << r.dump();
    EXPECT_EQ(r["fairness"]["edits"].size(), 5u);  // female person, male person, red, green, blue
  }
  const std::multiset<std::string> each = {"female,blue", "female,red", "male,blue", "male,red"};
  EXPECT_EQ(cells["a kite"], each);
  EXPECT_EQ(cells["a boat"], each);

  for (int64_t k = 0; k < 2; ++k) {
    GenerateOptions s = run("sharded");
    s.shard_index = k;
    s.num_shards = 2;
    EXPECT_EQ(generate(s).generated, 4);
  }
  EXPECT_EQ(merge_manifests(tmp / "sharded"), 8);
  const auto before = pngs(tmp / "full");
  EXPECT_EQ(pngs(tmp / "sharded"), before);
  const auto merged = read_manifest(tmp / "sharded/manifest.jsonl");
  for (const auto& [index, r] : full) EXPECT_EQ(merged.at(index)["fairness"], r["fairness"]) << index;

  // The last image's file and manifest line are gone.
  const std::string dir = tmp / "full", last = full.at(7)["file"];
  fs::remove(dir + "/" + last);
  std::string manifest = slurp(dir + "/manifest.jsonl");
  manifest.erase(manifest.rfind('\n', manifest.size() - 2) + 1);
  std::ofstream(dir + "/manifest.jsonl", std::ios::trunc) << manifest;
  const RunSummary s = generate(run("full"));
  EXPECT_EQ(s.skipped, 7);
  EXPECT_EQ(s.generated, 1);
  EXPECT_EQ(read_manifest(dir + "/manifest.jsonl").at(7)["fairness"], full.at(7)["fairness"]);
  EXPECT_EQ(pngs(dir), before);
}

// Rerunning into a folder with changed settings would mix two runs: refused, nothing written.
TEST(Generate, ResumeRefusesAFolderOfAnotherRun) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  GenerateOptions o = tiny(fixtures, tmp / "run");
  o.images_per_prompt = 2;
  o.fairness = {"gender=50:50"};
  EXPECT_EQ(generate(o).generated, 2);
  const std::string manifest = slurp(tmp / "run/manifest.jsonl");
  const auto files = pngs(tmp / "run");

  GenerateOptions changed = o;
  changed.fairness = {"gender=female:1,male:0"};
  test::expect_error([&] { generate(changed); }, ErrorKind::BadInput,
                     {"manifest.jsonl: image 0 (00000-1234.png) was made with fairness", "use a new --out"});
  changed = o;
  changed.seed = 99;
  test::expect_error([&] { generate(changed); }, ErrorKind::BadInput,
                     {"image 0 (00000-1234.png) was made with seed 1234, this run plans 99"});
  changed = o;
  changed.fairness.clear();
  test::expect_error([&] { generate(changed); }, ErrorKind::BadInput, {"was made with fairness groups {\"gender\""});
  changed = o;
  changed.steps = 3;
  test::expect_error([&] { generate(changed); }, ErrorKind::BadInput, {"was made with steps 4, this run plans 3"});
  changed = o;
  changed.fairness_mode = "fast";
  test::expect_error([&] { generate(changed); }, ErrorKind::BadInput,
                     {"was made with fairness mode \"exact\", this run plans \"fast\""});
  EXPECT_EQ(slurp(tmp / "run/manifest.jsonl"), manifest);
  EXPECT_EQ(pngs(tmp / "run"), files);
  EXPECT_EQ(generate(o).generated, 0);  // the original command still resumes
}

// The edit prompts are embedded with the model's text encoder: a model without one is refused
// before anything is loaded or written.
TEST(Generate, FairnessNeedsATextEncoder) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::TempDir tmp;
  // The fixture model's parts, linked, with a model_index.json that lists no text encoder.
  const fs::path model = tmp.path / "no-text-encoder";
  fs::create_directories(model);
  for (const char* part : {"scheduler", "tokenizer", "unet", "vae"})
    fs::create_directory_symlink(fs::path(fixtures) / "models/tiny-sd1" / part, model / part);
  nlohmann::json index = nlohmann::json::parse(slurp(fixtures + "/models/tiny-sd1/model_index.json"));
  index.erase("text_encoder");
  std::ofstream((model / "model_index.json").string()) << index.dump();
  GenerateOptions o = tiny(fixtures, tmp / "never");
  o.model = model.string();
  o.fairness = {"gender=50:50"};
  test::expect_error([&] { generate(o); }, ErrorKind::BadInput,
                     {"--fairness: needs the model's text encoder to embed the edit prompts",
                      "no-text-encoder has none (its model_index.json lists no text_encoder)"});
  EXPECT_FALSE(fs::exists(tmp / "never"));
}

TEST(Generate, ShardFromSlurmEnvironment) {
  GenerateOptions o;
  o.model = "m";
  o.prompt = "p";
  o.out_dir = "/tmp";
  ::setenv("SLURM_ARRAY_TASK_ID", "3", 1);
  ::setenv("SLURM_ARRAY_TASK_COUNT", "4", 1);
  ::setenv("SLURM_ARRAY_TASK_MIN", "1", 1);
  test::expect_error([&] { validate(o); }, ErrorKind::BadInput, {"m", "model not found"});
  EXPECT_EQ(o.shard_index, 2);
  EXPECT_EQ(o.num_shards, 4);
  ::unsetenv("SLURM_ARRAY_TASK_ID");
  ::unsetenv("SLURM_ARRAY_TASK_COUNT");
  ::unsetenv("SLURM_ARRAY_TASK_MIN");
}


// ---------------------------------------------------------------------------------------
// The embedding API (include/fairdiff/model.h) on the shipped toy model: no fixtures needed.
// ---------------------------------------------------------------------------------------

std::string toy_model() { return (fs::path(FAIRDIFF_SOURCE_DIR) / "models" / "toy").string(); }

std::string png_text(const std::string& path, const std::string& keyword) {
  for (const PngText& t : read_png_text(path))
    if (t.keyword == keyword) return t.text;
  return {};
}

// The job writes what Model::generate returns: same pixels, same record, same A1111 text.
TEST(ModelApi, GenerateInMemoryEqualsTheJobsFiles) {
  static const bool configured = (configure_process(1), true);
  (void)configured;
  test::TempDir tmp;
  GenerateOptions o;
  o.model = toy_model();
  o.prompt = "a photo of a kite";
  o.images_per_prompt = 2;
  o.batch_size = 2;
  o.steps = 5;
  o.seed = 3;
  o.device = "cpu";
  o.fairness = {"colour=red:50,blue:50"};
  o.out_dir = tmp / "job";
  o.quiet = true;
  ASSERT_EQ(generate(o).generated, 2);

  ModelOptions mo;
  mo.model = toy_model();
  mo.device = "cpu";
  Model model = Model::load(mo);
  EXPECT_EQ(model.native_width(), 32);
  FairnessOptions fo;
  fo.fairness = o.fairness;
  model.set_fairness(fo);
  const std::vector<GroupAssignment> groups = model.assign_groups(2, o.seed);  // prompt 0, as the plan draws them
  ASSERT_EQ(groups.size(), 2u);
  std::vector<ImageRequest> batch;
  for (int64_t i = 0; i < 2; ++i) batch.push_back({o.prompt, "", o.seed + i, groups[static_cast<size_t>(i)]});
  SamplingSettings s;
  s.steps = o.steps;
  size_t calls = 0, last_step = 0, steps = 0;
  const std::vector<Image> images = model.generate(batch, s, [&](const StepProgress& p) {
    ++calls;
    last_step = p.step;
    steps = p.steps;
    EXPECT_EQ(p.images, 2);
  });
  ASSERT_EQ(images.size(), 2u);
  EXPECT_EQ(calls, steps);  // once per denoising step
  EXPECT_EQ(last_step + 1, steps);

  for (const auto& e : fs::directory_iterator(tmp / "job")) {
    if (e.path().extension() != ".png") continue;
    const nlohmann::json rec = nlohmann::json::parse(png_text(e.path().string(), "fairdiff"));
    const int64_t i = rec.at("index").get<int64_t>();
    const Image& im = images[static_cast<size_t>(i)];
    EXPECT_EQ(im.width, 32);
    EXPECT_EQ(im.height, 32);
    EXPECT_TRUE(pixels(slurp(e.path().string())) == im.rgb) << "pixels of image " << i;
    nlohmann::json mine = nlohmann::json::parse(im.record);
    mine["index"] = rec["index"];
    mine["file"] = rec["file"];
    mine["base_seed"] = rec["base_seed"];
    EXPECT_EQ(mine, rec) << "record of image " << i;
    EXPECT_EQ(im.parameters, png_text(e.path().string(), "parameters"));
  }
}

TEST(ModelApi, RefusesAssignmentsTheInstructionDoesNotHave) {
  ModelOptions mo;
  mo.model = toy_model();
  mo.device = "cpu";
  Model model = Model::load(mo);
  SamplingSettings s;
  s.steps = 2;
  const ImageRequest steered{"a photo of a kite", "", 1, {{"colour", "red"}}};
  // No instruction set yet.
  EXPECT_THROW(model.generate({steered}, s), Error);
  FairnessOptions fo;
  fo.fairness = {"colour=red:50,blue:50"};
  model.set_fairness(fo);
  EXPECT_TRUE(model.fairness_enabled());
  EXPECT_THROW(model.generate({{"a kite", "", 1, {{"colour", "purple"}}}}, s), Error);
  EXPECT_THROW(model.generate({{"a kite", "", 1, {{"gender", "female"}}}}, s), Error);
  SamplingSettings no_cfg = s;
  no_cfg.cfg_scale = 1;
  EXPECT_THROW(model.generate({steered}, no_cfg), Error);
  SamplingSettings odd = s;
  odd.width = 30;
  EXPECT_THROW(model.generate({steered}, odd), Error);
}

TEST(ModelApi, DataAreFoundBesideTheBinaryNotInTheSourceTree) {
  // The test binary lives in build/tests; build/share/fairdiff links to the source folders.
  EXPECT_FALSE(default_model().empty());
  EXPECT_TRUE(fs::exists(fs::path(default_model()) / "model_index.json"));
}
}  // namespace
}  // namespace fairdiff

