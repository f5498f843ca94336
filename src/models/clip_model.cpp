// CLIPModel. Shape letters: B images, T texts, C channels, S image side, p patch side,
// N patches, D hidden, P projection.
#include "clip_model.h"

#include "config_json.h"

namespace fairdiff {
namespace {
const std::string kClipHint = "use a transformers CLIPModel folder (OpenAI CLIP ViT-B/32, B/16, L/14, L/14-336 or one of their size)";
}  // namespace

CLIPVisionConfig CLIPVisionConfig::from_json(const nlohmann::json& j, const std::string& where) {
  CLIPVisionConfig c;
  c.hidden_size = config_json::get_int(j, "hidden_size", c.hidden_size, where);
  c.intermediate_size = config_json::get_int(j, "intermediate_size", c.intermediate_size, where);
  c.num_hidden_layers = config_json::get_int(j, "num_hidden_layers", c.num_hidden_layers, where);
  c.num_attention_heads = config_json::get_int(j, "num_attention_heads", c.num_attention_heads, where);
  c.num_channels = config_json::get_int(j, "num_channels", c.num_channels, where);
  c.image_size = config_json::get_int(j, "image_size", c.image_size, where);
  c.patch_size = config_json::get_int(j, "patch_size", c.patch_size, where);
  c.hidden_act = config_json::get_string(j, "hidden_act", c.hidden_act, where);
  c.layer_norm_eps = config_json::get_number(j, "layer_norm_eps", c.layer_norm_eps, where);

  if (auto type = j.find("model_type"); type != j.end() && *type != "clip_vision_model")
    reject_config(where, "vision_config.model_type", *type, "\"clip_vision_model\"", kClipHint);
  if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu")
    reject_config(where, "vision_config.hidden_act", c.hidden_act, "\"quick_gelu\", \"gelu\"", kClipHint);
  for (auto [key, v] : {std::pair{"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
                        {"num_hidden_layers", c.num_hidden_layers}, {"num_attention_heads", c.num_attention_heads},
                        {"num_channels", c.num_channels}, {"image_size", c.image_size}, {"patch_size", c.patch_size}})
    if (v <= 0) throw_bad_input(where, "vision_config." + std::string(key) + " = " + std::to_string(v) + " must be positive");
  if (c.hidden_size % c.num_attention_heads != 0)
    throw_bad_input(where, "vision_config.hidden_size " + std::to_string(c.hidden_size) +
                               " is not divisible by num_attention_heads " + std::to_string(c.num_attention_heads));
  // The position embedding has one row per patch of the training size: no interpolation.
  if (c.image_size % c.patch_size != 0)
    reject_config(where, "vision_config.image_size", c.image_size,
                  "a multiple of patch_size " + std::to_string(c.patch_size), kClipHint);
  return c;
}

CLIPTextConfig CLIPVisionConfig::encoder_config() const {
  CLIPTextConfig c;
  c.hidden_size = hidden_size;
  c.intermediate_size = intermediate_size;
  c.num_hidden_layers = num_hidden_layers;
  c.num_attention_heads = num_attention_heads;
  c.hidden_act = hidden_act;
  c.layer_norm_eps = layer_norm_eps;
  return c;
}

CLIPConfig CLIPConfig::from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) throw_bad_input(where, "is not a JSON object", "a CLIPModel config.json");
  if (auto type = j.find("model_type"); type == j.end() || *type != "clip")
    reject_config(where, "model_type", type == j.end() ? nlohmann::json() : *type,
                  "\"clip\" (a transformers CLIPModel folder)", kClipHint);
  if (auto arch = j.find("architectures"); arch != j.end() && arch->is_array())
    for (const auto& a : *arch)
      if (a != "CLIPModel") reject_config(where, "architectures", *arch, "[\"CLIPModel\"]", kClipHint);
  CLIPConfig c;
  c.projection_dim = config_json::get_int(j, "projection_dim", c.projection_dim, where);
  if (c.projection_dim <= 0) throw_bad_input(where, "projection_dim must be positive");
  const nlohmann::json empty = nlohmann::json::object();
  const nlohmann::json& text = j.contains("text_config") && j["text_config"].is_object() ? j["text_config"] : empty;
  const nlohmann::json& vision =
      j.contains("vision_config") && j["vision_config"].is_object() ? j["vision_config"] : empty;
  c.text_config = CLIPTextConfig::from_json(text, where + " (text_config)");
  // CLIPTextConfig's default end-of-text id is 49407 (pooled at its first position); our
  // struct keeps the SD configs' legacy 2 for diffusers folders, which always state it.
  if (!config_json::has_value(text, "eos_token_id")) c.text_config.eos_token_id = 49407;
  c.vision_config = CLIPVisionConfig::from_json(vision, where);
  return c;
}

