// The audit: manifest records -> classified images -> per-prompt shares against the
// targets. Drawing the chart and the sheet lives in audit_render.cpp.
#include "fairdiff/audit.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "config_json.h"
#include "fairdiff/error.h"
#include "fs_util.h"
#include "png_io.h"
#include "string_util.h"
#include "toy_world.h"

#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC
#define STBI_ONLY_PNG
#include <stb_image.h>

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

// The largest image the audit decodes: 16384 x 16384, generate's largest.
constexpr int64_t kMaxAuditPixels = int64_t{16384} * 16384;

// One manifest line.
struct Record {
  nlohmann::json json;
  std::string where;  // "DIR/manifest.jsonl:3", for error messages
  int64_t index = 0;
  std::string file, prompt;
};

// DIR/manifest.jsonl, or the shard manifests of a run that was not merged yet.
std::vector<std::string> manifest_files(const std::string& dir) {
  const std::string whole = dir + "/manifest.jsonl";
  if (is_regular_file(whole)) return {whole};
  std::vector<std::string> shards;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (starts_with(name, "manifest-shard-") && e.path().extension() == ".jsonl") shards.push_back(e.path().string());
  }
  if (shards.empty())
    throw_bad_input(dir, "has no manifest.jsonl (nor manifest-shard-*.jsonl)", "give the --out folder of a fairdiff generate run");
  std::sort(shards.begin(), shards.end());
  return shards;
}

// `last`: the manifest's last line, where a run killed (or out of disk) while appending
// leaves a torn record; resuming the run repairs it.
Record parse_record(const std::string& line, const std::string& where, bool last) {
  Record r;
  r.where = where;
  r.json = nlohmann::json::parse(line, nullptr, false);
  if (r.json.is_discarded() && last)
    throw_bad_input(where, "the last line is torn (the run was killed or ran out of disk while writing it)",
                    "rerun the same generate command: it moves the line aside and redoes that image");
  if (r.json.is_discarded())
    throw_bad_input(where, "is not valid JSON",
                    "rerun the same generate command: it moves unreadable lines aside and redoes their images");
  const auto& j = r.json;
  if (!j.is_object() || !j.contains("index") || !j["index"].is_number_integer() || !j.contains("file") ||
      !j["file"].is_string() || !j.contains("prompt") || !j["prompt"].is_string())
    throw_bad_input(where, "a record needs \"index\" (an integer), \"file\" and \"prompt\" (strings)");
  const std::optional<int64_t> index = whole_number(j["index"]);
  if (!index) throw_bad_input(where, "\"index\" " + j["index"].dump() + " is not a whole number");
  r.index = *index;
  r.file = j["file"].get<std::string>();
  // A record names a file of the run's folder: never an absolute path or one that climbs
  // out of it (a manifest from elsewhere must not make the audit read other files).
  const fs::path file(r.file);
  bool climbs = file.empty() || file.is_absolute() || file.has_root_name() || file.has_root_directory();
  for (const auto& part : file) climbs = climbs || part == "..";
  if (climbs)
    throw_bad_input(where, "\"file\" " + j["file"].dump() + " is not a file inside the run folder",
                    "records name their PNG relative to the folder, e.g. \"00000-42.png\"");
  r.prompt = j["prompt"].get<std::string>();
  return r;
}

// Every record of the run, in run order (by index), each image once.
std::vector<Record> read_records(const std::string& dir) {
  std::map<int64_t, Record> by_index;
  for (const std::string& path : manifest_files(dir)) {
    std::ifstream in(path);
    std::string line;
    for (int64_t number = 1; std::getline(in, line); ++number) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const bool last = in.eof() || in.peek() == std::char_traits<char>::eof();
      Record r = parse_record(line, path + ":" + std::to_string(number), last);
      const auto [it, fresh] = by_index.emplace(r.index, r);
      if (!fresh && it->second.file != r.file)
        throw_bad_input(r.where, "image " + std::to_string(r.index) + " is also listed at " + it->second.where + " with another file",
                        "were these shards planned with different options?");
    }
  }
  if (by_index.empty()) throw_bad_input(dir, "the manifest lists no images", "wait for the run to write its first image");
  std::vector<Record> records;
  for (auto& [index, r] : by_index) records.push_back(std::move(r));
  return records;
}

