#include "unet_2d_condition.h"

#include <torch/nn/modules/container/modulelist.h>

#include <algorithm>

#include "config_json.h"
#include "fairdiff/error.h"
#include "string_util.h"

namespace fairdiff {

namespace nn = torch::nn;
using namespace config_json;

namespace {

const std::vector<std::string> kDownBlockTypes = {"CrossAttnDownBlock2D", "DownBlock2D"};
const std::vector<std::string> kUpBlockTypes = {"CrossAttnUpBlock2D", "UpBlock2D"};

// clang-format off
const std::vector<std::string> kKnownKeys = {
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "dropout", "act_fn", "norm_num_groups",
    "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "reverse_transformer_layers_per_block",
    "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
    "dual_cross_attention", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_type", "time_embedding_dim",
    "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel",
    "projection_class_embeddings_input_dim", "attention_type", "class_embeddings_concat",
    "mid_block_only_cross_attention", "cross_attention_norm", "addition_embed_type_num_heads"};
// clang-format on

void require_string(const std::string& where, const std::string& key, const std::string& value,
                    const std::vector<std::string>& supported, const std::string& hint = {}) {
  if (std::find(supported.begin(), supported.end(), value) != supported.end()) return;
  throw_unsupported(where, key + " = \"" + value + "\" is not supported (supported: " + join(supported) + ")", hint);
}

void require_false(const nlohmann::json& config, const std::string& key, const std::string& where,
                   const std::string& hint = {}) {
  if (!get_bool(config, key, false, where)) return;
  throw_unsupported(where, key + " = true is not supported (supported: false)", hint);
}

// Runs of equal rows in x [B,...]: `first` [G] the first row of each run, `spread` [B] each
// row's run; both undefined when no row equals the one before it.
struct SharedRows {
  at::Tensor first, spread;
};

SharedRows shared_rows(const at::Tensor& x) {
  const int64_t B = x.size(0);
  if (B < 2) return {};
  // Equal bits (not ==, which calls -0 and 0 equal): one comparison of all neighbours, one
  // transfer to the host.
  const at::ScalarType bits = x.element_size() == 8 ? at::kLong : x.element_size() == 4 ? at::kInt : at::kShort;
  const at::Tensor v = x.contiguous().view(bits);
  const at::Tensor same = at::eq(v.narrow(0, 1, B - 1), v.narrow(0, 0, B - 1)).flatten(1).all(1).to(at::kCPU);
  const bool* same_as_previous = same.data_ptr<bool>();
  std::vector<int64_t> first{0}, spread{0};
  for (int64_t b = 1; b < B; ++b) {
    if (!same_as_previous[b - 1]) first.push_back(b);
    spread.push_back(static_cast<int64_t>(first.size()) - 1);
  }
  if (static_cast<int64_t>(first.size()) == B) return {};
  return {at::tensor(first, at::kLong).to(x.device()), at::tensor(spread, at::kLong).to(x.device())};
}

}  // namespace

// ---------------------------------------------------------------------------
// Config

UNet2DConditionConfig UNet2DConditionConfig::from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) throw_bad_input(where, "expected a JSON object, found " + std::string(j.type_name()));
  const UNet2DConditionConfig defaults;
  UNet2DConditionConfig c;

  // Architectures we do not build: say which, before anything else fails on them.
  // text_time (SDXL) is the one addition embedding we implement.
  if (has_value(j, "addition_embed_type")) {
    const auto& v = j.at("addition_embed_type");
    if (!v.is_string() || v.get<std::string>() != "text_time")
      throw_unsupported(where, "addition_embed_type = " + v.dump() + " is not supported (supported: null, \"text_time\")",
                        "only Stable Diffusion 1.x / 2.x / XL UNets are supported");
    c.addition_embed_type = "text_time";
    // Without these the reference would build add_embedding with no sizes: refuse by name.
    for (const char* key : {"addition_time_embed_dim", "projection_class_embeddings_input_dim"})
      if (!has_value(j, key))
        throw_bad_input(where, std::string("addition_embed_type \"text_time\" needs ") + key + ", found none",
                        "take unet/config.json from the model's release (SDXL base: 256 and 2816)");
    c.addition_time_embed_dim = get_int(j, "addition_time_embed_dim", 0, where);
    c.projection_class_embeddings_input_dim = get_int(j, "projection_class_embeddings_input_dim", 0, where);
  }
  const std::string sd_only = "only Stable Diffusion 1.x / 2.x / XL UNets are supported";
  require_null(j, "class_embed_type", where, sd_only);
  require_null(j, "num_class_embeds", where, sd_only);
  require_null(j, "encoder_hid_dim", where, sd_only);
  require_null(j, "encoder_hid_dim_type", where, sd_only);
  require_null(j, "time_cond_proj_dim", where, "guidance-embedding (LCM-distilled) UNets are not supported");
  require_null(j, "time_embedding_act_fn", where, sd_only);
  require_null(j, "timestep_post_act", where, sd_only);
  require_null(j, "cross_attention_norm", where, sd_only);
  require_null(j, "reverse_transformer_layers_per_block", where, sd_only);
  // diffusers 0.29 itself refuses num_attention_heads (a naming issue it has not resolved).
  require_null(j, "num_attention_heads", where,
               "diffusers rejects this key too; give the head counts as attention_head_dim");
  require_false(j, "dual_cross_attention", where, sd_only);
  require_false(j, "resnet_skip_time_act", where, sd_only);
  if (has_value(j, "only_cross_attention")) {
    const auto& v = j.at("only_cross_attention");
    bool any = v.is_boolean() ? v.get<bool>() : false;
    if (v.is_array()) {
      for (const auto& item : v) {
        if (!item.is_boolean()) throw_bad_input(where, "only_cross_attention must be true/false or a list of them");
        any = any || item.get<bool>();
      }
    } else if (!v.is_boolean()) {
      throw_bad_input(where, "only_cross_attention must be true/false or a list of them, found " + v.dump());
    }
    if (any)
      throw_unsupported(where, "only_cross_attention = " + v.dump() + " is not supported (supported: false)", sd_only);
  }
  // Used only by block types and embeddings rejected above; the reference ignores them here too:
  // mid_block_only_cross_attention, class_embeddings_concat, addition_embed_type_num_heads
  // (text_image only); addition_time_embed_dim and projection_class_embeddings_input_dim
  // without text_time.
  warn_unknown_keys(j, kKnownKeys, where);

  require_string(where, "attention_type", get_string(j, "attention_type", "default", where), {"default"});
  c.resnet_time_scale_shift = get_string(j, "resnet_time_scale_shift", defaults.resnet_time_scale_shift, where);
  require_string(where, "resnet_time_scale_shift", c.resnet_time_scale_shift, {"default"});
  c.time_embedding_type = get_string(j, "time_embedding_type", defaults.time_embedding_type, where);
  require_string(where, "time_embedding_type", c.time_embedding_type, {"positional"});
  c.act_fn = get_string(j, "act_fn", defaults.act_fn, where);
  require_string(where, "act_fn", c.act_fn, {"silu", "swish"});
  if (j.contains("mid_block_type") && j.at("mid_block_type").is_null())
    throw_unsupported(where, "mid_block_type = null is not supported (supported: UNetMidBlock2DCrossAttn)");
  c.mid_block_type = get_string(j, "mid_block_type", defaults.mid_block_type, where);
  require_string(where, "mid_block_type", c.mid_block_type, {"UNetMidBlock2DCrossAttn"});

  c.sample_size = get_int_or_list(j, "sample_size", defaults.sample_size, where);
  c.in_channels = get_int(j, "in_channels", defaults.in_channels, where);
  c.out_channels = get_int(j, "out_channels", defaults.out_channels, where);
  c.center_input_sample = get_bool(j, "center_input_sample", defaults.center_input_sample, where);
  c.flip_sin_to_cos = get_bool(j, "flip_sin_to_cos", defaults.flip_sin_to_cos, where);
  c.freq_shift = get_number(j, "freq_shift", defaults.freq_shift, where);
  c.down_block_types = get_string_list(j, "down_block_types", defaults.down_block_types, where);
  c.up_block_types = get_string_list(j, "up_block_types", defaults.up_block_types, where);
  for (const auto& type : c.down_block_types) require_string(where, "down_block_types entry", type, kDownBlockTypes);
  for (const auto& type : c.up_block_types) require_string(where, "up_block_types entry", type, kUpBlockTypes);
  c.block_out_channels = get_int_or_list(j, "block_out_channels", defaults.block_out_channels, where);
  c.downsample_padding = get_int(j, "downsample_padding", defaults.downsample_padding, where);
  c.mid_block_scale_factor = get_number(j, "mid_block_scale_factor", defaults.mid_block_scale_factor, where);
  c.dropout = get_number(j, "dropout", defaults.dropout, where);
  if (j.contains("norm_num_groups") && j.at("norm_num_groups").is_null())
    throw_unsupported(where, "norm_num_groups = null is not supported (supported: an integer)");
  c.norm_num_groups = get_int(j, "norm_num_groups", defaults.norm_num_groups, where);
  c.norm_eps = get_number(j, "norm_eps", defaults.norm_eps, where);
  c.use_linear_projection = get_bool(j, "use_linear_projection", defaults.use_linear_projection, where);
  c.upcast_attention = get_bool(j, "upcast_attention", defaults.upcast_attention, where);
  c.resnet_out_scale_factor = get_number(j, "resnet_out_scale_factor", defaults.resnet_out_scale_factor, where);
  c.time_embedding_dim = get_int(j, "time_embedding_dim", defaults.time_embedding_dim, where);
  c.conv_in_kernel = get_int(j, "conv_in_kernel", defaults.conv_in_kernel, where);
  c.conv_out_kernel = get_int(j, "conv_out_kernel", defaults.conv_out_kernel, where);

  // Per-block values: an integer applies to every block, a list gives one per block.
  const size_t n = c.down_block_types.size();
  c.layers_per_block = per_block(get_int_or_list(j, "layers_per_block", {2}, where), n, "layers_per_block", where);
  if (j.contains("cross_attention_dim") && j.at("cross_attention_dim").is_null())
    throw_unsupported(where, "cross_attention_dim = null is not supported (supported: an integer or a list)");
  c.cross_attention_dim =
      per_block(get_int_or_list(j, "cross_attention_dim", {1280}, where), n, "cross_attention_dim", where);
  c.transformer_layers_per_block = per_block(get_int_or_list(j, "transformer_layers_per_block", {1}, where), n,
                                             "transformer_layers_per_block", where);
  c.attention_head_dim =
      per_block(get_int_or_list(j, "attention_head_dim", {8}, where), n, "attention_head_dim", where);
  c.num_attention_heads.clear();

  c.validate(where);
  return c;
}

