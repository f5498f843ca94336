// Planning the load of an original-layout (CompVis / Stability LDM) single-file checkpoint:
// family and configs from the tensor shapes, and the name of every tensor in our modules.
// Torch-free: it sees names and shapes only.
//
// Layout of this file: the table of names (kTable), the values the shapes cannot tell
// (family defaults), then the Planner, which finds the block structure, places each module
// of the table at its index in both namings, and writes the configs.
#include "single_file.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include "fairdiff/error.h"
#include "fs_util.h"
#include "string_util.h"

namespace fairdiff {

const char* family_name(SdFamily family) { return family == SdFamily::SD1 ? "SD 1.x" : "SD 2.x"; }

const char* transform_name(Transform transform) {
  switch (transform) {
    case Transform::Copy: return "copy";
    case Transform::SqueezeConv1x1: return "squeeze_conv1x1";
    case Transform::Rows: return "rows";
  }
  return "?";
}

namespace {

// ---------------------------------------------------------------------------
// The table: which tensors each kind of module holds, under our name (diffusers /
// transformers) and under the LDM name, both relative to where the module sits. The
// Planner places every module: it pairs the module's prefix in our naming (e.g.
// "down_blocks.1.resnets.0.") with its prefix in the checkpoint (e.g.
// "model.diffusion_model.input_blocks.4.0.").

// clang-format off
enum class How {
  Copy,      // the same tensor
  Optional,  // copied when the checkpoint has it (a resnet's shortcut exists only where the width changes)
  Linear,    // a linear weight that LDM stores as a 1x1 conv [O, I, 1, 1] (VAE attention), or already as [O, I]
  Q, K, V,   // rows [0, C), [C, 2C), [2C, 3C) of a fused attention in_proj of 3C rows
};
// clang-format on

struct Row {
  const char* module;
  const char* target;
  const char* source;
  How how;
};

// clang-format off
const Row kTable[] = {
  // module                   ours                                   LDM                               how
  // -- UNet, under model.diffusion_model. ---------------------------------------------------------------
  {"unet",                    "conv_in.weight",                      "input_blocks.0.0.weight",        How::Copy},
  {"unet",                    "conv_in.bias",                        "input_blocks.0.0.bias",          How::Copy},
  {"unet",                    "time_embedding.linear_1.weight",      "time_embed.0.weight",            How::Copy},
  {"unet",                    "time_embedding.linear_1.bias",        "time_embed.0.bias",              How::Copy},
  {"unet",                    "time_embedding.linear_2.weight",      "time_embed.2.weight",            How::Copy},
  {"unet",                    "time_embedding.linear_2.bias",        "time_embed.2.bias",              How::Copy},
  {"unet",                    "conv_norm_out.weight",                "out.0.weight",                   How::Copy},
  {"unet",                    "conv_norm_out.bias",                  "out.0.bias",                     How::Copy},
  {"unet",                    "conv_out.weight",                     "out.2.weight",                   How::Copy},
  {"unet",                    "conv_out.bias",                       "out.2.bias",                     How::Copy},
  // ResnetBlock2D <- ResBlock (in_layers = GroupNorm, SiLU, conv; out_layers = GroupNorm, SiLU, Dropout, conv)
  {"unet_resnet",             "norm1.weight",                        "in_layers.0.weight",             How::Copy},
  {"unet_resnet",             "norm1.bias",                          "in_layers.0.bias",               How::Copy},
  {"unet_resnet",             "conv1.weight",                        "in_layers.2.weight",             How::Copy},
  {"unet_resnet",             "conv1.bias",                          "in_layers.2.bias",               How::Copy},
  {"unet_resnet",             "time_emb_proj.weight",                "emb_layers.1.weight",            How::Copy},
  {"unet_resnet",             "time_emb_proj.bias",                  "emb_layers.1.bias",              How::Copy},
  {"unet_resnet",             "norm2.weight",                        "out_layers.0.weight",            How::Copy},
  {"unet_resnet",             "norm2.bias",                          "out_layers.0.bias",              How::Copy},
  {"unet_resnet",             "conv2.weight",                        "out_layers.3.weight",            How::Copy},
  {"unet_resnet",             "conv2.bias",                          "out_layers.3.bias",              How::Copy},
  {"unet_resnet",             "conv_shortcut.weight",                "skip_connection.weight",         How::Optional},
  {"unet_resnet",             "conv_shortcut.bias",                  "skip_connection.bias",           How::Optional},
  // Transformer2DModel <- SpatialTransformer (proj_in / proj_out: 1x1 convs in SD 1.x, linear in SD 2.x, on both sides)
  {"unet_attention",          "norm.weight",                         "norm.weight",                    How::Copy},
  {"unet_attention",          "norm.bias",                           "norm.bias",                      How::Copy},
  {"unet_attention",          "proj_in.weight",                      "proj_in.weight",                 How::Copy},
  {"unet_attention",          "proj_in.bias",                        "proj_in.bias",                   How::Copy},
  {"unet_attention",          "proj_out.weight",                     "proj_out.weight",                How::Copy},
  {"unet_attention",          "proj_out.bias",                       "proj_out.bias",                  How::Copy},
  // BasicTransformerBlock: LDM already used these names
  {"unet_transformer_block",  "norm1.weight",                        "norm1.weight",                   How::Copy},
  {"unet_transformer_block",  "norm1.bias",                          "norm1.bias",                     How::Copy},
  {"unet_transformer_block",  "attn1.to_q.weight",                   "attn1.to_q.weight",              How::Copy},
  {"unet_transformer_block",  "attn1.to_k.weight",                   "attn1.to_k.weight",              How::Copy},
  {"unet_transformer_block",  "attn1.to_v.weight",                   "attn1.to_v.weight",              How::Copy},
  {"unet_transformer_block",  "attn1.to_out.0.weight",               "attn1.to_out.0.weight",          How::Copy},
  {"unet_transformer_block",  "attn1.to_out.0.bias",                 "attn1.to_out.0.bias",            How::Copy},
  {"unet_transformer_block",  "norm2.weight",                        "norm2.weight",                   How::Copy},
  {"unet_transformer_block",  "norm2.bias",                          "norm2.bias",                     How::Copy},
  {"unet_transformer_block",  "attn2.to_q.weight",                   "attn2.to_q.weight",              How::Copy},
  {"unet_transformer_block",  "attn2.to_k.weight",                   "attn2.to_k.weight",              How::Copy},
  {"unet_transformer_block",  "attn2.to_v.weight",                   "attn2.to_v.weight",              How::Copy},
  {"unet_transformer_block",  "attn2.to_out.0.weight",               "attn2.to_out.0.weight",          How::Copy},
  {"unet_transformer_block",  "attn2.to_out.0.bias",                 "attn2.to_out.0.bias",            How::Copy},
  {"unet_transformer_block",  "norm3.weight",                        "norm3.weight",                   How::Copy},
  {"unet_transformer_block",  "norm3.bias",                          "norm3.bias",                     How::Copy},
  {"unet_transformer_block",  "ff.net.0.proj.weight",                "ff.net.0.proj.weight",           How::Copy},
  {"unet_transformer_block",  "ff.net.0.proj.bias",                  "ff.net.0.proj.bias",             How::Copy},
  {"unet_transformer_block",  "ff.net.2.weight",                     "ff.net.2.weight",                How::Copy},
  {"unet_transformer_block",  "ff.net.2.bias",                       "ff.net.2.bias",                  How::Copy},
  // Down/Upsample2D.conv <- Downsample.op / Upsample.conv, VAE down/upsample convs, quant convs
  {"conv",                    "weight",                              "weight",                         How::Copy},
  {"conv",                    "bias",                                "bias",                           How::Copy},

  // -- VAE, under first_stage_model. ------------------------------------------------------------------
  {"vae",                     "encoder.conv_in.weight",              "encoder.conv_in.weight",         How::Copy},
  {"vae",                     "encoder.conv_in.bias",                "encoder.conv_in.bias",           How::Copy},
  {"vae",                     "encoder.conv_norm_out.weight",        "encoder.norm_out.weight",        How::Copy},
  {"vae",                     "encoder.conv_norm_out.bias",          "encoder.norm_out.bias",          How::Copy},
  {"vae",                     "encoder.conv_out.weight",             "encoder.conv_out.weight",        How::Copy},
  {"vae",                     "encoder.conv_out.bias",               "encoder.conv_out.bias",          How::Copy},
  {"vae",                     "decoder.conv_in.weight",              "decoder.conv_in.weight",         How::Copy},
  {"vae",                     "decoder.conv_in.bias",                "decoder.conv_in.bias",           How::Copy},
  {"vae",                     "decoder.conv_norm_out.weight",        "decoder.norm_out.weight",        How::Copy},
  {"vae",                     "decoder.conv_norm_out.bias",          "decoder.norm_out.bias",          How::Copy},
  {"vae",                     "decoder.conv_out.weight",             "decoder.conv_out.weight",        How::Copy},
  {"vae",                     "decoder.conv_out.bias",               "decoder.conv_out.bias",          How::Copy},
  {"vae_resnet",              "norm1.weight",                        "norm1.weight",                   How::Copy},
  {"vae_resnet",              "norm1.bias",                          "norm1.bias",                     How::Copy},
  {"vae_resnet",              "conv1.weight",                        "conv1.weight",                   How::Copy},
  {"vae_resnet",              "conv1.bias",                          "conv1.bias",                     How::Copy},
  {"vae_resnet",              "norm2.weight",                        "norm2.weight",                   How::Copy},
  {"vae_resnet",              "norm2.bias",                          "norm2.bias",                     How::Copy},
  {"vae_resnet",              "conv2.weight",                        "conv2.weight",                   How::Copy},
  {"vae_resnet",              "conv2.bias",                          "conv2.bias",                     How::Copy},
  {"vae_resnet",              "conv_shortcut.weight",                "nin_shortcut.weight",            How::Optional},
  {"vae_resnet",              "conv_shortcut.bias",                  "nin_shortcut.bias",              How::Optional},
  // Attention <- AttnBlock (q, k, v, proj_out are 1x1 convs in LDM)
  {"vae_attention",           "group_norm.weight",                   "norm.weight",                    How::Copy},
  {"vae_attention",           "group_norm.bias",                     "norm.bias",                      How::Copy},
  {"vae_attention",           "to_q.weight",                         "q.weight",                       How::Linear},
  {"vae_attention",           "to_q.bias",                           "q.bias",                         How::Copy},
  {"vae_attention",           "to_k.weight",                         "k.weight",                       How::Linear},
  {"vae_attention",           "to_k.bias",                           "k.bias",                         How::Copy},
  {"vae_attention",           "to_v.weight",                         "v.weight",                       How::Linear},
  {"vae_attention",           "to_v.bias",                           "v.bias",                         How::Copy},
  {"vae_attention",           "to_out.0.weight",                     "proj_out.weight",                How::Linear},
  {"vae_attention",           "to_out.0.bias",                       "proj_out.bias",                  How::Copy},

  // -- Text encoder (transformers CLIPTextModel) --------------------------------------------------------
  // SD 1.x stores a transformers CLIPTextModel under cond_stage_model.transformer.: same names.
  {"clip",                    "embeddings.token_embedding.weight",   "embeddings.token_embedding.weight",    How::Copy},
  {"clip",                    "embeddings.position_embedding.weight","embeddings.position_embedding.weight", How::Copy},
  {"clip",                    "final_layer_norm.weight",             "final_layer_norm.weight",        How::Copy},
  {"clip",                    "final_layer_norm.bias",               "final_layer_norm.bias",          How::Copy},
  {"clip_layer",              "layer_norm1.weight",                  "layer_norm1.weight",             How::Copy},
  {"clip_layer",              "layer_norm1.bias",                    "layer_norm1.bias",               How::Copy},
  {"clip_layer",              "self_attn.q_proj.weight",             "self_attn.q_proj.weight",        How::Copy},
  {"clip_layer",              "self_attn.q_proj.bias",               "self_attn.q_proj.bias",          How::Copy},
  {"clip_layer",              "self_attn.k_proj.weight",             "self_attn.k_proj.weight",        How::Copy},
  {"clip_layer",              "self_attn.k_proj.bias",               "self_attn.k_proj.bias",          How::Copy},
  {"clip_layer",              "self_attn.v_proj.weight",             "self_attn.v_proj.weight",        How::Copy},
  {"clip_layer",              "self_attn.v_proj.bias",               "self_attn.v_proj.bias",          How::Copy},
  {"clip_layer",              "self_attn.out_proj.weight",           "self_attn.out_proj.weight",      How::Copy},
  {"clip_layer",              "self_attn.out_proj.bias",             "self_attn.out_proj.bias",        How::Copy},
  {"clip_layer",              "layer_norm2.weight",                  "layer_norm2.weight",             How::Copy},
  {"clip_layer",              "layer_norm2.bias",                    "layer_norm2.bias",               How::Copy},
  {"clip_layer",              "mlp.fc1.weight",                      "mlp.fc1.weight",                 How::Copy},
  {"clip_layer",              "mlp.fc1.bias",                        "mlp.fc1.bias",                   How::Copy},
  {"clip_layer",              "mlp.fc2.weight",                      "mlp.fc2.weight",                 How::Copy},
  {"clip_layer",              "mlp.fc2.bias",                        "mlp.fc2.bias",                   How::Copy},
  // SD 2.x stores the OpenCLIP text tower under cond_stage_model.model.
  {"openclip",                "embeddings.token_embedding.weight",   "token_embedding.weight",         How::Copy},
  {"openclip",                "embeddings.position_embedding.weight","positional_embedding",           How::Copy},
  {"openclip",                "final_layer_norm.weight",             "ln_final.weight",                How::Copy},
  {"openclip",                "final_layer_norm.bias",               "ln_final.bias",                  How::Copy},
  {"openclip_layer",          "layer_norm1.weight",                  "ln_1.weight",                    How::Copy},
  {"openclip_layer",          "layer_norm1.bias",                    "ln_1.bias",                      How::Copy},
  {"openclip_layer",          "self_attn.q_proj.weight",             "attn.in_proj_weight",            How::Q},
  {"openclip_layer",          "self_attn.k_proj.weight",             "attn.in_proj_weight",            How::K},
  {"openclip_layer",          "self_attn.v_proj.weight",             "attn.in_proj_weight",            How::V},
  {"openclip_layer",          "self_attn.q_proj.bias",               "attn.in_proj_bias",              How::Q},
  {"openclip_layer",          "self_attn.k_proj.bias",               "attn.in_proj_bias",              How::K},
  {"openclip_layer",          "self_attn.v_proj.bias",               "attn.in_proj_bias",              How::V},
  {"openclip_layer",          "self_attn.out_proj.weight",           "attn.out_proj.weight",           How::Copy},
  {"openclip_layer",          "self_attn.out_proj.bias",             "attn.out_proj.bias",             How::Copy},
  {"openclip_layer",          "layer_norm2.weight",                  "ln_2.weight",                    How::Copy},
  {"openclip_layer",          "layer_norm2.bias",                    "ln_2.bias",                      How::Copy},
  {"openclip_layer",          "mlp.fc1.weight",                      "mlp.c_fc.weight",                How::Copy},
  {"openclip_layer",          "mlp.fc1.bias",                        "mlp.c_fc.bias",                  How::Copy},
  {"openclip_layer",          "mlp.fc2.weight",                      "mlp.c_proj.weight",              How::Copy},
  {"openclip_layer",          "mlp.fc2.bias",                        "mlp.c_proj.bias",                How::Copy},
};
// clang-format on

// Tensors that real checkpoints carry besides the three networks, left out on purpose
// (the reference drops them too). Anything else that maps to nothing is an error.
// clang-format off
const char* const kIgnoredNames[] = {
    // transformers' CLIPTextEmbeddings buffer (0..76), rebuilt by the model
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    // OpenCLIP's contrastive head: CLIPTextModel has no projection
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
    // LDM's DDPM schedule buffers: the scheduler config describes the schedule
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
};
// clang-format on
// The EMA copy of the UNet (training checkpoints): the reference loads the non-EMA weights.
const char* const kIgnoredPrefixes[] = {"model_ema."};

const std::string kUnet = "model.diffusion_model.";
const std::string kVae = "first_stage_model.";
const std::string kClip = "cond_stage_model.transformer.text_model.";
const std::string kOpenClip = "cond_stage_model.model.";

// ---------------------------------------------------------------------------
// What the shapes cannot tell: the values of the released SD 1.5 / SD 2.1 configs
// (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1), which the reference
// uses for every file of the family.

struct FamilyDefaults {
  const char* hidden_act;    // text encoder: CLIP's quick_gelu, OpenCLIP's gelu
  int64_t projection_dim;    // recorded in the SD text_encoder configs (unused by CLIPTextModel)
  int64_t unet_sample_size;  // latent pixels: 512 / 8, 768 / 8
  int64_t vae_sample_size;   // image pixels
  bool upcast_attention;     // SD 2.1 computes attention scores in float32
};

FamilyDefaults family_defaults(SdFamily family) {
  if (family == SdFamily::SD1) return {"quick_gelu", 768, 64, 512, false};
  return {"gelu", 512, 96, 768, true};
}

// Attention heads are not in any shape (the heads of q, k and v share one matrix). Both
// families use heads 64 channels wide: CLIP ViT-L/14 text (768 = 12 x 64), OpenCLIP
// ViT-H/14 text (1024 = 16 x 64), the SD 2.x UNet (num_head_channels 64). A width that 64
// does not divide only occurs in test-size models, which (like the tiny test models of
// transformers and diffusers) use heads 8 channels wide.
int64_t heads_for_width(int64_t width) {
  if (width % 64 == 0) return width / 64;
  if (width % 8 == 0) return width / 8;
  return 1;
}

// The SD 1.x UNet has 8 heads in every block whatever their width (LDM num_heads 8), which
// its diffusers config writes as attention_head_dim = 8.
constexpr int64_t kSd1UnetHeads = 8;

nlohmann::json scheduler_config(SdFamily family, const std::string& prediction_type) {
  // The scheduler configs of the released diffusers folders, which the reference's
  // from_single_file uses for files of each family: PNDM for SD 1.x, DDIM for SD 2.x.
  nlohmann::json j = {
      {"_class_name", family == SdFamily::SD1 ? "PNDMScheduler" : "DDIMScheduler"},
      {"num_train_timesteps", 1000},
      {"beta_start", 0.00085},
      {"beta_end", 0.012},
      {"beta_schedule", "scaled_linear"},
      {"trained_betas", nullptr},
      {"clip_sample", false},
      {"set_alpha_to_one", false},
      {"skip_prk_steps", true},
      {"steps_offset", 1},
      {"timestep_spacing", "leading"},
      {"prediction_type", prediction_type},
  };
  return j;
}

std::string idx(int64_t i) { return std::to_string(i); }

// ---------------------------------------------------------------------------

class Planner {
 public:
  Planner(const TensorShapes& tensors, std::string where) : where_(std::move(where)) {
    for (const auto& [name, shape] : tensors) {
      if (!shapes_.emplace(name, shape).second) throw_bad_input(where_, "tensor " + name + " appears twice");
      order_.push_back(name);
    }
  }

