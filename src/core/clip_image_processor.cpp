// CLIPImageProcessor and Pillow's bicubic resize (Pillow 9.x, libImaging/Resample.c),
// ported from their published semantics.
#include "clip_image_processor.h"

#include <algorithm>
#include <cmath>

#include "config_json.h"

namespace fairdiff {
namespace {

const std::string kProcessorHint = "use a CLIPImageProcessor preprocessor_config.json as transformers writes it for CLIP";

// Pillow's cubic convolution kernel, a = -0.5, support 2.
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  x = std::abs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// 8-bit images use integer weights with this many fraction bits (32 - 8 - 2: the sum of
// 255 * weight over the taps stays inside an int32).
constexpr int kPrecisionBits = 22;

// The taps of one output pixel along one axis: input positions [first, first + weights.size()).
struct Taps {
  int64_t first = 0;
  std::vector<int32_t> weights;
};

std::vector<Taps> resample_taps(int64_t in_size, int64_t out_size) {
  const double scale = double(in_size) / double(out_size);
  // Shrinking stretches the kernel by the scale: every input pixel contributes (antialiasing).
  const double filter_scale = std::max(scale, 1.0);
  const double support = 2.0 * filter_scale;
  std::vector<Taps> taps(static_cast<size_t>(out_size));
  std::vector<double> w;
  for (int64_t i = 0; i < out_size; ++i) {
    const double center = (double(i) + 0.5) * scale;
    // Pillow rounds with a truncating int cast (C semantics), then clamps.
    const int64_t first = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
    const int64_t last = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), in_size);
    w.assign(static_cast<size_t>(std::max<int64_t>(last - first, 0)), 0.0);
    double sum = 0;
    for (size_t k = 0; k < w.size(); ++k) {
      w[k] = bicubic_filter((double(first + int64_t(k)) - center + 0.5) / filter_scale);
      sum += w[k];
    }
    Taps& t = taps[static_cast<size_t>(i)];
    t.first = first;
    t.weights.resize(w.size());
    for (size_t k = 0; k < w.size(); ++k) {
      const double normalised = sum != 0.0 ? w[k] / sum : w[k];
      // Round half away from zero, as Pillow's normalize_coeffs_8bpc does.
      const double fixed = normalised * double(1 << kPrecisionBits);
      t.weights[k] = static_cast<int32_t>(normalised < 0 ? fixed - 0.5 : fixed + 0.5);
    }
  }
  return taps;
}

uint8_t clip8(int64_t acc) {
  const int64_t v = acc >> kPrecisionBits;  // arithmetic shift: floor, as Pillow's lookup table
  return static_cast<uint8_t>(std::clamp<int64_t>(v, 0, 255));
}

// One separable pass along x (horizontal = true) or y, writing rounded uint8 values.
Rgb8 resample_pass(const Rgb8& in, int64_t out_size, bool horizontal) {
  const std::vector<Taps> taps = resample_taps(horizontal ? in.width : in.height, out_size);
  Rgb8 out;
  out.width = horizontal ? out_size : in.width;
  out.height = horizontal ? in.height : out_size;
  out.rgb.resize(static_cast<size_t>(out.width * out.height * 3));
  for (int64_t y = 0; y < out.height; ++y)
    for (int64_t x = 0; x < out.width; ++x) {
      const Taps& t = taps[static_cast<size_t>(horizontal ? x : y)];
      for (int64_t c = 0; c < 3; ++c) {
        int64_t acc = int64_t(1) << (kPrecisionBits - 1);  // + 0.5: round to nearest
        for (size_t k = 0; k < t.weights.size(); ++k) {
          const int64_t src_x = horizontal ? t.first + int64_t(k) : x;
          const int64_t src_y = horizontal ? y : t.first + int64_t(k);
          acc += int64_t(in.rgb[static_cast<size_t>((src_y * in.width + src_x) * 3 + c)]) * t.weights[k];
        }
        out.rgb[static_cast<size_t>((y * out.width + x) * 3 + c)] = clip8(acc);
      }
    }
  return out;
}

// A "size"/"crop_size" entry: an int, or an object with the given keys.
int64_t size_value(const nlohmann::json& j, const std::string& key, const std::string& field, int64_t fallback,
                   const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const nlohmann::json& v = j[key];
  if (v.is_number()) return config_json::get_int(j, key, fallback, where);
  if (v.is_object() && v.contains(field)) return config_json::get_int(v, field, fallback, where + " (" + key + ")");
  reject_config(where, key, v, std::string("an integer or {\"") + field + "\": N}", kProcessorHint);
}

std::array<double, 3> channel_values(const nlohmann::json& j, const std::string& key, std::array<double, 3> fallback,
                                     const std::string& where) {
  if (!config_json::has_value(j, key)) return fallback;
  const std::vector<double> v = config_json::get_number_list(j, key, {}, where);
  if (v.size() != 3) throw_bad_input(where, key + " = " + j[key].dump() + " is not three numbers (R, G, B)", kProcessorHint);
  return {v[0], v[1], v[2]};
}

}  // namespace

