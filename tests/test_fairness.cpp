// Fair Diffusion's instruction, torch-free: --fairness parsing, the attribute library,
// and the assignment of groups (exact quotas, seeded, independent of sharding).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "fairdiff/error.h"
#include "fairdiff/generate.h"
#include "safetensors.h"
#include "fairness.h"
#include "run_plan.h"

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

// A fresh temporary folder, removed with the object.
struct Scratch {
  fs::path dir;
  explicit Scratch(const std::string& name)
      : dir(fs::temp_directory_path() / ("fairdiff-" + name + "-" + std::to_string(::getpid()))) {
    fs::create_directories(dir);
  }
  ~Scratch() { fs::remove_all(dir); }
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream((dir / name).string()) << text;
    return (dir / name).string();
  }
};

// "female,red" -> images of that joint cell (gender, colour), over `images`.
std::map<std::string, int> cells(const std::vector<PlannedImage>& images) {
  std::map<std::string, int> counts;
  for (const auto& img : images) {
    EXPECT_EQ(img.groups.size(), 2u);
    if (img.groups.size() == 2) ++counts[img.groups[0].second + "," + img.groups[1].second];
  }
  return counts;
}

const char* kJoint = R"({"joint": {"attributes": ["gender", "colour"],
    "targets": {"female,red": 40, "female,blue": 10, "male,red": 10, "male,blue": 40}}})";

TEST(Fairness, JointTargetsGiveExactCellCounts) {
  Scratch tmp("joint");
  GenerateOptions o = options({});
  o.fairness_file = tmp.write("joint.json", kJoint);
  const FairnessSpec spec = parse_fairness(o);
  ASSERT_EQ(spec.targets.size(), 2u);  // both from the library, in the joint's order
  EXPECT_EQ(spec.targets[1].attribute.name, "colour");
  ASSERT_TRUE(spec.joint.has_value());
  EXPECT_EQ(spec.joint->shares, (std::vector<double>{0.4, 0, 0.1, 0.1, 0, 0.4}));  // green cells missing: 0
  EXPECT_EQ(spec.targets[0].shares, (std::vector<double>{0.5, 0.5}));               // the joint's marginals
  EXPECT_EQ(spec.targets[1].shares, (std::vector<double>{0.5, 0, 0.5}));
  const RunPlan plan = plan_run(o, 16, 16);
  ASSERT_EQ(plan.images.size(), 100u);
  EXPECT_EQ(cells(plan.images),
            (std::map<std::string, int>{{"female,red", 40}, {"female,blue", 10}, {"male,red", 10}, {"male,blue", 40}}));
  EXPECT_EQ(joint_record(spec)["targets"]["male,green"], 0.0);
  EXPECT_EQ(joint_record(spec)["attributes"], (nlohmann::json{"gender", "colour"}));

  // Deterministic for a seed, another order for another seed, never in cell order.
  const RunPlan again = plan_run(o, 16, 16);
  o.seed = 8;
  const RunPlan other = plan_run(o, 16, 16);
  int same = 0;
  for (size_t k = 0; k < 100; ++k) {
    EXPECT_EQ(plan.images[k].groups, again.images[k].groups);
    same += plan.images[k].groups == other.images[k].groups;
  }
  EXPECT_LT(same, 80);
  EXPECT_EQ(cells(other.images), cells(plan.images));
}

TEST(Fairness, JointAssignmentIsTheSameForAnyShardSplit) {
  Scratch tmp("joint-shards");
  GenerateOptions o = options({}, 37);
  o.fairness_file = tmp.write("joint.json", kJoint);
  const RunPlan full = plan_run(o, 16, 16);
  for (int64_t shards : {2, 3, 5}) {
    std::map<int64_t, std::vector<std::pair<std::string, std::string>>> joined;
    for (int64_t k = 0; k < shards; ++k) {
      GenerateOptions s = o;
      s.shard_index = k;
      s.num_shards = shards;
      for (const auto& img : plan_run(s, 16, 16).shard()) EXPECT_TRUE(joined.emplace(img.index, img.groups).second);
    }
    ASSERT_EQ(joined.size(), full.images.size());
    for (const auto& img : full.images) EXPECT_EQ(joined.at(img.index), img.groups) << shards << " shards, " << img.index;
  }
}