  SingleFilePlan run(const SingleFileOptions& options) {
    reject_other_models();
    for (const auto& name : order_) {
      bool ignore = std::find_if(std::begin(kIgnoredNames), std::end(kIgnoredNames),
                                 [&](const char* n) { return name == n; }) != std::end(kIgnoredNames);
      for (const char* prefix : kIgnoredPrefixes) ignore = ignore || starts_with(name, prefix);
      if (ignore) drop_source(name);
    }
    plan_text_encoder();
    plan_unet();
    plan_vae();
    const FamilyDefaults fam = family_defaults(plan_.family);
    plan_.text_encoder_config["hidden_act"] = fam.hidden_act;
    plan_.text_encoder_config["projection_dim"] = fam.projection_dim;
    plan_.unet_config["sample_size"] = fam.unet_sample_size;
    plan_.unet_config["upcast_attention"] = fam.upcast_attention;
    plan_.vae_config["sample_size"] = fam.vae_sample_size;

    std::string prediction = options.prediction_type;
    if (prediction.empty()) prediction = plan_.family == SdFamily::SD1 ? "epsilon" : "v_prediction";
    if (prediction != "epsilon" && prediction != "v_prediction" && prediction != "sample")
      throw_bad_input(where_, "prediction type \"" + prediction + "\" is not one of epsilon, v_prediction, sample");
    plan_.scheduler_config = scheduler_config(plan_.family, prediction);
    apply_overrides(options.config_overrides);
    check_complete();
    return std::move(plan_);
  }