// record.fairness.<field>.<attribute>, or nullptr.
const nlohmann::json* fairness_field(const nlohmann::json& record, const char* field, const std::string& attribute) {
  const auto f = record.find("fairness");
  if (f == record.end() || !f->is_object()) return nullptr;
  const auto g = f->find(field);
  if (g == f->end() || !g->is_object()) return nullptr;
  const auto a = g->find(attribute);
  return a == g->end() ? nullptr : &*a;
}

// --attribute, else the one attribute the records assign.
std::string resolve_attribute(const std::vector<Record>& records, const std::string& given, const std::string& dir) {
  if (!given.empty()) return given;
  std::set<std::string> found;
  for (const Record& r : records) {
    const auto f = r.json.find("fairness");
    if (f == r.json.end() || !f->is_object() || !f->contains("groups") || !(*f)["groups"].is_object()) continue;
    for (const auto& [attribute, group] : (*f)["groups"].items()) found.insert(attribute);
  }
  if (found.empty())
    throw_bad_input(dir, "the run has no fairness groups that say which attribute to audit", "give --attribute NAME, e.g. --attribute colour");
  if (found.size() > 1)
    throw_bad_input(dir, "the run assigns several attributes (" + join(std::vector<std::string>(found.begin(), found.end())) + ")",
                    "choose one with --attribute");
  return *found.begin();
}

int group_index(const GroupClassifier& c, const std::string& group, const std::string& where, const std::string& field) {
  const auto& groups = c.groups();
  const auto it = std::find(groups.begin(), groups.end(), group);
  if (it == groups.end())
    throw_bad_input(where, field + " names group \"" + group + "\", which the " + c.name() + " classifier does not tell",
                    "its groups: " + join(groups));
  return static_cast<int>(it - groups.begin());
}

// The assigned group of a record (-1 when none).
int assigned_group(const Record& r, const GroupClassifier& c) {
  const nlohmann::json* g = fairness_field(r.json, "groups", c.attribute());
  if (!g) return -1;
  const std::string field = "fairness.groups." + c.attribute();
  if (!g->is_string()) throw_bad_input(r.where, field + " is not a string");
  return group_index(c, g->get<std::string>(), r.where, field);
}

// The record's target shares per group (groups the targets leave out: 0), or none.
std::optional<std::vector<double>> targets_of(const Record& r, const GroupClassifier& c) {
  const nlohmann::json* t = fairness_field(r.json, "targets", c.attribute());
  if (!t) return std::nullopt;
  const std::string field = "fairness.targets." + c.attribute();
  if (!t->is_object()) throw_bad_input(r.where, field + " is not an object {group: share}");
  std::vector<double> shares(c.groups().size(), 0.0);
  for (const auto& [group, share] : t->items()) {
    if (!share.is_number()) throw_bad_input(r.where, field + "." + group + " is not a number");
    shares[static_cast<size_t>(group_index(c, group, r.where, field))] = share.get<double>();
  }
  return shares;
}

// Reads and checks one image of the run.
RgbImage read_image(const Record& r, const std::string& dir) {
  const std::string path = dir + "/" + r.file;
  const char* rerun = "rerun the generate command: it resumes and makes the missing images";
  if (!is_regular_file(path)) throw_bad_input(r.where, "lists " + r.file + ", which is missing", rerun);
  if (!png_is_complete(path)) throw_bad_input(path, "is not a complete PNG file", "delete it and " + std::string(rerun));
  return read_png_rgb(path);
}

// What generate --verify recorded: 1 reached, 0 missed, -1 not verified.
int verify_state(const Record& r) {
  auto v = r.json.find("verify");
  if (v == r.json.end() || !v->is_object()) return -1;
  auto ok = v->find("verified");
  if (ok == v->end() || !ok->is_boolean()) throw_bad_input(r.where, "verify.verified is not true or false");
  return ok->get<bool>() ? 1 : 0;
}

// Images are read and classified in batches of this many: a network classifier's batch,
// and the most decoded images held at once.
constexpr size_t kClassifyBatch = 32;

