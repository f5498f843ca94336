// AutoencoderKL: the Stable Diffusion VAE, built from its diffusers `vae/config.json`;
// parameter names equal the checkpoint keys (encoder.*, decoder.*, quant_conv,
// post_quant_conv).
//
//   auto config = fairdiff::AutoencoderKLConfig::from_json(json, "vae/config.json");
//   fairdiff::AutoencoderKL vae(config);
//   vae->to(device, dtype);
//   fairdiff::load_state_dict(*vae, weights, "vae");
//   at::Tensor image = vae->decode(latents / config.scaling_factor);   // ~[-1,1]
//   fairdiff::LatentDistribution d = vae->encode(image);                // d.mean * scaling_factor
//
// Shape letters: B batch, C channels, H/W image height/width, Z latent channels,
// h/w latent height/width (H / 2^(blocks-1)).
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "layers.h"
#include "unet_2d_blocks.h"

namespace fairdiff {

// The config.json fields, with diffusers' defaults (AutoencoderKL.__init__, 0.29).
struct AutoencoderKLConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  std::vector<std::string> down_block_types = {"DownEncoderBlock2D"};
  std::vector<std::string> up_block_types = {"UpDecoderBlock2D"};
  std::vector<int64_t> block_out_channels = {64};
  int64_t layers_per_block = 1;
  std::string act_fn = "silu";
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;
  std::vector<int64_t> sample_size = {32};  // image pixels: [size] or [height, width]
  double scaling_factor = 0.18215;
  // Pipelines decode a half-precision VAE in float32 when set (the SD 1.x / 2.x VAE
  // overflows in float16); the module itself does not look at it.
  bool force_upcast = true;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;

  // Parses a diffusers AutoencoderKL config; `where` (the config.json path) names the file
  // in errors. Absent keys take the defaults above.
  static AutoencoderKLConfig from_json(const nlohmann::json& config, const std::string& where);
  void validate(const std::string& where) const;
  // Pixels per latent pixel: 2^(number of blocks - 1) (8 for Stable Diffusion).
  int64_t scale_factor() const { return int64_t(1) << (block_out_channels.size() - 1); }
};

// DiagonalGaussianDistribution of the encoder's moments.
struct LatentDistribution {
  at::Tensor mean;     // [B,Z,h,w]
  at::Tensor logvar;   // [B,Z,h,w], clamped to [-30, 20]
  at::Tensor std;      // exp(logvar / 2)
  at::Tensor moments;  // [B,2Z,h,w] = cat(mean, logvar) before clamping
};

namespace vae {

// vae.py Encoder: conv_in, DownEncoderBlock2Ds, UNetMidBlock2D, GroupNorm, SiLU, conv_out
// to 2 * latent_channels (mean and log-variance).
class EncoderImpl : public torch::nn::Module {
 public:
  explicit EncoderImpl(const AutoencoderKLConfig& config);
  // x [B,C,H,W] -> [B,2Z,h,w]
  at::Tensor forward(const at::Tensor& x);

 private:
  leaf::Conv2d conv_in_{nullptr}, conv_out_{nullptr};
  std::vector<DownEncoderBlock2D> down_blocks_;
  UNetMidBlock2D mid_block_{nullptr};
  leaf::GroupNorm conv_norm_out_{nullptr};
};
TORCH_MODULE(Encoder);

// vae.py Decoder: conv_in, UNetMidBlock2D, UpDecoderBlock2Ds, GroupNorm, SiLU, conv_out.
class DecoderImpl : public torch::nn::Module {
 public:
  explicit DecoderImpl(const AutoencoderKLConfig& config);
  // z [B,Z,h,w] -> [B,C,H,W]
  at::Tensor forward(const at::Tensor& z);

 private:
  leaf::Conv2d conv_in_{nullptr}, conv_out_{nullptr};
  UNetMidBlock2D mid_block_{nullptr};
  std::vector<UpDecoderBlock2D> up_blocks_;
  leaf::GroupNorm conv_norm_out_{nullptr};
};
TORCH_MODULE(Decoder);

}  // namespace vae

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(const AutoencoderKLConfig& config);

  // image [B,C,H,W] in [-1,1] -> latent distribution over [B,Z,h,w] (unscaled)
  LatentDistribution encode(const at::Tensor& image);
  // z [B,Z,h,w], already divided by scaling_factor -> image [B,C,H,W], roughly [-1,1]
  at::Tensor decode(const at::Tensor& z);

  // As diffusers' enable_tiling(): latents larger than `tile_latent_size` (default: the
  // config's sample_size / scale_factor, 64 for SD) are decoded in overlapping tiles of
  // that size, a quarter overlapping, and the seams blended linearly (tiled_decode). The
  // decoder's peak memory is then one tile's; the output differs slightly from a single
  // decode near the seams, as the reference's does. 0 turns tiling off again.
  void enable_tiling(int64_t tile_latent_size = -1);
  bool tiling() const { return tile_latent_size_ > 0; }
  int64_t tile_latent_size() const { return tile_latent_size_; }

  const AutoencoderKLConfig& config() const { return config_; }

 private:
  AutoencoderKLConfig config_;
  vae::Encoder encoder_{nullptr};
  vae::Decoder decoder_{nullptr};
  leaf::Conv2d quant_conv_{nullptr}, post_quant_conv_{nullptr};
  int64_t tile_latent_size_ = 0;  // 0: no tiling

  at::Tensor tiled_decode(const at::Tensor& z);
};
TORCH_MODULE(AutoencoderKL);

}  // namespace fairdiff