 private:
  // -- Tensors ----------------------------------------------------------------

  const std::vector<int64_t>* find(const std::string& name) const {
    auto it = shapes_.find(name);
    return it == shapes_.end() ? nullptr : &it->second;
  }
  bool has(const std::string& name) const { return shapes_.count(name) > 0; }

  // The shape of a tensor the inference needs; a missing or odd one is a BadInput error.
  const std::vector<int64_t>& need(const std::string& name, size_t rank, const std::string& what) const {
    const auto* shape = find(name);
    if (!shape)
      throw_bad_input(where_, "has no tensor " + name + " (" + what + ")",
                      "not a complete Stable Diffusion 1.x / 2.x checkpoint in the original layout");
    if (shape->size() != rank)
      throw_bad_input(where_, "tensor " + name + " has shape " + shape_str(*shape) + ", expected " +
                                  std::to_string(rank) + " dimensions (" + what + ")");
    return *shape;
  }

  bool has_prefix(const std::string& prefix) const {
    auto it = shapes_.lower_bound(prefix);
    return it != shapes_.end() && starts_with(it->first, prefix);
  }

  // Every n such that a tensor is named prefix + n + "." + ...
  std::set<int64_t> indices(const std::string& prefix) const {
    std::set<int64_t> found;
    for (auto it = shapes_.lower_bound(prefix); it != shapes_.end() && starts_with(it->first, prefix); ++it) {
      const char* p = it->first.c_str() + prefix.size();
      if (*p < '0' || *p > '9') continue;
      char* end = nullptr;
      const long long v = std::strtoll(p, &end, 10);
      if (*end == '.') found.insert(v);
    }
    return found;
  }