std::vector<int64_t> UNet2DConditionConfig::num_heads() const {
  // diffusers' UNet2DConditionModel calls this field attention_head_dim, but SD 1.x / 2.x
  // configs (num_attention_heads null) have always meant it as the NUMBER of heads: the
  // reference sets num_attention_heads = num_attention_heads or attention_head_dim, and the
  // width of a head is then channels / heads (SD 1.5: 8 heads of 40..160; SD 2.1: 5..20
  // heads of 64).
  return num_attention_heads.empty() ? attention_head_dim : num_attention_heads;
}

void UNet2DConditionConfig::validate(const std::string& where) const {
  const size_t n = down_block_types.size();
  auto count = [&](const std::string& key, size_t size) {
    if (size != n)
      throw_bad_input(where,
                      key + " has " + std::to_string(size) + " entries but down_block_types has " + std::to_string(n),
                      "give one entry per block");
  };
  if (n == 0) throw_bad_input(where, "down_block_types is empty");
  count("up_block_types", up_block_types.size());
  count("block_out_channels", block_out_channels.size());
  count("layers_per_block", layers_per_block.size());
  count("cross_attention_dim", cross_attention_dim.size());
  count("transformer_layers_per_block", transformer_layers_per_block.size());
  count("attention_head_dim", attention_head_dim.size());
  if (!num_attention_heads.empty()) count("num_attention_heads", num_attention_heads.size());
  for (const auto& type : down_block_types) require_string(where, "down_block_types entry", type, kDownBlockTypes);
  for (const auto& type : up_block_types) require_string(where, "up_block_types entry", type, kUpBlockTypes);
  require_string(where, "mid_block_type", mid_block_type, {"UNetMidBlock2DCrossAttn"});
  require_string(where, "act_fn", act_fn, {"silu", "swish"});
  require_string(where, "resnet_time_scale_shift", resnet_time_scale_shift, {"default"});
  require_string(where, "time_embedding_type", time_embedding_type, {"positional"});
  if (only_cross_attention) throw_unsupported(where, "only_cross_attention = true is not supported (supported: false)");

  auto positive = [&](const std::string& key, int64_t value) {
    if (value <= 0) throw_bad_input(where, key + " must be positive, found " + std::to_string(value));
  };
  positive("in_channels", in_channels);
  positive("out_channels", out_channels);
  positive("norm_num_groups", norm_num_groups);
  if (time_embedding_dim < 0) throw_bad_input(where, "time_embedding_dim must be positive");
  for (int64_t k : {conv_in_kernel, conv_out_kernel})
    if (k <= 0 || k % 2 == 0)
      throw_unsupported(where, "conv_in_kernel / conv_out_kernel = " + std::to_string(k) +
                                   " is not supported (supported: odd sizes)");
  if (downsample_padding < 0) throw_bad_input(where, "downsample_padding must be >= 0");
  if (!addition_embed_type.empty()) {
    require_string(where, "addition_embed_type", addition_embed_type, {"text_time"});
    positive("addition_time_embed_dim", addition_time_embed_dim);
    // add_embedding's input is [pooled (P), 6 time features of addition_time_embed_dim].
    if (projection_class_embeddings_input_dim <= 6 * addition_time_embed_dim)
      throw_bad_input(where, "projection_class_embeddings_input_dim " +
                                 std::to_string(projection_class_embeddings_input_dim) +
                                 " leaves no room for the pooled text embedding next to 6 x addition_time_embed_dim " +
                                 std::to_string(addition_time_embed_dim),
                      "it is the pooled width + 6 x addition_time_embed_dim (SDXL base: 1280 + 6 x 256 = 2816)");
  }
  const std::vector<int64_t> heads = num_heads();
  for (size_t i = 0; i < n; ++i) {
    const std::string block = "block " + std::to_string(i) + ": ";
    positive(block + "block_out_channels", block_out_channels[i]);
    positive(block + "layers_per_block", layers_per_block[i]);
    positive(block + "cross_attention_dim", cross_attention_dim[i]);
    positive(block + "transformer_layers_per_block", transformer_layers_per_block[i]);
    positive(block + "attention heads (attention_head_dim)", heads[i]);
    if (block_out_channels[i] % norm_num_groups != 0)
      throw_bad_input(where, block + "block_out_channels " + std::to_string(block_out_channels[i]) +
                                 " is not divisible by norm_num_groups " + std::to_string(norm_num_groups));
    if (block_out_channels[i] % heads[i] != 0)
      throw_bad_input(where, block + "block_out_channels " + std::to_string(block_out_channels[i]) +
                                 " is not divisible by the head count " + std::to_string(heads[i]) +
                                 " (attention_head_dim)");
  }
}

