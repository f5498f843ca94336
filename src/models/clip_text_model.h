// CLIPTextModel (transformers), the text encoder of Stable Diffusion 1.x/2.x, and
// CLIPTextModelWithProjection, SDXL's second text encoder (the same tower plus
// `text_projection`, which makes the pooled output SDXL's text_embeds).
//
// Token + position embeddings, a pre-LayerNorm transformer with a causal mask,
// and a final LayerNorm. Module names equal the transformers checkpoint keys
// (text_model.encoder.layers.0.self_attn.q_proj.weight, ...).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "layers.h"

namespace fairdiff {

struct CLIPTextConfig {  // defaults: transformers' CLIPTextConfig
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;
  int64_t intermediate_size = 2048;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 8;
  int64_t max_position_embeddings = 77;
  std::string hidden_act = "quick_gelu";  // SD 1.x; SD 2.x (OpenCLIP) uses "gelu"
  double layer_norm_eps = 1e-5;
  int64_t eos_token_id = 2;  // 2 is the legacy value of SD configs: pool at argmax(input_ids)
  int64_t projection_dim = 512;  // CLIPTextModelWithProjection's text_projection output width
  // config.json's architectures: "CLIPTextModel", "CLIPTextModelWithProjection", or "" when absent.
  std::string architecture;

  static CLIPTextConfig from_json(const nlohmann::json& config, const std::string& where);
};

// torch.nn.Linear as CLIP runs it: one at::linear over the whole batch (the numbers of
// torch::nn::Linear), with uninitialised parameters, placeholders while built for a load
// (leaf::PlaceholderParameters). LibTorch's kaiming init of the SD 1.x text encoder's
// 85M linear parameters, with the embeddings' 38M normal draws, took 1.4 s of every start
// on a 2-vCPU VM, for numbers the load replaces. (Not leaf::Linear: that one runs each
// image's rows apart when generating and stores its weight in float16 with --fp16-weights.)
struct CLIPLinearImpl : torch::nn::Module {
  CLIPLinearImpl(int64_t in_features, int64_t out_features, bool bias = true);
  at::Tensor forward(const at::Tensor& x) { return at::linear(x, weight_, bias_); }  // [...,in] -> [...,out]
  at::Tensor weight_, bias_;  // [out,in], [out] (undefined without bias)
};
TORCH_MODULE(CLIPLinear);

// An embedding table without LibTorch's normal init (CLIPLinear says why).
torch::nn::Embedding clip_embedding(int64_t count, int64_t dim);

struct CLIPAttentionImpl : torch::nn::Module {
  CLIPAttentionImpl(const CLIPTextConfig& config);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& causal_mask);
  int64_t heads, head_dim;
  double scale;
  CLIPLinear k_proj_{nullptr}, v_proj_{nullptr}, q_proj_{nullptr}, out_proj_{nullptr};
};
TORCH_MODULE(CLIPAttention);

struct CLIPMLPImpl : torch::nn::Module {
  CLIPMLPImpl(const CLIPTextConfig& config);
  at::Tensor forward(const at::Tensor& x);
  bool quick_gelu;
  CLIPLinear fc1_{nullptr}, fc2_{nullptr};
};
TORCH_MODULE(CLIPMLP);

struct CLIPEncoderLayerImpl : torch::nn::Module {
  CLIPEncoderLayerImpl(const CLIPTextConfig& config);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& causal_mask);
  CLIPAttention self_attn_{nullptr};
  torch::nn::LayerNorm layer_norm1_{nullptr}, layer_norm2_{nullptr};
  CLIPMLP mlp_{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

struct CLIPTextEmbeddingsImpl : torch::nn::Module {
  CLIPTextEmbeddingsImpl(const CLIPTextConfig& config);
  at::Tensor forward(const at::Tensor& input_ids);
  torch::nn::Embedding token_embedding_{nullptr}, position_embedding_{nullptr};
};
TORCH_MODULE(CLIPTextEmbeddings);

struct CLIPEncoderImpl : torch::nn::Module {
  CLIPEncoderImpl(const CLIPTextConfig& config);
  std::vector<CLIPEncoderLayer> layer_list;  // typed view of `layers`
  torch::nn::ModuleList layers_;
};
TORCH_MODULE(CLIPEncoder);

struct CLIPTextOutput {
  at::Tensor last_hidden_state;           // [B, L, D] after final_layer_norm
  at::Tensor pooler_output;               // [B, D] at the end-of-text token
  at::Tensor text_embeds;                 // [B, P] text_projection(pooler_output); WithProjection only
  std::vector<at::Tensor> hidden_states;  // [embeddings, layer 1, ..., layer N], before final_layer_norm
};

// `text_model.*`: the text tower, shared by CLIPTextModel and CLIPModel (src/models/clip_model.h).
struct CLIPTextTransformerImpl : torch::nn::Module {
  CLIPTextTransformerImpl(const CLIPTextConfig& config);
  // input_ids [B, L] int64, L <= max_position_embeddings. Stable Diffusion pipelines
  // pass no attention_mask (causal mask only); CLIPModel's processor does, and it
  // changes only the padded rows, never the pooled output.
  CLIPTextOutput forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {});
  CLIPTextConfig config;
  CLIPTextEmbeddings embeddings_{nullptr};
  CLIPEncoder encoder_{nullptr};
  torch::nn::LayerNorm final_layer_norm_{nullptr};
};
TORCH_MODULE(CLIPTextTransformer);

class CLIPTextModelImpl : public torch::nn::Module {
 public:
  explicit CLIPTextModelImpl(const CLIPTextConfig& config);

  // See CLIPTextTransformerImpl::forward.
  CLIPTextOutput forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {}) {
    return text_model_->forward(input_ids, attention_mask);
  }

  // Prompt embeddings as diffusers computes them: clip_skip 0 is the last hidden
  // state; clip_skip k is final_layer_norm(hidden_states[-(k + 1)]).
  at::Tensor prompt_embeds(const at::Tensor& input_ids, int64_t clip_skip = 0);
  // The same from an output already computed (one encoder call for prompts and negatives).
  at::Tensor skip_layers(const CLIPTextOutput& output, int64_t clip_skip);

  at::Tensor final_layer_norm(const at::Tensor& x) { return text_model_->final_layer_norm_(x); }
  const CLIPTextConfig& config() const { return config_; }

 private:
  CLIPTextConfig config_;
  CLIPTextTransformer text_model_{nullptr};
};
TORCH_MODULE(CLIPTextModel);

}  // namespace fairdiff

namespace fairdiff {

// CLIPTextModelWithProjection: `text_model.*` plus `text_projection` (no bias). Its forward
// also fills text_embeds, the pooled output projected (SDXL's pooled prompt embedding).
class CLIPTextModelWithProjectionImpl : public torch::nn::Module {
 public:
  explicit CLIPTextModelWithProjectionImpl(const CLIPTextConfig& config);

  // See CLIPTextTransformerImpl::forward; text_embeds [B, projection_dim] set.
  CLIPTextOutput forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {});
  const CLIPTextConfig& config() const { return config_; }

 private:
  CLIPTextConfig config_;
  CLIPTextTransformer text_model_{nullptr};
  CLIPLinear text_projection_{nullptr};
};
TORCH_MODULE(CLIPTextModelWithProjection);

}  // namespace fairdiff