CLIPImageProcessorConfig CLIPImageProcessorConfig::from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) throw_bad_input(where, "is not a JSON object", "a CLIPImageProcessor preprocessor_config.json");
  CLIPImageProcessorConfig c;
  if (auto type = j.find("image_processor_type");
      type != j.end() && *type != "CLIPImageProcessor" && *type != "CLIPFeatureExtractor")
    reject_config(where, "image_processor_type", *type, "\"CLIPImageProcessor\"", kProcessorHint);
  c.do_resize = config_json::get_bool(j, "do_resize", c.do_resize, where);
  if (j.contains("size") && j["size"].is_object() && !j["size"].contains("shortest_edge"))
    reject_config(where, "size", j["size"], "{\"shortest_edge\": N} (CLIP's resize)", kProcessorHint);
  c.shortest_edge = size_value(j, "size", "shortest_edge", c.shortest_edge, where);
  c.resample = config_json::get_int(j, "resample", c.resample, where);
  if (c.resample != 3) reject_config(where, "resample", c.resample, "3 (bicubic)", kProcessorHint);
  c.do_center_crop = config_json::get_bool(j, "do_center_crop", c.do_center_crop, where);
  c.crop_height = size_value(j, "crop_size", "height", c.crop_height, where);
  c.crop_width = size_value(j, "crop_size", "width", c.crop_width, where);
  c.do_rescale = config_json::get_bool(j, "do_rescale", c.do_rescale, where);
  c.rescale_factor = config_json::get_number(j, "rescale_factor", c.rescale_factor, where);
  c.do_normalize = config_json::get_bool(j, "do_normalize", c.do_normalize, where);
  c.image_mean = channel_values(j, "image_mean", c.image_mean, where);
  c.image_std = channel_values(j, "image_std", c.image_std, where);
  for (auto [key, v] : {std::pair{"size.shortest_edge", c.shortest_edge}, {"crop_size.height", c.crop_height},
                        {"crop_size.width", c.crop_width}})
    if (v <= 0 || v > 4096) throw_bad_input(where, std::string(key) + " = " + std::to_string(v) + " is out of range 1..4096");
  for (double s : c.image_std)
    if (!(s > 0)) throw_bad_input(where, "image_std has a value that is not positive", kProcessorHint);
  return c;
}

Rgb8 pil_resize_bicubic(const Rgb8& image, int64_t out_width, int64_t out_height) {
  // Horizontal pass first; an axis whose size does not change is not resampled (a copy).
  Rgb8 out = image;
  if (out_width != image.width) out = resample_pass(out, out_width, /*horizontal=*/true);
  if (out_height != image.height) out = resample_pass(out, out_height, /*horizontal=*/false);
  return out;
}

std::array<int64_t, 2> shortest_edge_size(int64_t width, int64_t height, int64_t shortest_edge) {
  const bool portrait = width <= height;
  const int64_t short_side = portrait ? width : height, long_side = portrait ? height : width;
  const auto new_long = static_cast<int64_t>(double(shortest_edge) * double(long_side) / double(short_side));
  return portrait ? std::array<int64_t, 2>{shortest_edge, new_long} : std::array<int64_t, 2>{new_long, shortest_edge};
}

namespace {

int64_t floor_div2(int64_t v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }

// transformers' center_crop: (H - h) // 2 from the top, (W - w) // 2 from the left; an
// image smaller than the crop is first centred on zeros (the larger half of the padding
// on the top / left: ceil).
Rgb8 center_crop(const Rgb8& in, int64_t crop_w, int64_t crop_h) {
  const int64_t pad_h = std::max<int64_t>(crop_h - in.height, 0), pad_w = std::max<int64_t>(crop_w - in.width, 0);
  const int64_t top_pad = (pad_h + 1) / 2, left_pad = (pad_w + 1) / 2;
  const int64_t top = floor_div2(in.height - crop_h) + top_pad, left = floor_div2(in.width - crop_w) + left_pad;
  Rgb8 out;
  out.width = crop_w;
  out.height = crop_h;
  out.rgb.assign(static_cast<size_t>(crop_w * crop_h * 3), 0);
  for (int64_t y = 0; y < crop_h; ++y)
    for (int64_t x = 0; x < crop_w; ++x) {
      // Position in the padded image, then in the source.
      const int64_t sy = top + y - top_pad, sx = left + x - left_pad;
      if (sy < 0 || sy >= in.height || sx < 0 || sx >= in.width) continue;
      for (int64_t c = 0; c < 3; ++c)
        out.rgb[static_cast<size_t>((y * crop_w + x) * 3 + c)] = in.rgb[static_cast<size_t>((sy * in.width + sx) * 3 + c)];
    }
  return out;
}

}  // namespace

ClipPixels clip_preprocess(const uint8_t* rgb, int64_t width, int64_t height, const CLIPImageProcessorConfig& p) {
  ClipPixels out;
  Rgb8 image;
  image.width = width;
  image.height = height;
  image.rgb.assign(rgb, rgb + width * height * 3);
  if (p.do_resize) {
    const auto [w, h] = shortest_edge_size(width, height, p.shortest_edge);
    image = pil_resize_bicubic(image, w, h);
  }
  out.resized = image;
  if (p.do_center_crop) image = center_crop(image, p.crop_width, p.crop_height);
  out.cropped = image;
  out.width = image.width;
  out.height = image.height;
  const int64_t n = image.width * image.height;
  out.values.resize(static_cast<size_t>(3 * n));
  for (int64_t c = 0; c < 3; ++c) {
    // transformers: rescale in float64 then float32; normalise in float32.
    const auto mean = static_cast<float>(p.image_mean[size_t(c)]), std = static_cast<float>(p.image_std[size_t(c)]);
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t u = image.rgb[static_cast<size_t>(i * 3 + c)];
      float x = p.do_rescale ? static_cast<float>(double(u) * p.rescale_factor) : static_cast<float>(u);
      if (p.do_normalize) x = (x - mean) / std;
      out.values[static_cast<size_t>(c * n + i)] = x;
    }
  }
  return out;
}

}  // namespace fairdiff
