// Leaf layers shared by the UNet and the VAE, each named after its diffusers class
// (resnet.py, attention_processor.py, attention.py, transformers/transformer_2d.py,
// embeddings.py, downsampling.py, upsampling.py).
//
// Member names equal the checkpoint keys (`norm1`, `to_out.0`, `ff.net.2`, ...); layers
// without parameters that hold a list index in the reference (dropouts) are kept as
// placeholders so the indices stay equal. Inference only: dropouts are never applied.
//
// Shape letters: B batch, C channels, H/W height/width, N = H*W (query tokens),
// L context tokens, D context width, h heads, d head width.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fairdiff {

// ---------------------------------------------------------------------------
// Parameter leaves: Linear, Conv2d, GroupNorm, LayerNorm with the parameter names and the
// ATen calls of torch.nn (at::linear, at::conv2d, at::group_norm, at::layer_norm), but
// without initialisation: LibTorch's kaiming init of the 860M SD UNet parameters took 41 s
// here (zero-filling still 14 s), and load_state_dict replaces every tensor anyway. Linear
// and conv weights are UNINITIALISED until loaded (norms start at scale 1, shift 0).
// Each forward is one profile::Scope (profile.h), counting its FLOPs from the shapes.
namespace leaf {

// While one is alive on this thread, Linear and Conv2d register their weights and biases as
// placeholders (one element, expanded to the shape) instead of allocating them: for networks
// whose every parameter a load then replaces (load_state_dict's set_data, which checks that
// the file has them all). Allocated, SD 1.5's 3.4 GiB of UNet weights were never touched but
// left the heap that large once freed, and the denoising steps' tensors then spread over it:
// 1.09 GiB resident for the steps' 0.26 GiB of live tensors at 512x512 (measured here).
class PlaceholderParameters {
 public:
  PlaceholderParameters();
  ~PlaceholderParameters();
  PlaceholderParameters(const PlaceholderParameters&) = delete;
  PlaceholderParameters& operator=(const PlaceholderParameters&) = delete;

 private:
  bool previous_;
};

// An uninitialised parameter of `shape`, or its placeholder while a PlaceholderParameters is
// alive on this thread: for layers of other files that are built for a load the same way.
at::Tensor new_parameter(at::IntArrayRef shape);

// A network built with placeholder weights, for a loader to fill:
//   m.unet = leaf::built_for_load<UNet2DConditionModel>(unet_config);
template <typename Holder, typename... Args>
Holder built_for_load(Args&&... args) {
  PlaceholderParameters placeholders;
  return Holder(std::forward<Args>(args)...);
}

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias = true);
  // x [...,in] -> [...,out]
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor& weight() { return weight_; }

 private:
  at::Tensor weight_, bias_;  // [out,in], [out]; a weight stored in another dtype than x's is converted per call
};
TORCH_MODULE(Linear);

class Conv2dImpl : public torch::nn::Module {
 public:
  Conv2dImpl(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride = 1, int64_t padding = 0);
  // x [B,C_in,H,W] -> [B,C_out,H',W']
  at::Tensor forward(const at::Tensor& x) const;

  // For inference on the CPU: reorders the weight once into oneDNN's blocked layout,
  // which every call otherwise does again (per image, when generating: 2.7x the cost of
  // a 1280-channel 8x8 convolution, measured here). The same numbers (tested). After it
  // the dense weight is no longer read: release_weight() lets its memory go, keeping the
  // parameter's name and shape. False (nothing done) off the CPU or without oneDNN.
  bool prepack();
  bool prepacked() const { return packed_.defined(); }
  void release_weight();
  const at::Tensor& weight() const { return weight_; }
  at::Tensor& mutable_weight() { return weight_; }

 private:
  int64_t stride_, padding_;
  at::Tensor weight_, bias_;  // [out,in,k,k], [out]
  at::Tensor packed_;         // weight_ in oneDNN's layout (an MKLDNN tensor), after prepack()
};
TORCH_MODULE(Conv2d);