  // 1 + the largest such n (0 when none): the number of modules in a list, any gap in
  // which shows up as missing tensors.
  int64_t count_indices(const std::string& prefix) const {
    const std::set<int64_t> found = indices(prefix);
    return found.empty() ? 0 : *found.rbegin() + 1;
  }

  // -- Placing modules of the table -------------------------------------------

  void place(const char* module, const char* component, const std::string& target_prefix,
             const std::string& source_prefix) {
    bool any_row = false;
    for (const Row& row : kTable) {
      if (std::strcmp(row.module, module) != 0) continue;
      any_row = true;
      const std::string target = target_prefix + row.target;
      const std::string source = source_prefix + row.source;
      const auto* shape = find(source);
      if (!shape) {
        if (row.how != How::Optional) missing_.push_back(std::string(component) + " " + target + " <- " + source);
        continue;
      }
      PlannedTensor t;
      t.component = component;
      t.target = target;
      t.source = source;
      t.source_shape = *shape;
      t.shape = *shape;
      switch (row.how) {
        case How::Copy:
        case How::Optional: break;
        case How::Linear:
          if (shape->size() == 4 && (*shape)[2] == 1 && (*shape)[3] == 1) {
            t.transform = Transform::SqueezeConv1x1;
            t.shape.resize(2);
          } else if (shape->size() != 2) {
            throw_bad_input(where_, "tensor " + source + " has shape " + shape_str(*shape) +
                                        ", expected a linear weight [O,I] or a 1x1 convolution [O,I,1,1]");
          }
          break;
        case How::Q:
        case How::K:
        case How::V:
          if (shape->empty() || (*shape)[0] % 3 != 0)
            throw_bad_input(where_, "tensor " + source + " has shape " + shape_str(*shape) +
                                        ", expected a fused q/k/v projection of 3 x C rows");
          t.transform = Transform::Rows;
          t.parts = 3;
          t.part = row.how == How::Q ? 0 : row.how == How::K ? 1 : 2;
          t.shape[0] /= 3;
          break;
      }
      uses_[source] += 1;
      plan_.tensors.push_back(std::move(t));
    }
    if (!any_row) throw std::logic_error(std::string("single_file: no table rows for module ") + module);
  }

  void drop_source(const std::string& name) {
    if (!has(name) || dropped_.count(name)) return;
    dropped_.insert(name);
    plan_.ignored.push_back(name);
  }

  // Every source tensor of a module placed at `source_prefix`, left out on purpose.
  void drop(const char* module, const std::string& source_prefix) {
    for (const Row& row : kTable)
      if (std::strcmp(row.module, module) == 0) drop_source(source_prefix + row.source);
  }

  // -- What this is -------------------------------------------------------------

  void reject_other_models() const {
    const std::string hint = "fairdiff reads Stable Diffusion 1.x / 2.x single-file checkpoints";
    // SDXL folders are supported; their single-file layout is not mapped: no reference key
    // set of a converted SDXL checkpoint was available to establish the table with certainty.
    if (has_prefix("conditioner.embedders."))
      throw_unsupported(where_,
                        "is an SDXL single-file checkpoint (conditioner.embedders.*): single-file SDXL is not supported",
                        "use the diffusers folder of the model (stabilityai/stable-diffusion-xl-base-1.0), which "
                        "fairdiff runs");
    if (has_prefix("model.diffusion_model.joint_blocks.") || has_prefix("double_blocks."))
      throw_unsupported(where_, "is an SD3 / Flux transformer checkpoint, not an SD 1.x / 2.x UNet", hint);
    if (has_prefix("control_model."))
      throw_unsupported(where_, "is a ControlNet checkpoint (control_model.*), not a text-to-image model", hint);
    if (!has(kUnet + "input_blocks.0.0.weight")) {
      const bool diffusers = has("conv_in.weight") || has("unet.conv_in.weight") || has_prefix("down_blocks.");
      throw_bad_input(
          where_,
          "has no model.diffusion_model.input_blocks.0.0.weight: not an original-layout (CompVis / "
          "Stability) Stable Diffusion checkpoint",
          diffusers ? "this looks like a diffusers component file: load the whole diffusers model folder" : hint);
    }
    if (has_prefix(kUnet + "label_emb."))
      throw_unsupported(where_, "has a class-conditioned UNet (label_emb: an upscaler or unCLIP model)",
                        "only text-to-image SD 1.x / 2.x checkpoints are supported");
  }

