// The toy world of the shipped model (models/toy): small RGB pictures of one coloured
// object on a grey background, drawn procedurally, with a colour bias per object class
// that we choose, so that the bias of a model trained on it — and the effect of fair
// guidance — can be measured to the pixel. No people: the protected attribute of this
// world is the object's colour. Torch-free and deterministic on every platform (own
// random generator, no <random> distributions, whose results differ between libraries).
//
//   fairdiff::toy::World world;                       // the shipped world's classes and bias
//   fairdiff::toy::Sample s = world.sample(seed, i);  // i-th training picture of a stream
//   // s.rgb: 32x32x3 bytes; s.caption: "a photo of a red kite", "a boat", ...
//
// Pixels: the background is unsaturated (R = G = B, light grey with a gentle vertical
// gradient); every saturated pixel belongs to the object, whose colour is a clear hue
// (red 0°, green 120°, blue 240°, jittered by at most 12°), so a hue classifier can tell
// the group of an image exactly (see audit.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fairdiff::toy {

constexpr int kImageSize = 32;  // pixels per side of every picture

// A counter-based generator (splitmix64): value k of stream `seed` depends on nothing
// else, so a data stream can be regenerated from any position.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  double uniform();                                // [0, 1)
  double uniform(double lo, double hi);            // [lo, hi)
  int below(int n);                                // 0 .. n-1
  int pick(const std::vector<double>& weights);    // index drawn with these weights

 private:
  uint64_t state_;
};

struct Colour {
  std::string name;  // the word used in captions and edit prompts: "red"
  double hue;        // degrees
};

struct ObjectClass {
  std::string name;                // "kite"
  std::vector<double> colour_bias; // probability of each colour (World::colours order) in the data
};

struct Sample {
  int object_class = 0;
  int colour = 0;
  bool colour_in_caption = false;
  std::string caption;
  std::vector<uint8_t> rgb;  // kImageSize x kImageSize x 3, row-major
};

class World {
 public:
  // The shipped world: kite, boat, house, ball in red, green, blue, biased as
  // kite 90:5:5, boat 10:10:80, house 45:10:45, ball 20:70:10 (red:green:blue).
  World();

  const std::vector<Colour>& colours() const { return colours_; }
  const std::vector<ObjectClass>& classes() const { return classes_; }

  // Picture i of the data stream `seed`: class uniform, colour from the class's bias,
  // caption from templates that name the colour in about half of the captions.
  Sample sample(uint64_t seed, uint64_t i) const;
  // A picture of a chosen class and colour (tests, the classifier's checks).
  Sample render(int object_class, int colour, Rng& rng) const;

  // Caption templates ("a photo of a {colour} {class}", ...) drawn for sample().
  std::string caption(int object_class, int colour, bool name_colour, Rng& rng) const;

  int class_index(const std::string& name) const;   // -1 when unknown
  int colour_index(const std::string& name) const;  // -1 when unknown

 private:
  std::vector<Colour> colours_;
  std::vector<ObjectClass> classes_;
};

// HSV (degrees, [0,1], [0,1]) <-> 8-bit RGB, the conversions the world and the hue
// classifier share.
void hsv_to_rgb(double h, double s, double v, uint8_t out[3]);
void rgb_to_hsv(const uint8_t rgb[3], double* h, double* s, double* v);

}  // namespace fairdiff::toy
