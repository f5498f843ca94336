// CLIPModel (transformers): the dual encoder that judges images by text.
//
// The text tower is CLIPTextModel's (`text_model.*`); the vision tower is a ViT
// (`vision_model.*`): a patch convolution, a class embedding and position embeddings,
// `pre_layrnorm` (transformers' spelling) before the same pre-LN encoder, and
// `post_layernorm` on the class token. Two bias-free projections map both into one
// space; `logit_scale` is the learned temperature. Module names equal the checkpoint
// keys; every ViT size (B/32, B/16, L/14, L/14-336) comes from config.json.
//
//   CLIPModel clip(CLIPConfig::from_json(config, path));
//   at::Tensor image = clip->get_image_features(pixel_values);            // [B, P], not normalised
//   at::Tensor text = clip->get_text_features(input_ids, attention_mask);  // [T, P]
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <string>

#include "clip_text_model.h"

namespace fairdiff {

struct CLIPVisionConfig {  // defaults: transformers' CLIPVisionConfig (ViT-B/32)
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t num_channels = 3;
  int64_t image_size = 224;
  int64_t patch_size = 32;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;

  static CLIPVisionConfig from_json(const nlohmann::json& config, const std::string& where);
  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
  // The encoder's settings: its layers are the text tower's, without the causal mask.
  CLIPTextConfig encoder_config() const;
};

struct CLIPConfig {  // config.json of a CLIPModel: text_config and vision_config are diffs to their defaults
  CLIPTextConfig text_config;
  CLIPVisionConfig vision_config;
  int64_t projection_dim = 512;

  static CLIPConfig from_json(const nlohmann::json& config, const std::string& where);
};

struct CLIPVisionEmbeddingsImpl : torch::nn::Module {
  CLIPVisionEmbeddingsImpl(const CLIPVisionConfig& config);
  at::Tensor forward(const at::Tensor& pixel_values);
  at::Tensor class_embedding_;  // [D]
  torch::nn::Conv2d patch_embedding_{nullptr};
  torch::nn::Embedding position_embedding_{nullptr};
};
TORCH_MODULE(CLIPVisionEmbeddings);

struct CLIPVisionOutput {
  at::Tensor last_hidden_state;  // [B, 1 + patches, D], no final norm
  at::Tensor pooler_output;      // [B, D] post_layernorm of the class token
};

// `vision_model.*`
struct CLIPVisionTransformerImpl : torch::nn::Module {
  CLIPVisionTransformerImpl(const CLIPVisionConfig& config);
  CLIPVisionOutput forward(const at::Tensor& pixel_values);
  CLIPVisionEmbeddings embeddings_{nullptr};
  torch::nn::LayerNorm pre_layrnorm_{nullptr};
  CLIPEncoder encoder_{nullptr};
  torch::nn::LayerNorm post_layernorm_{nullptr};
};
TORCH_MODULE(CLIPVisionTransformer);

class CLIPModelImpl : public torch::nn::Module {
 public:
  explicit CLIPModelImpl(const CLIPConfig& config);

  // pixel_values [B, C, S, S] normalised as CLIPImageProcessor does -> [B, P]
  at::Tensor get_image_features(const at::Tensor& pixel_values);
  // input_ids, attention_mask [T, L] -> [T, P]
  at::Tensor get_text_features(const at::Tensor& input_ids, const at::Tensor& attention_mask = {});
  CLIPVisionOutput vision_forward(const at::Tensor& pixel_values) { return vision_model_->forward(pixel_values); }
  CLIPTextOutput text_forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {}) {
    return text_model_->forward(input_ids, attention_mask);
  }
  // exp(logit_scale): the factor of the cosine similarities in logits_per_image.
  double logit_scale_exp() const { return std::exp(logit_scale_.item<double>()); }
  const CLIPConfig& config() const { return config_; }

 private:
  CLIPConfig config_;
  CLIPTextTransformer text_model_{nullptr};
  CLIPVisionTransformer vision_model_{nullptr};
  CLIPLinear visual_projection_{nullptr}, text_projection_{nullptr};
  at::Tensor logit_scale_;  // []
};
TORCH_MODULE(CLIPModel);

// x / ||x||_2 along the last dimension, as CLIPModel.forward normalises its embeddings.
at::Tensor l2_normalize(const at::Tensor& x);

}  // namespace fairdiff
