// `fairdiff audit DIR`: did a run reach the proportions it was asked for?
//
//   fairdiff::AuditOptions o;
//   o.dir = "runs/toy";                       // a --out folder: PNGs + manifest.jsonl (or shard manifests)
//   fairdiff::AuditReport r = fairdiff::audit(o);  // classifies every image; writes the chart and the sheet
//   std::fputs(fairdiff::audit_text(r).c_str(), stdout);  // or audit_json(r)
//
// A GroupClassifier puts each image into one group of one attribute (or leaves it
// unclassified); the audit counts the groups per prompt, with 95% Wilson intervals, and
// compares them with the targets and the per-image assignments that `generate --fairness`
// recorded in the manifest. Classifiers come by name from make_classifier(), so a CLIP
// zero-shot classifier can join the hue classifier of the toy world (register_classifier).
// Torch-free.
//
// JSON (audit_json), schema 1: fields may be added, never renamed or removed. Shares,
// interval bounds, targets and errors are fractions in [0, 1]; error = share - target.
//   {"schema": 1, "dir": str, "attribute": str, "classifier": str, "groups": [str],
//    "classifier_model": str, "margin": num,             // the classifier's model folder ("" = none)
//    "chart": str, "sheet": str,                       // the PNG files written
//    "prompts": [{"prompt": str, "images": int,
//                 "groups": [{"name": str, "count": int, "share": num, "low": num, "high": num,
//                             "target": num|null, "error": num|null}],   // classifier's group order
//                 "unclassified": int,
//                 "assigned": int,                     // images with an assigned group of the attribute
//                 "assigned_hit_rate": num|null,       // share of those classified into it
//                 "verified": int, "unverified": int}],  // generate --verify: reached / missed by its verifier
//    "overall": {"images": int, "unclassified": int,
//                "mean_abs_error": num|null,           // over all (prompt, group) pairs with a target
//                "max_abs_error": num|null, "assigned": int, "assigned_hit_rate": num|null,
//                "verified": int, "unverified": int},
//    "images": [{"file": str, "prompt": int, "assigned": str|null, "classified": str|null}]}  // run order
// A prompt has targets when its records carry fairness.targets for the attribute (a group
// the targets leave out has target 0); an unguided run has none, so its errors are null.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace fairdiff {

using Rgb = std::array<uint8_t, 3>;

// 8-bit RGB pixels, row-major, height x width x 3.
struct RgbImage {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

// Decodes a PNG (any bit depth / colour type) to RGB; BadInput naming the file on failure.
RgbImage read_png_rgb(const std::string& path);
// Scaled to fit a max_side square, aspect kept: area-averaged when shrinking, nearest when growing.
RgbImage make_thumbnail(const RgbImage& image, int max_side);

class GroupClassifier {
 public:
  virtual ~GroupClassifier() = default;
  virtual std::string name() const = 0;        // as given to make_classifier: "hue"
  virtual std::string attribute() const = 0;   // the attribute it tells: "colour"
  virtual const std::vector<std::string>& groups() const = 0;
  // Group index of a picture, or -1 when it cannot tell (no clear majority, nothing found).
  virtual int classify(const uint8_t* rgb, int width, int height) const = 0;
  // Several pictures at once, each as classify() would put it: a network classifier runs
  // them as one batch. The default calls classify() for each.
  virtual std::vector<int> classify_batch(const std::vector<const RgbImage*>& images) const;
  // How sure it is of each group, per group (sum 1), for records and margins; empty when the
  // classifier has no probabilities (the hue classifier counts votes).
  virtual std::vector<double> probabilities(const uint8_t* /*rgb*/, int /*width*/, int /*height*/) const { return {}; }
  // Both at once (generate --verify records the two): a network classifier overrides it to
  // run its network once.
  struct Judgement {
    int group = -1;
    std::vector<double> probabilities;
  };
  virtual Judgement judge(const uint8_t* rgb, int width, int height) const {
    return {classify(rgb, width, height), probabilities(rgb, width, height)};
  }
  // How charts and sheets draw group g: its own colour where the group is one, else a palette.
  virtual Rgb display_colour(int group) const;
};

// The toy world's colour attribute (src/toy_world.h): saturated pixels vote for the nearest
// group hue; the background is grey (R = G = B) and so never votes. Exact on the world's
// renders, and robust to the noise and blur of generated pictures.
class HueClassifier : public GroupClassifier {
 public:
  HueClassifier();
  std::string name() const override { return "hue"; }
  std::string attribute() const override { return "colour"; }
  const std::vector<std::string>& groups() const override { return groups_; }
  int classify(const uint8_t* rgb, int width, int height) const override;
  Rgb display_colour(int group) const override;

