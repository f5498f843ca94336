// The toy world of the shipped model: deterministic, biased as documented, captions that
// name the colour they show, and (when models/toy is present) a tokenizer that knows
// every word of it.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>

#include "tokenizer.h"
#include "toy_world.h"

namespace fs = std::filesystem;
using fairdiff::toy::Sample;
using fairdiff::toy::World;

TEST(ToyWorld, StreamIsDeterministicAndVaried) {
  const World world;
  const Sample a = world.sample(7, 123), b = world.sample(7, 123), c = world.sample(7, 124), d = world.sample(8, 123);
  EXPECT_EQ(a.rgb, b.rgb);
  EXPECT_EQ(a.caption, b.caption);
  EXPECT_NE(a.rgb, c.rgb);
  EXPECT_NE(a.rgb, d.rgb);
  ASSERT_EQ(a.rgb.size(), size_t(fairdiff::toy::kImageSize) * fairdiff::toy::kImageSize * 3);
}

TEST(ToyWorld, DataIsBiasedAsDocumented) {
  const World world;
  constexpr int kSamples = 40000;
  std::map<std::pair<int, int>, int> counts;
  std::map<int, int> per_class;
  int named = 0;
  for (int i = 0; i < kSamples; ++i) {
    const Sample s = world.sample(1, i);
    ++counts[{s.object_class, s.colour}];
    ++per_class[s.object_class];
    named += s.colour_in_caption;
    // The caption names the class unless it is the bare colour word, and names the
    // colour exactly when colour_in_caption says so.
    const std::string& colour = world.colours()[s.colour].name;
    EXPECT_EQ(s.caption.find(colour) != std::string::npos, s.colour_in_caption) << s.caption;
  }
  EXPECT_NEAR(double(named) / kSamples, 0.5, 0.01);
  for (size_t c = 0; c < world.classes().size(); ++c) {
    EXPECT_NEAR(double(per_class[int(c)]) / kSamples, 1.0 / world.classes().size(), 0.01);
    for (size_t k = 0; k < world.colours().size(); ++k)
      EXPECT_NEAR(double(counts[{int(c), int(k)}]) / per_class[int(c)], world.classes()[c].colour_bias[k], 0.015)
          << world.classes()[c].name << " " << world.colours()[k].name;
  }
  EXPECT_NEAR(world.classes()[world.class_index("kite")].colour_bias[world.colour_index("red")], 0.9, 1e-12);
}

TEST(ToyWorld, BackgroundIsGreyAndObjectIsItsHue) {
  const World world;
  fairdiff::toy::Rng rng(3);
  for (int c = 0; c < int(world.classes().size()); ++c)
    for (int k = 0; k < int(world.colours().size()); ++k) {
      const Sample s = world.render(c, k, rng);
      const uint8_t* corner = s.rgb.data();  // objects keep a 1-pixel margin
      EXPECT_TRUE(corner[0] == corner[1] && corner[1] == corner[2]);
      int object = 0;
      for (size_t p = 0; p < s.rgb.size(); p += 3) {
        double h, sat, v;
        fairdiff::toy::rgb_to_hsv(&s.rgb[p], &h, &sat, &v);
        if (sat < 0.5) continue;
        ++object;
        const double d = std::abs(std::fmod(h - world.colours()[k].hue + 540.0, 360.0) - 180.0);
        EXPECT_LE(d, 13.0) << world.classes()[c].name << " " << world.colours()[k].name;
      }
      EXPECT_GT(object, 30) << "too few object pixels";
    }
}

TEST(ToyWorld, ShippedTokenizerKnowsEveryWord) {
  const fs::path dir = fs::path(FAIRDIFF_SOURCE_DIR) / "models" / "toy" / "tokenizer";
  if (!fs::is_directory(dir)) GTEST_SKIP() << "models/toy is not there (scripts/train-toy makes it)";
  const auto tok = fairdiff::load_tokenizer(dir.string());
  const World world;
  fairdiff::toy::Rng rng(5);
  for (int i = 0; i < 2000; ++i) {
    const Sample s = world.sample(11, i);
    for (int64_t id : tok->encode_ids(s.caption)) EXPECT_NE(id, tok->unk_id()) << s.caption;
    EXPECT_FALSE(tok->tokenize(s.caption).truncated()) << s.caption;
  }
}