// The chart and the sheet go where the user asked: a missing folder is their mistake, found
// before the images are read.
void check_output_folder(const std::string& path, const std::string& flag) {
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty() && !is_directory(parent.string()))
    throw_bad_input(flag + " " + path, "folder " + parent.string() + " not found", "create it or choose another file");
}

PromptAudit new_prompt(const std::string& prompt, const std::vector<std::string>& groups) {
  PromptAudit p;
  p.prompt = prompt;
  p.groups.resize(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) p.groups[g].name = groups[g];
  return p;
}

void count(PromptAudit& p, const ImageVerdict& v) {
  ++p.images;
  if (v.classified < 0) ++p.unclassified;
  else ++p.groups[static_cast<size_t>(v.classified)].count;
  if (v.assigned >= 0) {
    ++p.assigned;
    if (v.classified == v.assigned) ++p.assigned_hits;
  }
  if (v.verified == 1) ++p.verified;
  if (v.verified == 0) ++p.unverified;
}

// Shares, intervals and the overall errors from the counts.
void finish(AuditReport& r) {
  double sum = 0, max = 0;
  int64_t pairs = 0;
  for (PromptAudit& p : r.prompts) {
    for (GroupShare& g : p.groups) {
      g.share = static_cast<double>(g.count) / static_cast<double>(p.images);
      const Interval i = wilson_interval(g.count, p.images);
      g.low = i.low;
      g.high = i.high;
      if (const auto e = g.error()) {
        sum += std::abs(*e);
        max = std::max(max, std::abs(*e));
        ++pairs;
      }
    }
    r.unclassified += p.unclassified;
    r.assigned += p.assigned;
    r.assigned_hits += p.assigned_hits;
    r.verified += p.verified;
    r.unverified += p.unverified;
  }
  if (pairs > 0) {
    r.mean_abs_error = sum / static_cast<double>(pairs);
    r.max_abs_error = max;
  }
}

std::optional<double> rate(int64_t hits, int64_t n) {
  if (n == 0) return std::nullopt;
  return static_cast<double>(hits) / static_cast<double>(n);
}

std::string percent(double share) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", 100.0 * share);
  return buf;
}

std::string signed_percent(double share) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%+.1f%%", 100.0 * share);
  return buf;
}

// Ordered: the JSON reads in the order the schema in audit.h documents.
nlohmann::ordered_json number_or_null(const std::optional<double>& v) {
  return v ? nlohmann::ordered_json(*v) : nlohmann::ordered_json(nullptr);
}

}  // namespace

RgbImage read_png_rgb(const std::string& path) {
  // The size from IHDR before decoding: a few hundred bytes of PNG can claim gigapixels
  // (a decompression bomb); stb would try to allocate them.
  const PngSize size = read_png_size(path);
  // In double: two 32-bit sides multiply past int64 (found by the png fuzzer).
  if (static_cast<double>(size.width) * static_cast<double>(size.height) > static_cast<double>(kMaxAuditPixels))
    throw_bad_input(path, "claims " + std::to_string(size.width) + "x" + std::to_string(size.height) +
                              " pixels, more than the audit reads (" + std::to_string(kMaxAuditPixels) + ")",
                    "audit the images fairdiff generated; this one is not");
  // stb_image believes chunk lengths: a 100-byte file whose IDAT claims 2 GB makes it
  // allocate 2 GB before it finds the data missing. A complete PNG's chunks fit the file.
  if (!png_is_complete(path)) throw_bad_input(path, "is not a complete PNG file", "regenerate the image");
  int w = 0, h = 0, channels = 0;
  uint8_t* pixels = stbi_load(path.c_str(), &w, &h, &channels, 3);
  if (!pixels) throw_bad_input(path, std::string("cannot decode the PNG: ") + stbi_failure_reason(), "regenerate the image");
  RgbImage image{w, h, std::vector<uint8_t>(pixels, pixels + static_cast<size_t>(w) * h * 3)};
  stbi_image_free(pixels);
  return image;
}

Interval wilson_interval(int64_t k, int64_t n, double z) {
  if (n <= 0) return {0, 1};
  const double nn = static_cast<double>(n), p = static_cast<double>(k) / nn, z2 = z * z;
  const double denominator = 1 + z2 / nn;
  const double centre = (p + z2 / (2 * nn)) / denominator;
  const double half = z * std::sqrt(p * (1 - p) / nn + z2 / (4 * nn * nn)) / denominator;
  return {std::max(0.0, centre - half), std::min(1.0, centre + half)};
}

