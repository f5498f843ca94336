// `fairdiff audit`, torch-free: the hue classifier on the toy world's pictures (clean and
// degraded), Wilson intervals, and audits of hand-made run folders.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>

#include "fairdiff/audit.h"
#include "png_io.h"
#include "test_util.h"
#include "toy_world.h"

namespace fairdiff {
namespace {

using test::expect_error;
using test::TempDir;

// A generated picture's likely faults: half resolution (2x2 box average, scaled back up)
// and Gaussian-ish pixel noise (sum of four uniforms, standard deviation `sigma` levels).
std::vector<uint8_t> degrade(const std::vector<uint8_t>& rgb, double sigma, toy::Rng& rng) {
  const int n = toy::kImageSize;
  std::vector<uint8_t> out(rgb.size());
  for (int y = 0; y < n; ++y)
    for (int x = 0; x < n; ++x)
      for (int k = 0; k < 3; ++k) {
        const int bx = x & ~1, by = y & ~1;
        double sum = 0;
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx) sum += rgb[((by + dy) * n + bx + dx) * 3 + k];
        double noise = 0;
        for (int u = 0; u < 4; ++u) noise += rng.uniform(-1.0, 1.0);
        noise *= sigma * std::sqrt(3.0) / 2.0;  // four U(-1, 1) have variance 4/3
        out[(y * n + x) * 3 + k] = static_cast<uint8_t>(std::clamp(std::lround(sum / 4 + noise), 0L, 255L));
      }
  return out;
}

// Share of `per_cell` pictures of every class and colour that the classifier gets right.
double hue_accuracy(int per_cell, double noise_sigma, bool degraded) {
  const toy::World world;
  const HueClassifier hue;
  toy::Rng rng(2024), noise_rng(7);
  int right = 0, total = 0;
  for (size_t c = 0; c < world.classes().size(); ++c)
    for (size_t colour = 0; colour < world.colours().size(); ++colour)
      for (int k = 0; k < per_cell; ++k) {
        const toy::Sample s = world.render(static_cast<int>(c), static_cast<int>(colour), rng);
        const std::vector<uint8_t> pixels = degraded ? degrade(s.rgb, noise_sigma, noise_rng) : s.rgb;
        right += hue.classify(pixels.data(), toy::kImageSize, toy::kImageSize) == static_cast<int>(colour);
        ++total;
      }
  return static_cast<double>(right) / total;
}

TEST(HueClassifier, ExactOnTheWorldsRenders) {
  const double accuracy = hue_accuracy(300, 0, false);  // 3600 pictures
  EXPECT_GE(accuracy, 0.99);
  EXPECT_EQ(accuracy, 1.0) << "the renders are unambiguous: every miss is a classifier bug";
}

TEST(HueClassifier, RobustToBlurAndNoise) {
  EXPECT_GE(hue_accuracy(300, 8, true), 0.99);
  EXPECT_GE(hue_accuracy(100, 16, true), 0.99);
}

TEST(HueClassifier, LeavesUnclearPicturesUnclassified) {
  const HueClassifier hue;
  const int n = 32;
  std::vector<uint8_t> grey(n * n * 3, 200);
  EXPECT_EQ(hue.classify(grey.data(), n, n), -1);
  // Half red, half blue: no clear majority.
  std::vector<uint8_t> split = grey;
  for (int i = 0; i < n * n; ++i) {
    uint8_t* p = &split[i * 3];
    p[0] = i % n < n / 2 ? 220 : 20, p[1] = 20, p[2] = i % n < n / 2 ? 20 : 220;
  }
  EXPECT_EQ(hue.classify(split.data(), n, n), -1);
  // Yellow is no group's hue, so it does not vote for red or green.
  std::vector<uint8_t> yellow = grey;
  for (int i = 0; i < n * n / 4; ++i) yellow[i * 3] = 230, yellow[i * 3 + 1] = 230, yellow[i * 3 + 2] = 20;
  EXPECT_EQ(hue.classify(yellow.data(), n, n), -1);
  EXPECT_EQ(hue.classify(grey.data(), 0, 0), -1);
}

TEST(HueClassifier, FactoryNamesWhatIsAvailable) {
  const auto c = make_classifier("hue", "colour");
  EXPECT_EQ(c->groups(), (std::vector<std::string>{"red", "green", "blue"}));
  EXPECT_EQ(c->attribute(), "colour");
  expect_error([] { make_classifier("clip", "colour"); }, ErrorKind::BadInput, {"--classifier clip", "unknown classifier", "available: hue"});
  expect_error([] { make_classifier("hue", "gender"); }, ErrorKind::BadInput, {"--attribute gender", "cannot tell", "colour"});
}

TEST(Wilson, KnownValues) {
  struct Case {
    int64_t k, n;
    double low, high;
  };
  // Wilson score intervals at z = 1.959964 (e.g. statsmodels' proportion_confint(method="wilson")).
  for (const Case& c : {Case{0, 10, 0.0, 0.277533}, Case{1, 10, 0.017876, 0.404150}, Case{5, 10, 0.236593, 0.763407},
                        Case{10, 10, 0.722467, 1.0}, Case{50, 100, 0.403832, 0.596168}, Case{81, 263, 0.255289, 0.366210}}) {
    const Interval i = wilson_interval(c.k, c.n);
    EXPECT_NEAR(i.low, c.low, 1e-6) << c.k << "/" << c.n;
    EXPECT_NEAR(i.high, c.high, 1e-6) << c.k << "/" << c.n;
  }
  const Interval none = wilson_interval(0, 0);
  EXPECT_EQ(none.low, 0.0);
  EXPECT_EQ(none.high, 1.0);
}

// ---- audits of hand-made run folders ----

// A run folder being written: rendered pictures as PNGs and their manifest lines.
struct FakeRun {
  TempDir dir;
  toy::World world;
  toy::Rng rng{11};
  int64_t next_index = 0;
  std::vector<std::string> lines;