// Which rows of a batch may share a Linear or Conv2d call when generating. By default each
// row is its own call, so that an image's numbers never depend on the batch it is in (the
// kernels pick their algorithm by shape: README, Generating). The rows of one image in a
// denoising step (its unconditional, text and edit rows) are a fixed set, whatever the batch
// size, so they may go through together: one weight reorder and one pass over the weight for
// all of them instead of one per row. The pipeline names them around its UNet call:
//
//   leaf::RowGroups groups({3, 3});  // rows 0-2 are image 0's, rows 3-5 image 1's
//   at::Tensor eps = unet->forward(x, t, cond);
//
// The scope is the calling thread's; sizes that do not add up to a layer's row count (a
// layer that sees other rows) leave that layer one row per call.
class RowGroups {
 public:
  explicit RowGroups(const std::vector<int64_t>& sizes);
  ~RowGroups();
  RowGroups(const RowGroups&) = delete;
  RowGroups& operator=(const RowGroups&) = delete;

  int64_t rows() const { return rows_; }
  // (first row, row count) of each group
  const std::vector<std::pair<int64_t, int64_t>>& calls() const { return calls_; }

 private:
  int64_t rows_ = 0;
  std::vector<std::pair<int64_t, int64_t>> calls_;
  const RowGroups* previous_;
};

// The calls for a batch of `rows` rows: (first row, row count) per call, by the RowGroups in
// scope; one row per call without it or when `grouped` is false.
std::vector<std::pair<int64_t, int64_t>> row_calls(int64_t rows, bool grouped = true);

// Whether LibTorch's oneDNN can reorder a CPU convolution weight of `dtype` here (the rule of
// Conv2dImpl::prepack, which leaves the others their plain weights): float32 wherever LibTorch
// has oneDNN; bf16 only on a CPU with AVX-512 BW, VL and DQ (LibTorch 1.13's
// mkldnn_bf16_device_check; elsewhere the reorder throws, as found on an AVX2-only Zen 3).
bool onednn_reorders(at::ScalarType dtype);

// Whether float32 CPU convolutions (64 or more output channels, weights not prepacked) run
// as matrix products when generating: each image's input unfolded into columns (im2col), in
// bands of output rows, times the weight as it is stored, by OpenBLAS; else through LibTorch
// (oneDNN). FAIRDIFF_CONV=gemm or =onednn chooses; unset, oneDNN: in whole UNet steps on a
// Zen 5 oneDNN measured faster, with AVX-512 and held to AVX2; a whole step on an AVX2-only
// CPU is still to be measured (README, Performance, fourteenth session). Decided at the first
// call; an unknown value is an error.
bool gemm_convolutions();
// Chooses for the rest of the process (tests, fairdiff-bench --conv), over FAIRDIFF_CONV.
void use_gemm_convolutions(bool gemm);
// Forgets the choice: the next gemm_convolutions() reads FAIRDIFF_CONV again (tests).
void reset_convolution_path();
// "gemm" or "onednn": what gemm_convolutions() chose, for logs and reports.
const char* convolution_path();

// One group of rows' convolution as matrix products (the path gemm_convolutions() picks),
// written into `out`: x [n,C_in,H,W] float32 on the CPU, weight [C_out,C_in,k,k], bias
// [C_out], out [n,C_out,H',W'] contiguous. Bands of output rows are chosen by the layer's
// shape alone, so a row's numbers never depend on n.
void conv2d_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t stride,
                 int64_t padding, at::Tensor& out);

// Prepacks every leaf::Conv2d of `module` (Conv2dImpl::prepack) and lets the dense
// weights go: `on_released(weight)` is called with each one before it is released (the
// model drops its pages of the file there). Returns the number prepacked.
int64_t prepack_convolutions(torch::nn::Module& module, const std::function<void(const at::Tensor&)>& on_released);

