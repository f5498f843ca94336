// Fair Diffusion's instruction, torch-free: attribute library, flag parsing, assignment.
#include "fairness.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>

#include "config_json.h"
#include "fairdiff/error.h"
#include "data_paths.h"
#include "fs_util.h"
#include "string_util.h"

namespace fairdiff {
namespace {

std::string number(double v);  // "%.6g"

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == sep) {
      parts.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  return parts;
}

bool parse_number(const std::string& text, double* out) {
  const std::string t = trim(text);
  if (t.empty()) return false;
  char* end = nullptr;
  const double v = std::strtod(t.c_str(), &end);
  if (*end != '\0' || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

std::string group_names(const Attribute& a) {
  std::string names;
  for (const auto& g : a.groups) names += (names.empty() ? "" : ", ") + g.name;
  return names;
}

int64_t group_index(const Attribute& a, const std::string& name) {
  for (size_t g = 0; g < a.groups.size(); ++g)
    if (a.groups[g].name == name) return static_cast<int64_t>(g);
  return -1;
}

// Ratios are shares, percentages or counts: finite, in [0, kMaxRatio], so that their sum
// and every share stay exact enough (1e308:1e308 would sum to infinity: all shares 0).
constexpr double kMaxRatio = 1e9;

// Ratios checked and normalised: non-negative, at most kMaxRatio, not all zero.
std::vector<double> normalise(const std::vector<double>& ratios, const std::string& where) {
  double total = 0;
  for (double r : ratios) {
    if (r < 0) throw_bad_input(where, "ratio " + std::to_string(r) + " is negative", "ratios are non-negative numbers");
    if (!(r <= kMaxRatio))
      throw_bad_input(where, "ratio " + number(r) + " is more than 1e9",
                      "ratios are shares, percentages or counts, e.g. 50:50 or 0.3:0.7");
    total += r;
  }
  if (!(total > 0)) throw_bad_input(where, "all ratios are zero", "give at least one group a positive share");
  std::vector<double> shares;
  for (double r : ratios) shares.push_back(r / total);
  return shares;
}

// "50:50" (one ratio per group, in the attribute's order) or "female:30,male:70" (named; others 0).
std::vector<double> parse_ratios(const Attribute& a, const std::string& text, const std::string& where) {
  double first = 0;
  const bool named = text.find(',') != std::string::npos || !parse_number(split(text, ':').front(), &first);
  std::vector<double> ratios(a.groups.size(), 0.0);
  if (!named) {
    const std::vector<std::string> parts = split(text, ':');
    if (parts.size() > a.groups.size())
      throw_bad_input(where, std::to_string(parts.size()) + " ratios for " + std::to_string(a.groups.size()) +
                                 " groups of \"" + a.name + "\" (more ratios than groups)",
                      "groups, in order: " + group_names(a));
    if (parts.size() < a.groups.size())
      throw_bad_input(where, std::to_string(parts.size()) + " ratio(s) for " + std::to_string(a.groups.size()) +
                                 " groups of \"" + a.name + "\"",
                      "give one ratio per group (" + group_names(a) + ") or name them: GROUP:RATIO,...");
    for (size_t g = 0; g < parts.size(); ++g)
      if (!parse_number(parts[g], &ratios[g]))
        throw_bad_input(where, "ratio \"" + parts[g] + "\" is not a number", "e.g. " + a.name + "=50:50");
  } else {
    std::set<std::string> seen;
    for (const std::string& item : split(text, ',')) {
      const size_t colon = item.rfind(':');
      const std::string group = trim(item.substr(0, colon == std::string::npos ? item.size() : colon));
      const int64_t g = group_index(a, group);
      if (g < 0)
        throw_bad_input(where, "unknown group \"" + group + "\" of attribute \"" + a.name + "\"",
                        "groups: " + group_names(a));
      if (!seen.insert(group).second) throw_bad_input(where, "group \"" + group + "\" is given twice");
      const std::string value = colon == std::string::npos ? "" : item.substr(colon + 1);
      if (!parse_number(value, &ratios[static_cast<size_t>(g)]))
        throw_bad_input(where, "ratio \"" + value + "\" of group \"" + group + "\" is not a number",
                        "e.g. " + a.name + "=" + a.groups.front().name + ":30,...");
    }
  }
  return normalise(ratios, where);
}

// The edit settings (library defaults or a fairness file's overrides), each checked by
// name: a scale in [0, 100] (a negative one would steer every image away from its own
// group), the threshold and momentum decay in [0, 1], whole non-negative warm-up steps.
void read_defaults(const nlohmann::json& j, EditDefaults* d, const std::string& where) {
  const auto setting = [&](const char* key, double* value, double lo, double hi) {
    if (!j.contains(key)) return;
    if (!j[key].is_number()) throw_bad_input(where, "an edit setting is not a number", "edit_* settings are numbers");
    const double v = j[key].get<double>();
    if (!(v >= lo && v <= hi))
      throw_bad_input(where, std::string(key) + " " + number(v) + " is not in [" + number(lo) + ", " + number(hi) + "]",
                      "edit_guidance_scale and edit_momentum_scale are in [0, 100], edit_threshold and "
                      "edit_mom_beta in [0, 1]");
    *value = v;
  };
  setting("edit_guidance_scale", &d->edit_guidance_scale, 0, 100);
  setting("edit_threshold", &d->edit_threshold, 0, 1);
  setting("edit_momentum_scale", &d->edit_momentum_scale, 0, 100);
  setting("edit_mom_beta", &d->edit_mom_beta, 0, 1);
  if (j.contains("edit_warmup_steps")) {
    const nlohmann::json& v = j["edit_warmup_steps"];
    if (!v.is_number()) throw_bad_input(where, "an edit setting is not a number", "edit_* settings are numbers");
    const std::optional<int64_t> steps = whole_number(v);
    if (!steps || *steps < 0 || *steps > 10000)
      throw_bad_input(where, "edit_warmup_steps " + v.dump() + " is not a whole number in [0, 10000]",
                      "the loop index of the first step that edits, e.g. 5");
    d->edit_warmup_steps = *steps;
  }
}

void check_groups(const Attribute& a, const std::string& where) {
  if (a.groups.empty()) throw_bad_input(where, "attribute \"" + a.name + "\" has no groups", "list at least two groups");
  std::set<std::string> names;
  for (const auto& g : a.groups) {
    if (g.name.empty()) throw_bad_input(where, "a group of \"" + a.name + "\" has no name");
    if (!names.insert(g.name).second) throw_bad_input(where, "group \"" + g.name + "\" is listed twice");
    if (g.edit_prompts.empty()) throw_bad_input(where, "group \"" + g.name + "\" has no edit prompts");
    for (const auto& p : g.edit_prompts)
      if (trim(p).empty()) throw_bad_input(where, "group \"" + g.name + "\" has an empty edit prompt");
  }
}

// "classifier_prompts": {"female": ["a photo of a woman", ...], ...}: every group, each with
// at least one prompt, or the classifier would silently never pick a group.
void read_classifier_prompts(const nlohmann::json& j, Attribute* a, const std::string& where) {
  const std::string form = "{\"GROUP\": [\"a photo of ...\", ...], ...} with every group";
  if (!j.is_object()) throw_bad_input(where, "\"classifier_prompts\" is not an object", form);
  for (auto it = j.begin(); it != j.end(); ++it) {
    auto g = std::find_if(a->groups.begin(), a->groups.end(), [&](const AttributeGroup& x) { return x.name == it.key(); });
    if (g == a->groups.end()) throw_bad_input(where, "classifier_prompts: unknown group \"" + it.key() + "\"", form);
    if (!it.value().is_array()) throw_bad_input(where, "classifier_prompts of \"" + it.key() + "\" is not a list", form);
    for (const auto& p : it.value()) {
      if (!p.is_string() || trim(p.get<std::string>()).empty())
        throw_bad_input(where, "classifier_prompts of \"" + it.key() + "\" has an empty or non-text prompt", form);
      g->classifier_prompts.push_back(p.get<std::string>());
    }
  }
  for (const AttributeGroup& g : a->groups)
    if (g.classifier_prompts.empty())
      throw_bad_input(where, "classifier_prompts has no prompt for group \"" + g.name + "\"", form);
}

// splitmix64: spreads (seed, prompt, attribute) over the generator's seed space.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

int64_t target_index(const FairnessSpec& spec, const std::string& name) {
  for (size_t a = 0; a < spec.targets.size(); ++a)
    if (spec.targets[a].attribute.name == name) return static_cast<int64_t>(a);
  return -1;
}

void add_target(FairnessSpec* spec, FairnessTarget t, const std::string& where) {
  if (target_index(*spec, t.attribute.name) >= 0)
    throw_bad_input(where, "attribute \"" + t.attribute.name + "\" is given twice");
  spec->targets.push_back(std::move(t));
}

std::string number(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.6g", v);
  return text;
}

// Cell `cell` of a joint over attributes with these group counts: one group per attribute (last fastest).
std::vector<int64_t> cell_groups(const std::vector<int64_t>& sizes, int64_t cell) {
  std::vector<int64_t> groups(sizes.size());
  for (size_t i = sizes.size(); i-- > 0; cell /= sizes[i]) groups[i] = cell % sizes[i];
  return groups;
}

std::vector<int64_t> joint_sizes(const FairnessSpec& spec, const JointTarget& joint) {
  std::vector<int64_t> sizes;
  for (size_t a : joint.attributes) sizes.push_back(static_cast<int64_t>(spec.targets[a].attribute.groups.size()));
  return sizes;
}

std::string cell_name(const FairnessSpec& spec, const JointTarget& joint, int64_t cell) {
  const std::vector<int64_t> groups = cell_groups(joint_sizes(spec, joint), cell);
  std::string name;
  for (size_t i = 0; i < groups.size(); ++i)
    name += (i ? "," : "") + spec.targets[joint.attributes[i]].attribute.groups[static_cast<size_t>(groups[i])].name;
  return name;
}

// One file entry: {"name", "targets", "edit_prompts", edit_* settings}. Without "targets" the
// shares stay empty: the joint target must supply them.
FairnessTarget read_file_entry(const nlohmann::json& entry, const std::string& path, const std::string& dir) {
  if (!entry.is_object() || !entry.contains("name") || !entry["name"].is_string())
    throw_bad_input(path, "an attribute has no \"name\"");
  FairnessTarget t;
  t.attribute = load_attribute(entry["name"].get<std::string>(), dir);
  const std::string where = path + ": " + t.attribute.name;
  if (entry.contains("targets")) {
    if (!entry["targets"].is_object())
      throw_bad_input(where, "\"targets\" is not an object", "{\"female\": 0.3, \"male\": 0.7}");
    std::vector<double> ratios(t.attribute.groups.size(), 0.0);
    for (auto it = entry["targets"].begin(); it != entry["targets"].end(); ++it) {
      const int64_t g = group_index(t.attribute, it.key());
      if (g < 0)
        throw_bad_input(where, "unknown group \"" + it.key() + "\"", "groups: " + group_names(t.attribute));
      if (!it.value().is_number()) throw_bad_input(where, "target of \"" + it.key() + "\" is not a number");
      ratios[static_cast<size_t>(g)] = it.value().get<double>();
    }
    t.shares = normalise(ratios, where);
  }
  // Overrides: "edit_prompts": {"female": ["woman"]}, and any edit_* setting.
  if (entry.contains("edit_prompts")) {
    if (!entry["edit_prompts"].is_object())
      throw_bad_input(where, "\"edit_prompts\" is not an object", "{\"female\": [\"woman\"], ...}");
    for (auto it = entry["edit_prompts"].begin(); it != entry["edit_prompts"].end(); ++it) {
      const int64_t g = group_index(t.attribute, it.key());
      if (g < 0) throw_bad_input(where, "edit_prompts: unknown group \"" + it.key() + "\"");
      if (!it.value().is_array()) throw_bad_input(where, "edit_prompts of \"" + it.key() + "\" is not a list");
      std::vector<std::string> prompts;
      for (const auto& p : it.value()) {
        if (!p.is_string()) throw_bad_input(where, "an edit prompt of \"" + it.key() + "\" is not a string");
        prompts.push_back(p.get<std::string>());
      }
      t.attribute.groups[static_cast<size_t>(g)].edit_prompts = prompts;
    }
    check_groups(t.attribute, where);
  }
  read_defaults(entry, &t.attribute.defaults, where);
  return t;
}

// The joint's attributes as indices into spec->targets; one it does not have yet comes from the library.
std::vector<size_t> joint_attributes(const nlohmann::json& names, const std::string& where, const std::string& dir,
                                     FairnessSpec* spec) {
  if (!names.is_array() || names.size() < 2)
    throw_bad_input(where, "\"attributes\" must list at least two attribute names",
                    "\"joint\": {\"attributes\": [\"gender\", \"colour\"], \"targets\": {\"female,red\": 1, ...}}");
  std::vector<size_t> indices;
  for (const auto& name : names) {
    if (!name.is_string()) throw_bad_input(where, "attribute " + name.dump() + " is not a name");
    int64_t a = target_index(*spec, name.get<std::string>());
    if (a < 0) {
      spec->targets.push_back({load_attribute(name.get<std::string>(), dir), {}});
      a = static_cast<int64_t>(spec->targets.size()) - 1;
    }
    if (std::find(indices.begin(), indices.end(), static_cast<size_t>(a)) != indices.end())
      throw_bad_input(where, "attribute \"" + name.get<std::string>() + "\" is listed twice");
    indices.push_back(static_cast<size_t>(a));
  }
  return indices;
}

// "female,red" -> its cell index in the joint; BadInput for a wrong count or an unknown group.
int64_t cell_index(const FairnessSpec& spec, const JointTarget& joint, const std::string& key, const std::string& where) {
  const std::vector<std::string> parts = split(key, ',');
  std::string order;
  for (size_t a : joint.attributes) order += (order.empty() ? "" : ",") + spec.targets[a].attribute.name;
  if (parts.size() != joint.attributes.size())
    throw_bad_input(where, "cell \"" + key + "\" names " + std::to_string(parts.size()) + " group(s), expected " +
                               std::to_string(joint.attributes.size()),
                    "one group per attribute, in the order " + order + ", e.g. \"" + cell_name(spec, joint, 0) + "\"");
  int64_t cell = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Attribute& attr = spec.targets[joint.attributes[i]].attribute;
    const int64_t g = group_index(attr, trim(parts[i]));
    if (g < 0)
      throw_bad_input(where, "cell \"" + key + "\": unknown group \"" + trim(parts[i]) + "\" of attribute \"" +
                                 attr.name + "\"",
                      "groups: " + group_names(attr));
    cell = cell * static_cast<int64_t>(attr.groups.size()) + g;
  }
  return cell;
}

// The joint's marginals become its attributes' shares; marginal targets given as well must agree.
void apply_marginals(FairnessSpec* spec, const JointTarget& joint, const std::string& where) {
  const std::vector<int64_t> sizes = joint_sizes(*spec, joint);
  for (size_t i = 0; i < joint.attributes.size(); ++i) {
    FairnessTarget& t = spec->targets[joint.attributes[i]];
    std::vector<double> marginal(t.attribute.groups.size(), 0.0);
    for (size_t c = 0; c < joint.shares.size(); ++c)
      marginal[static_cast<size_t>(cell_groups(sizes, static_cast<int64_t>(c))[i])] += joint.shares[c];
    for (size_t g = 0; g < marginal.size() && !t.shares.empty(); ++g)
      if (std::abs(t.shares[g] - marginal[g]) > 1e-9)
        throw_bad_input(where, "joint targets contradict the marginal targets of " + t.attribute.name + ": " +
                                   t.attribute.groups[g].name + " is " + number(t.shares[g]) + " there but " +
                                   number(marginal[g]) + " in the joint",
                        "drop the marginal targets of " + t.attribute.name + ", which the joint sets, or make them agree");
    t.shares = marginal;
  }
}

// "joint": {"attributes": [A, B, ...], "targets": {"GROUP_A,GROUP_B,...": ratio, ...}}; missing cells are 0.
void read_joint(const nlohmann::json& j, const std::string& path, const std::string& dir, FairnessSpec* spec) {
  const std::string where = path + ": joint";
  if (!j.is_object() || !j.contains("attributes") || !j.contains("targets") || !j["targets"].is_object())
    throw_bad_input(where, "expected an object with \"attributes\" and a \"targets\" object",
                    "\"joint\": {\"attributes\": [\"gender\", \"colour\"], \"targets\": {\"female,red\": 1, ...}}");
  JointTarget joint;
  joint.attributes = joint_attributes(j["attributes"], where, dir, spec);
  int64_t cells = 1;
  for (int64_t size : joint_sizes(*spec, joint)) cells *= size;
  std::vector<double> ratios(static_cast<size_t>(cells), 0.0);
  std::set<int64_t> seen;
  for (auto it = j["targets"].begin(); it != j["targets"].end(); ++it) {
    const int64_t cell = cell_index(*spec, joint, it.key(), where);
    if (!seen.insert(cell).second) throw_bad_input(where, "cell \"" + it.key() + "\" is given twice");
    if (!it.value().is_number()) throw_bad_input(where, "target of cell \"" + it.key() + "\" is not a number");
    ratios[static_cast<size_t>(cell)] = it.value().get<double>();
  }
  joint.shares = normalise(ratios, where);
  apply_marginals(spec, joint, where);
  spec->joint = std::move(joint);
}

// --fairness-file: {"attributes": [entry, ...], "joint": {...}}, either part optional.
void read_fairness_file(const std::string& path, const std::string& dir, FairnessSpec* spec) {
  if (!is_regular_file(path)) throw_bad_input(path, "fairness file not found", "give a JSON file");
  std::ifstream in(path);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  const bool object = !j.is_discarded() && j.is_object();
  if (!object || (!j.contains("attributes") && !j.contains("joint")) ||
      (j.contains("attributes") && !j["attributes"].is_array()))
    throw_bad_input(path, "is not a JSON object with an \"attributes\" list or a \"joint\" target",
                    "{\"attributes\": [{\"name\": \"gender\", \"targets\": {\"female\": 0.5, \"male\": 0.5}}]}");
  for (auto it = j.begin(); it != j.end(); ++it)  // a misspelt "joint" must not vanish silently
    if (it.key() != "attributes" && it.key() != "joint" && it.key() != "description")
      throw_bad_input(path, "unknown key \"" + it.key() + "\"", "known keys: attributes, joint, description");
  if (j.contains("attributes"))
    for (const auto& entry : j["attributes"]) {
      FairnessTarget t = read_file_entry(entry, path, dir);
      add_target(spec, std::move(t), path + ": " + entry["name"].get<std::string>());
    }
  if (j.contains("joint")) read_joint(j["joint"], path, dir, spec);
  for (const FairnessTarget& t : spec->targets)
    if (t.shares.empty())
      throw_bad_input(path + ": " + t.attribute.name, "has no \"targets\" object and is not in the joint target",
                      "add \"targets\": {\"" + t.attribute.groups.front().name + "\": 0.5, ...}");
}

// The cell (group, or joint cell) of each of n images. "quota": exact largest-remainder
// counts in a seeded shuffled order; "random": independent draws from the shares.
std::vector<int64_t> draw_cells(const std::vector<double>& shares, const std::string& assignment,
                                std::mt19937_64& rng, int64_t n) {
  std::vector<int64_t> order;
  if (assignment == "random") {
    // Independent draws: u in [0, 1) from the top 53 bits, then the cumulative shares.
    for (int64_t k = 0; k < n; ++k) {
      const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
      double cumulative = 0;
      int64_t g = static_cast<int64_t>(shares.size()) - 1;
      for (size_t j = 0; j < shares.size(); ++j) {
        cumulative += shares[j];
        if (u < cumulative && shares[j] > 0) { g = static_cast<int64_t>(j); break; }
      }
      while (g > 0 && shares[static_cast<size_t>(g)] == 0) --g;  // rounding past the end
      order.push_back(g);
    }
    return order;
  }
  const std::vector<int64_t> counts = quota_counts(shares, n);
  for (size_t g = 0; g < counts.size(); ++g) order.insert(order.end(), static_cast<size_t>(counts[g]), static_cast<int64_t>(g));
  // Fisher-Yates with our own index draw (std::uniform_int_distribution differs between
  // standard libraries); the modulo bias is below 2^-40 for any realistic n.
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng() % i]);
  return order;
}

}  // namespace

