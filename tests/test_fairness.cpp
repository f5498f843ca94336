// Fair Diffusion's instruction, torch-free: --fairness parsing, the attribute library,
// and the assignment of groups (exact quotas, seeded, independent of sharding).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "fairness.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

GenerateOptions options(std::vector<std::string> fairness, int64_t n = 100) {
  GenerateOptions o;
  o.model = "unused";
  o.prompt = "a photo of the face of a firefighter";
  o.images_per_prompt = n;
  o.seed = 7;
  o.fairness = std::move(fairness);
  return o;
}

std::map<std::string, int> count(const std::vector<PlannedImage>& images) {
  std::map<std::string, int> counts;
  for (const auto& img : images) {
    EXPECT_EQ(img.groups.size(), 1u);
    if (!img.groups.empty()) ++counts[img.groups[0].second];
  }
  return counts;
}

// The message of the BadInput that parsing throws (empty when none).
std::string error_of(const GenerateOptions& o) {
  try {
    parse_fairness(o);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::BadInput);
    const std::string what = e.what();
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    return what;
  }
  return "";
}

TEST(Fairness, LibraryHasGender) {
  const Attribute a = load_attribute("gender", "");
  ASSERT_EQ(a.groups.size(), 2u);
  EXPECT_EQ(a.groups[0].name, "female");
  EXPECT_EQ(a.groups[0].edit_prompts, std::vector<std::string>{"female person"});
  EXPECT_EQ(a.groups[1].edit_prompts, std::vector<std::string>{"male person"});
  EXPECT_EQ(a.defaults.edit_warmup_steps, 5);
  EXPECT_DOUBLE_EQ(a.defaults.edit_threshold, 0.95);
  EXPECT_FALSE(a.description.empty());
}

TEST(Fairness, ThirtySeventyGivesExactCounts) {
  for (const std::string flag : {"gender=30:70", "gender=female:30,male:70", "gender=male:7,female:3"}) {
    const RunPlan plan = plan_run(options({flag}), 16, 16);
    ASSERT_EQ(plan.images.size(), 100u);
    const auto counts = count(plan.images);
    EXPECT_EQ(counts.at("female"), 30) << flag;
    EXPECT_EQ(counts.at("male"), 70) << flag;
  }
}

TEST(Fairness, QuotaPerPromptIsLargestRemainder) {
  EXPECT_EQ(quota_counts({0.5, 0.5}, 5), (std::vector<int64_t>{3, 2}));   // tie to the earlier group
  EXPECT_EQ(quota_counts({1.0 / 3, 2.0 / 3}, 10), (std::vector<int64_t>{3, 7}));
  EXPECT_EQ(quota_counts({0.2, 0.3, 0.5}, 7), (std::vector<int64_t>{1, 2, 4}));
  EXPECT_EQ(quota_counts({0, 1}, 3), (std::vector<int64_t>{0, 3}));
}

TEST(Fairness, AssignmentIsShuffledAndSeeded) {
  const RunPlan a = plan_run(options({"gender=50:50"}), 16, 16);
  const RunPlan b = plan_run(options({"gender=50:50"}), 16, 16);
  GenerateOptions other = options({"gender=50:50"});
  other.seed = 8;
  const RunPlan c = plan_run(other, 16, 16);
  std::string sa, sc;
  for (size_t k = 0; k < a.images.size(); ++k) {
    EXPECT_EQ(a.images[k].groups, b.images[k].groups);
    sa += a.images[k].groups[0].second[0];
    sc += c.images[k].groups[0].second[0];
  }
  EXPECT_NE(sa, sc);                                  // another seed, another order
  EXPECT_NE(sa.substr(0, 50), std::string(50, 'f'));  // not in group order
}

TEST(Fairness, ShardsSeeTheUnshardedAssignment) {
  const RunPlan full = plan_run(options({"gender=30:70"}, 37), 16, 16);
  std::map<int64_t, std::vector<std::pair<std::string, std::string>>> joined;
  for (int64_t k = 0; k < 3; ++k) {
    GenerateOptions o = options({"gender=30:70"}, 37);
    o.shard_index = k;
    o.num_shards = 3;
    for (const auto& img : plan_run(o, 16, 16).shard()) EXPECT_TRUE(joined.emplace(img.index, img.groups).second);
  }
  ASSERT_EQ(joined.size(), full.images.size());
  for (const auto& img : full.images) EXPECT_EQ(joined.at(img.index), img.groups) << img.index;
}