// ---------------------------------------------------------------------------
// Model

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNet2DConditionConfig& config) : config_(config) {
  const auto& c = config_;
  c.validate("UNet2DConditionConfig");
  const size_t n = c.down_block_types.size();
  const std::vector<int64_t> heads = c.num_heads();
  const int64_t time_input_dim = c.block_out_channels[0];
  const int64_t time_embed_dim = c.time_embedding_dim > 0 ? c.time_embedding_dim : 4 * c.block_out_channels[0];

  conv_in_ = register_module(
      "conv_in", leaf::Conv2d(c.in_channels, c.block_out_channels[0], c.conv_in_kernel, 1, (c.conv_in_kernel - 1) / 2));
  time_proj_ = register_module("time_proj", Timesteps(time_input_dim, c.flip_sin_to_cos, c.freq_shift));
  time_embedding_ = register_module("time_embedding", TimestepEmbedding(time_input_dim, time_embed_dim));
  if (takes_text_time()) {
    add_time_proj_ = register_module("add_time_proj", Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos,
                                                                 c.freq_shift));
    add_embedding_ =
        register_module("add_embedding", TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim));
  }

  UNetBlockOptions common;
  common.temb_channels = time_embed_dim;
  common.resnet_eps = c.norm_eps;
  common.resnet_groups = c.norm_num_groups;
  common.downsample_padding = c.downsample_padding;
  common.use_linear_projection = c.use_linear_projection;
  common.upcast_attention = c.upcast_attention;

  // Down path: block i maps block_out_channels[i-1] -> [i], halving the size except the last.
  auto down_list = nn::ModuleList();
  int64_t output_channels = c.block_out_channels[0];
  for (size_t i = 0; i < n; ++i) {
    UNetBlockOptions o = common;
    o.in_channels = output_channels;
    output_channels = c.block_out_channels[i];
    o.out_channels = output_channels;
    o.num_layers = c.layers_per_block[i];
    o.transformer_layers = c.transformer_layers_per_block[i];
    o.cross_attention_dim = c.cross_attention_dim[i];
    o.num_attention_heads = heads[i];
    o.add_downsample = i + 1 < n;
    o.output_scale_factor = c.resnet_out_scale_factor;
    std::shared_ptr<UNetDownBlock> block;
    if (c.down_block_types[i] == "CrossAttnDownBlock2D")
      block = std::make_shared<CrossAttnDownBlock2D>(o);
    else
      block = std::make_shared<DownBlock2D>(o);
    down_blocks_.push_back(block);
    down_list->push_back(block);
  }
  register_module("down_blocks", down_list);

  {
    UNetBlockOptions o = common;
    o.in_channels = o.out_channels = c.block_out_channels.back();
    o.num_layers = 1;
    o.transformer_layers = c.transformer_layers_per_block.back();
    o.cross_attention_dim = c.cross_attention_dim.back();
    o.num_attention_heads = heads.back();
    o.output_scale_factor = c.mid_block_scale_factor;
    mid_block_ = register_module("mid_block", UNetMidBlock2DCrossAttn(o));
  }

  // Up path: the per-block lists reversed; block i takes the block below's output
  // (prev_output_channels) and skips from down block n-1-i.
  auto up_list = nn::ModuleList();
  std::vector<int64_t> rev_channels(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  output_channels = rev_channels[0];
  for (size_t i = 0; i < n; ++i) {
    const size_t r = n - 1 - i;  // the matching down block
    UNetBlockOptions o = common;
    o.prev_output_channels = output_channels;
    output_channels = rev_channels[i];
    o.out_channels = output_channels;
    o.in_channels = rev_channels[std::min(i + 1, n - 1)];
    o.num_layers = c.layers_per_block[r] + 1;
    o.transformer_layers = c.transformer_layers_per_block[r];
    o.cross_attention_dim = c.cross_attention_dim[r];
    o.num_attention_heads = heads[r];
    o.add_upsample = i + 1 < n;
    o.output_scale_factor = c.resnet_out_scale_factor;
    if (o.add_upsample) ++num_upsamplers_;
    std::shared_ptr<UNetUpBlock> block;
    if (c.up_block_types[i] == "CrossAttnUpBlock2D")
      block = std::make_shared<CrossAttnUpBlock2D>(o);
    else
      block = std::make_shared<UpBlock2D>(o);
    up_blocks_.push_back(block);
    up_list->push_back(block);
  }
  register_module("up_blocks", up_list);

  conv_norm_out_ =
      register_module("conv_norm_out", leaf::GroupNorm(c.norm_num_groups, c.block_out_channels[0], c.norm_eps));
  conv_out_ = register_module("conv_out", leaf::Conv2d(c.block_out_channels[0], c.out_channels, c.conv_out_kernel, 1,
                                                       (c.conv_out_kernel - 1) / 2));
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample, const at::Tensor& timestep,
                                             const Conditioning& conditioning) {
  if (!takes_text_time()) {
    TORCH_CHECK(!conditioning.pooled.defined() && !conditioning.time_ids.defined(),
                "UNet2DConditionModel: pooled embeddings or time ids given to a UNet without addition_embed_type");
    return run(sample, timestep, conditioning.context, nullptr);
  }
  return run(sample, timestep, conditioning.context, &conditioning);
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample, const at::Tensor& timestep,
                                             const at::Tensor& encoder_hidden_states) {
  return run(sample, timestep, encoder_hidden_states, nullptr);
}