TEST(Fairness, QuotasHoldPerPrompt) {
  Scratch tmp("per-prompt");
  GenerateOptions o = options({"gender=30:70"}, 10);
  o.prompt.clear();
  o.prompts_file = tmp.write("prompts.txt", "a doctor\n{\"prompt\": \"a nurse\", \"count\": 20}\na pilot\n");
  const RunPlan plan = plan_run(o, 16, 16);
  ASSERT_EQ(plan.images.size(), 40u);
  std::map<int64_t, std::vector<PlannedImage>> by_prompt;
  for (const auto& img : plan.images) by_prompt[img.prompt_index].push_back(img);
  EXPECT_EQ(count(by_prompt[0]), (std::map<std::string, int>{{"female", 3}, {"male", 7}}));
  EXPECT_EQ(count(by_prompt[1]), (std::map<std::string, int>{{"female", 6}, {"male", 14}}));
  EXPECT_EQ(count(by_prompt[2]), (std::map<std::string, int>{{"female", 3}, {"male", 7}}));
  // Each prompt its own shuffle: the first and last prompt (same count) differ in order.
  std::string first, last;
  for (size_t k = 0; k < 10; ++k) {
    first += by_prompt[0][k].groups[0].second[0];
    last += by_prompt[2][k].groups[0].second[0];
  }
  EXPECT_NE(first, last);

  // The joint's cells, too: 4 cells x 2 images for each of 2 prompts.
  o.fairness.clear();
  o.fairness_file = tmp.write("joint.json", R"({"joint": {"attributes": ["gender", "colour"],
      "targets": {"female,red": 1, "female,blue": 1, "male,red": 1, "male,blue": 1}}})");
  o.prompts_file = tmp.write("two.txt", "a kite\na boat\n");
  o.images_per_prompt = 8;
  std::map<int64_t, std::vector<PlannedImage>> joint_by_prompt;
  for (const auto& img : plan_run(o, 16, 16).images) joint_by_prompt[img.prompt_index].push_back(img);
  for (int64_t p : {0, 1})
    EXPECT_EQ(cells(joint_by_prompt[p]),
              (std::map<std::string, int>{{"female,red", 2}, {"female,blue", 2}, {"male,red", 2}, {"male,blue", 2}}));
}

TEST(Fairness, JointAgreesWithMarginalTargetsOrIsRejected) {
  Scratch tmp("joint-marginals");
  GenerateOptions o = options({});
  // Marginals that agree (after normalisation): fine, and overrides ride along.
  o.fairness_file = tmp.write("agree.json", R"({"attributes": [
      {"name": "gender", "targets": {"female": 1, "male": 1}, "edit_guidance_scale": 6},
      {"name": "colour", "targets": {"red": 5, "blue": 5}}],
    "joint": {"attributes": ["gender", "colour"],
      "targets": {"female,red": 40, "female,blue": 10, "male,red": 10, "male,blue": 40}}})");
  const FairnessSpec spec = parse_fairness(o);
  EXPECT_DOUBLE_EQ(spec.targets[0].attribute.defaults.edit_guidance_scale, 6);
  EXPECT_EQ(cells(plan_run(o, 16, 16).images).at("female,blue"), 10);
  o.fairness = {"gender=50:50"};  // the shorthand flag is a marginal target, too
  o.fairness_file = tmp.write("flag.json", kJoint);
  EXPECT_EQ(error_of(o), "");

  o.fairness = {"gender=30:70"};
  const std::string flag = error_of(o);
  EXPECT_NE(flag.find("joint targets contradict the marginal targets of gender: female is 0.3 there but 0.5 in the joint"),
            std::string::npos) << flag;
  o.fairness.clear();
  o.fairness_file = tmp.write("contradict.json", R"({"attributes": [{"name": "colour", "targets": {"red": 1}}],
    "joint": {"attributes": ["gender", "colour"], "targets": {"female,red": 1, "male,blue": 1}}})");
  const std::string file = error_of(o);
  EXPECT_NE(file.find("contradict.json: joint: joint targets contradict the marginal targets of colour"), std::string::npos)
      << file;
  EXPECT_NE(file.find("drop the marginal targets of colour"), std::string::npos) << file;
}