std::string attributes_dir(const std::string& dir) {
  if (!dir.empty()) return dir;
  const std::string found = find_data("configs/attributes");
  if (found.empty()) {
    std::string looked;
    for (const std::string& d : data_dirs()) looked += (looked.empty() ? "" : ", ") + d;
    throw_bad_input("--attributes", "no attribute library found (looked for configs/attributes in " + looked + ")",
                    "pass --attributes DIR or set FAIRDIFF_DATA_DIR");
  }
  return found;
}

Attribute load_attribute(const std::string& name, const std::string& dir) {
  const std::string folder = attributes_dir(dir);
  const std::string path = folder + "/" + name + ".json";
  if (name.empty() || name.find('/') != std::string::npos || !is_regular_file(path))
    throw_bad_input("--fairness", "unknown attribute \"" + name + "\" (no " + path + ")",
                    "add it to the attribute library or pass --attributes DIR");
  std::ifstream in(path);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw_bad_input(path, "is not valid JSON");
  Attribute a;
  a.name = name;
  try {
    a.description = j.value("description", std::string());
    if (j.contains("groups")) {
      if (!j["groups"].is_array()) throw_bad_input(path, "\"groups\" is not a list");
      for (const auto& g : j["groups"]) {
        AttributeGroup group;
        group.name = g.value("name", std::string());
        group.edit_prompts = g.value("edit_prompts", std::vector<std::string>{});
        a.groups.push_back(group);
      }
    }
  } catch (const nlohmann::json::exception&) {
    throw_bad_input(path, "a group has the wrong type", "groups: [{\"name\": ..., \"edit_prompts\": [...]}]");
  }
  check_groups(a, path);
  if (j.contains("defaults")) read_defaults(j["defaults"], &a.defaults, path);
  if (j.contains("classifier_prompts")) read_classifier_prompts(j["classifier_prompts"], &a, path);
  return a;
}

