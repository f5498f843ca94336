// UNet2DConditionModel: the Stable Diffusion 1.x / 2.x / XL denoiser, built from its
// diffusers `unet/config.json`; parameter names equal the checkpoint keys.
//
//   auto config = fairdiff::UNet2DConditionConfig::from_json(json, "unet/config.json");
//   fairdiff::UNet2DConditionModel unet(config);
//   unet->to(device, dtype);
//   fairdiff::load_state_dict(*unet, weights, "unet");
//   at::Tensor eps = unet->forward(latents, timestep, prompt_embeds);
//
// SDXL's UNet adds `addition_embed_type: text_time`: the pooled text embedding and the six
// size conditions (add_time_ids) feed add_embedding, which is added to the timestep
// embedding; it takes a Conditioning with all three parts.
// Config values we do not implement (class embeddings, other addition embeddings, other
// block types, ...) are rejected by from_json with an Unsupported error; nothing is
// silently ignored that would change the computation.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "conditioning.h"
#include "layers.h"
#include "unet_2d_blocks.h"

namespace fairdiff {

// The config.json fields, with diffusers' defaults (UNet2DConditionModel.__init__, 0.29).
// Per-block fields hold one value per entry of down_block_types (from_json broadcasts a
// single integer, as the reference does).
struct UNet2DConditionConfig {
  std::vector<int64_t> sample_size;  // null by default; [size] or [height, width] (latent pixels)
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  std::vector<std::string> down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"};
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";
  std::vector<std::string> up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D"};
  bool only_cross_attention = false;  // only false is supported
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};
  std::vector<int64_t> layers_per_block = {2, 2, 2, 2};
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  double dropout = 0.0;  // training only
  std::string act_fn = "silu";
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  std::vector<int64_t> cross_attention_dim = {1280, 1280, 1280, 1280};
  std::vector<int64_t> transformer_layers_per_block = {1, 1, 1, 1};
  // As written in config.json; see num_heads() for what it means.
  std::vector<int64_t> attention_head_dim = {8, 8, 8, 8};
  std::vector<int64_t> num_attention_heads;  // null by default (and rejected by from_json, as by diffusers)
  bool use_linear_projection = false;
  bool upcast_attention = false;
  std::string resnet_time_scale_shift = "default";
  double resnet_out_scale_factor = 1.0;
  std::string time_embedding_type = "positional";
  int64_t time_embedding_dim = 0;  // null by default: 4 * block_out_channels[0]
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;
  // SDXL: "text_time" or "" (null). text_time embeds each of the 6 time ids with
  // addition_time_embed_dim sinusoidal channels and feeds [pooled, time features]
  // (projection_class_embeddings_input_dim = pooled width + 6 * addition_time_embed_dim)
  // through add_embedding.
  std::string addition_embed_type;
  int64_t addition_time_embed_dim = 0;                // null by default
  int64_t projection_class_embeddings_input_dim = 0;  // null by default

  // Parses a diffusers UNet2DConditionModel config. `where` (the config.json path) names
  // the file in errors. Absent keys take the defaults above.
  static UNet2DConditionConfig from_json(const nlohmann::json& config, const std::string& where);

  // Attention heads per down block (the one place that translates attention_head_dim).
  std::vector<int64_t> num_heads() const;
  // Checks lengths and divisibility; throws BadInput / Unsupported naming `where`.
  void validate(const std::string& where) const;
};

class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DConditionModelImpl(const UNet2DConditionConfig& config);

  // sample [B,C_in,H,W]; timestep 0-dim, [1] or [B], integer or floating (broadcast to B);
  // encoder_hidden_states [B,L,D] -> noise prediction [B,C_out,H,W]
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states);
  // The same with a Conditioning: its context is encoder_hidden_states; pooled embeddings and
  // added time ids feed the addition embedding of a UNet that has one (SDXL's text_time),
  // and a UNet without one refuses them rather than ignore them.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timestep, const Conditioning& conditioning);

  const UNet2DConditionConfig& config() const { return config_; }
  // Whether forward needs pooled embeddings and time ids (addition_embed_type text_time).
  bool takes_text_time() const { return config_.addition_embed_type == "text_time"; }

 private:
  // The network, with the addition embedding `aug` [B,T] added to the time embedding (undefined: none).
  at::Tensor run(const at::Tensor& sample, const at::Tensor& timestep, const at::Tensor& encoder_hidden_states,
                 const Conditioning* added);

  UNet2DConditionConfig config_;
  int64_t num_upsamplers_ = 0;
  leaf::Conv2d conv_in_{nullptr}, conv_out_{nullptr};
  Timesteps time_proj_{nullptr};
  TimestepEmbedding time_embedding_{nullptr};
  Timesteps add_time_proj_{nullptr};             // text_time only
  TimestepEmbedding add_embedding_{nullptr};     // text_time only
  std::vector<std::shared_ptr<UNetDownBlock>> down_blocks_;
  UNetMidBlock2DCrossAttn mid_block_{nullptr};
  std::vector<std::shared_ptr<UNetUpBlock>> up_blocks_;
  leaf::GroupNorm conv_norm_out_{nullptr};
};
TORCH_MODULE(UNet2DConditionModel);

}  // namespace fairdiff
