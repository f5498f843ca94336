#include "unet_2d_blocks.h"

namespace fairdiff {

namespace nn = torch::nn;

namespace {

ResnetBlock2D make_resnet(const UNetBlockOptions& o, int64_t in_channels, int64_t out_channels) {
  ResnetBlock2DOptions r;
  r.in_channels = in_channels;
  r.out_channels = out_channels;
  r.temb_channels = o.temb_channels;
  r.groups = o.resnet_groups;
  r.eps = o.resnet_eps;
  r.output_scale_factor = o.output_scale_factor;
  return ResnetBlock2D(r);
}

Transformer2DModel make_transformer(const UNetBlockOptions& o, int64_t channels) {
  Transformer2DModelOptions t;
  t.num_attention_heads = o.num_attention_heads;
  t.attention_head_dim = channels / o.num_attention_heads;
  t.in_channels = channels;
  t.num_layers = o.transformer_layers;
  t.cross_attention_dim = o.cross_attention_dim;
  t.norm_num_groups = o.resnet_groups;
  t.use_linear_projection = o.use_linear_projection;
  t.upcast_attention = o.upcast_attention;
  return Transformer2DModel(t);
}

// Registers `items` as the ModuleList `name` of `parent` (the checkpoint's list level).
template <typename Holder>
void register_list(nn::Module& parent, const std::string& name, const std::vector<Holder>& items) {
  auto list = nn::ModuleList();
  for (const auto& item : items) list->push_back(item);
  parent.register_module(name, list);
}

// Down blocks: resnet i takes in_channels first, out_channels after.
std::vector<ResnetBlock2D> down_resnets(const UNetBlockOptions& o) {
  std::vector<ResnetBlock2D> resnets;
  for (int64_t i = 0; i < o.num_layers; ++i)
    resnets.push_back(make_resnet(o, i == 0 ? o.in_channels : o.out_channels, o.out_channels));
  return resnets;
}

// UNet up blocks: resnet i sees the running features (prev_output_channels for the
// first) concatenated with a skip (in_channels for the last, out_channels otherwise).
std::vector<ResnetBlock2D> up_resnets(const UNetBlockOptions& o) {
  std::vector<ResnetBlock2D> resnets;
  for (int64_t i = 0; i < o.num_layers; ++i) {
    const int64_t skip_channels = i == o.num_layers - 1 ? o.in_channels : o.out_channels;
    const int64_t running_channels = i == 0 ? o.prev_output_channels : o.out_channels;
    resnets.push_back(make_resnet(o, running_channels + skip_channels, o.out_channels));
  }
  return resnets;
}

at::Tensor pop_skip(std::vector<at::Tensor>& skips) {
  TORCH_CHECK(!skips.empty(), "UNet up block: no skip connection left");
  at::Tensor skip = std::move(skips.back());
  skips.pop_back();
  return skip;
}

}  // namespace

// ---------------------------------------------------------------------------
// UNet down blocks

CrossAttnDownBlock2D::CrossAttnDownBlock2D(const UNetBlockOptions& o) {
  resnets_ = down_resnets(o);
  for (int64_t i = 0; i < o.num_layers; ++i) attentions_.push_back(make_transformer(o, o.out_channels));
  register_list(*this, "resnets", resnets_);
  register_list(*this, "attentions", attentions_);
  if (o.add_downsample) {
    downsampler_ = Downsample2D(o.out_channels, o.out_channels, o.downsample_padding);
    register_list(*this, "downsamplers", std::vector<Downsample2D>{downsampler_});
  }
}

at::Tensor CrossAttnDownBlock2D::forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                                         std::vector<at::Tensor>& skips, const at::Tensor& spread) {
  // x [B,C_in,H,W] (or [G,C_in,H,W] with spread) -> [B,C_out,H/2,W/2]; pushes num_layers (+1) skips
  at::Tensor h = x;
  for (size_t i = 0; i < resnets_.size(); ++i) {
    h = resnets_[i](h, temb);                                           // [B|G,C_out,H,W]
    h = attentions_[i](h, context, i == 0 ? spread : at::Tensor());  // [B,C_out,H,W]: spread in the first
    skips.push_back(h);
  }
  if (downsampler_) {
    h = downsampler_(h);  // [B,C_out,H/2,W/2]
    skips.push_back(h);
  }
  return h;
}