FairnessSpec parse_fairness(const FairnessOptions& o) {
  if (o.assignment != "quota" && o.assignment != "random")
    throw_bad_input("--assignment", "unknown assignment \"" + o.assignment + "\"", "use quota or random");
  FairnessSpec spec;
  spec.mode = o.fairness_mode;
  for (const std::string& value : o.fairness) {
    const std::string where = "--fairness " + value;
    const size_t eq = value.find('=');
    if (eq == std::string::npos)
      throw_bad_input(where, "expected ATTRIBUTE=RATIOS", "e.g. --fairness gender=50:50 or gender=female:30,male:70");
    FairnessTarget t;
    t.attribute = load_attribute(trim(value.substr(0, eq)), o.attributes_dir);
    t.shares = parse_ratios(t.attribute, value.substr(eq + 1), where);
    add_target(&spec, std::move(t), where);
  }
  if (!o.fairness_file.empty()) read_fairness_file(o.fairness_file, o.attributes_dir, &spec);
  // One momentum per image in semantic guidance: attributes must agree on it.
  for (const auto& t : spec.targets) {
    const EditDefaults &a = spec.targets.front().attribute.defaults, &b = t.attribute.defaults;
    if (a.edit_momentum_scale != b.edit_momentum_scale || a.edit_mom_beta != b.edit_mom_beta)
      throw_bad_input("--fairness", "attributes \"" + spec.targets.front().attribute.name + "\" and \"" +
                                        t.attribute.name + "\" set different edit momentum",
                      "give them the same edit_momentum_scale and edit_mom_beta");
  }
  return spec;
}