CLIPVisionEmbeddingsImpl::CLIPVisionEmbeddingsImpl(const CLIPVisionConfig& c) {
  class_embedding_ = register_parameter("class_embedding", at::zeros({c.hidden_size}));
  patch_embedding_ = register_module(
      "patch_embedding", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.num_channels, c.hidden_size, c.patch_size)
                                               .stride(c.patch_size)
                                               .bias(false)));
  position_embedding_ = register_module("position_embedding", clip_embedding(c.num_patches() + 1, c.hidden_size));
}

at::Tensor CLIPVisionEmbeddingsImpl::forward(const at::Tensor& pixel_values) {
  // pixel_values [B, C, S, S] -> [B, 1 + N, D]
  const int64_t B = pixel_values.size(0);
  at::Tensor patches = patch_embedding_(pixel_values.to(class_embedding_.scalar_type()));  // [B, D, S/p, S/p]
  patches = patches.flatten(2).transpose(1, 2);                                            // [B, N, D]
  at::Tensor cls = class_embedding_.view({1, 1, -1}).expand({B, 1, -1});                   // [B, 1, D]
  return at::cat({cls, patches}, 1) + position_embedding_->weight.unsqueeze(0);             // [B, 1 + N, D]
}

CLIPVisionTransformerImpl::CLIPVisionTransformerImpl(const CLIPVisionConfig& c) {
  auto norm = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
  embeddings_ = register_module("embeddings", CLIPVisionEmbeddings(c));
  pre_layrnorm_ = register_module("pre_layrnorm", norm());
  encoder_ = register_module("encoder", CLIPEncoder(c.encoder_config()));
  post_layernorm_ = register_module("post_layernorm", norm());
}

CLIPVisionOutput CLIPVisionTransformerImpl::forward(const at::Tensor& pixel_values) {
  // pixel_values [B, C, S, S]; the side must be the training size (no position interpolation).
  at::Tensor h = pre_layrnorm_(embeddings_(pixel_values));  // [B, 1 + N, D]
  for (auto& layer : encoder_->layer_list) h = layer(h, at::Tensor());
  CLIPVisionOutput out;
  out.last_hidden_state = h;
  out.pooler_output = post_layernorm_(h.select(1, 0));  // [B, D]: the class token
  return out;
}

CLIPModelImpl::CLIPModelImpl(const CLIPConfig& c) : config_(c) {
  text_model_ = register_module("text_model", CLIPTextTransformer(c.text_config));
  vision_model_ = register_module("vision_model", CLIPVisionTransformer(c.vision_config));
  visual_projection_ = register_module(
      "visual_projection", CLIPLinear(c.vision_config.hidden_size, c.projection_dim, /*bias=*/false));
  text_projection_ =
      register_module("text_projection", CLIPLinear(c.text_config.hidden_size, c.projection_dim, /*bias=*/false));
  logit_scale_ = register_parameter("logit_scale", at::zeros({}));
}

at::Tensor CLIPModelImpl::get_image_features(const at::Tensor& pixel_values) {
  const int64_t S = config_.vision_config.image_size;
  TORCH_CHECK(pixel_values.dim() == 4 && pixel_values.size(2) == S && pixel_values.size(3) == S,
              "CLIPModel: pixel_values must be [B, C, ", S, ", ", S, "]");
  return visual_projection_(vision_model_->forward(pixel_values).pooler_output);  // [B, P]
}

at::Tensor CLIPModelImpl::get_text_features(const at::Tensor& input_ids, const at::Tensor& attention_mask) {
  return text_projection_(text_model_->forward(input_ids, attention_mask).pooler_output);  // [T, P]
}

at::Tensor l2_normalize(const at::Tensor& x) { return x / x.norm(2, -1, /*keepdim=*/true); }

}  // namespace fairdiff