  // An image of the colour `drawn` ("" = a blank grey picture), upscaled `zoom` times.
  nlohmann::json add(const std::string& prompt, const std::string& drawn, const std::string& assigned = "",
                     const nlohmann::json& targets = nullptr, int zoom = 1) {
    std::vector<uint8_t> rgb(toy::kImageSize * toy::kImageSize * 3, 190);
    if (!drawn.empty()) rgb = world.render(static_cast<int>(next_index % 4), world.colour_index(drawn), rng).rgb;
    const int n = toy::kImageSize * zoom;
    std::vector<uint8_t> big(static_cast<size_t>(n) * n * 3);
    for (int y = 0; y < n; ++y)
      for (int x = 0; x < n; ++x)
        for (int k = 0; k < 3; ++k) big[(y * n + x) * 3 + k] = rgb[((y / zoom) * toy::kImageSize + x / zoom) * 3 + k];
    const std::string file = std::to_string(next_index) + ".png";
    write_png(dir / file, big.data(), n, n, {});
    nlohmann::json record = {{"index", next_index++}, {"file", file}, {"prompt", prompt}, {"seed", 1}};
    if (!assigned.empty()) record["fairness"] = {{"groups", {{"colour", assigned}}}, {"targets", {{"colour", targets}}}};
    lines.push_back(record.dump());
    return record;
  }

  void write_manifest(const std::string& name = "manifest.jsonl") const {
    std::ofstream out(dir / name);
    for (const auto& l : lines) out << l << "\n";
  }