// Stores every leaf::Linear and leaf::Conv2d weight of `module` in `dtype` (float16: half the
// memory); their forwards convert it to the input's dtype per call, so the arithmetic stays
// the input's. `on_replaced(old_weight)` is called before each is replaced (the model drops
// its pages of the file there). Biases, norms and embeddings keep their dtype: a few MB.
// Returns the number of weights stored.
int64_t store_weights(torch::nn::Module& module, at::ScalarType dtype,
                      const std::function<void(const at::Tensor&)>& on_replaced);

// The dtype `module` computes in: that of its first 1-D parameter (a bias or a norm's), which
// store_weights leaves as it is.
at::ScalarType compute_dtype(torch::nn::Module& module);

class GroupNormImpl : public torch::nn::Module {
 public:
  GroupNormImpl(int64_t groups, int64_t channels, double eps);
  // x [B,C,...] -> same
  at::Tensor forward(const at::Tensor& x) const;
  // silu(forward(x)), the norm and the activation in one pass where a kernel does both
  // (bf16 with AVX-512: cpu::group_norm_bf16); the input is never modified.
  at::Tensor forward_silu(const at::Tensor& x) const;

 private:
  at::Tensor normalize(const at::Tensor& x, bool silu, bool* fused) const;
  int64_t groups_;
  double eps_;
  at::Tensor weight_, bias_;  // [C], [C]
};
TORCH_MODULE(GroupNorm);

class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps);
  // x [...,dim] -> same
  at::Tensor forward(const at::Tensor& x) const;

 private:
  int64_t dim_;
  double eps_;
  at::Tensor weight_, bias_;  // [dim], [dim]
};
TORCH_MODULE(LayerNorm);

}  // namespace leaf

// SiLU computed in float32 and rounded once to the tensor's dtype, as the reference computes
// it (PyTorch 2.x's CPU and CUDA kernels) and cpu::group_norm_bf16's fused SiLU: LibTorch
// 1.13's bf16 SiLU on the CPU rounds after each of its operations (30% of values one bf16
// step away, a few two). Other dtypes and devices: at::silu.
at::Tensor silu_in_float(const at::Tensor& x);
// The same of a tensor that nobody else holds (a norm's output): in place unless autograd is
// recording (training), so inference allocates no second feature map.
at::Tensor silu_fresh(at::Tensor x);

// ---------------------------------------------------------------------------
// ResnetBlock2D (time_embedding_norm "default", pre-norm, SiLU):
//   out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale
struct ResnetBlock2DOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;     // 0: same as in_channels
  int64_t temb_channels = 512;  // 0: no time embedding (the VAE)
  int64_t groups = 32;
  double eps = 1e-6;
  double output_scale_factor = 1.0;
};

class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  explicit ResnetBlock2DImpl(const ResnetBlock2DOptions& options);
  // x [B,C_in,H,W], temb [B,T] or undefined -> [B,C_out,H,W]
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb = {});

 private:
  ResnetBlock2DOptions options_;
  leaf::GroupNorm norm1_{nullptr}, norm2_{nullptr};
  leaf::Conv2d conv1_{nullptr}, conv2_{nullptr}, conv_shortcut_{nullptr};
  leaf::Linear time_emb_proj_{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

// ---------------------------------------------------------------------------
// Attention with the semantics of diffusers' AttnProcessor2_0: softmax(q k^T / sqrt(d)) v
// per head. `upcast_attention` computes q k^T and the softmax in float32,
// `upcast_softmax` the softmax only (both matter for half precision only). The VAE's
// variant adds a GroupNorm on the input, a residual connection and an output rescale,
// and takes [B,C,H,W] input.
struct AttentionOptions {
  int64_t query_dim = 0;
  int64_t cross_attention_dim = 0;  // 0: self-attention (keys/values from the query input)
  int64_t heads = 8;
  int64_t dim_head = 64;
  bool bias = false;     // on to_q / to_k / to_v
  bool out_bias = true;  // on to_out.0
  bool upcast_attention = false;
  bool upcast_softmax = false;
  int64_t norm_num_groups = 0;  // > 0: group_norm on the input (VAE)
  double eps = 1e-5;            // of group_norm
  bool residual_connection = false;
  double rescale_output_factor = 1.0;
};

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& options);
  // x [B,N,C] or [B,C,H,W]; context [B,L,D] or undefined (self-attention) -> same shape as x
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context = {});

 private:
  AttentionOptions options_;
  double scale_;
  leaf::GroupNorm group_norm_{nullptr};
  leaf::Linear to_q_{nullptr}, to_k_{nullptr}, to_v_{nullptr}, to_out_0_{nullptr};
};
TORCH_MODULE(Attention);