DownBlock2D::DownBlock2D(const UNetBlockOptions& o) {
  resnets_ = down_resnets(o);
  register_list(*this, "resnets", resnets_);
  if (o.add_downsample) {
    downsampler_ = Downsample2D(o.out_channels, o.out_channels, o.downsample_padding);
    register_list(*this, "downsamplers", std::vector<Downsample2D>{downsampler_});
  }
}

at::Tensor DownBlock2D::forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& /*context*/,
                                std::vector<at::Tensor>& skips, const at::Tensor& spread) {
  // x [B,C_in,H,W] (or [G,C_in,H,W] with spread) -> [B,C_out,H',W']; pushes num_layers (+1) skips
  // Without a cross-attention to wait for, shared rows are spread at once.
  at::Tensor h = spread.defined() ? x.index_select(0, spread) : x;
  for (auto& resnet : resnets_) {
    h = resnet(h, temb);  // [B,C_out,H,W]
    skips.push_back(h);
  }
  if (downsampler_) {
    h = downsampler_(h);  // [B,C_out,H/2,W/2]
    skips.push_back(h);
  }
  return h;
}

// ---------------------------------------------------------------------------
// UNet up blocks

CrossAttnUpBlock2D::CrossAttnUpBlock2D(const UNetBlockOptions& o) {
  resnets_ = up_resnets(o);
  for (int64_t i = 0; i < o.num_layers; ++i) attentions_.push_back(make_transformer(o, o.out_channels));
  register_list(*this, "resnets", resnets_);
  register_list(*this, "attentions", attentions_);
  if (o.add_upsample) {
    upsampler_ = Upsample2D(o.out_channels, o.out_channels);
    register_list(*this, "upsamplers", std::vector<Upsample2D>{upsampler_});
  }
}

at::Tensor CrossAttnUpBlock2D::forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                                       std::vector<at::Tensor>& skips,
                                       const std::optional<std::vector<int64_t>>& upsample_size) {
  // x [B,C_prev,H,W] -> [B,C_out,2H,2W]; pops num_layers skips
  at::Tensor h = x;
  for (size_t i = 0; i < resnets_.size(); ++i) {
    h = at::cat({h, pop_skip(skips)}, 1);  // [B,C_h+C_skip,H,W]
    h = resnets_[i](h, temb);              // [B,C_out,H,W]
    h = attentions_[i](h, context);        // [B,C_out,H,W]
  }
  if (upsampler_) h = upsampler_(h, upsample_size);  // [B,C_out,2H,2W]
  return h;
}

UpBlock2D::UpBlock2D(const UNetBlockOptions& o) {
  resnets_ = up_resnets(o);
  register_list(*this, "resnets", resnets_);
  if (o.add_upsample) {
    upsampler_ = Upsample2D(o.out_channels, o.out_channels);
    register_list(*this, "upsamplers", std::vector<Upsample2D>{upsampler_});
  }
}

at::Tensor UpBlock2D::forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& /*context*/,
                              std::vector<at::Tensor>& skips,
                              const std::optional<std::vector<int64_t>>& upsample_size) {
  // x [B,C_prev,H,W] -> [B,C_out,2H,2W]; pops num_layers skips
  at::Tensor h = x;
  for (auto& resnet : resnets_) {
    h = at::cat({h, pop_skip(skips)}, 1);  // [B,C_h+C_skip,H,W]
    h = resnet(h, temb);                   // [B,C_out,H,W]
  }
  if (upsampler_) h = upsampler_(h, upsample_size);  // [B,C_out,2H,2W]
  return h;
}

// ---------------------------------------------------------------------------
// UNetMidBlock2DCrossAttn