TEST(Fairness, EachBadJointIsOneClearLine) {
  Scratch tmp("bad-joint");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"joint": {"attributes": ["gender", "colour"], "targets": {"female,purple": 1}}})",
       "cell \"female,purple\": unknown group \"purple\" of attribute \"colour\""},
      {R"({"joint": {"attributes": ["gender", "colour"], "targets": {"female": 1}}})",
       "cell \"female\" names 1 group(s), expected 2"},
      {R"({"joint": {"attributes": ["gender", "colour"], "targets": {"female,red": -1, "male,red": 2}}})", "is negative"},
      {R"({"joint": {"attributes": ["gender", "colour"], "targets": {"female,red": 0}}})", "all ratios are zero"},
      {R"({"joint": {"attributes": ["gender", "colour"], "targets": {"female,red": "a lot"}}})",
       "target of cell \"female,red\" is not a number"},
      {R"({"joint": {"attributes": ["gender", "colour"], "targets": {"female,red": 1, "female, red": 1}}})",
       "\" is given twice"},  // "female, red" and "female,red" name one cell
      {R"({"joint": {"attributes": ["gender"], "targets": {"female": 1}}})", "at least two attribute names"},
      {R"({"joint": {"attributes": ["gender", "gender"], "targets": {}}})", "attribute \"gender\" is listed twice"},
      {R"({"joint": {"attributes": ["gender", "age"], "targets": {}}})", "unknown attribute \"age\""},
      {R"({"joint": {"attributes": ["gender", "colour"]}})", "expected an object with \"attributes\" and a \"targets\""},
      {R"({"attributes": [{"name": "gender"}]})", "gender: has no \"targets\" object and is not in the joint target"},
      {R"({"attributes": [{"name": "gender"}], "jiont": {}})", "unknown key \"jiont\""},
      {R"({"attributes": {"name": "gender"}, "joint": {}})", "is not a JSON object with an \"attributes\" list"},
  };
  for (const auto& [text, needle] : cases) {
    GenerateOptions o = options({});
    o.fairness_file = tmp.write("bad.json", text);
    const std::string what = error_of(o);
    EXPECT_NE(what.find(needle), std::string::npos) << text << " -> " << what;
  }
}

TEST(Fairness, RandomJointAssignmentDrawsOnlyCellsWithShares) {
  Scratch tmp("joint-random");
  GenerateOptions o = options({}, 400);
  o.assignment = "random";
  o.fairness_file = tmp.write("joint.json", kJoint);
  const auto counts = cells(plan_run(o, 16, 16).images);
  EXPECT_EQ(counts.size(), 4u);  // no green, never a zero-share cell
  EXPECT_GT(counts.at("female,red"), 120);
  EXPECT_GT(counts.at("male,blue"), 120);
}

