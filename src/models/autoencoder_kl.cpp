#include "autoencoder_kl.h"

#include <torch/nn/modules/container/modulelist.h>

#include <algorithm>

#include "config_json.h"
#include "fairdiff/error.h"

namespace fairdiff {

namespace nn = torch::nn;
using namespace config_json;

namespace {

// clang-format off
const std::vector<std::string> kKnownKeys = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
    "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"};
// clang-format on

// The VAE's norms use eps 1e-6 throughout (hard-coded in the reference, not in config.json).
constexpr double kVaeEps = 1e-6;

void require_all(const std::string& where, const std::string& key, const std::vector<std::string>& values,
                 const std::string& supported) {
  for (const auto& v : values)
    if (v != supported)
      throw_unsupported(where, key + " entry \"" + v + "\" is not supported (supported: " + supported + ")",
                        "only the Stable Diffusion AutoencoderKL layout is supported");
}

leaf::Conv2d conv3x3(int64_t in, int64_t out) { return leaf::Conv2d(in, out, 3, 1, 1); }

UNetBlockOptions vae_block(const AutoencoderKLConfig& c) {
  UNetBlockOptions o;
  o.temb_channels = 0;
  o.resnet_eps = kVaeEps;
  o.resnet_groups = c.norm_num_groups;
  o.output_scale_factor = 1.0;
  return o;
}

// The mid block of both halves: one resnet, attention (one head as wide as the
// channels: attention_head_dim = block_out_channels[-1]), one resnet.
UNetMidBlock2D make_mid_block(const AutoencoderKLConfig& c) {
  UNetBlockOptions o = vae_block(c);
  o.in_channels = o.out_channels = c.block_out_channels.back();
  o.num_layers = 1;
  o.add_attention = c.mid_block_add_attention;
  o.attention_head_dim = c.block_out_channels.back();
  return UNetMidBlock2D(o);
}

}  // namespace

// ---------------------------------------------------------------------------
// Config

AutoencoderKLConfig AutoencoderKLConfig::from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) throw_bad_input(where, "expected a JSON object, found " + std::string(j.type_name()));
  const AutoencoderKLConfig d;
  AutoencoderKLConfig c;
  // Latent normalisations of other model families (SD3 / Flux shift, SDXL-style per-channel
  // statistics): the SD pipelines we run would ignore them and produce wrong latents.
  require_null(j, "shift_factor", where, "VAEs with a latent shift (SD3, Flux) are not supported");
  require_null(j, "latents_mean", where, "VAEs with per-channel latent statistics are not supported");
  require_null(j, "latents_std", where, "VAEs with per-channel latent statistics are not supported");
  warn_unknown_keys(j, kKnownKeys, where);

  c.in_channels = get_int(j, "in_channels", d.in_channels, where);
  c.out_channels = get_int(j, "out_channels", d.out_channels, where);
  c.down_block_types = get_string_list(j, "down_block_types", d.down_block_types, where);
  c.up_block_types = get_string_list(j, "up_block_types", d.up_block_types, where);
  c.block_out_channels = get_int_or_list(j, "block_out_channels", d.block_out_channels, where);
  c.layers_per_block = get_int(j, "layers_per_block", d.layers_per_block, where);
  c.act_fn = get_string(j, "act_fn", d.act_fn, where);
  c.latent_channels = get_int(j, "latent_channels", d.latent_channels, where);
  c.norm_num_groups = get_int(j, "norm_num_groups", d.norm_num_groups, where);
  c.sample_size = get_int_or_list(j, "sample_size", d.sample_size, where);
  c.scaling_factor = get_number(j, "scaling_factor", d.scaling_factor, where);
  c.force_upcast = get_bool(j, "force_upcast", d.force_upcast, where);
  c.use_quant_conv = get_bool(j, "use_quant_conv", d.use_quant_conv, where);
  c.use_post_quant_conv = get_bool(j, "use_post_quant_conv", d.use_post_quant_conv, where);
  c.mid_block_add_attention = get_bool(j, "mid_block_add_attention", d.mid_block_add_attention, where);
  c.validate(where);
  return c;
}

