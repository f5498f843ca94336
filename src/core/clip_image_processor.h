// CLIPImageProcessor (transformers), bit for bit: shortest-edge resize with Pillow's
// bicubic filter, centre crop, rescale, normalise. Torch-free.
//
//   CLIPImageProcessorConfig p = CLIPImageProcessorConfig::from_json(json, path);
//   ClipPixels x = clip_preprocess(rgb, width, height, p);  // x.values: [3, crop_h, crop_w]
//
// Why Pillow's resize and not a generic bicubic: CLIP was trained on images that went
// through exactly it. Pillow's cubic kernel has a = -0.5 (torch and OpenCV use -0.75), is
// stretched by the scale when shrinking (antialiasing), uses 22-bit fixed-point weights
// for 8-bit images, and rounds the horizontal pass to a uint8 image before the vertical
// one. A float implementation differs by one level at 14-23% of the pixels, and one level
// is 0.015 after normalisation: far beyond the golden tolerance.
#pragma once

#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace fairdiff {

struct CLIPImageProcessorConfig {  // defaults: transformers' CLIPImageProcessor
  bool do_resize = true;
  int64_t shortest_edge = 224;
  int64_t resample = 3;  // PIL.Image.BICUBIC, the only filter implemented
  bool do_center_crop = true;
  int64_t crop_height = 224, crop_width = 224;
  bool do_rescale = true;
  double rescale_factor = 1.0 / 255.0;
  bool do_normalize = true;
  std::array<double, 3> image_mean{0.48145466, 0.4578275, 0.40821073};
  std::array<double, 3> image_std{0.26862954, 0.26130258, 0.27577711};

  static CLIPImageProcessorConfig from_json(const nlohmann::json& config, const std::string& where);
};

// 8-bit RGB, row-major, height x width x 3.
struct Rgb8 {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

// Pillow's Image.resize(size, Image.BICUBIC) of an 8-bit RGB image (Pillow 9.x).
Rgb8 pil_resize_bicubic(const Rgb8& image, int64_t out_width, int64_t out_height);

// transformers' shortest-edge size: the short side becomes `shortest_edge`, the long one
// int(shortest_edge * long / short) (truncated). Returns {width, height}.
std::array<int64_t, 2> shortest_edge_size(int64_t width, int64_t height, int64_t shortest_edge);

struct ClipPixels {
  std::vector<float> values;  // [3, H, W], channel-major: what pixel_values holds for one image
  int64_t width = 0, height = 0;
  Rgb8 resized, cropped;      // the uint8 intermediates, for tests
};

// The whole processor on one image. An image smaller than the crop is padded with zeros
// around the centre, as transformers' center_crop does.
ClipPixels clip_preprocess(const uint8_t* rgb, int64_t width, int64_t height, const CLIPImageProcessorConfig& config);

}  // namespace fairdiff