std::optional<double> PromptAudit::hit_rate() const { return rate(assigned_hits, assigned); }
std::optional<double> AuditReport::hit_rate() const { return rate(assigned_hits, assigned); }

AuditReport audit(const AuditOptions& o) {
  if (!is_directory(o.dir)) throw_bad_input(o.dir, "run folder not found", "give the --out folder of a fairdiff generate run");
  check_classifier_name(o.classifier);  // a mistyped name fails before any image is read
  const std::vector<Record> records = read_records(o.dir);
  AuditReport r;
  r.dir = o.dir;
  r.attribute = resolve_attribute(records, o.attribute, o.dir);
  ClassifierOptions co = o.classifier_options;
  co.attribute = r.attribute;
  const std::unique_ptr<GroupClassifier> classifier = make_classifier(o.classifier, co);
  r.classifier = classifier->name();
  r.classifier_model = co.model;
  r.margin = co.margin;
  r.groups = classifier->groups();
  for (size_t g = 0; g < r.groups.size(); ++g) r.colours.push_back(classifier->display_colour(static_cast<int>(g)));
  r.chart_path = o.chart_path.empty() ? o.dir + "/audit-chart.png" : o.chart_path;
  r.sheet_path = o.sheet_path.empty() ? o.dir + "/audit-sheet.png" : o.sheet_path;
  check_output_folder(r.chart_path, "--chart");
  check_output_folder(r.sheet_path, "--sheet");

  std::map<std::string, size_t> prompt_slot;
  for (size_t begin = 0; begin < records.size(); begin += kClassifyBatch) {
    const size_t end = std::min(records.size(), begin + kClassifyBatch);
    std::vector<RgbImage> images;
    for (size_t i = begin; i < end; ++i) images.push_back(read_image(records[i], o.dir));
    std::vector<const RgbImage*> batch;
    for (const RgbImage& image : images) batch.push_back(&image);
    const std::vector<int> classified = classifier->classify_batch(batch);
    for (size_t i = begin; i < end; ++i) {
      const Record& rec = records[i];
      const auto [slot, fresh] = prompt_slot.emplace(rec.prompt, r.prompts.size());
      if (fresh) r.prompts.push_back(new_prompt(rec.prompt, r.groups));
      PromptAudit& p = r.prompts[slot->second];
      // The instruction is the same for every image of a prompt: the first record that has it tells it.
      if (!p.groups.front().target)
        if (const auto t = targets_of(rec, *classifier))
          for (size_t g = 0; g < t->size(); ++g) p.groups[g].target = (*t)[g];
      ImageVerdict v;
      v.file = rec.file;
      v.prompt = slot->second;
      v.assigned = assigned_group(rec, *classifier);
      v.classified = classified[i - begin];
      v.verified = verify_state(rec);
      if (slot->second < kSheetMaxPrompts && p.images < kSheetMaxPerPrompt)
        v.thumbnail = make_thumbnail(images[i - begin], kSheetThumbnail);
      count(p, v);
      r.images.push_back(std::move(v));
    }
  }
  finish(r);
  write_audit_chart(r, r.chart_path);
  write_audit_sheet(r, r.sheet_path);
  return r;
}