void AutoencoderKLConfig::validate(const std::string& where) const {
  require_all(where, "down_block_types", down_block_types, "DownEncoderBlock2D");
  require_all(where, "up_block_types", up_block_types, "UpDecoderBlock2D");
  if (act_fn != "silu" && act_fn != "swish")
    throw_unsupported(where, "act_fn = \"" + act_fn + "\" is not supported (supported: silu, swish)");
  const size_t n = block_out_channels.size();
  if (n == 0) throw_bad_input(where, "block_out_channels is empty");
  // The reference builds one encoder block per down_block_types entry and one decoder
  // block per up_block_types entry, indexing block_out_channels with both.
  if (down_block_types.size() != n || up_block_types.size() != n)
    throw_bad_input(where, "down_block_types (" + std::to_string(down_block_types.size()) + "), up_block_types (" +
                               std::to_string(up_block_types.size()) + ") and block_out_channels (" +
                               std::to_string(n) + ") must have the same length");
  auto positive = [&](const std::string& key, int64_t value) {
    if (value <= 0) throw_bad_input(where, key + " must be positive, found " + std::to_string(value));
  };
  positive("in_channels", in_channels);
  positive("out_channels", out_channels);
  positive("layers_per_block", layers_per_block);
  positive("latent_channels", latent_channels);
  positive("norm_num_groups", norm_num_groups);
  for (int64_t ch : block_out_channels) {
    positive("block_out_channels entry", ch);
    if (ch % norm_num_groups != 0)
      throw_bad_input(where, "block_out_channels entry " + std::to_string(ch) +
                                 " is not divisible by norm_num_groups " + std::to_string(norm_num_groups));
  }
  if (scaling_factor == 0) throw_bad_input(where, "scaling_factor must not be 0");
}

// ---------------------------------------------------------------------------
// Encoder / Decoder