// Multi-head attention core on already projected tensors, shared by every attention here.
// q [B,N,h*d], k/v [B,L,h*d] -> [B,N,h*d]; `scale` multiplies q k^T. Up to
// `max_score_elements` scores an image (all heads), batched matmuls and a softmax, as the
// reference's classic processor computes them. Above: on the CPU the fused kernel
// (cpu::AttentionHead); elsewhere one image and head at a time, in blocks of query rows of at
// most that many scores. Attention passes 0 on the CPU, so there the fused kernel runs at every
// size; tests call this with the default to compare the two.
constexpr int64_t kMaxBatchedScores = int64_t(1) << 21;
at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale, bool upcast_attention, bool upcast_softmax,
                                int64_t max_score_elements = kMaxBatchedScores);

// ---------------------------------------------------------------------------
// GEGLU: proj to 2x width, split in (value, gate), value * gelu(gate) (exact erf GELU).
class GEGLUImpl : public torch::nn::Module {
 public:
  GEGLUImpl(int64_t dim_in, int64_t dim_out, bool bias = true);
  // x [B,N,dim_in] -> [B,N,dim_out]
  at::Tensor forward(const at::Tensor& x);

 private:
  leaf::Linear proj_{nullptr};
};
TORCH_MODULE(GEGLU);

// FeedForward with activation_fn "geglu": net = [GEGLU(dim, 4 dim), Dropout, Linear(4 dim, dim)].
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, int64_t mult = 4, bool bias = true);
  // x [B,N,C] -> [B,N,C]
  at::Tensor forward(const at::Tensor& x);

 private:
  GEGLU geglu_{nullptr};       // net.0
  leaf::Linear out_{nullptr};  // net.2
};
TORCH_MODULE(FeedForward);

// ---------------------------------------------------------------------------
// BasicTransformerBlock (norm_type "layer_norm"): self-attention, cross-attention, GEGLU
// feed-forward, each pre-LayerNorm with a residual.
struct BasicTransformerBlockOptions {
  int64_t dim = 0;
  int64_t heads = 8;
  int64_t dim_head = 64;
  int64_t cross_attention_dim = 0;  // 0: attn2 attends to the block's own input
  bool attention_bias = false;
  bool upcast_attention = false;
  double norm_eps = 1e-5;
};