  // -- Text encoder -------------------------------------------------------------

  void plan_text_encoder() {
    std::string token, position, fc1;
    int64_t layers = 0;
    if (has(kClip + "embeddings.token_embedding.weight")) {
      // SD 1.x: a transformers CLIPTextModel, stored whole.
      plan_.family = SdFamily::SD1;
      plan_.text_encoder_layout = "CLIP (cond_stage_model.transformer.text_model.*)";
      token = kClip + "embeddings.token_embedding.weight";
      position = kClip + "embeddings.position_embedding.weight";
      fc1 = kClip + "encoder.layers.0.mlp.fc1.weight";
      layers = count_indices(kClip + "encoder.layers.");
      place("clip", "text_encoder", "text_model.", kClip);
      for (int64_t n = 0; n < layers; ++n)
        place("clip_layer", "text_encoder", "text_model.encoder.layers." + idx(n) + ".",
              kClip + "encoder.layers." + idx(n) + ".");
    } else if (has(kOpenClip + "token_embedding.weight")) {
      // SD 2.x as released: the whole OpenCLIP text tower. SD 2.x conditions on the output of
      // its penultimate block, so the reference builds a text model one block shorter and
      // leaves the last block out (resblocks.23 of the 24 of ViT-H/14).
      plan_.family = SdFamily::SD2;
      plan_.text_encoder_layout = "OpenCLIP (cond_stage_model.model.transformer.resblocks.*)";
      const std::string blocks = kOpenClip + "transformer.resblocks.";
      token = kOpenClip + "token_embedding.weight";
      position = kOpenClip + "positional_embedding";
      fc1 = blocks + "0.mlp.c_fc.weight";
      const int64_t stored = count_indices(blocks);
      layers = stored - 1;
      place("openclip", "text_encoder", "text_model.", kOpenClip);
      for (int64_t n = 0; n < layers; ++n)
        place("openclip_layer", "text_encoder", "text_model.encoder.layers." + idx(n) + ".", blocks + idx(n) + ".");
      if (stored > 0) drop("openclip_layer", blocks + idx(stored - 1) + ".");
    } else if (has(kOpenClip + "text_model.embeddings.token_embedding.weight")) {
      // SD 2.x as diffusers' convert_diffusers_to_original_stable_diffusion.py writes it: the
      // transformers names for embeddings and final norm, OpenCLIP names (fused q/k/v) for the
      // blocks, and only the blocks the diffusers text model has.
      plan_.family = SdFamily::SD2;
      plan_.text_encoder_layout = "OpenCLIP as converted from diffusers (cond_stage_model.model.resblocks.*)";
      const std::string blocks = kOpenClip + "resblocks.";
      token = kOpenClip + "text_model.embeddings.token_embedding.weight";
      position = kOpenClip + "text_model.embeddings.position_embedding.weight";
      fc1 = blocks + "0.mlp.c_fc.weight";
      layers = count_indices(blocks);
      place("clip", "text_encoder", "text_model.", kOpenClip + "text_model.");
      for (int64_t n = 0; n < layers; ++n)
        place("openclip_layer", "text_encoder", "text_model.encoder.layers." + idx(n) + ".", blocks + idx(n) + ".");
    } else {
      throw_bad_input(where_,
                      "has no text encoder (neither cond_stage_model.transformer.text_model.* of SD 1.x nor "
                      "cond_stage_model.model.* of SD 2.x)",
                      "a UNet-only or VAE-only file is not a full checkpoint; load a complete one");
    }
    if (layers < 1) throw_bad_input(where_, "its text encoder has no transformer blocks");
    const auto& tok = need(token, 2, "token embedding [vocab, width]");
    const auto& pos = need(position, 2, "position embedding [positions, width]");
    const int64_t hidden = tok[1];
    plan_.text_encoder_config = {
        {"architectures", nlohmann::json::array({"CLIPTextModel"})},
        {"model_type", "clip_text_model"},
        {"vocab_size", tok[0]},
        {"hidden_size", hidden},
        {"intermediate_size", need(fc1, 2, "first MLP layer [intermediate, width]")[0]},
        {"num_hidden_layers", layers},
        {"num_attention_heads", heads_for_width(hidden)},
        {"max_position_embeddings", pos[0]},
        {"layer_norm_eps", 1e-5},
        // The SD text encoder configs keep the legacy ids 0 / 2 / 1: pooling takes argmax(input_ids).
        {"bos_token_id", 0},
        {"eos_token_id", 2},
        {"pad_token_id", 1},
        {"attention_dropout", 0.0},
        {"initializer_range", 0.02},
        {"initializer_factor", 1.0},
    };
  }

  // -- UNet -----------------------------------------------------------------------

  // What the UNet's tensors say about its architecture.
  struct UnetLayout {
    std::vector<int64_t> conv_in, conv_out, time_embed;  // shapes of the first, last and time-embedding layers
    int64_t lpb = 0;                      // layers_per_block: resnets per down level (up levels have lpb + 1)
    int64_t levels = 0;                   // entries of block_out_channels
    std::vector<int64_t> channels;        // block_out_channels
    std::vector<bool> attn, up_attn;      // down level l / up level u has cross-attention
    std::vector<int64_t> layers;          // transformer_layers_per_block, per level
    int64_t mid_depth = 0;                // transformer blocks of the middle block
    int64_t cross_attention_dim = 0;
    bool linear_projection = false;       // proj_in is a linear layer (SD 2.x), not a 1x1 convolution
    // input_blocks: [conv_in], then per level lpb resnets and a downsampler; output_blocks: lpb + 1 per level.
    int64_t down_index(int64_t level, int64_t j) const { return 1 + level * (lpb + 1) + j; }
    int64_t up_index(int64_t block, int64_t j) const { return block * (lpb + 1) + j; }
  };