std::string audit_text(const AuditReport& r) {
  size_t width = std::string("unclassified").size();
  for (const auto& g : r.groups) width = std::max(width, g.size());
  const int w = static_cast<int>(width);
  std::string out;
  char line[512];
  std::snprintf(line, sizeof line, "audit of %s: %zu images, attribute %s, classifier %s", r.dir.c_str(), r.images.size(),
                r.attribute.c_str(), r.classifier.c_str());
  out += line;
  if (!r.classifier_model.empty()) {
    std::snprintf(line, sizeof line, " (%s, margin %g)", r.classifier_model.c_str(), r.margin);
    out += line;
  }
  out += "\n";
  for (const PromptAudit& p : r.prompts) {
    out += "\n\"" + p.prompt + "\": " + std::to_string(p.images) + " images\n";
    std::snprintf(line, sizeof line, "  %-*s %6s %7s  %-17s %7s %7s\n", w, "group", "count", "share", "95% interval", "target", "error");
    out += line;
    for (const GroupShare& g : p.groups) {
      const std::string interval = "[" + percent(g.low) + ", " + percent(g.high) + "]";
      const auto e = g.error();
      std::snprintf(line, sizeof line, "  %-*s %6lld %7s  %-17s %7s %7s\n", w, g.name.c_str(), static_cast<long long>(g.count),
                    percent(g.share).c_str(), interval.c_str(), g.target ? percent(*g.target).c_str() : "-",
                    e ? signed_percent(*e).c_str() : "-");
      out += line;
    }
    std::snprintf(line, sizeof line, "  %-*s %6lld %7s\n", w, "unclassified", static_cast<long long>(p.unclassified),
                  percent(static_cast<double>(p.unclassified) / static_cast<double>(p.images)).c_str());
    out += line;
    if (const auto hit = p.hit_rate())
      out += "  assigned group reached: " + std::to_string(p.assigned_hits) + " of " + std::to_string(p.assigned) + " (" +
             percent(*hit) + ")\n";
  }
  out += "\noverall: " + std::to_string(r.images.size()) + " images, " + std::to_string(r.unclassified) + " unclassified";
  if (r.mean_abs_error) out += ", mean |error| " + percent(*r.mean_abs_error) + ", max |error| " + percent(*r.max_abs_error);
  else out += ", no targets (an unguided run)";
  if (const auto hit = r.hit_rate()) out += ", assigned group reached " + percent(*hit);
  if (r.verified + r.unverified > 0)
    out += "; generate --verify: " + std::to_string(r.verified) + " verified, " + std::to_string(r.unverified) +
           " unverified (missed after every retry)";
  out += "\nchart: " + r.chart_path + "\nsheet: " + r.sheet_path + "\n";
  return out;
}

std::string audit_json(const AuditReport& r) {
  nlohmann::ordered_json prompts = nlohmann::ordered_json::array();
  for (const PromptAudit& p : r.prompts) {
    nlohmann::ordered_json groups = nlohmann::ordered_json::array();
    for (const GroupShare& g : p.groups)
      groups.push_back({{"name", g.name}, {"count", g.count}, {"share", g.share}, {"low", g.low}, {"high", g.high},
                        {"target", number_or_null(g.target)}, {"error", number_or_null(g.error())}});
    prompts.push_back({{"prompt", p.prompt}, {"images", p.images}, {"groups", groups}, {"unclassified", p.unclassified},
                       {"assigned", p.assigned}, {"assigned_hit_rate", number_or_null(p.hit_rate())},
                       {"verified", p.verified}, {"unverified", p.unverified}});
  }
  auto group_or_null = [&](int g) {
    return g < 0 ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(r.groups[static_cast<size_t>(g)]);
  };
  nlohmann::ordered_json images = nlohmann::ordered_json::array();
  for (const ImageVerdict& v : r.images)
    images.push_back({{"file", v.file}, {"prompt", v.prompt}, {"assigned", group_or_null(v.assigned)},
                      {"classified", group_or_null(v.classified)}});
  const nlohmann::ordered_json overall = {{"images", r.images.size()},
                                          {"unclassified", r.unclassified},
                                          {"mean_abs_error", number_or_null(r.mean_abs_error)},
                                          {"max_abs_error", number_or_null(r.max_abs_error)},
                                          {"assigned", r.assigned},
                                          {"assigned_hit_rate", number_or_null(r.hit_rate())},
                                          {"verified", r.verified},
                                          {"unverified", r.unverified}};
  const nlohmann::ordered_json j = {{"schema", 1},         {"dir", r.dir},           {"attribute", r.attribute},
                                    {"classifier", r.classifier}, {"groups", r.groups},
                                    {"classifier_model", r.classifier_model}, {"margin", r.margin}, {"chart", r.chart_path},
                                    {"sheet", r.sheet_path}, {"prompts", prompts},  {"overall", overall},
                                    {"images", images}};
  return j.dump(2) + "\n";
}

}  // namespace fairdiff