class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  explicit BasicTransformerBlockImpl(const BasicTransformerBlockOptions& options);
  // x [B,N,C], context [B,L,D] -> [B,N,C]
  // With `spread` [B] (int64): x [G,N,C] holds the rows that several context rows share, and
  // context row i goes with x row spread[i]. The self-attention runs on the G rows, and they
  // are spread to B before the cross-attention, the first layer that reads the context.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const at::Tensor& spread = {});

 private:
  leaf::LayerNorm norm1_{nullptr}, norm2_{nullptr}, norm3_{nullptr};
  Attention attn1_{nullptr}, attn2_{nullptr};
  FeedForward ff_{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

// ---------------------------------------------------------------------------
// Transformer2DModel for continuous (latent image) input: GroupNorm (eps 1e-6), proj_in
// (1x1 conv, or linear with use_linear_projection), transformer blocks on the N = H*W
// tokens, proj_out, residual.
struct Transformer2DModelOptions {
  int64_t num_attention_heads = 16;
  int64_t attention_head_dim = 88;
  int64_t in_channels = 0;
  int64_t num_layers = 1;
  int64_t cross_attention_dim = 0;
  int64_t norm_num_groups = 32;
  bool use_linear_projection = false;
  bool upcast_attention = false;
};

class Transformer2DModelImpl : public torch::nn::Module {
 public:
  explicit Transformer2DModelImpl(const Transformer2DModelOptions& options);
  // x [B,C,H,W], context [B,L,D] -> [B,C,H,W]
  // With `spread` [B]: x is [G,C,H,W], shared rows as BasicTransformerBlock takes them.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const at::Tensor& spread = {});

 private:
  Transformer2DModelOptions options_;
  int64_t inner_dim_;
  leaf::GroupNorm norm_{nullptr};
  // proj_in / proj_out are either 1x1 convolutions or linear layers; one of each pair is set.
  leaf::Conv2d proj_in_conv_{nullptr}, proj_out_conv_{nullptr};
  leaf::Linear proj_in_linear_{nullptr}, proj_out_linear_{nullptr};
  std::vector<BasicTransformerBlock> blocks_;  // transformer_blocks.*
};
TORCH_MODULE(Transformer2DModel);

// ---------------------------------------------------------------------------
// Downsample2D with use_conv: 3x3 stride-2 conv. padding 0 means an asymmetric zero pad
// (right and bottom by one) before the conv, as the VAE encoder uses.
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding);
  // x [B,C,H,W] -> [B,C_out,ceil(H/2),ceil(W/2)] (padding 1) or [B,C_out,H/2,W/2] (padding 0)
  at::Tensor forward(const at::Tensor& x);

 private:
  int64_t padding_;
  leaf::Conv2d conv_{nullptr};
};
TORCH_MODULE(Downsample2D);

// Upsample2D with use_conv: nearest-neighbour x2 (or to `output_size`), then a 3x3 conv.
class Upsample2DImpl : public torch::nn::Module {
 public:
  Upsample2DImpl(int64_t channels, int64_t out_channels);
  // x [B,C,H,W] -> [B,C_out,2H,2W], or [B,C_out,output_size] when given
  at::Tensor forward(const at::Tensor& x, std::optional<std::vector<int64_t>> output_size = std::nullopt);

 private:
  leaf::Conv2d conv_{nullptr};
};
TORCH_MODULE(Upsample2D);

// ---------------------------------------------------------------------------
// Sinusoidal timestep embedding (embeddings.py get_timestep_embedding):
//   freq_i = exp(-ln(max_period) * i / (half - downscale_freq_shift)), i < half = dim/2,
//   emb = [sin(t freq), cos(t freq)], or [cos, sin] with flip_sin_to_cos; odd dim zero-padded.
// timesteps [B] (any numeric dtype) -> [B,dim] float32
at::Tensor get_timestep_embedding(const at::Tensor& timesteps, int64_t embedding_dim, bool flip_sin_to_cos,
                                  double downscale_freq_shift, double scale = 1.0, double max_period = 10000.0);

// Timesteps: the parameter-free module around get_timestep_embedding.
class TimestepsImpl : public torch::nn::Module {
 public:
  TimestepsImpl(int64_t num_channels, bool flip_sin_to_cos, double downscale_freq_shift);
  // timesteps [B] -> [B,num_channels] float32
  at::Tensor forward(const at::Tensor& timesteps) const;

 private:
  int64_t num_channels_;
  bool flip_sin_to_cos_;
  double downscale_freq_shift_;
};
TORCH_MODULE(Timesteps);

// TimestepEmbedding: linear_1, SiLU, linear_2.
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  // x [B,in] -> [B,time_embed_dim]
  at::Tensor forward(const at::Tensor& x);

 private:
  leaf::Linear linear_1_{nullptr}, linear_2_{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

}  // namespace fairdiff