UNetMidBlock2DCrossAttnImpl::UNetMidBlock2DCrossAttnImpl(const UNetBlockOptions& o) {
  const int64_t channels = o.in_channels;
  resnets_.push_back(make_resnet(o, channels, channels));
  for (int64_t i = 0; i < o.num_layers; ++i) {
    attentions_.push_back(make_transformer(o, channels));
    resnets_.push_back(make_resnet(o, channels, channels));
  }
  register_list(*this, "attentions", attentions_);
  register_list(*this, "resnets", resnets_);
}

at::Tensor UNetMidBlock2DCrossAttnImpl::forward(const at::Tensor& x, const at::Tensor& temb,
                                                const at::Tensor& context) {
  // x [B,C,H,W] -> [B,C,H,W]
  at::Tensor h = resnets_[0](x, temb);
  for (size_t i = 0; i < attentions_.size(); ++i) {
    h = attentions_[i](h, context);
    h = resnets_[i + 1](h, temb);
  }
  return h;
}

// ---------------------------------------------------------------------------
// VAE blocks

DownEncoderBlock2DImpl::DownEncoderBlock2DImpl(const UNetBlockOptions& o) {
  resnets_ = down_resnets(o);
  register_list(*this, "resnets", resnets_);
  if (o.add_downsample) {
    downsampler_ = Downsample2D(o.out_channels, o.out_channels, o.downsample_padding);
    register_list(*this, "downsamplers", std::vector<Downsample2D>{downsampler_});
  }
}

at::Tensor DownEncoderBlock2DImpl::forward(const at::Tensor& x) {
  // x [B,C_in,H,W] -> [B,C_out,H/2,W/2]
  at::Tensor h = x;
  for (auto& resnet : resnets_) h = resnet(h);  // [B,C_out,H,W]
  if (downsampler_) h = downsampler_(h);        // [B,C_out,H/2,W/2]
  return h;
}

UpDecoderBlock2DImpl::UpDecoderBlock2DImpl(const UNetBlockOptions& o) {
  // The decoder's up blocks take no skips: resnet i maps in_channels (first) or out_channels.
  resnets_ = down_resnets(o);
  register_list(*this, "resnets", resnets_);
  if (o.add_upsample) {
    upsampler_ = Upsample2D(o.out_channels, o.out_channels);
    register_list(*this, "upsamplers", std::vector<Upsample2D>{upsampler_});
  }
}

at::Tensor UpDecoderBlock2DImpl::forward(const at::Tensor& x) {
  // x [B,C_in,H,W] -> [B,C_out,2H,2W]
  at::Tensor h = x;
  for (auto& resnet : resnets_) h = resnet(h);  // [B,C_out,H,W]
  if (upsampler_) h = upsampler_(h);            // [B,C_out,2H,2W]
  return h;
}

UNetMidBlock2DImpl::UNetMidBlock2DImpl(const UNetBlockOptions& o) {
  const int64_t channels = o.in_channels;
  const int64_t head_dim = o.attention_head_dim > 0 ? o.attention_head_dim : channels;
  AttentionOptions a;
  a.query_dim = channels;
  a.heads = channels / head_dim;
  a.dim_head = head_dim;
  a.bias = true;
  a.upcast_softmax = true;
  a.norm_num_groups = o.resnet_groups;  // resnet_time_scale_shift "default" (the only one supported)
  a.eps = o.resnet_eps;
  a.residual_connection = true;
  a.rescale_output_factor = o.output_scale_factor;

  resnets_.push_back(make_resnet(o, channels, channels));
  for (int64_t i = 0; i < o.num_layers; ++i) {
    if (o.add_attention) attentions_.push_back(Attention(a));
    resnets_.push_back(make_resnet(o, channels, channels));
  }
  if (o.add_attention) register_list(*this, "attentions", attentions_);
  register_list(*this, "resnets", resnets_);
}

at::Tensor UNetMidBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb) {
  // x [B,C,H,W] -> [B,C,H,W]
  at::Tensor h = resnets_[0](x, temb);
  for (size_t i = 1; i < resnets_.size(); ++i) {
    if (!attentions_.empty()) h = attentions_[i - 1](h);  // [B,C,H,W], residual inside
    h = resnets_[i](h, temb);
  }
  return h;
}

}  // namespace fairdiff
