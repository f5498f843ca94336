// Fair Diffusion's instruction: which identity group each image is steered toward.
// Torch-free: the attribute library, the --fairness / --fairness-file parsing and the
// assignment of groups to images are all decided in the run plan, before sharding.
//
//   FairnessOptions r;  r.fairness = {"gender=30:70"};
//   FairnessSpec spec = parse_fairness(r);                 // throws Error(BadInput), one line
//   auto g = assign_groups(spec, o.assignment, /*seed=*/42, /*prompt_index=*/0, /*n=*/100);
//   // g[k][a]: group index of image k for attribute a; exactly 30 "female", 70 "male"
//
// A --fairness-file may add one joint (intersectional) target over two or more attributes:
//
//   {"attributes": [{"name": "gender", "edit_guidance_scale": 5}],
//    "joint": {"attributes": ["gender", "colour"],
//              "targets": {"female,red": 40, "female,blue": 10, "male,red": 10, "male,blue": 40}}}
//
// Cell keys name one group per joint attribute, comma-separated in the joint's order;
// missing cells are 0. Largest remainder then runs over the cells, so every cell count is
// exact per prompt and the marginal counts follow. An attribute of the joint needs no
// "targets" of its own; when it has some (or a --fairness flag), they must equal the
// joint's marginals.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "fairdiff/options.h"

namespace fairdiff {

struct AttributeGroup {
  std::string name;
  std::vector<std::string> edit_prompts;  // each one edit concept, forward toward this group
  // How a zero-shot classifier (CLIP) names this group: its text embeddings are averaged
  // (a prompt ensemble). Empty when the attribute file has no "classifier_prompts".
  std::vector<std::string> classifier_prompts;
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

// An intersectional target: one share per combination of the attributes' groups.
struct JointTarget {
  std::vector<size_t> attributes;  // indices into FairnessSpec::targets, in the order of the cell keys
  std::vector<double> shares;      // per cell, row-major over the attributes' groups (last fastest), sum 1
};

struct FairnessSpec {
  std::vector<FairnessTarget> targets;  // in the order given; empty = fairness off
  // The joint target, if any; the shares of its attributes' targets are its marginals.
  std::optional<JointTarget> joint;
  std::string mode = "exact";  // --fairness-mode: exact | fast
  bool enabled() const { return !targets.empty(); }
};

// The attribute library: `dir` (--attributes) or, when empty, configs/attributes found by find_data
// (data_paths.h); BadInput when there is none.
std::string attributes_dir(const std::string& dir);
// Reads DIR/NAME.json; BadInput when missing, malformed, without groups or with an empty edit
// prompt, or with "classifier_prompts" ({"group": ["a photo of ...", ...]}) that name an unknown
// group, leave a group out or hold an empty prompt.
Attribute load_attribute(const std::string& name, const std::string& dir);

// --fairness values, --fairness-file and --assignment (FairnessOptions, fairdiff/options.h),
// checked (one BadInput line per problem).
FairnessSpec parse_fairness(const FairnessOptions& options);

// Largest remainder: integer counts summing to n, as close to shares * n as possible
// (ties to the earlier group).
std::vector<int64_t> quota_counts(const std::vector<double>& shares, int64_t n);

// Group indices of a prompt's n images: result[k][a] for image k and attribute a.
// "quota": exact largest-remainder counts per attribute (per cell for the joint target's
// attributes), in a seeded shuffled order; "random": each image drawn independently.
// Deterministic in (seed, prompt_index).
std::vector<std::vector<int64_t>> assign_groups(const FairnessSpec& spec, const std::string& assignment,
                                                int64_t seed, int64_t prompt_index, int64_t n);

// "gender=female, age=old": the A1111 "Fairness" parameter of an image.
std::string fairness_label(const std::vector<std::pair<std::string, std::string>>& groups);

// The instruction as image records carry it: {"gender": {"female": 0.3, "male": 0.7}, ...}.
nlohmann::json targets_record(const FairnessSpec& spec);
// The joint target as image records carry it: {"attributes": ["gender", "colour"],
// "targets": {"female,red": 0.4, ...}} (every cell, shares summing to 1); null without one.
nlohmann::json joint_record(const FairnessSpec& spec);

}  // namespace fairdiff
