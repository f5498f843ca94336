#include "toy_world.h"

#include <algorithm>
#include <cmath>

namespace fairdiff::toy {

namespace {

uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Shapes in pixel coordinates (x right, y down), centre (cx, cy), size s: inside()
// says whether a point is covered by the object.
struct Shape {
  int kind;  // index into World::classes()
  double cx, cy, s;

  bool inside(double x, double y) const {
    const double dx = x - cx, dy = y - cy;
    switch (kind) {
      case 0:  // kite: a tall diamond
        return std::abs(dx) / (0.65 * s) + std::abs(dy) / s <= 1.0;
      case 1: {  // boat: a hull (trapezoid, wide on top) under a right-angled sail
        if (dy >= 0.15 * s && dy <= 0.55 * s) {
          const double t = (dy - 0.15 * s) / (0.4 * s);  // 0 at the deck, 1 at the keel
          return std::abs(dx) <= s * (1.0 - 0.35 * t);
        }
        if (dy >= -s && dy < 0.1 * s && dx >= 0) return dx <= 0.75 * s * (dy + s) / (1.1 * s);
        return false;
      }
      case 2: {  // house: a square body with a door, under a triangular roof
        if (dy >= -0.1 * s && dy <= 0.8 * s && std::abs(dx) <= 0.7 * s)
          return !(std::abs(dx) <= 0.16 * s && dy >= 0.35 * s);  // the door shows the background
        if (dy >= -0.95 * s && dy < -0.1 * s) return std::abs(dx) <= 0.95 * s * (dy + 0.95 * s) / (0.85 * s);
        return false;
      }
      default:  // ball: a disc
        return dx * dx + dy * dy <= 0.8 * 0.8 * s * s;
    }
  }
};

}  // namespace

uint64_t Rng::next() {
  state_ += 0x9E3779B97F4A7C15ULL;
  return mix64(state_);
}

double Rng::uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }

double Rng::uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

int Rng::below(int n) { return int(uniform() * n); }

int Rng::pick(const std::vector<double>& weights) {
  double total = 0;
  for (double w : weights) total += w;
  double u = uniform() * total;
  for (size_t k = 0; k < weights.size(); ++k) {
    if (u < weights[k]) return int(k);
    u -= weights[k];
  }
  return int(weights.size()) - 1;
}

void hsv_to_rgb(double h, double s, double v, uint8_t out[3]) {
  h = std::fmod(std::fmod(h, 360.0) + 360.0, 360.0);
  const double c = v * s, hp = h / 60.0, x = c * (1 - std::abs(std::fmod(hp, 2.0) - 1));
  double r = 0, g = 0, b = 0;
  if (hp < 1) r = c, g = x;
  else if (hp < 2) r = x, g = c;
  else if (hp < 3) g = c, b = x;
  else if (hp < 4) g = x, b = c;
  else if (hp < 5) r = x, b = c;
  else r = c, b = x;
  const double m = v - c;
  const double rgb[3] = {r + m, g + m, b + m};
  for (int k = 0; k < 3; ++k) out[k] = uint8_t(std::lround(std::clamp(rgb[k], 0.0, 1.0) * 255.0));
}

void rgb_to_hsv(const uint8_t rgb[3], double* h, double* s, double* v) {
  const double r = rgb[0] / 255.0, g = rgb[1] / 255.0, b = rgb[2] / 255.0;
  const double mx = std::max({r, g, b}), mn = std::min({r, g, b}), d = mx - mn;
  *v = mx;
  *s = mx > 0 ? d / mx : 0;
  if (d <= 0) {
    *h = 0;
    return;
  }
  double hue;
  if (mx == r) hue = std::fmod((g - b) / d, 6.0);
  else if (mx == g) hue = (b - r) / d + 2;
  else hue = (r - g) / d + 4;
  hue *= 60;
  *h = hue < 0 ? hue + 360 : hue;
}