 private:
  std::vector<std::string> groups_;
  std::vector<double> hues_;  // degrees, per group
};

// The classifier registry. The torch-free library registers "hue"; the LibTorch library
// and embedders add theirs with register_classifier (explicitly, at start-up: a static
// initialiser in a static library is dropped by the linker when nothing else refers to it).
struct ClassifierOptions {
  std::string attribute;       // the attribute to tell: "colour", "gender"
  std::string model;           // the classifier's own model folder, "" when it needs none
  std::string device = "cpu";  // where a network classifier runs
  double margin = 0;           // a best probability below this leaves the image unclassified
  std::string attributes_dir;  // attribute library (class prompts), "" = the one found at run time
};
// Returns nullptr when the classifier cannot tell options.attribute.
using ClassifierFactory = std::function<std::unique_ptr<GroupClassifier>(const ClassifierOptions&)>;
struct ClassifierInfo {
  std::string name;   // --classifier NAME
  std::string tells;  // the attributes it tells, for error messages: "colour (the toy world's red, green, blue)"
  ClassifierFactory make;
};
// Adds a classifier, or replaces the one of the same name.
void register_classifier(ClassifierInfo info);
// Names the registry knows, in registration order, for help and error messages.
std::vector<std::string> classifier_names();
// BadInput naming the available classifiers when `name` is unknown.
void check_classifier_name(const std::string& name);
// BadInput naming the available classifiers (or the attributes this one tells) on failure.
std::unique_ptr<GroupClassifier> make_classifier(const std::string& name, const ClassifierOptions& options);
std::unique_ptr<GroupClassifier> make_classifier(const std::string& name, const std::string& attribute);

// Wilson score interval of the proportion k / n (z = 1.959964: 95%); [0, 1] when n = 0.
struct Interval {
  double low = 0, high = 1;
};
Interval wilson_interval(int64_t k, int64_t n, double z = 1.959964);

struct AuditOptions {
  std::string dir;                 // the run's --out folder
  std::string attribute;           // "" = the one the records assign (fairness.groups)
  std::string classifier = "hue";
  ClassifierOptions classifier_options;  // its model, device and margin (the attribute is filled in)
  std::string chart_path;          // "" = DIR/audit-chart.png
  std::string sheet_path;          // "" = DIR/audit-sheet.png
};

struct GroupShare {
  std::string name;
  int64_t count = 0;
  double share = 0, low = 0, high = 1;  // count / images, and its 95% Wilson interval
  std::optional<double> target;         // none for an unguided prompt
  std::optional<double> error() const { return target ? std::optional<double>(share - *target) : std::nullopt; }
};

struct PromptAudit {
  std::string prompt;
  int64_t images = 0, unclassified = 0;
  int64_t assigned = 0, assigned_hits = 0;  // images with an assigned group; of those, classified into it
  // Images that `generate --verify` checked: reached their group by its verifier, or kept
  // after the last retry still missing it (counted apart, never as hits of the verifier).
  int64_t verified = 0, unverified = 0;
  std::vector<GroupShare> groups;           // the classifier's group order
  std::optional<double> hit_rate() const;
};

// One audited image, in run order; the thumbnail only for the images the sheet shows.
struct ImageVerdict {
  std::string file;
  size_t prompt = 0;    // index into AuditReport::prompts
  int assigned = -1;    // group index, -1 = none
  int classified = -1;  // group index, -1 = unclassified
  int verified = -1;    // generate --verify: 1 reached its group, 0 still missed it; -1 not verified
  RgbImage thumbnail;
};

// The sheet and the chart stay a viewable size however large the run: the JSON has everything.
constexpr int kSheetThumbnail = 64;      // pixels per thumbnail side on the contact sheet
constexpr int kSheetMaxPerPrompt = 120;  // the first images of a prompt shown on the sheet
constexpr int kSheetMaxPrompts = 20;     // the first prompts shown on the sheet
constexpr int kChartMaxPrompts = 40;     // the first prompts shown on the chart

struct AuditReport {
  std::string dir, attribute, classifier, chart_path, sheet_path;
  std::string classifier_model;  // the classifier's model folder, "" when it needs none
  double margin = 0;             // ClassifierOptions::margin as used
  std::vector<std::string> groups;
  std::vector<Rgb> colours;  // display colour per group
  std::vector<PromptAudit> prompts;  // in order of first appearance
  std::vector<ImageVerdict> images;
  int64_t unclassified = 0, assigned = 0, assigned_hits = 0, verified = 0, unverified = 0;
  std::optional<double> mean_abs_error, max_abs_error;
  std::optional<double> hit_rate() const;
};

// Reads the manifest and every image, classifies, computes; writes the chart and the sheet.
// BadInput (naming the file or manifest line) for a missing folder or manifest, a malformed
// line, a missing or incomplete PNG, an unknown classifier or attribute.
AuditReport audit(const AuditOptions& options);

std::string audit_text(const AuditReport& report);  // the table printed by `fairdiff audit`
std::string audit_json(const AuditReport& report);  // the schema above, indented

// Bar chart: per prompt, target against achieved share per group (with its interval).
void write_audit_chart(const AuditReport& report, const std::string& path);
// Contact sheet: thumbnails framed in the assigned group's colour, crossed where the
// classifier disagrees with the assignment.
void write_audit_sheet(const AuditReport& report, const std::string& path);

}  // namespace fairdiff
