// The UNet's and the VAE's blocks, named after diffusers' unets/unet_2d_blocks.py.
//
// UNet down blocks push every intermediate output onto a skip stack; up blocks pop one
// skip per resnet (concatenated on channels), so the stack is the reference's
// `down_block_res_samples` tuple. The UNet holds its down and up blocks through the small
// interfaces below, because its block list mixes types (as the reference's ModuleList does).
//
// Shape letters: B batch, C channels, H/W height/width, T time-embedding width,
// L context tokens, D context width.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <vector>

#include "layers.h"

namespace fairdiff {

// Settings shared by the blocks of one network (the UNet's get_down_block / get_up_block arguments).
struct UNetBlockOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t prev_output_channels = 0;  // up blocks: channels coming from the block below
  int64_t temb_channels = 1280;      // 0: no time embedding
  int64_t num_layers = 2;            // resnets (up blocks: layers_per_block + 1)
  int64_t transformer_layers = 1;    // transformer blocks per Transformer2DModel
  double resnet_eps = 1e-5;
  int64_t resnet_groups = 32;
  double output_scale_factor = 1.0;
  bool add_downsample = true;
  bool add_upsample = true;
  int64_t downsample_padding = 1;
  int64_t cross_attention_dim = 1280;
  int64_t num_attention_heads = 8;
  bool use_linear_projection = false;
  bool upcast_attention = false;
  // UNetMidBlock2D (VAE) only:
  bool add_attention = true;
  int64_t attention_head_dim = 0;  // head width; heads = in_channels / attention_head_dim (0: one head)
};

// A UNet down block: runs on x and pushes its outputs onto `skips`.
class UNetDownBlock : public torch::nn::Module {
 public:
  // x [B,C_in,H,W], temb [B,T], context [B,L,D] -> [B,C_out,H',W']
  // With `spread` [B] (int64, the first block only): x is [G,C_in,H,W], rows that several
  // context rows share (an image's CFG and edit rows), context row i taking x row spread[i];
  // the block computes on the G rows as long as nothing reads the context, then spreads them.
  virtual at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                             std::vector<at::Tensor>& skips, const at::Tensor& spread) = 0;
  virtual int64_t num_resnets() const = 0;
};

// A UNet up block: pops one skip per resnet from the back of `skips`.
class UNetUpBlock : public torch::nn::Module {
 public:
  // x [B,C_prev,H,W], temb [B,T], context [B,L,D] -> [B,C_out,H'',W'']
  virtual at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                             std::vector<at::Tensor>& skips,
                             const std::optional<std::vector<int64_t>>& upsample_size) = 0;
  virtual int64_t num_resnets() const = 0;
};

// resnet -> transformer, num_layers times, then an optional stride-2 downsample.
class CrossAttnDownBlock2D : public UNetDownBlock {
 public:
  explicit CrossAttnDownBlock2D(const UNetBlockOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                     std::vector<at::Tensor>& skips, const at::Tensor& spread) override;
  int64_t num_resnets() const override { return static_cast<int64_t>(resnets_.size()); }

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;
  Downsample2D downsampler_{nullptr};
};

// resnets only, then an optional downsample.
class DownBlock2D : public UNetDownBlock {
 public:
  explicit DownBlock2D(const UNetBlockOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                     std::vector<at::Tensor>& skips, const at::Tensor& spread) override;
  int64_t num_resnets() const override { return static_cast<int64_t>(resnets_.size()); }

 private:
  std::vector<ResnetBlock2D> resnets_;
  Downsample2D downsampler_{nullptr};
};

// (cat skip -> resnet -> transformer) num_layers times, then an optional upsample.
class CrossAttnUpBlock2D : public UNetUpBlock {
 public:
  explicit CrossAttnUpBlock2D(const UNetBlockOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                     std::vector<at::Tensor>& skips, const std::optional<std::vector<int64_t>>& upsample_size) override;
  int64_t num_resnets() const override { return static_cast<int64_t>(resnets_.size()); }

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;
  Upsample2D upsampler_{nullptr};
};

// (cat skip -> resnet) num_layers times, then an optional upsample.
class UpBlock2D : public UNetUpBlock {
 public:
  explicit UpBlock2D(const UNetBlockOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                     std::vector<at::Tensor>& skips, const std::optional<std::vector<int64_t>>& upsample_size) override;
  int64_t num_resnets() const override { return static_cast<int64_t>(resnets_.size()); }

 private:
  std::vector<ResnetBlock2D> resnets_;
  Upsample2D upsampler_{nullptr};
};

// resnet, then (transformer -> resnet) per layer; channels unchanged.
class UNetMidBlock2DCrossAttnImpl : public torch::nn::Module {
 public:
  explicit UNetMidBlock2DCrossAttnImpl(const UNetBlockOptions& options);
  // x [B,C,H,W], temb [B,T], context [B,L,D] -> [B,C,H,W]
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context);

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;
};
TORCH_MODULE(UNetMidBlock2DCrossAttn);

// ---------------------------------------------------------------------------
// VAE blocks (no time embedding, no cross-attention).

// resnets, then an optional downsample (the encoder uses padding 0: asymmetric pad).
class DownEncoderBlock2DImpl : public torch::nn::Module {
 public:
  explicit DownEncoderBlock2DImpl(const UNetBlockOptions& options);
  // x [B,C_in,H,W] -> [B,C_out,H/2,W/2] (or [B,C_out,H,W] in the last block)
  at::Tensor forward(const at::Tensor& x);

 private:
  std::vector<ResnetBlock2D> resnets_;
  Downsample2D downsampler_{nullptr};
};
TORCH_MODULE(DownEncoderBlock2D);

// resnets, then an optional x2 upsample.
class UpDecoderBlock2DImpl : public torch::nn::Module {
 public:
  explicit UpDecoderBlock2DImpl(const UNetBlockOptions& options);
  // x [B,C_in,H,W] -> [B,C_out,2H,2W] (or [B,C_out,H,W] in the last block)
  at::Tensor forward(const at::Tensor& x);

 private:
  std::vector<ResnetBlock2D> resnets_;
  Upsample2D upsampler_{nullptr};
};
TORCH_MODULE(UpDecoderBlock2D);

// resnet, then (spatial self-attention -> resnet) per layer. The attention is the
// single-head VAE variant (group_norm, residual, float32 softmax).
class UNetMidBlock2DImpl : public torch::nn::Module {
 public:
  explicit UNetMidBlock2DImpl(const UNetBlockOptions& options);
  // x [B,C,H,W] -> [B,C,H,W]
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb = {});

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Attention> attentions_;  // empty without add_attention
};
TORCH_MODULE(UNetMidBlock2D);

}  // namespace fairdiff
