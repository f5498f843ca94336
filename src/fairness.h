// Fair Diffusion's instruction: which identity group each image is steered toward.
// Torch-free: the attribute library, the --fairness / --fairness-file parsing and the
// assignment of groups to images are all decided in the run plan, before sharding.
//
//   GenerateOptions o;  o.fairness = {"gender=30:70"};
//   FairnessSpec spec = parse_fairness(o);                 // throws Error(BadInput), one line
//   auto g = assign_groups(spec, o.assignment, /*seed=*/42, /*prompt_index=*/0, /*n=*/100);
//   // g[k][a]: group index of image k for attribute a; exactly 30 "female", 70 "male"
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fairdiff/generate.h"

namespace fairdiff {

struct AttributeGroup {
  std::string name;
  std::vector<std::string> edit_prompts;  // each one edit concept, forward toward this group
};

// Semantic-guidance settings of an attribute (configs/attributes/*.json "defaults").
struct EditDefaults {
  double edit_guidance_scale = 4;
  double edit_threshold = 0.95;
  int64_t edit_warmup_steps = 5;
  double edit_momentum_scale = 0.5;
  double edit_mom_beta = 0.6;
};

struct Attribute {
  std::string name, description;
  std::vector<AttributeGroup> groups;
  EditDefaults defaults;
};

// One attribute of the instruction: its groups and the normalised target shares (sum 1).
struct FairnessTarget {
  Attribute attribute;
  std::vector<double> shares;  // per group, in the attribute's group order
};

struct FairnessSpec {
  std::vector<FairnessTarget> targets;  // in the order given; empty = fairness off
  bool enabled() const { return !targets.empty(); }
};

// The attribute library: `dir` (--attributes) or, when empty, the source tree's configs/attributes.
std::string attributes_dir(const std::string& dir);
// Reads DIR/NAME.json; BadInput when missing, malformed, without groups or with an empty edit prompt.
Attribute load_attribute(const std::string& name, const std::string& dir);

// --fairness values, --fairness-file and --assignment, checked (one BadInput line per problem).
FairnessSpec parse_fairness(const GenerateOptions& options);

// Largest remainder: integer counts summing to n, as close to shares * n as possible
// (ties to the earlier group).
std::vector<int64_t> quota_counts(const std::vector<double>& shares, int64_t n);

// Group indices of a prompt's n images: result[k][a] for image k and attribute a.
// "quota": exact largest-remainder counts per attribute, in a seeded shuffled order;
// "random": each image drawn independently. Deterministic in (seed, prompt_index).
std::vector<std::vector<int64_t>> assign_groups(const FairnessSpec& spec, const std::string& assignment,
                                                int64_t seed, int64_t prompt_index, int64_t n);

// "gender=female, age=old": the A1111 "Fairness" parameter of an image.
std::string fairness_label(const std::vector<std::pair<std::string, std::string>>& groups);

}  // namespace fairdiff
