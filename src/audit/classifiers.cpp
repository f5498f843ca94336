// The classifier registry and the classifiers of the torch-free layer: the toy world's
// hue classifier. The LibTorch library registers its own (a CLIP zero-shot classifier)
// through register_classifier, so the audit never needs to know which ones exist.
#include <algorithm>
#include <cmath>
#include <mutex>

#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "string_util.h"
#include "toy_world.h"

namespace fairdiff {
namespace {

// Hue classifier. The world's background is exactly grey (saturation 0) and its objects
// have saturation >= 0.75 and value >= 0.65; mixing with grey keeps the hue, so edge pixels
// vote like the object's inside, and only the weak ones drop out.
constexpr double kMinSaturation = 0.3;
constexpr double kMinChroma = 0.15;     // (max - min) / 255: the hue of dim or greyish pixels is noise
constexpr double kHueTolerance = 40;    // degrees from a group's hue; the world jitters by at most 12
constexpr double kMajority = 0.6;       // share of all voting pixels the winning group needs
constexpr double kMinArea = 0.004;      // share of the picture the winner must cover (the smallest object: 8%)
constexpr int64_t kMinPixels = 4;

double hue_distance(double a, double b) {
  const double d = std::fmod(std::abs(a - b), 360.0);
  return std::min(d, 360.0 - d);
}

// Classifiers by name, the built-in ones first; guarded, as a library may register from any thread.
struct Registry {
  std::mutex mutex;
  std::vector<ClassifierInfo> entries;
  Registry() {
    entries.push_back({"hue", "colour (the toy world's red, green, blue)",
                       [](const ClassifierOptions& o) -> std::unique_ptr<GroupClassifier> {
                         if (o.attribute != "colour") return nullptr;
                         return std::make_unique<HueClassifier>();
                       }});
  }
};

Registry& registry() {
  static Registry r;
  return r;
}

ClassifierInfo find_classifier(const std::string& name) {
  Registry& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    for (const ClassifierInfo& e : r.entries)
      if (e.name == name) return e;
  }
  throw_bad_input("--classifier " + name, "unknown classifier", "available: " + join(classifier_names()));
}

}  // namespace

void register_classifier(ClassifierInfo info) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (ClassifierInfo& e : r.entries)
    if (e.name == info.name) {
      e = std::move(info);
      return;
    }
  r.entries.push_back(std::move(info));
}

std::vector<std::string> classifier_names() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::string> names;
  for (const ClassifierInfo& e : r.entries) names.push_back(e.name);
  return names;
}

void check_classifier_name(const std::string& name) { find_classifier(name); }

std::unique_ptr<GroupClassifier> make_classifier(const std::string& name, const ClassifierOptions& options) {
  const ClassifierInfo e = find_classifier(name);
  if (auto c = e.make(options)) return c;
  throw_bad_input("--attribute " + options.attribute, "the " + name + " classifier cannot tell this attribute",
                  "it tells " + e.tells);
}

std::unique_ptr<GroupClassifier> make_classifier(const std::string& name, const std::string& attribute) {
  ClassifierOptions o;
  o.attribute = attribute;
  return make_classifier(name, o);
}

std::vector<int> GroupClassifier::classify_batch(const std::vector<const RgbImage*>& images) const {
  std::vector<int> out;
  for (const RgbImage* image : images) out.push_back(classify(image->rgb.data(), image->width, image->height));
  return out;
}

Rgb GroupClassifier::display_colour(int group) const {
  static const Rgb kPalette[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},  {214, 39, 40},  {148, 103, 189},
                                 {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};
  return kPalette[static_cast<size_t>(group) % (sizeof kPalette / sizeof kPalette[0])];
}

HueClassifier::HueClassifier() {
  const toy::World world;
  for (const toy::Colour& c : world.colours()) {
    groups_.push_back(c.name);
    hues_.push_back(c.hue);
  }
}

int HueClassifier::classify(const uint8_t* rgb, int width, int height) const {
  if (width <= 0 || height <= 0) return -1;
  const int64_t area = static_cast<int64_t>(width) * height;
  std::vector<int64_t> votes(hues_.size(), 0);
  int64_t voters = 0;  // every coloured pixel, also those far from any group's hue
  for (int64_t i = 0; i < area; ++i) {
    double h, s, v;
    toy::rgb_to_hsv(rgb + 3 * i, &h, &s, &v);
    if (s < kMinSaturation || s * v < kMinChroma) continue;  // s * v = (max - min) / 255
    ++voters;
    size_t best = 0;
    for (size_t g = 1; g < hues_.size(); ++g)
      if (hue_distance(h, hues_[g]) < hue_distance(h, hues_[best])) best = g;
    if (hue_distance(h, hues_[best]) <= kHueTolerance) ++votes[best];
  }
  const auto winner = std::max_element(votes.begin(), votes.end());
  const int64_t need = std::max<int64_t>(kMinPixels, static_cast<int64_t>(std::ceil(kMinArea * static_cast<double>(area))));
  if (*winner < need || static_cast<double>(*winner) < kMajority * static_cast<double>(voters)) return -1;
  return static_cast<int>(winner - votes.begin());
}

Rgb HueClassifier::display_colour(int group) const {
  Rgb out;
  toy::hsv_to_rgb(hues_[static_cast<size_t>(group)], 0.85, 0.85, out.data());
  return out;
}

}  // namespace fairdiff