// Records as generate writes them (the fields the resume check reads).
nlohmann::json record_of(const PlannedImage& img, const FairnessSpec& spec) {
  nlohmann::json r = {{"index", img.index},   {"file", img.file},   {"prompt", img.prompt},
                      {"negative_prompt", img.negative_prompt}, {"seed", img.seed},
                      {"steps", img.steps},   {"guidance_scale", img.cfg_scale},
                      {"width", img.width},   {"height", img.height}};
  if (!spec.enabled()) return r;
  nlohmann::json groups = nlohmann::json::object();
  for (const auto& [attribute, group] : img.groups) groups[attribute] = group;
  r["fairness"] = {{"groups", groups}, {"targets", targets_record(spec)}};
  if (spec.joint) r["fairness"]["joint"] = joint_record(spec);
  return r;
}

// Round-trips through text, as the manifest does.
std::map<int64_t, nlohmann::json> manifest_of(const GenerateOptions& o, size_t keep) {
  const RunPlan plan = plan_run(o, 16, 16);
  std::map<int64_t, nlohmann::json> done;
  for (size_t k = 0; k < keep; ++k)
    done[plan.images[k].index] = nlohmann::json::parse(record_of(plan.images[k], parse_fairness(o)).dump());
  return done;
}

std::string resume_error(const std::map<int64_t, nlohmann::json>& done, const GenerateOptions& o) {
  try {
    check_resume(done, plan_run(o, 16, 16).images, parse_fairness(o), "out/manifest.jsonl");
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::BadInput);
    return e.what();
  }
  return "";
}

TEST(Fairness, ResumeRefusesRecordsOfAnotherPlan) {
  Scratch tmp("resume");
  GenerateOptions o = options({"gender=30:70"}, 10);
  const auto done = manifest_of(o, 6);
  EXPECT_EQ(resume_error(done, o), "");  // the same command resumes

  GenerateOptions targets = o;
  targets.fairness = {"gender=female:1,male:1"};
  const std::string t = resume_error(done, targets);
  EXPECT_NE(t.find("out/manifest.jsonl: image "), std::string::npos) << t;
  EXPECT_NE(t.find("the folder holds another run (use a new --out for changed settings"), std::string::npos) << t;
  GenerateOptions seed = o;
  seed.seed = 9;
  EXPECT_NE(resume_error(done, seed).find("image 0 (00000-7.png) was made with seed 7, this run plans 9"),
            std::string::npos) << resume_error(done, seed);
  GenerateOptions prompt = o;
  prompt.prompt = "a photo of a nurse";
  EXPECT_NE(resume_error(done, prompt).find("was made with prompt \"a photo of the face of a firefighter\""),
            std::string::npos) << resume_error(done, prompt);
  GenerateOptions fewer = o;
  fewer.images_per_prompt = 4;  // quotas of 4 images differ: groups or the missing images are reported
  EXPECT_NE(resume_error(done, fewer).find("image "), std::string::npos);
  GenerateOptions plain = o;
  plain.fairness.clear();
  EXPECT_NE(resume_error(done, plain).find("was made with fairness groups {\"gender\":"), std::string::npos)
      << resume_error(done, plain);
  // A joint that keeps the marginals but moves images between cells is caught, too.
  GenerateOptions joint = options({}, 8);
  joint.fairness_file = tmp.write("a.json", kJoint);
  const auto joint_done = manifest_of(joint, 8);
  EXPECT_EQ(resume_error(joint_done, joint), "");
  joint.fairness_file = tmp.write("b.json", R"({"joint": {"attributes": ["gender", "colour"],
      "targets": {"female,red": 30, "female,blue": 20, "male,red": 20, "male,blue": 30}}})");
  EXPECT_NE(resume_error(joint_done, joint).find("image 0"), std::string::npos) << resume_error(joint_done, joint);
}

