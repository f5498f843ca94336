// CLIPImageProcessor's settings and geometry, and the attribute files' class prompts (torch-free).
// The bit-exact Pillow resize is checked against the reference by the clip/ golden cases.
#include <gtest/gtest.h>

#include <fstream>

#include "clip_image_processor.h"
#include "fairness.h"
#include "test_util.h"

namespace fairdiff {
namespace {

Rgb8 gradient(int64_t w, int64_t h) {
  Rgb8 image{w, h, std::vector<uint8_t>(static_cast<size_t>(w * h * 3))};
  for (int64_t i = 0; i < w * h * 3; ++i) image.rgb[static_cast<size_t>(i)] = static_cast<uint8_t>((i * 37) % 251);
  return image;
}

TEST(ClipPreprocess, ShortestEdgeTruncatesTheLongSide) {
  EXPECT_EQ(shortest_edge_size(45, 37, 32), (std::array<int64_t, 2>{38, 32}));  // int(32 * 45 / 37) = 38
  EXPECT_EQ(shortest_edge_size(50, 20, 32), (std::array<int64_t, 2>{80, 32}));
  EXPECT_EQ(shortest_edge_size(20, 50, 32), (std::array<int64_t, 2>{32, 80}));
  EXPECT_EQ(shortest_edge_size(64, 64, 32), (std::array<int64_t, 2>{32, 32}));
}

TEST(ClipPreprocess, SameSizeIsACopyAndAFlatImageStaysFlat) {
  const Rgb8 image = gradient(7, 5);
  EXPECT_EQ(pil_resize_bicubic(image, 7, 5).rgb, image.rgb);
  // The weights of every output pixel sum to one in fixed point: a constant image stays
  // constant when shrunk, grown or both.
  Rgb8 flat{9, 6, std::vector<uint8_t>(9 * 6 * 3, 200)};
  for (auto [w, h] : {std::pair<int64_t, int64_t>{4, 3}, {17, 11}, {9, 2}, {3, 6}}) {
    const Rgb8 out = pil_resize_bicubic(flat, w, h);
    ASSERT_EQ(out.rgb.size(), static_cast<size_t>(w * h * 3));
    for (uint8_t v : out.rgb) EXPECT_EQ(v, 200) << w << "x" << h;
  }
}

TEST(ClipPreprocess, NormalisesPerChannelInFloat) {
  CLIPImageProcessorConfig p;
  p.shortest_edge = 2;
  p.crop_height = p.crop_width = 2;
  const std::vector<uint8_t> rgb(2 * 2 * 3, 255);
  const ClipPixels x = clip_preprocess(rgb.data(), 2, 2, p);
  ASSERT_EQ(x.values.size(), 12u);
  for (int c = 0; c < 3; ++c)
    EXPECT_FLOAT_EQ(x.values[static_cast<size_t>(c * 4)],
                    (1.0f - static_cast<float>(p.image_mean[size_t(c)])) / static_cast<float>(p.image_std[size_t(c)]));
}

TEST(ClipPreprocess, ASmallImageIsCentredOnZerosByTheCrop) {
  CLIPImageProcessorConfig p;
  p.do_resize = false;
  p.do_rescale = p.do_normalize = false;
  p.crop_height = 4;
  p.crop_width = 5;
  const std::vector<uint8_t> rgb(2 * 3 * 3, 9);  // 3 wide, 2 high
  const ClipPixels x = clip_preprocess(rgb.data(), 3, 2, p);
  ASSERT_EQ(x.cropped.width, 5);
  ASSERT_EQ(x.cropped.height, 4);
  // Padding ceil(2/2) = 1 row on top and ceil(2/2) = 1 column on the left.
  for (int64_t y = 0; y < 4; ++y)
    for (int64_t xx = 0; xx < 5; ++xx) {
      const bool inside = y >= 1 && y < 3 && xx >= 1 && xx < 4;
      EXPECT_EQ(x.cropped.rgb[static_cast<size_t>((y * 5 + xx) * 3)], inside ? 9 : 0) << y << "," << xx;
    }
}

TEST(ClipPreprocess, ConfigValuesWeDoNotImplementAreRefusedByName) {
  using nlohmann::json;
  test::expect_error([] { CLIPImageProcessorConfig::from_json(json{{"resample", 2}}, "p.json"); }, ErrorKind::Unsupported,
                     {"p.json", "resample", "3 (bicubic)"});
  test::expect_error([] { CLIPImageProcessorConfig::from_json(json{{"size", {{"height", 224}, {"width", 224}}}}, "p.json"); },
                     ErrorKind::Unsupported, {"size", "shortest_edge"});
  test::expect_error([] { CLIPImageProcessorConfig::from_json(json{{"image_mean", {0.5, 0.5}}}, "p.json"); },
                     ErrorKind::BadInput, {"image_mean", "three numbers"});
  test::expect_error([] { CLIPImageProcessorConfig::from_json(json{{"image_std", {0.5, 0, 0.5}}}, "p.json"); },
                     ErrorKind::BadInput, {"image_std", "positive"});
  const CLIPImageProcessorConfig c =
      CLIPImageProcessorConfig::from_json(json{{"size", 336}, {"crop_size", 336}}, "p.json");  // older int form
  EXPECT_EQ(c.shortest_edge, 336);
  EXPECT_EQ(c.crop_height, 336);
  EXPECT_EQ(c.crop_width, 336);
}

TEST(ClipPreprocess, LibraryAttributesHaveClassPrompts) {
  for (const std::string name : {"gender", "colour"}) {
    const Attribute a = load_attribute(name, "");
    for (const AttributeGroup& g : a.groups) EXPECT_FALSE(g.classifier_prompts.empty()) << name << "/" << g.name;
  }
}

TEST(ClipPreprocess, BadClassPromptsAreOneClearLine) {
  test::TempDir dir;
  const std::string groups = R"("groups": [{"name": "a", "edit_prompts": ["x"]}, {"name": "b", "edit_prompts": ["y"]}])";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("classifier_prompts": {"a": ["p"], "c": ["q"]})", "unknown group \"c\""},
      {R"("classifier_prompts": {"a": ["p"]})", "no prompt for group \"b\""},
      {R"("classifier_prompts": {"a": ["p"], "b": [" "]})", "empty or non-text prompt"},
      {R"("classifier_prompts": {"a": "p", "b": ["q"]})", "is not a list"},
      {R"("classifier_prompts": ["p"])", "is not an object"}};
  for (const auto& [field, needle] : cases) {
    std::ofstream(dir / "t.json") << "{" << groups << ", " << field << "}";
    test::expect_error([&] { load_attribute("t", dir.path.string()); }, ErrorKind::BadInput, {"t.json", needle});
  }
}

}  // namespace
}  // namespace fairdiff