  // The UNet, in steps: read its layout off the tensors (1-3), place its modules (4),
  // write its config (5), and check it fits the text encoder (6).
  void plan_unet() {
    UnetLayout u = unet_levels();
    unet_attention(u);
    unet_widths(u);
    place_unet(u);
    plan_.unet_config = unet_config(u);
    check_text_width(u.cross_attention_dim);
  }

  // 1. A text-to-image input, and levels: `lpb` resnets (each + attention) per level, then a
  //    downsampler after every level but the last; as many output_blocks, one more per level.
  UnetLayout unet_levels() const {
    const std::string U = kUnet;
    UnetLayout u;
    u.conv_in = need(U + "input_blocks.0.0.weight", 4, "UNet input convolution");
    if (u.conv_in[1] != 4)
      throw_unsupported(where_,
                        "the UNet takes " + std::to_string(u.conv_in[1]) +
                            " input channels: an inpainting (9), depth (5) or instruct-pix2pix (8) model",
                        "fairdiff runs text-to-image checkpoints, whose UNet takes 4 latent channels");
    const int64_t n_in = count_indices(U + "input_blocks.");
    int64_t first_down = 0;
    for (int64_t i = 1; i < n_in && !first_down; ++i)
      if (has(U + "input_blocks." + idx(i) + ".0.op.weight")) first_down = i;
    u.lpb = first_down ? first_down - 1 : n_in - 1;
    if (u.lpb < 1 || n_in % (u.lpb + 1) != 0)
      throw_bad_input(where_, "its " + std::to_string(n_in) +
                                  " UNet input_blocks do not form levels of resnets followed by a downsampler");
    u.levels = n_in / (u.lpb + 1);
    const int64_t n_out = count_indices(U + "output_blocks.");
    if (n_out != u.levels * (u.lpb + 1))
      throw_bad_input(where_, "has " + std::to_string(n_out) + " UNet output_blocks, expected " +
                                  std::to_string(u.levels * (u.lpb + 1)) + " for " + std::to_string(u.levels) +
                                  " levels of " + std::to_string(u.lpb) + " resnets");
    if (!has(U + "middle_block.1.proj_in.weight"))
      throw_unsupported(where_, "its UNet has no attention in the middle block",
                        "only the SD 1.x / 2.x UNet (UNetMidBlock2DCrossAttn) is supported");
    return u;
  }

  // 2. Per level: channels, attention going down and up, and transformer_layers_per_block:
  //    one value per level, used by its down and up block; the mid block uses the last one (diffusers).
  void unet_attention(UnetLayout& u) const {
    const std::string U = kUnet;
    const int64_t levels = u.levels;
    u.channels.assign(levels, 0);
    u.attn.assign(levels, false);
    u.up_attn.assign(levels, false);
    std::vector<int64_t> depth(levels, 0), up_depth(levels, 0);
    auto transformer_count = [&](const std::string& block) { return count_indices(block + "transformer_blocks."); };
    for (int64_t l = 0; l < levels; ++l) {
      const std::string first = U + "input_blocks." + idx(u.down_index(l, 0)) + ".";
      u.channels[l] = need(first + "0.in_layers.2.weight", 4, "first resnet convolution of a UNet level")[0];
      u.attn[l] = has(first + "1.proj_in.weight");
      if (u.attn[l]) depth[l] = transformer_count(first + "1.");
      const std::string up_first = U + "output_blocks." + idx(u.up_index(l, 0)) + ".";
      u.up_attn[l] = has(up_first + "1.proj_in.weight");
      if (u.up_attn[l]) up_depth[l] = transformer_count(up_first + "1.");
    }
    u.mid_depth = transformer_count(U + "middle_block.1.");

    u.layers.assign(levels, 1);
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t r = levels - 1 - l;  // the up level at the same resolution
      if (u.attn[l] && u.up_attn[r] && depth[l] != up_depth[r])
        throw_unsupported(where_,
                          "UNet level " + idx(l) + " has " + idx(depth[l]) + " transformer blocks going down and " +
                              idx(up_depth[r]) + " going up",
                          "diffusers' UNet2DConditionModel uses one count per level");
      u.layers[l] = u.attn[l] ? depth[l] : u.up_attn[r] ? up_depth[r] : l == levels - 1 ? u.mid_depth : 1;
    }
    if (u.layers[levels - 1] != u.mid_depth)
      throw_unsupported(where_,
                        "the UNet's middle block has " + idx(u.mid_depth) + " transformer blocks, its last level " +
                            idx(u.layers[levels - 1]),
                        "diffusers' UNet2DConditionModel gives both the same count");
  }

  // 3. The width of the text it attends to, its projections, its time embedding and output.
  void unet_widths(UnetLayout& u) const {
    const std::string U = kUnet;
    const auto& mid_k = need(U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2,
                             "cross-attention key projection [width, context]");
    u.cross_attention_dim = mid_k[1];
    u.linear_projection = find(U + "middle_block.1.proj_in.weight")->size() == 2;
    u.time_embed = need(U + "time_embed.0.weight", 2, "time embedding [time_dim, channels]");
    const int64_t model_channels = u.conv_in[0];
    if (u.time_embed[1] != model_channels)
      throw_unsupported(where_,
                        "the UNet's time embedding takes " + idx(u.time_embed[1]) + " sinusoids for " +
                            idx(model_channels) + " channels",
                        "diffusers' UNet2DConditionModel uses one sinusoid per channel of the first level");
    u.conv_out = need(U + "out.2.weight", 4, "UNet output convolution");
  }

  // 4. Modules, in the order of the diffusers state dict.
  void place_unet(const UnetLayout& u) {
    const std::string U = kUnet;
    const int64_t levels = u.levels, lpb = u.lpb;
    place("unet", "unet", "", U);
    for (int64_t l = 0; l < levels; ++l) {
      const std::string down = "down_blocks." + idx(l) + ".";
      for (int64_t j = 0; j < lpb; ++j) {
        const std::string src = U + "input_blocks." + idx(u.down_index(l, j)) + ".";
        place("unet_resnet", "unet", down + "resnets." + idx(j) + ".", src + "0.");
        if (u.attn[l]) place_attention(down + "attentions." + idx(j) + ".", src + "1.", u.layers[l]);
      }
      if (l + 1 < levels)
        place("conv", "unet", down + "downsamplers.0.conv.",
              U + "input_blocks." + idx(u.down_index(l, lpb)) + ".0.op.");
    }
    place("unet_resnet", "unet", "mid_block.resnets.0.", U + "middle_block.0.");
    place_attention("mid_block.attentions.0.", U + "middle_block.1.", u.mid_depth);
    place("unet_resnet", "unet", "mid_block.resnets.1.", U + "middle_block.2.");
    for (int64_t b = 0; b < levels; ++b) {
      const std::string up = "up_blocks." + idx(b) + ".";
      for (int64_t j = 0; j <= lpb; ++j) {
        const std::string src = U + "output_blocks." + idx(u.up_index(b, j)) + ".";
        place("unet_resnet", "unet", up + "resnets." + idx(j) + ".", src + "0.");
        if (u.up_attn[b]) place_attention(up + "attentions." + idx(j) + ".", src + "1.", u.layers[levels - 1 - b]);
        // The upsampler follows the resnet, or the resnet and its attention.
        if (j == lpb && b + 1 < levels)
          place("conv", "unet", up + "upsamplers.0.conv.", src + (u.up_attn[b] ? "2" : "1") + ".conv.");
      }
    }
  }