at::Tensor UNet2DConditionModelImpl::run(const at::Tensor& sample, const at::Tensor& timestep,
                                         const at::Tensor& encoder_hidden_states, const Conditioning* added) {
  // sample [B,C,H,W], timestep [] / [1] / [B], encoder_hidden_states [B,L,D] -> [B,C_out,H,W]
  // added (text_time): pooled [B,P], time_ids [B,6]
  TORCH_CHECK(added || !takes_text_time(),
              "UNet2DConditionModel: this UNet (addition_embed_type text_time, SDXL) needs pooled text embeddings "
              "and time ids: pass a Conditioning");
  TORCH_CHECK(sample.dim() == 4, "UNet2DConditionModel: sample must be [B,C,H,W], got ", sample.sizes());
  TORCH_CHECK(encoder_hidden_states.dim() == 3, "UNet2DConditionModel: encoder_hidden_states must be [B,L,D], got ",
              encoder_hidden_states.sizes());
  const int64_t B = sample.size(0);

  // Sizes that are not a multiple of 2^upsamplers: each upsampler then targets the size of
  // the matching skip instead of doubling.
  const int64_t overall_up_factor = int64_t(1) << num_upsamplers_;
  const bool forward_upsample_size = sample.size(2) % overall_up_factor != 0 || sample.size(3) % overall_up_factor != 0;

  // 1. time: sinusoidal features of each sample's timestep, then the MLP.
  at::Tensor t = timestep.to(sample.device());
  if (t.dim() == 0) t = t.reshape({1});
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == B),
              "UNet2DConditionModel: timestep must be a scalar, [1] or [", B, "], got ", timestep.sizes());
  // Every row of a sampling step shares one timestep: it is embedded once, [1,T], and the
  // resnets' projections of it broadcast over the rows. Cheaper, and it keeps a row's numbers
  // independent of how many rows share the call: BLAS picks its kernel for these tiny
  // products by their row count (OpenBLAS's small-matrix and gemv paths), and the kernels
  // round differently, so a batch of 1 and of 4 gave other images under fair guidance.
  const bool shared = t.size(0) == 1 || at::equal(t, t[0].expand_as(t));
  t = shared ? t.narrow(0, 0, 1) : t.expand({B});             // [1] or [B]
  at::Tensor t_emb = time_proj_(t).to(sample.scalar_type());  // [1|B,C0]
  at::Tensor emb = time_embedding_(t_emb);                    // [1|B,T]
  if (added) {
    // SDXL: each of the 6 time ids gets its own sinusoidal features, flattened after the
    // pooled text embedding: [B, P + 6 A] -> add_embedding -> [B,T], added to the time's.
    TORCH_CHECK(added->pooled.defined() && added->time_ids.defined(),
                "UNet2DConditionModel: addition_embed_type text_time needs pooled text embeddings and time ids");
    TORCH_CHECK(added->pooled.dim() == 2 && added->pooled.size(0) == B && added->time_ids.dim() == 2 &&
                    added->time_ids.size(0) == B,
                "UNet2DConditionModel: pooled must be [", B, ",P] and time_ids [", B, ",6], got ",
                added->pooled.sizes(), " and ", added->time_ids.sizes());
    const at::Tensor time_ids = added->time_ids.to(sample.device());
    at::Tensor time_embeds = add_time_proj_(time_ids.flatten()).reshape({B, -1});  // [B, 6 A]
    at::Tensor add_embeds = at::cat({added->pooled.to(sample.device(), emb.scalar_type()),
                                     time_embeds.to(emb.scalar_type())}, -1);      // [B, P + 6 A]
    TORCH_CHECK(add_embeds.size(1) == config_.projection_class_embeddings_input_dim,
                "UNet2DConditionModel: pooled width + 6 x addition_time_embed_dim is ", add_embeds.size(1),
                ", projection_class_embeddings_input_dim is ", config_.projection_class_embeddings_input_dim);
    emb = emb + add_embedding_(add_embeds);  // [B,T]
  }

  // 2. pre-process. Rows that repeat the row before them (an image's unconditional, text and
  // edit rows: one latent, side by side) with one time embedding for all are the same up to
  // the first layer that reads the context: conv_in, the first resnet, the first transformer
  // block's self-attention. Those run once per run of equal rows ([G]); `spread` then maps
  // each of the B rows to its run.
  at::Tensor h = config_.center_input_sample ? sample * 2.0 - 1.0 : sample;
  at::Tensor spread;
  if (emb.size(0) == 1) {
    const SharedRows shared = shared_rows(h);
    if (shared.spread.defined()) {
      h = h.index_select(0, shared.first);  // [G,C,H,W]
      spread = shared.spread;               // [B]
    }
  }
  h = conv_in_(h);  // [B|G,C0,H,W]

  // 3. down
  std::vector<at::Tensor> skips{spread.defined() ? h.index_select(0, spread) : h};
  for (size_t i = 0; i < down_blocks_.size(); ++i)
    h = down_blocks_[i]->forward(h, emb, encoder_hidden_states, skips, i == 0 ? spread : at::Tensor());

  // 4. mid
  h = mid_block_(h, emb, encoder_hidden_states);

  // 5. up: each block consumes its resnets' worth of skips from the back.
  for (size_t i = 0; i < up_blocks_.size(); ++i) {
    auto& block = up_blocks_[i];
    std::optional<std::vector<int64_t>> upsample_size;
    const bool is_final = i + 1 == up_blocks_.size();
    if (!is_final && forward_upsample_size) {
      const size_t below = skips.size() - static_cast<size_t>(block->num_resnets()) - 1;
      const at::Tensor& target = skips.at(below);
      upsample_size = std::vector<int64_t>{target.size(2), target.size(3)};
    }
    h = block->forward(h, emb, encoder_hidden_states, skips, upsample_size);
  }

  // 6. post-process
  h = conv_norm_out_->forward_silu(h);
  return conv_out_(h);  // [B,C_out,H,W]
}

}  // namespace fairdiff
