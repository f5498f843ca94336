// CLIPTextModel. Shape letters: B batch, L tokens (<= 77), D hidden, H heads, d head dim.
#include "clip_text_model.h"

#include <cmath>
#include <limits>

#include "config_json.h"

namespace fairdiff {

CLIPTextConfig CLIPTextConfig::from_json(const nlohmann::json& j, const std::string& where) {
  CLIPTextConfig c;
  c.vocab_size = config_json::get_int(j, "vocab_size", c.vocab_size, where);
  c.hidden_size = config_json::get_int(j, "hidden_size", c.hidden_size, where);
  c.intermediate_size = config_json::get_int(j, "intermediate_size", c.intermediate_size, where);
  c.num_hidden_layers = config_json::get_int(j, "num_hidden_layers", c.num_hidden_layers, where);
  c.num_attention_heads = config_json::get_int(j, "num_attention_heads", c.num_attention_heads, where);
  c.max_position_embeddings = config_json::get_int(j, "max_position_embeddings", c.max_position_embeddings, where);
  c.hidden_act = config_json::get_string(j, "hidden_act", c.hidden_act, where);
  c.layer_norm_eps = config_json::get_number(j, "layer_norm_eps", c.layer_norm_eps, where);
  c.eos_token_id = config_json::get_int(j, "eos_token_id", c.eos_token_id, where);
  c.projection_dim = config_json::get_int(j, "projection_dim", c.projection_dim, where);

  // A text model with a projection head (SDXL's second encoder) is a different network:
  // the loader builds the class that config.json names.
  if (auto arch = j.find("architectures"); arch != j.end() && arch->is_array()) {
    if (arch->size() != 1 || !(*arch)[0].is_string() ||
        ((*arch)[0] != "CLIPTextModel" && (*arch)[0] != "CLIPTextModelWithProjection"))
      reject_config(where, "architectures", *arch, "[\"CLIPTextModel\"], [\"CLIPTextModelWithProjection\"]");
    c.architecture = (*arch)[0].get<std::string>();
  }
  if (auto type = j.find("model_type"); type != j.end() && *type != "clip_text_model")
    reject_config(where, "model_type", *type, "\"clip_text_model\"");
  if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu")
    reject_config(where, "hidden_act", c.hidden_act, "\"quick_gelu\", \"gelu\"");
  if (c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0)
    throw_bad_input(where, "hidden_size " + std::to_string(c.hidden_size) + " is not divisible by num_attention_heads " +
                               std::to_string(c.num_attention_heads));
  for (auto [key, v] : {std::pair{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                        {"intermediate_size", c.intermediate_size}, {"num_hidden_layers", c.num_hidden_layers},
                        {"max_position_embeddings", c.max_position_embeddings}, {"projection_dim", c.projection_dim}})
    if (v <= 0) throw_bad_input(where, std::string(key) + " = " + std::to_string(v) + " must be positive");
  return c;
}

CLIPAttentionImpl::CLIPAttentionImpl(const CLIPTextConfig& c)
    : heads(c.num_attention_heads),
      head_dim(c.hidden_size / c.num_attention_heads),
      scale(1.0 / std::sqrt(static_cast<double>(c.hidden_size / c.num_attention_heads))) {
  // Registration order follows the reference (k, v, q, out).
  k_proj_ = register_module("k_proj", CLIPLinear(c.hidden_size, c.hidden_size));
  v_proj_ = register_module("v_proj", CLIPLinear(c.hidden_size, c.hidden_size));
  q_proj_ = register_module("q_proj", CLIPLinear(c.hidden_size, c.hidden_size));
  out_proj_ = register_module("out_proj", CLIPLinear(c.hidden_size, c.hidden_size));
}

at::Tensor CLIPAttentionImpl::forward(const at::Tensor& x, const at::Tensor& causal_mask) {
  // x [B, L, D], causal_mask [L, L] or [B, 1, L, L] (0 where seen, dtype-min where not), or undefined
  const int64_t B = x.size(0), L = x.size(1);
  auto split = [&](const at::Tensor& t) {
    return t.view({B, L, heads, head_dim}).transpose(1, 2);  // [B, H, L, d]
  };
  // The reference scales q before the product (eager CLIPAttention).
  at::Tensor q = split(q_proj_(x) * scale), k = split(k_proj_(x)), v = split(v_proj_(x));
  at::Tensor weights = at::matmul(q, k.transpose(-1, -2));  // [B, H, L, L]
  if (causal_mask.defined()) weights = weights + causal_mask;  // the vision tower has none
  weights = at::softmax(weights, -1);
  at::Tensor out = at::matmul(weights, v);                    // [B, H, L, d]
  out = out.transpose(1, 2).reshape({B, L, heads * head_dim});  // [B, L, D]
  return out_proj_(out);
}

CLIPMLPImpl::CLIPMLPImpl(const CLIPTextConfig& c) : quick_gelu(c.hidden_act == "quick_gelu") {
  fc1_ = register_module("fc1", CLIPLinear(c.hidden_size, c.intermediate_size));
  fc2_ = register_module("fc2", CLIPLinear(c.intermediate_size, c.hidden_size));
}

at::Tensor CLIPMLPImpl::forward(const at::Tensor& x) {
  at::Tensor h = fc1_(x);
  // quick_gelu is OpenAI CLIP's sigmoid approximation; "gelu" is the exact erf form.
  h = quick_gelu ? h * at::sigmoid(1.702 * h) : at::gelu(h);
  return fc2_(h);
}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const CLIPTextConfig& c) {
  self_attn_ = register_module("self_attn", CLIPAttention(c));
  layer_norm1_ = register_module(
      "layer_norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
  mlp_ = register_module("mlp", CLIPMLP(c));
  layer_norm2_ = register_module(
      "layer_norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
}

at::Tensor CLIPEncoderLayerImpl::forward(const at::Tensor& x, const at::Tensor& causal_mask) {
  // Pre-LN: normalise, transform, add back.
  at::Tensor h = x + self_attn_(layer_norm1_(x), causal_mask);
  return h + mlp_(layer_norm2_(h));
}

CLIPLinearImpl::CLIPLinearImpl(int64_t in_features, int64_t out_features, bool bias) {
  weight_ = register_parameter("weight", leaf::new_parameter({out_features, in_features}));
  if (bias) bias_ = register_parameter("bias", leaf::new_parameter({out_features}));
}

torch::nn::Embedding clip_embedding(int64_t count, int64_t dim) {
  return torch::nn::Embedding(torch::nn::EmbeddingOptions(count, dim)._weight(leaf::new_parameter({count, dim})));
}

CLIPTextEmbeddingsImpl::CLIPTextEmbeddingsImpl(const CLIPTextConfig& c) {
  token_embedding_ = register_module("token_embedding", clip_embedding(c.vocab_size, c.hidden_size));
  position_embedding_ = register_module("position_embedding", clip_embedding(c.max_position_embeddings, c.hidden_size));
}

at::Tensor CLIPTextEmbeddingsImpl::forward(const at::Tensor& input_ids) {
  // input_ids [B, L] -> [B, L, D]; positions 0..L-1 (transformers' position_ids
  // buffer is not persistent, so it is not a checkpoint key and not registered).
  const int64_t L = input_ids.size(1);
  return token_embedding_(input_ids) + position_embedding_->weight.narrow(0, 0, L).unsqueeze(0);
}

CLIPEncoderImpl::CLIPEncoderImpl(const CLIPTextConfig& c) {
  layers_ = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    layer_list.emplace_back(c);
    layers_->push_back(layer_list.back());
  }
}

CLIPTextTransformerImpl::CLIPTextTransformerImpl(const CLIPTextConfig& c) : config(c) {
  embeddings_ = register_module("embeddings", CLIPTextEmbeddings(c));
  encoder_ = register_module("encoder", CLIPEncoder(c));
  final_layer_norm_ = register_module(
      "final_layer_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
}

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& config) : config_(config) {
  text_model_ = register_module("text_model", CLIPTextTransformer(config));
}

CLIPTextModelWithProjectionImpl::CLIPTextModelWithProjectionImpl(const CLIPTextConfig& config) : config_(config) {
  text_model_ = register_module("text_model", CLIPTextTransformer(config));
  text_projection_ = register_module(
      "text_projection", CLIPLinear(config.hidden_size, config.projection_dim, /*bias=*/false));
}

CLIPTextOutput CLIPTextModelWithProjectionImpl::forward(const at::Tensor& input_ids, const at::Tensor& attention_mask) {
  // input_ids [B, L] -> hidden states as CLIPTextModel, text_embeds [B, P]
  CLIPTextOutput out = text_model_->forward(input_ids, attention_mask);
  out.text_embeds = text_projection_(out.pooler_output);  // [B, P]
  return out;
}

CLIPTextOutput CLIPTextTransformerImpl::forward(const at::Tensor& input_ids, const at::Tensor& attention_mask) {
  // input_ids [B, L], attention_mask [B, L] (1 = token, 0 = padding) or undefined
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(1) <= config.max_position_embeddings,
              "CLIPTextModel: input_ids must be [B, L<=", config.max_position_embeddings, "]");
  CLIPTextOutput out;
  at::Tensor h = embeddings_(input_ids);  // [B, L, D]
  const int64_t L = h.size(1);
  // Causal mask: position i sees positions <= i. The reference fills with the
  // dtype's most negative finite value (torch.finfo(dtype).min), not -inf.
  const double lowest = h.scalar_type() == at::kHalf       ? -65504.0
                        : h.scalar_type() == at::kBFloat16 ? -3.3895313892515355e38
                                                           : double(std::numeric_limits<float>::lowest());
  at::Tensor mask = at::full({L, L}, lowest, h.options()).triu(1);  // [L, L]
  if (attention_mask.defined()) {
    // The reference adds the padding mask after the causal one; lowest + lowest
    // overflows to -inf there as here, and both give exp = 0.
    at::Tensor padding = (1 - attention_mask.to(h.scalar_type())) * lowest;  // [B, L]
    mask = mask.unsqueeze(0).unsqueeze(0) + padding.view({-1, 1, 1, L});   // [B, 1, L, L]
  }
  out.hidden_states.reserve(config.num_hidden_layers + 1);
  out.hidden_states.push_back(h);
  for (auto& layer : encoder_->layer_list) {
    h = layer(h, mask);
    out.hidden_states.push_back(h);
  }
  out.last_hidden_state = final_layer_norm_(h);
  // Pool at the end-of-text token: argmax(input_ids) for legacy configs (eos id 2,
  // all SD text encoders; EOS 49407 is the largest id), else the first EOS.
  at::Tensor eos_pos = config.eos_token_id == 2 ? input_ids.argmax(-1)
                                                 : (input_ids == config.eos_token_id).to(at::kInt).argmax(-1);
  const int64_t B = input_ids.size(0);
  at::Tensor rows = at::arange(B, eos_pos.options()) * L + eos_pos;  // [B] rows of the flattened [B*L, D]
  out.pooler_output = out.last_hidden_state.reshape({B * L, -1}).index_select(0, rows);  // [B, D]
  return out;
}

at::Tensor CLIPTextModelImpl::prompt_embeds(const at::Tensor& input_ids, int64_t clip_skip) {
  return skip_layers(forward(input_ids), clip_skip);
}

at::Tensor CLIPTextModelImpl::skip_layers(const CLIPTextOutput& out, int64_t clip_skip) {
  if (clip_skip <= 0) return out.last_hidden_state;
  const int64_t n = static_cast<int64_t>(out.hidden_states.size());
  TORCH_CHECK(clip_skip < n - 1, "clip skip ", clip_skip, " exceeds the ", n - 1, " text encoder layers");
  return final_layer_norm(out.hidden_states[static_cast<size_t>(n - 1 - clip_skip)]);
}

}  // namespace fairdiff