  // 5. The diffusers config of that UNet.
  nlohmann::json unet_config(const UnetLayout& u) const {
    nlohmann::json down_types = nlohmann::json::array(), up_types = nlohmann::json::array();
    for (int64_t l = 0; l < u.levels; ++l) down_types.push_back(u.attn[l] ? "CrossAttnDownBlock2D" : "DownBlock2D");
    for (int64_t b = 0; b < u.levels; ++b) up_types.push_back(u.up_attn[b] ? "CrossAttnUpBlock2D" : "UpBlock2D");
    nlohmann::json head_dim;
    if (plan_.family == SdFamily::SD1) {
      head_dim = kSd1UnetHeads;
    } else {
      // SD 2.x: heads 64 channels wide, written (as the reference does) as per-level head counts.
      head_dim = nlohmann::json::array();
      for (int64_t c : u.channels) head_dim.push_back(heads_for_width(c));
    }
    const auto& layers = u.layers;
    const bool same_layers = std::all_of(layers.begin(), layers.end(), [&](int64_t v) { return v == layers[0]; });
    const int64_t model_channels = u.conv_in[0], time_dim = u.time_embed[0];
    return {
        {"_class_name", "UNet2DConditionModel"},
        {"in_channels", u.conv_in[1]},
        {"out_channels", u.conv_out[0]},
        {"center_input_sample", false},
        {"flip_sin_to_cos", true},
        {"freq_shift", 0},
        {"down_block_types", down_types},
        {"mid_block_type", "UNetMidBlock2DCrossAttn"},
        {"up_block_types", up_types},
        {"only_cross_attention", false},
        {"block_out_channels", u.channels},
        {"layers_per_block", u.lpb},
        {"downsample_padding", 1},
        {"mid_block_scale_factor", 1},
        {"dropout", 0.0},
        {"act_fn", "silu"},
        {"norm_num_groups", 32},
        {"norm_eps", 1e-5},
        {"cross_attention_dim", u.cross_attention_dim},
        {"transformer_layers_per_block", same_layers ? nlohmann::json(layers[0]) : nlohmann::json(layers)},
        {"attention_head_dim", head_dim},
        {"num_attention_heads", nullptr},
        {"use_linear_projection", u.linear_projection},
        {"resnet_time_scale_shift", "default"},
        {"resnet_out_scale_factor", 1.0},
        {"time_embedding_type", "positional"},
        // null means 4 x block_out_channels[0], as in every SD config
        {"time_embedding_dim", time_dim == 4 * model_channels ? nlohmann::json(nullptr) : nlohmann::json(time_dim)},
        {"conv_in_kernel", u.conv_in[2]},
        {"conv_out_kernel", u.conv_out[2]},
    };
  }

  // 6. The UNet attends to text as wide as the text encoder's output.
  void check_text_width(int64_t cross_attention_dim) const {
    const int64_t text_width = plan_.text_encoder_config.at("hidden_size").get<int64_t>();
    if (text_width != cross_attention_dim)
      throw_bad_input(where_,
                      "its text encoder is " + idx(text_width) + " wide but the UNet attends to " +
                          idx(cross_attention_dim) + "-wide text",
                      "the file mixes parts of different models");
  }

  void place_attention(const std::string& target, const std::string& source, int64_t blocks) {
    place("unet_attention", "unet", target, source);
    for (int64_t t = 0; t < blocks; ++t)
      place("unet_transformer_block", "unet", target + "transformer_blocks." + idx(t) + ".",
            source + "transformer_blocks." + idx(t) + ".");
  }

  // -- VAE -------------------------------------------------------------------------