World::World()
    : colours_{{"red", 0.0}, {"green", 120.0}, {"blue", 240.0}},
      classes_{{"kite", {0.90, 0.05, 0.05}},
               {"boat", {0.10, 0.10, 0.80}},
               {"house", {0.45, 0.10, 0.45}},
               {"ball", {0.20, 0.70, 0.10}}} {}

int World::class_index(const std::string& name) const {
  for (size_t k = 0; k < classes_.size(); ++k)
    if (classes_[k].name == name) return int(k);
  return -1;
}

int World::colour_index(const std::string& name) const {
  for (size_t k = 0; k < colours_.size(); ++k)
    if (colours_[k].name == name) return int(k);
  return -1;
}

std::string World::caption(int object_class, int colour, bool name_colour, Rng& rng) const {
  const std::string& c = classes_[object_class].name;
  const std::string& col = colours_[colour].name;
  if (!name_colour) {
    static const char* const plain[] = {"a photo of a ", "a picture of a ", "an image of a ", "a ", ""};
    return plain[rng.pick({4, 2, 2, 3, 1})] + c;
  }
  // The bare colour word (as scraped alt text sometimes is) teaches the edit prompts
  // "red" / "green" / "blue" that the attribute file uses.
  switch (rng.pick({4, 2, 3, 2, 1})) {
    case 0: return "a photo of a " + col + " " + c;
    case 1: return "a picture of a " + col + " " + c;
    case 2: return "a " + col + " " + c;
    case 3: return "a " + c + " in " + col;
    default: return col;
  }
}

Sample World::render(int object_class, int colour, Rng& rng) const {
  Sample out;
  out.object_class = object_class;
  out.colour = colour;
  out.rgb.resize(size_t(kImageSize) * kImageSize * 3);

  const double s = rng.uniform(8.0, 12.5);
  const double margin = s + 1.0;
  const Shape shape{object_class, rng.uniform(margin, kImageSize - margin), rng.uniform(margin, kImageSize - margin), s};

  // Object colour: a clear hue (jitter <= 12 degrees), well saturated, mid to bright.
  uint8_t fg[3];
  hsv_to_rgb(colours_[colour].hue + rng.uniform(-12.0, 12.0), rng.uniform(0.75, 1.0), rng.uniform(0.65, 0.95), fg);
  // Background: unsaturated grey with a gentle vertical gradient.
  const double grey = rng.uniform(170.0, 235.0), slope = rng.uniform(-0.6, 0.6);

  constexpr int kSuper = 4;  // 4x4 samples per pixel give anti-aliased edges
  for (int y = 0; y < kImageSize; ++y) {
    const double bg = std::clamp(grey + slope * (y - kImageSize / 2), 0.0, 255.0);
    for (int x = 0; x < kImageSize; ++x) {
      int covered = 0;
      for (int sy = 0; sy < kSuper; ++sy)
        for (int sx = 0; sx < kSuper; ++sx)
          covered += shape.inside(x + (sx + 0.5) / kSuper, y + (sy + 0.5) / kSuper);
      const double a = double(covered) / (kSuper * kSuper);
      uint8_t* px = &out.rgb[(size_t(y) * kImageSize + x) * 3];
      for (int k = 0; k < 3; ++k) px[k] = uint8_t(std::lround(a * fg[k] + (1 - a) * bg));
    }
  }
  return out;
}

Sample World::sample(uint64_t seed, uint64_t i) const {
  Rng rng(mix64(mix64(seed) ^ (i * 0xD1B54A32D192ED03ULL)));
  const int object_class = rng.below(int(classes_.size()));
  const int colour = rng.pick(classes_[object_class].colour_bias);
  const bool name_colour = rng.uniform() < 0.5;
  std::string caption = this->caption(object_class, colour, name_colour, rng);
  Sample out = render(object_class, colour, rng);
  out.colour_in_caption = name_colour;
  out.caption = std::move(caption);
  return out;
}

}  // namespace fairdiff::toy