  AuditOptions options() const {
    AuditOptions o;
    o.dir = dir.path.string();
    return o;
  }
};

// Prompt "kite": 10 images, targets 40:30:30, assigned 4 red, 3 green, 3 blue; drawn as
// 5 red (one of them assigned green), 2 green, 2 blue and one blank picture (assigned blue).
// Prompt "boat": unguided, 3 blue, one of them between the kites.
void fill_example(FakeRun& run) {
  const nlohmann::json targets = {{"red", 0.4}, {"green", 0.3}, {"blue", 0.3}};
  const std::vector<std::pair<std::string, std::string>> drawn_assigned = {
      {"red", "red"}, {"red", "red"}, {"red", "green"}, {"red", "red"},   {"green", "green"},
      {"", "blue"},   {"red", "red"}, {"green", "green"}, {"blue", "blue"}, {"blue", "blue"}};
  for (size_t k = 0; k < drawn_assigned.size(); ++k) {
    if (k == 5) run.add("a boat", "blue");
    run.add("a photo of a kite", drawn_assigned[k].first, drawn_assigned[k].second, targets);
  }
  run.add("a boat", "blue");
  run.add("a boat", "blue");
}

TEST(Audit, CountsSharesAndErrors) {
  FakeRun run;
  fill_example(run);
  run.write_manifest();
  const AuditReport r = audit(run.options());

  EXPECT_EQ(r.attribute, "colour");
  EXPECT_EQ(r.classifier, "hue");
  ASSERT_EQ(r.prompts.size(), 2u);
  const PromptAudit& kite = r.prompts[0];
  EXPECT_EQ(kite.prompt, "a photo of a kite");
  EXPECT_EQ(kite.images, 10);
  EXPECT_EQ(kite.unclassified, 1);
  const int64_t counts[] = {5, 2, 2};
  const double targets[] = {0.4, 0.3, 0.3};
  for (size_t g = 0; g < 3; ++g) {
    const GroupShare& s = kite.groups[g];
    EXPECT_EQ(s.count, counts[g]) << s.name;
    EXPECT_DOUBLE_EQ(s.share, counts[g] / 10.0);
    const Interval i = wilson_interval(counts[g], 10);
    EXPECT_DOUBLE_EQ(s.low, i.low);
    EXPECT_DOUBLE_EQ(s.high, i.high);
    ASSERT_TRUE(s.target.has_value());
    EXPECT_DOUBLE_EQ(*s.target, targets[g]);
    EXPECT_DOUBLE_EQ(*s.error(), counts[g] / 10.0 - targets[g]);
  }
  EXPECT_EQ(kite.assigned, 10);
  EXPECT_EQ(kite.assigned_hits, 8);  // one assigned green came out red, the blank one missed blue
  EXPECT_DOUBLE_EQ(*kite.hit_rate(), 0.8);

  const PromptAudit& boat = r.prompts[1];
  EXPECT_EQ(boat.images, 3);
  EXPECT_EQ(boat.groups[2].count, 3);
  EXPECT_FALSE(boat.groups[2].target.has_value());
  EXPECT_FALSE(boat.hit_rate().has_value());

  EXPECT_EQ(r.images.size(), 13u);
  const double red_error = 0.5 - 0.4, other_error = 0.2 - 0.3;
  EXPECT_DOUBLE_EQ(*r.mean_abs_error, (std::abs(red_error) + 2 * std::abs(other_error)) / 3);
  EXPECT_DOUBLE_EQ(*r.max_abs_error, std::max(std::abs(red_error), std::abs(other_error)));
  EXPECT_DOUBLE_EQ(*r.hit_rate(), 0.8);

  // The default pictures, complete, of a sensible size.
  EXPECT_EQ(r.chart_path, run.dir / "audit-chart.png");
  EXPECT_EQ(r.sheet_path, run.dir / "audit-sheet.png");
  ASSERT_TRUE(png_is_complete(r.chart_path));
  ASSERT_TRUE(png_is_complete(r.sheet_path));
  const RgbImage sheet = read_png_rgb(r.sheet_path);
  EXPECT_GE(sheet.width, 12 * kSheetThumbnail);
  EXPECT_GE(read_png_rgb(r.chart_path).height, 2 * 200);

  const std::string text = audit_text(r);
  EXPECT_NE(text.find("\"a photo of a kite\": 10 images"), std::string::npos) << text;
  EXPECT_NE(text.find("assigned group reached: 8 of 10 (80.0%)"), std::string::npos) << text;
  EXPECT_NE(text.find("chart: " + r.chart_path), std::string::npos) << text;
}

TEST(Audit, JsonFollowsTheSchema) {
  FakeRun run;
  fill_example(run);
  run.write_manifest();
  const nlohmann::json j = nlohmann::json::parse(audit_json(audit(run.options())));
  EXPECT_EQ(j["schema"], 1);
  EXPECT_EQ(j["attribute"], "colour");
  EXPECT_EQ(j["groups"], nlohmann::json({"red", "green", "blue"}));
  EXPECT_EQ(j["chart"], run.dir / "audit-chart.png");
  const auto& kite = j["prompts"][0];
  EXPECT_EQ(kite["prompt"], "a photo of a kite");
  EXPECT_EQ(kite["images"], 10);
  EXPECT_EQ(kite["unclassified"], 1);
  EXPECT_EQ(kite["assigned"], 10);
  EXPECT_DOUBLE_EQ(kite["assigned_hit_rate"].get<double>(), 0.8);
  const auto& red = kite["groups"][0];
  EXPECT_EQ(red["name"], "red");
  EXPECT_EQ(red["count"], 5);
  EXPECT_DOUBLE_EQ(red["share"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(red["target"].get<double>(), 0.4);
  EXPECT_DOUBLE_EQ(red["error"].get<double>(), 0.5 - 0.4);
  EXPECT_LT(red["low"].get<double>(), 0.5);
  EXPECT_GT(red["high"].get<double>(), 0.5);
  const auto& boat = j["prompts"][1];
  EXPECT_TRUE(boat["groups"][2]["target"].is_null());
  EXPECT_TRUE(boat["groups"][2]["error"].is_null());
  EXPECT_TRUE(boat["assigned_hit_rate"].is_null());
  EXPECT_EQ(j["overall"]["images"], 13);
  EXPECT_EQ(j["overall"]["unclassified"], 1);
  EXPECT_DOUBLE_EQ(j["overall"]["max_abs_error"].get<double>(), 0.1);
}

TEST(Audit, UnguidedRunNeedsAnAttributeAndHasNoTargets) {
  FakeRun run;
  run.add("a ball", "green");
  run.add("a ball", "red");
  run.write_manifest();
  expect_error([&] { audit(run.options()); }, ErrorKind::BadInput, {"no fairness groups", "--attribute"});
  AuditOptions o = run.options();
  o.attribute = "colour";
  const AuditReport r = audit(o);
  EXPECT_FALSE(r.mean_abs_error.has_value());
  EXPECT_FALSE(r.hit_rate().has_value());
  EXPECT_EQ(r.prompts[0].groups[0].count, 1);
  EXPECT_EQ(r.prompts[0].groups[1].count, 1);
  const nlohmann::json j = nlohmann::json::parse(audit_json(r));
  EXPECT_TRUE(j["overall"]["mean_abs_error"].is_null());
  EXPECT_NE(audit_text(r).find("no targets"), std::string::npos);
}

TEST(Audit, ReadsShardManifestsInRunOrder) {
  FakeRun run;
  const nlohmann::json targets = {{"red", 0.5}, {"green", 0.5}, {"blue", 0.0}};
  for (int i = 0; i < 4; ++i) run.add("a kite", i % 2 ? "green" : "red", i % 2 ? "green" : "red", targets);
  // Shard k of 2 holds the images whose index mod 2 is k.
  const std::vector<std::string> all = run.lines;
  run.lines = {all[1], all[3]};
  run.write_manifest("manifest-shard-1-of-2.jsonl");
  run.lines = {all[0], all[2]};
  run.write_manifest("manifest-shard-0-of-2.jsonl");
  AuditOptions o = run.options();
  o.chart_path = run.dir / "c.png";
  o.sheet_path = run.dir / "s.png";
  const AuditReport r = audit(o);
  ASSERT_EQ(r.images.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(r.images[i].file, std::to_string(i) + ".png");
  EXPECT_DOUBLE_EQ(*r.max_abs_error, 0.0);
  EXPECT_TRUE(png_is_complete(run.dir / "c.png"));
  EXPECT_TRUE(png_is_complete(run.dir / "s.png"));
  EXPECT_FALSE(std::filesystem::exists(run.dir / "audit-chart.png"));
}

TEST(Audit, LargeImagesGetThumbnails) {
  FakeRun run;  // 512x512, as Stable Diffusion makes them
  const nlohmann::json targets = {{"red", 1.0}};
  run.add("a kite", "red", "red", targets, 16);
  run.add("a kite", "blue", "red", targets, 16);
  run.write_manifest();
  const AuditReport r = audit(run.options());
  EXPECT_EQ(r.prompts[0].groups[0].count, 1);
  EXPECT_EQ(r.prompts[0].groups[2].count, 1);
  EXPECT_DOUBLE_EQ(*r.prompts[0].groups[1].target, 0.0);  // a group the targets leave out
  EXPECT_EQ(r.images[0].thumbnail.width, kSheetThumbnail);
  EXPECT_EQ(r.images[0].thumbnail.height, kSheetThumbnail);
  EXPECT_TRUE(png_is_complete(r.sheet_path));

  RgbImage wide{96, 48, std::vector<uint8_t>(96 * 48 * 3, 10)};
  const RgbImage t = make_thumbnail(wide, 64);
  EXPECT_EQ(t.width, 64);
  EXPECT_EQ(t.height, 32);
  EXPECT_EQ(t.rgb[0], 10);
}

TEST(Audit, BadInputsNameTheFileOrLine) {
  TempDir empty;
  AuditOptions none;
  none.dir = empty / "no-such-run";
  expect_error([&] { audit(none); }, ErrorKind::BadInput, {"no-such-run", "run folder not found"});
  none.dir = empty.path.string();
  expect_error([&] { audit(none); }, ErrorKind::BadInput, {"has no manifest.jsonl"});

  FakeRun run;
  fill_example(run);
  run.lines[1] = "{\"index\": 1, \"file\": ";
  run.write_manifest();
  expect_error([&] { audit(run.options()); }, ErrorKind::BadInput, {"manifest.jsonl:2", "is not valid JSON"});

  FakeRun missing;
  fill_example(missing);
  missing.write_manifest();
  std::filesystem::remove(missing.dir / "3.png");
  expect_error([&] { audit(missing.options()); }, ErrorKind::BadInput, {"manifest.jsonl:4", "lists 3.png, which is missing"});

  FakeRun truncated;
  fill_example(truncated);
  truncated.write_manifest();
  std::filesystem::resize_file(truncated.dir / "2.png", 40);
  expect_error([&] { audit(truncated.options()); }, ErrorKind::BadInput, {"2.png", "is not a complete PNG"});

  FakeRun fields;
  fields.add("a kite", "red", "red", {{"red", 1.0}});
  fields.lines.push_back("{\"index\": 5, \"prompt\": \"a kite\"}");
  fields.write_manifest();
  expect_error([&] { audit(fields.options()); }, ErrorKind::BadInput, {"manifest.jsonl:2", "\"file\""});

  FakeRun group;
  group.add("a kite", "red", "yellow", {{"red", 1.0}});
  group.write_manifest();
  expect_error([&] { audit(group.options()); }, ErrorKind::BadInput, {"manifest.jsonl:1", "\"yellow\"", "red, green, blue"});

  FakeRun other;
  other.add("a kite", "red", "red", {{"red", 1.0}});
  other.write_manifest();
  AuditOptions o = other.options();
  o.classifier = "clip";
  expect_error([&] { audit(o); }, ErrorKind::BadInput, {"unknown classifier", "available: hue"});
  o.classifier = "hue";
  o.chart_path = other.dir / "no-such-folder/chart.png";
  expect_error([&] { audit(o); }, ErrorKind::BadInput, {"--chart", "no-such-folder", "not found"});
}

TEST(Audit, ReadsOnlyTheRunsOwnFilesAndRefusesPngBombs) {
  for (const std::string& file : {"../x.png", "/etc/passwd", "a/../../x.png", ""}) {
    FakeRun run;
    run.add("a kite", "red", "red", {{"red", 1.0}});
    run.lines.push_back(nlohmann::json({{"index", 1}, {"file", file}, {"prompt", "a kite"}}).dump());
    run.write_manifest();
    expect_error([&] { audit(run.options()); }, ErrorKind::BadInput,
                 {"manifest.jsonl:2", "is not a file inside the run folder"});
  }
  // IHDR claims 100000 x 100000: refused from the header, before stb allocates anything.
  FakeRun bomb;
  bomb.add("a kite", "red", "red", {{"red", 1.0}});
  bomb.write_manifest();
  std::string png;
  {
    std::ifstream in(bomb.dir / "0.png", std::ios::binary);
    png.assign(std::istreambuf_iterator<char>(in), {});
  }
  EXPECT_EQ(read_png_size(bomb.dir / "0.png").width, toy::kImageSize);
  for (int at : {16, 20}) {  // width, height: big-endian 100000
    png[at] = 0, png[at + 1] = 1, png[at + 2] = char(0x86), png[at + 3] = char(0xA0);
  }
  std::ofstream(bomb.dir / "0.png", std::ios::binary) << png;
  EXPECT_EQ(read_png_size(bomb.dir / "0.png").height, 100000);
  expect_error([&] { read_png_rgb(bomb.dir / "0.png"); }, ErrorKind::BadInput, {"0.png", "claims 100000x100000 pixels"});
  std::ofstream(bomb.dir / "short.png", std::ios::binary) << "\x89PNG";
  expect_error([&] { read_png_size(bomb.dir / "short.png"); }, ErrorKind::BadInput, {"short.png", "is not a PNG file"});
}

// A classifier that tells every picture apart by its first pixel's red value: registered
// at run time, found by name, given its options (as a CLIP classifier from the LibTorch
// library will be).
class FirstPixelClassifier : public GroupClassifier {
 public:
  explicit FirstPixelClassifier(double margin) : margin_(margin) {}
  std::string name() const override { return "first-pixel"; }
  std::string attribute() const override { return "brightness"; }
  const std::vector<std::string>& groups() const override { return groups_; }
  int classify(const uint8_t* rgb, int, int) const override { return rgb[0] >= 128 * (1 + margin_) ? 1 : 0; }

 private:
  double margin_;
  std::vector<std::string> groups_{"dark", "light"};
};

TEST(ClassifierRegistry, RegisteredFactoriesAreFoundByNameWithTheirOptions) {
  register_classifier({"first-pixel", "brightness (dark, light)", [](const ClassifierOptions& o) -> std::unique_ptr<GroupClassifier> {
                         if (o.attribute != "brightness") return nullptr;
                         return std::make_unique<FirstPixelClassifier>(o.margin);
                       }});
  const std::vector<std::string> names = classifier_names();
  ASSERT_GE(names.size(), 2u);
  EXPECT_EQ(names.front(), "hue");  // the built-in one stays first
  EXPECT_NE(std::find(names.begin(), names.end(), "first-pixel"), names.end());
  ClassifierOptions o;
  o.attribute = "brightness";
  const uint8_t bright[3] = {200, 200, 200};
  EXPECT_EQ(make_classifier("first-pixel", o)->classify(bright, 1, 1), 1);
  o.margin = 0.9;  // the factory sees the options: 200 < 128 * 1.9
  EXPECT_EQ(make_classifier("first-pixel", o)->classify(bright, 1, 1), 0);
  expect_error([] { make_classifier("first-pixel", "colour"); }, ErrorKind::BadInput,
               {"--attribute colour", "cannot tell", "brightness (dark, light)"});
  expect_error([] { check_classifier_name("nope"); }, ErrorKind::BadInput, {"unknown classifier", "hue", "first-pixel"});
}

}  // namespace
}  // namespace fairdiff