TEST(Fairness, RandomAssignmentIsSeededAndFollowsTheShares) {
  GenerateOptions o = options({"gender=0:1"}, 20);
  o.assignment = "random";
  EXPECT_EQ(count(plan_run(o, 16, 16).images).at("male"), 20);
  o.fairness = {"gender=50:50"};
  o.images_per_prompt = 1000;
  const auto counts = count(plan_run(o, 16, 16).images);
  EXPECT_GT(counts.at("female"), 400);
  EXPECT_GT(counts.at("male"), 400);
  EXPECT_EQ(plan_run(o, 16, 16).images[17].groups, plan_run(o, 16, 16).images[17].groups);
}

TEST(Fairness, FairnessFileWithOverrides) {
  const fs::path dir = fs::temp_directory_path() / ("fairdiff-fairness-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string file = (dir / "f.json").string();
  std::ofstream(file) << R"({"attributes": [{"name": "gender", "targets": {"female": 0.3, "male": 0.7},
      "edit_prompts": {"female": ["woman", "female person"]}, "edit_guidance_scale": 6}]})";
  GenerateOptions o = options({});
  o.fairness_file = file;
  const FairnessSpec spec = parse_fairness(o);
  ASSERT_EQ(spec.targets.size(), 1u);
  EXPECT_DOUBLE_EQ(spec.targets[0].shares[0], 0.3);
  EXPECT_EQ(spec.targets[0].attribute.groups[0].edit_prompts.size(), 2u);
  EXPECT_DOUBLE_EQ(spec.targets[0].attribute.defaults.edit_guidance_scale, 6);
  EXPECT_EQ(count(plan_run(o, 16, 16).images).at("female"), 30);
  std::ofstream(file) << R"({"attributes": [{"name": "gender", "targets": {"female": 1}, "edit_prompts": {"male": [" "]}}]})";
  EXPECT_NE(error_of(o).find("group \"male\" has an empty edit prompt"), std::string::npos) << error_of(o);
  fs::remove_all(dir);
}

TEST(Fairness, EachBadInputIsOneClearLine) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"age=50:50", "unknown attribute \"age\""},
      {"gender=female:30,robot:70", "unknown group \"robot\""},
      {"gender=fifty:50", "unknown group \"fifty\""},
      {"gender=50:abc", "ratio \"abc\" is not a number"},
      {"gender=female:x", "ratio \"x\" of group \"female\" is not a number"},
      {"gender=-1:2", "is negative"},
      {"gender=0:0", "all ratios are zero"},
      {"gender=30:30:40", "3 ratios for 2 groups of \"gender\" (more ratios than groups)"},
      {"gender=100", "1 ratio(s) for 2 groups"},
      {"gender", "expected ATTRIBUTE=RATIOS"},
  };
  for (const auto& [flag, needle] : cases) {
    const std::string what = error_of(options({flag}));
    EXPECT_NE(what.find(needle), std::string::npos) << flag << " -> " << what;
  }
  EXPECT_NE(error_of(options({"gender=1:1", "gender=1:2"})).find("given twice"), std::string::npos);
  GenerateOptions o = options({"gender=1:1"});
  o.assignment = "coin";
  EXPECT_NE(error_of(o).find("unknown assignment \"coin\""), std::string::npos);
}

TEST(Fairness, AttributeFileWithoutGroupsIsRejected) {
  const fs::path dir = fs::temp_directory_path() / ("fairdiff-attrs-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream((dir / "empty.json").string()) << R"({"name": "empty", "groups": []})";
  std::ofstream((dir / "blank.json").string())
      << R"({"name": "blank", "groups": [{"name": "a", "edit_prompts": [""]}, {"name": "b", "edit_prompts": ["b"]}]})";
  GenerateOptions o = options({"empty=1"});
  o.attributes_dir = dir.string();
  EXPECT_NE(error_of(o).find("attribute \"empty\" has no groups"), std::string::npos) << error_of(o);
  o.fairness = {"blank=1:1"};
  EXPECT_NE(error_of(o).find("group \"a\" has an empty edit prompt"), std::string::npos) << error_of(o);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace fairdiff