  void plan_vae() {
    const std::string F = kVae;
    const auto& conv_in = need(F + "encoder.conv_in.weight", 4, "VAE encoder input convolution");
    const int64_t levels = count_indices(F + "encoder.down.");
    const int64_t lpb = count_indices(F + "encoder.down.0.block.");
    if (levels < 1 || lpb < 1) throw_bad_input(where_, "has no VAE encoder blocks (first_stage_model.encoder.down.*)");
    // LDM numbers decoder levels from the lowest resolution up: up.{L-1} runs first, up.0 last.
    // diffusers' convert_diffusers_to_original_stable_diffusion.py writes up.{3 - i} whatever
    // L, so the first level is the highest index present, not always L - 1.
    const std::set<int64_t> up_levels = indices(F + "decoder.up.");
    const int64_t top = up_levels.empty() ? -1 : *up_levels.rbegin();
    if (static_cast<int64_t>(up_levels.size()) != levels || top - *up_levels.begin() + 1 != levels)
      throw_bad_input(where_, "its VAE decoder has " + idx(static_cast<int64_t>(up_levels.size())) +
                                  " levels (first_stage_model.decoder.up.*), its encoder " + idx(levels));
    std::vector<int64_t> channels(levels);
    for (int64_t l = 0; l < levels; ++l)
      channels[l] = need(F + "encoder.down." + idx(l) + ".block.0.conv1.weight", 4, "VAE resnet convolution")[0];
    const bool mid_attention = has(F + "encoder.mid.attn_1.q.weight");
    if (mid_attention != has(F + "decoder.mid.attn_1.q.weight"))
      throw_bad_input(where_, "only one of the VAE encoder and decoder has a mid-block attention");
    const bool quant = has(F + "quant_conv.weight"), post_quant = has(F + "post_quant_conv.weight");

    place("vae", "vae", "", F);
    for (int64_t l = 0; l < levels; ++l) {
      const std::string down = "encoder.down_blocks." + idx(l) + ".", src = F + "encoder.down." + idx(l) + ".";
      for (int64_t j = 0; j < lpb; ++j)
        place("vae_resnet", "vae", down + "resnets." + idx(j) + ".", src + "block." + idx(j) + ".");
      if (l + 1 < levels) place("conv", "vae", down + "downsamplers.0.conv.", src + "downsample.conv.");
    }
    for (const std::string part : {"encoder.", "decoder."}) {
      place("vae_resnet", "vae", part + "mid_block.resnets.0.", F + part + "mid.block_1.");
      if (mid_attention) place("vae_attention", "vae", part + "mid_block.attentions.0.", F + part + "mid.attn_1.");
      place("vae_resnet", "vae", part + "mid_block.resnets.1.", F + part + "mid.block_2.");
    }
    // diffusers numbers decoder levels in the order they run.
    for (int64_t u = 0; u < levels; ++u) {
      const int64_t l = top - u;
      const std::string up = "decoder.up_blocks." + idx(u) + ".", src = F + "decoder.up." + idx(l) + ".";
      for (int64_t j = 0; j <= lpb; ++j)
        place("vae_resnet", "vae", up + "resnets." + idx(j) + ".", src + "block." + idx(j) + ".");
      if (u + 1 < levels) place("conv", "vae", up + "upsamplers.0.conv.", src + "upsample.conv.");
    }
    if (quant) place("conv", "vae", "quant_conv.", F + "quant_conv.");
    if (post_quant) place("conv", "vae", "post_quant_conv.", F + "post_quant_conv.");

    plan_.vae_config = {
        {"_class_name", "AutoencoderKL"},
        {"in_channels", conv_in[1]},
        {"out_channels", need(F + "decoder.conv_out.weight", 4, "VAE decoder output convolution")[0]},
        {"down_block_types", std::vector<std::string>(levels, "DownEncoderBlock2D")},
        {"up_block_types", std::vector<std::string>(levels, "UpDecoderBlock2D")},
        {"block_out_channels", channels},
        {"layers_per_block", lpb},
        {"act_fn", "silu"},
        {"latent_channels", need(F + "decoder.conv_in.weight", 4, "VAE decoder input convolution")[1]},
        {"norm_num_groups", 32},
        {"scaling_factor", 0.18215},  // LDM's scale_factor in every SD 1.x / 2.x config
        {"shift_factor", nullptr},
        {"latents_mean", nullptr},
        {"latents_std", nullptr},
        {"force_upcast", true},
        {"use_quant_conv", quant},
        {"use_post_quant_conv", post_quant},
        {"mid_block_add_attention", mid_attention},
    };
  }

  // -- Overrides and the completeness check ----------------------------------------

  void apply_overrides(const nlohmann::json& overrides) {
    if (overrides.is_null()) return;
    if (!overrides.is_object()) throw_bad_input(where_, "config overrides must be a JSON object");
    const std::map<std::string, nlohmann::json*> configs = {{"text_encoder", &plan_.text_encoder_config},
                                                            {"unet", &plan_.unet_config},
                                                            {"vae", &plan_.vae_config},
                                                            {"scheduler", &plan_.scheduler_config}};
    for (auto it = overrides.begin(); it != overrides.end(); ++it) {
      auto c = configs.find(it.key());
      if (c == configs.end() || !it.value().is_object())
        throw_bad_input(where_, "config override \"" + it.key() +
                                    "\" must be an object under one of "
                                    "text_encoder, unet, vae, scheduler");
      c->second->merge_patch(it.value());
    }
  }

  void check_complete() const {
    std::vector<std::string> unmapped;
    for (const auto& name : order_) {
      auto it = uses_.find(name);
      const int uses = it == uses_.end() ? 0 : it->second;
      if (uses == 0 && !dropped_.count(name)) unmapped.push_back(name + " " + shape_str(shapes_.at(name)));
    }
    if (unmapped.empty() && missing_.empty()) return;
    std::string problem;
    const std::string family = family_name(plan_.family);
    if (!unmapped.empty())
      problem = std::to_string(unmapped.size()) + " checkpoint tensors map to no " + family +
                " tensor: " + first_names(unmapped);
    if (!missing_.empty())
      problem += (problem.empty() ? "" : "; ") + std::to_string(missing_.size()) + " tensors of the inferred " +
                 family + " model are missing from the file: " + first_names(missing_);
    throw_bad_input(where_, problem,
                    "not a complete SD 1.x / 2.x checkpoint, or a variant fairdiff does not know; a LoRA or "
                    "embedding file is not a model");
  }

  std::string where_;
  std::map<std::string, std::vector<int64_t>> shapes_;
  std::vector<std::string> order_;  // as given (file order)
  std::map<std::string, int> uses_;
  std::set<std::string> dropped_;
  std::vector<std::string> missing_;
  SingleFilePlan plan_;
};

}  // namespace

SingleFilePlan plan_single_file(const TensorShapes& tensors, const std::string& where,
                                const SingleFileOptions& options) {
  return Planner(tensors, where).run(options);
}

void refuse_pickle_checkpoint(const std::string& path) {
  const std::string hint =
      "PyTorch pickles can execute code when loaded, so fairdiff never opens them; use the .safetensors "
      "release of the model, or convert the file once in a sandbox you trust";
  std::string ext;
  if (const auto dot = path.find_last_of('.'); dot != std::string::npos && path.find('/', dot) == std::string::npos)
    ext = path.substr(dot);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const char* pickle : {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
    if (ext == pickle) throw_unsupported(path, "is a PyTorch pickle checkpoint (" + ext + ")", hint);
  if (is_directory(path))
    throw_bad_input(path, "is a folder, expected a .safetensors checkpoint file",
                    "for a diffusers model folder use the model-folder loader");
  if (!is_regular_file(path)) throw_bad_input(path, "checkpoint file not found");

  // A renamed pickle: torch.save writes a zip ("PK\3\4") or a raw pickle (0x80, protocol
  // 2..5), neither of which starts a plausible safetensors header (8-byte length, then '{').
  unsigned char head[9] = {};
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw_bad_input(path, "checkpoint file not readable");
  const size_t got = std::fread(head, 1, sizeof head, f);
  std::fseek(f, 0, SEEK_END);
  const long size = std::ftell(f);
  std::fclose(f);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | head[i];
  const bool safetensors_like =
      got == 9 && size >= 9 && header_len <= static_cast<uint64_t>(size) - 8 && head[8] == '{';
  const bool zip = got >= 4 && std::memcmp(head, "PK\x03\x04", 4) == 0;
  const bool raw_pickle = got >= 2 && head[0] == 0x80 && head[1] >= 2 && head[1] <= 5;
  if (!safetensors_like && (zip || raw_pickle))
    throw_unsupported(path, "is a PyTorch pickle checkpoint under another name", hint);
}

}  // namespace fairdiff