TEST(Fairness, RatiosAndEditSettingsAreFiniteAndInRange) {
  // Huge ratios would sum to infinity (every share 0); infinity and NaN are not numbers.
  for (const auto& [flag, needle] : std::vector<std::pair<std::string, std::string>>{
           {"gender=1e308:1", "ratio 1e+308 is more than 1e9"},
           {"gender=1e308:1e308", "ratio 1e+308 is more than 1e9"},
           {"gender=female:inf,male:1", "ratio \"inf\" of group \"female\" is not a number"},
           {"gender=female:nan,male:1", "is not a number"}}) {
    const std::string what = error_of(options({flag}));
    EXPECT_NE(what.find(needle), std::string::npos) << flag << " -> " << what;
  }
  EXPECT_EQ(error_of(options({"gender=1e9:1"})), "");
  Scratch tmp("edit-settings");
  for (const auto& [setting, needle] : std::vector<std::pair<std::string, std::string>>{
           {R"("edit_guidance_scale": -4)", "edit_guidance_scale -4 is not in [0, 100]"},
           {R"("edit_guidance_scale": 1e300)", "edit_guidance_scale 1e+300 is not in [0, 100]"},
           {R"("edit_momentum_scale": -0.5)", "edit_momentum_scale -0.5 is not in [0, 100]"},
           {R"("edit_mom_beta": 1.5)", "edit_mom_beta 1.5 is not in [0, 1]"},
           {R"("edit_threshold": 2)", "edit_threshold 2 is not in [0, 1]"},
           {R"("edit_warmup_steps": 2.5)", "edit_warmup_steps 2.5 is not a whole number"},
           {R"("edit_warmup_steps": 1.8446744073709552e20)", "edit_warmup_steps 1.844674407370955e+20 is not"},
           {R"("edit_warmup_steps": -1)", "edit_warmup_steps -1 is not a whole number in [0, 10000]"},
           {R"("edit_threshold": "high")", "an edit setting is not a number"}}) {
    GenerateOptions o = options({});
    o.fairness_file = tmp.write("f.json", R"({"attributes": [{"name": "gender", "targets": {"female": 1, "male": 1}, )" +
                                              setting + "}]}");
    const std::string what = error_of(o);
    EXPECT_NE(what.find("f.json: gender: " + needle), std::string::npos) << setting << " -> " << what;
  }
}

TEST(Fairness, NeedsAModelWithATextEncoder) {
  Scratch tmp("no-text-encoder");
  GenerateOptions o = options({"gender=50:50"});
  o.out_dir = (tmp.dir / "out").string();
  fs::create_directories(tmp.dir / "m");
  o.model = (tmp.dir / "m").string();
  tmp.write("m/model_index.json", R"({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
      "text_encoder": [null, null]})");
  auto error = [&] {
    try {
      validate(o);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::BadInput);
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error().find("--fairness: needs the model's text encoder to embed the edit prompts; " + o.model +
                         " has none (its model_index.json lists no text_encoder)"),
            std::string::npos) << error();
  tmp.write("m/model_index.json", R"({"text_encoder": ["transformers", "CLIPTextModel"]})");
  EXPECT_EQ(error(), "");
  // Single-file checkpoints: the text encoder is cond_stage_model.*.
  const std::vector<uint8_t> four(4, 0);
  write_safetensors((tmp.dir / "unet-only.safetensors").string(), {{"model.diffusion_model.x", DType::F32, {1}, four}});
  o.model = (tmp.dir / "unet-only.safetensors").string();
  o.fairness_file = tmp.write("f.json", R"({"attributes": [{"name": "gender", "targets": {"female": 1}}]})");
  o.fairness.clear();
  EXPECT_NE(error().find("--fairness-file: needs the model's text encoder"), std::string::npos) << error();
  EXPECT_NE(error().find("no cond_stage_model.* tensors"), std::string::npos) << error();
  write_safetensors((tmp.dir / "full.safetensors").string(),
                    {{"model.diffusion_model.x", DType::F32, {1}, four},
                     {"cond_stage_model.transformer.text_model.x", DType::F32, {1}, four}});
  o.model = (tmp.dir / "full.safetensors").string();
  EXPECT_EQ(error(), "");
  EXPECT_FALSE(fs::exists(o.out_dir));
}

}  // namespace
}  // namespace fairdiff