namespace vae {

EncoderImpl::EncoderImpl(const AutoencoderKLConfig& c) {
  const size_t n = c.block_out_channels.size();
  conv_in_ = register_module("conv_in", conv3x3(c.in_channels, c.block_out_channels[0]));
  auto blocks = nn::ModuleList();
  int64_t output_channels = c.block_out_channels[0];
  for (size_t i = 0; i < n; ++i) {
    UNetBlockOptions o = vae_block(c);
    o.in_channels = output_channels;
    output_channels = c.block_out_channels[i];
    o.out_channels = output_channels;
    o.num_layers = c.layers_per_block;
    o.add_downsample = i + 1 < n;
    o.downsample_padding = 0;  // asymmetric (right/bottom) pad, then a valid stride-2 conv
    down_blocks_.push_back(DownEncoderBlock2D(o));
    blocks->push_back(down_blocks_.back());
  }
  register_module("down_blocks", blocks);
  mid_block_ = register_module("mid_block", make_mid_block(c));
  conv_norm_out_ =
      register_module("conv_norm_out", leaf::GroupNorm(c.norm_num_groups, c.block_out_channels.back(), kVaeEps));
  // double_z: mean and log-variance
  conv_out_ = register_module("conv_out", conv3x3(c.block_out_channels.back(), 2 * c.latent_channels));
}

at::Tensor EncoderImpl::forward(const at::Tensor& x) {
  // x [B,C,H,W] -> [B,2Z,h,w]
  at::Tensor h = conv_in_(x);                     // [B,C0,H,W]
  for (auto& block : down_blocks_) h = block(h);  // [B,C_last,h,w]
  h = mid_block_(h);
  h = conv_norm_out_->forward_silu(h);
  return conv_out_(h);
}

DecoderImpl::DecoderImpl(const AutoencoderKLConfig& c) {
  const size_t n = c.block_out_channels.size();
  conv_in_ = register_module("conv_in", conv3x3(c.latent_channels, c.block_out_channels.back()));
  mid_block_ = register_module("mid_block", make_mid_block(c));
  auto blocks = nn::ModuleList();
  std::vector<int64_t> rev_channels(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  int64_t output_channels = rev_channels[0];
  for (size_t i = 0; i < n; ++i) {
    UNetBlockOptions o = vae_block(c);
    o.in_channels = output_channels;
    output_channels = rev_channels[i];
    o.out_channels = output_channels;
    o.num_layers = c.layers_per_block + 1;
    o.add_upsample = i + 1 < n;
    up_blocks_.push_back(UpDecoderBlock2D(o));
    blocks->push_back(up_blocks_.back());
  }
  register_module("up_blocks", blocks);
  conv_norm_out_ =
      register_module("conv_norm_out", leaf::GroupNorm(c.norm_num_groups, c.block_out_channels[0], kVaeEps));
  conv_out_ = register_module("conv_out", conv3x3(c.block_out_channels[0], c.out_channels));
}

at::Tensor DecoderImpl::forward(const at::Tensor& z) {
  // z [B,Z,h,w] -> [B,C,H,W]
  at::Tensor h = conv_in_(z);  // [B,C_last,h,w]
  h = mid_block_(h);
  for (auto& block : up_blocks_) h = block(h);  // [B,C0,H,W]
  h = conv_norm_out_->forward_silu(h);
  return conv_out_(h);
}

}  // namespace vae

// ---------------------------------------------------------------------------
// AutoencoderKL

AutoencoderKLImpl::AutoencoderKLImpl(const AutoencoderKLConfig& config) : config_(config) {
  config_.validate("AutoencoderKLConfig");
  const int64_t z = config_.latent_channels;
  encoder_ = register_module("encoder", vae::Encoder(config_));
  decoder_ = register_module("decoder", vae::Decoder(config_));
  if (config_.use_quant_conv) quant_conv_ = register_module("quant_conv", leaf::Conv2d(2 * z, 2 * z, 1));
  if (config_.use_post_quant_conv) post_quant_conv_ = register_module("post_quant_conv", leaf::Conv2d(z, z, 1));
}

LatentDistribution AutoencoderKLImpl::encode(const at::Tensor& image) {
  // image [B,C,H,W] -> mean/logvar/std [B,Z,h,w], moments [B,2Z,h,w]
  TORCH_CHECK(image.dim() == 4, "AutoencoderKL.encode: image must be [B,C,H,W], got ", image.sizes());
  LatentDistribution d;
  d.moments = encoder_(image);
  if (quant_conv_) d.moments = quant_conv_(d.moments);
  std::vector<at::Tensor> parts = d.moments.chunk(2, 1);  // 2 x [B,Z,h,w]
  d.mean = parts[0];
  d.logvar = at::clamp(parts[1], -30.0, 20.0);
  d.std = at::exp(d.logvar * 0.5);
  return d;
}

at::Tensor AutoencoderKLImpl::decode(const at::Tensor& z) {
  // z [B,Z,h,w] -> [B,C,H,W]
  TORCH_CHECK(z.dim() == 4, "AutoencoderKL.decode: latents must be [B,Z,h,w], got ", z.sizes());
  if (tiling() && (z.size(2) > tile_latent_size_ || z.size(3) > tile_latent_size_)) return tiled_decode(z);
  at::Tensor h = post_quant_conv_ ? post_quant_conv_(z) : z;
  return decoder_(h);
}

void AutoencoderKLImpl::enable_tiling(int64_t tile_latent_size) {
  // The reference's tile_sample_min_size is the config's sample_size (its first entry).
  if (tile_latent_size < 0) tile_latent_size = config_.sample_size.front() / config_.scale_factor();
  TORCH_CHECK(tile_latent_size == 0 || tile_latent_size >= 4,
              "AutoencoderKL.enable_tiling: tiles of fewer than 4 latent pixels leave no overlap, got ",
              tile_latent_size);
  tile_latent_size_ = tile_latent_size;
}

namespace {

// tile_overlap_factor of the reference: neighbouring tiles share a quarter of a tile.
constexpr double kTileOverlap = 0.25;

// blend_v / blend_h of the reference: the first `extent` rows (columns) of b fade in over
// the last `extent` of a: b[y] = a[-extent + y] (1 - y / extent) + b[y] (y / extent).
// In place on b, as the reference does (later tiles blend against already blended ones).
void blend(const at::Tensor& a, at::Tensor& b, int64_t dim, int64_t extent) {
  extent = std::min({a.size(dim), b.size(dim), extent});
  for (int64_t y = 0; y < extent; ++y) {
    const double w = static_cast<double>(y) / static_cast<double>(extent);
    at::Tensor by = b.select(dim, y);
    by.copy_(a.select(dim, a.size(dim) - extent + y) * (1 - w) + by * w);
  }
}

}  // namespace

at::Tensor AutoencoderKLImpl::tiled_decode(const at::Tensor& z) {
  // z [B,Z,h,w] -> [B,C,H,W], tile by tile (tiled_decode of the reference)
  const int64_t f = config_.scale_factor();
  const int64_t tile = tile_latent_size_, tile_sample = tile * f;
  const int64_t stride = static_cast<int64_t>(static_cast<double>(tile) * (1 - kTileOverlap));  // overlap_size
  const int64_t extent = static_cast<int64_t>(static_cast<double>(tile_sample) * kTileOverlap);  // blend_extent
  const int64_t limit = tile_sample - extent;                                                    // row_limit
  std::vector<std::vector<at::Tensor>> rows;
  for (int64_t i = 0; i < z.size(2); i += stride) {
    std::vector<at::Tensor> row;
    for (int64_t j = 0; j < z.size(3); j += stride) {
      at::Tensor t = z.slice(2, i, i + tile).slice(3, j, j + tile);  // [B,Z,<=tile,<=tile]
      if (post_quant_conv_) t = post_quant_conv_(t);
      row.push_back(decoder_(t));  // [B,C,<=tile f,<=tile f]
    }
    rows.push_back(std::move(row));
  }
  std::vector<at::Tensor> out_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<at::Tensor> out_row;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      at::Tensor& t = rows[i][j];
      if (i > 0) blend(rows[i - 1][j], t, 2, extent);
      if (j > 0) blend(rows[i][j - 1], t, 3, extent);
      out_row.push_back(t.slice(2, 0, limit).slice(3, 0, limit));
    }
    out_rows.push_back(at::cat(out_row, 3));
  }
  return at::cat(out_rows, 2);  // [B,C,H,W]
}

}  // namespace fairdiff