std::vector<int64_t> quota_counts(const std::vector<double>& shares, int64_t n) {
  std::vector<int64_t> counts(shares.size(), 0);
  std::vector<std::pair<double, size_t>> remainders;
  int64_t given = 0;
  for (size_t g = 0; g < shares.size(); ++g) {
    const double exact = shares[g] * static_cast<double>(n);
    counts[g] = static_cast<int64_t>(std::floor(exact));
    given += counts[g];
    remainders.emplace_back(exact - std::floor(exact), g);
  }
  // Largest remainders first; equal remainders to the earlier group.
  std::stable_sort(remainders.begin(), remainders.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = 0; given < n && !remainders.empty(); ++given, i = (i + 1) % remainders.size())
    ++counts[remainders[i].second];
  return counts;
}

std::vector<std::vector<int64_t>> assign_groups(const FairnessSpec& spec, const std::string& assignment,
                                                int64_t seed, int64_t prompt_index, int64_t n) {
  // One draw per attribute, except that the joint target's attributes share one draw over its cells.
  struct Draw {
    std::vector<size_t> attributes;
    std::vector<double> shares;  // per cell
    size_t stream;               // keys the generator: an attribute's draw never changes when others are added
  };
  std::vector<Draw> draws;
  std::vector<bool> in_joint(spec.targets.size(), false);
  if (spec.joint) {
    draws.push_back({spec.joint->attributes, spec.joint->shares, spec.joint->attributes.front()});
    for (size_t a : spec.joint->attributes) in_joint[a] = true;
  }
  for (size_t a = 0; a < spec.targets.size(); ++a)
    if (!in_joint[a]) draws.push_back({{a}, spec.targets[a].shares, a});

  std::vector<std::vector<int64_t>> result(static_cast<size_t>(n), std::vector<int64_t>(spec.targets.size(), 0));
  for (const Draw& draw : draws) {
    std::mt19937_64 rng(mix(mix(mix(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(prompt_index)) ^ draw.stream));
    const std::vector<int64_t> cells = draw_cells(draw.shares, assignment, rng, n);
    std::vector<int64_t> sizes;
    for (size_t a : draw.attributes) sizes.push_back(static_cast<int64_t>(spec.targets[a].attribute.groups.size()));
    for (int64_t k = 0; k < n; ++k) {
      const std::vector<int64_t> groups = cell_groups(sizes, cells[static_cast<size_t>(k)]);
      for (size_t i = 0; i < groups.size(); ++i) result[static_cast<size_t>(k)][draw.attributes[i]] = groups[i];
    }
  }
  return result;
}

std::string fairness_label(const std::vector<std::pair<std::string, std::string>>& groups) {
  std::string label;
  for (const auto& [attribute, group] : groups) label += (label.empty() ? "" : ", ") + attribute + "=" + group;
  return label;
}

nlohmann::json targets_record(const FairnessSpec& spec) {
  nlohmann::json targets = nlohmann::json::object();
  for (const FairnessTarget& t : spec.targets)
    for (size_t g = 0; g < t.attribute.groups.size(); ++g) targets[t.attribute.name][t.attribute.groups[g].name] = t.shares[g];
  return targets;
}

nlohmann::json joint_record(const FairnessSpec& spec) {
  if (!spec.joint) return nullptr;
  nlohmann::json names = nlohmann::json::array(), cells = nlohmann::json::object();
  for (size_t a : spec.joint->attributes) names.push_back(spec.targets[a].attribute.name);
  for (size_t c = 0; c < spec.joint->shares.size(); ++c)
    cells[cell_name(spec, *spec.joint, static_cast<int64_t>(c))] = spec.joint->shares[c];
  return {{"attributes", names}, {"targets", cells}};
}

}  // namespace fairdiff
