#include "layers.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <torch/nn/functional/upsampling.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "cpu_kernels.h"
#include "fairdiff/error.h"
#include "profile.h"
#include "runtime.h"

namespace fairdiff {

namespace nn = torch::nn;

namespace {

leaf::GroupNorm make_group_norm(int64_t groups, int64_t channels, double eps) {
  return leaf::GroupNorm(groups, channels, eps);
}

leaf::Conv2d make_conv(int64_t in, int64_t out, int64_t kernel, int64_t stride = 1, int64_t padding = 0) {
  return leaf::Conv2d(in, out, kernel, stride, padding);
}

leaf::Linear make_linear(int64_t in, int64_t out, bool bias = true) { return leaf::Linear(in, out, bias); }

}  // namespace

// ---------------------------------------------------------------------------
// Parameter leaves

namespace leaf {

namespace {
thread_local bool placeholder_parameters = false;
}  // namespace

at::Tensor new_parameter(at::IntArrayRef shape) {
  if (placeholder_parameters) return at::empty({1}).expand(shape);
  return at::empty(shape);
}

PlaceholderParameters::PlaceholderParameters() : previous_(placeholder_parameters) { placeholder_parameters = true; }

PlaceholderParameters::~PlaceholderParameters() { placeholder_parameters = previous_; }

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool bias) {
  weight_ = register_parameter("weight", new_parameter({out_features, in_features}));
  if (bias) bias_ = register_parameter("bias", new_parameter({out_features}));
}

Conv2dImpl::Conv2dImpl(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding)
    : stride_(stride), padding_(padding) {
  weight_ = register_parameter("weight", new_parameter({out_channels, in_channels, kernel, kernel}));
  bias_ = register_parameter("bias", new_parameter({out_channels}));
}

namespace {
// A weight kept in another dtype than the input's (store_weights), as the input's: one layer's
// worth of memory, for this call only.
at::Tensor as_input_dtype(const at::Tensor& weight, const at::Tensor& x) {
  return weight.scalar_type() == x.scalar_type() ? weight : weight.to(x.scalar_type());
}
}  // namespace

at::Tensor LinearImpl::forward(const at::Tensor& x) const {
  // x [...,in] -> [...,out]
  profile::Scope scope(profile::kLinear, 2.0 * static_cast<double>(x.numel()) * static_cast<double>(weight_.size(0)));
  const at::Tensor weight = as_input_dtype(weight_, x);
  if (x.dim() < 3 || !c10::InferenceMode::is_enabled()) return at::linear(x, weight, bias_);
  // When generating, one image at a time (or one image's rows: RowGroups), as Conv2d: BLAS
  // picks its kernel for a product by its row count (OpenBLAS's small-matrix and edge paths;
  // measured here: 16 against 32 rows of a 64-wide projection differ by up to 8e-6), and
  // under fair guidance such differences changed pixels between --batch-size 1 and 4. Per
  // image, every call has the image's rows. Each call's product is written into its slice
  // of the output: the same addmm (mm without bias) that at::linear runs for a 2-D input,
  // without a copy.
  const int64_t in = weight.size(1), out_features = weight.size(0);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, x.options());  // [B,...,out]
  const at::Tensor wt = weight.t();
  for (const auto& [first, count] : row_calls(x.size(0))) {
    at::Tensor ob = out.narrow(0, first, count).view({-1, out_features});
    const at::Tensor xb = x.narrow(0, first, count).reshape({-1, in});
    if (bias_.defined())
      at::addmm_out(ob, bias_, xb, wt);
    else
      at::mm_out(ob, xb, wt);
  }
  return out;
}

namespace {

// Feature maps above this size (one image, input or output) are convolved in bands of rows.
constexpr int64_t kBandAbove = int64_t(16) << 20;
// The bytes of one band's input or output (whichever is larger).
constexpr int64_t kBandBytes = int64_t(4) << 20;

// One image's convolution in bands of output rows, written into `out` [1,C_out,H',W'].
// oneDNN copies a plain NCHW input and output into its blocked layout and back, so one
// call on a 512x512 VAE feature map holds a second copy of it (measured: +512 MiB for a
// 256 MiB output); band by band that copy is a band's. Each band reads its input rows
// plus the kernel's halo, zero-padded only at the image's top and bottom edge: every
// output pixel is the same dot product as in one call (measured: identical bits).
template <typename Conv>
void conv2d_banded(const at::Tensor& x, const Conv& conv, int64_t stride, int64_t padding, int64_t k, at::Tensor& out) {
  // x [1,C_in,H,W] -> out [1,C_out,H',W']; conv(rows, pads) convolves with the layer's weight
  const int64_t H = x.size(2), Ho = out.size(2);
  const int64_t row_bytes = std::max(x.size(1) * x.size(3) * stride, out.size(1) * out.size(3)) * x.element_size();
  const int64_t band = std::max<int64_t>(1, kBandBytes / row_bytes);
  for (int64_t o0 = 0; o0 < Ho; o0 += band) {
    const int64_t o1 = std::min(Ho, o0 + band);
    const int64_t i0 = o0 * stride - padding, i1 = (o1 - 1) * stride - padding + k;  // input rows [i0, i1)
    const int64_t top = std::max<int64_t>(0, -i0), bottom = std::max<int64_t>(0, i1 - H);
    at::Tensor rows = x.slice(2, std::max<int64_t>(0, i0), std::min(H, i1));  // [1,C_in,rows,W]
    if (top > 0 || bottom > 0) rows = at::constant_pad_nd(rows, {0, 0, top, bottom});
    const std::array<int64_t, 2> pads{0, padding};
    out.slice(2, o0, o1).copy_(conv(rows, pads));  // [1,C_out,o1-o0,W']
  }
}

}  // namespace

namespace {

// The columns of one image's band of output rows hold at most this many bytes (16 MiB: a
// 320-channel 3x3 layer at 64x64 runs in bands of 21 rows). In a microbenchmark on the Zen 3
// 4 MiB bands were 1.3x slower and 32 MiB no faster.
constexpr int64_t kGemmColsBytes = int64_t(16) << 20;
// Convolutions with fewer output channels (conv_out's 4) keep LibTorch's: a product 4 rows
// tall runs far below the peak (measured 2.4-3.7x slower than oneDNN).
constexpr int64_t kGemmMinOut = 64;

int64_t ceil_div_nonnegative(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

// im2col for output rows [o0, o1) of one image x [C,H,W]: column row r = (c, ky, kx), the
// order of the weight's [C_out, C*k*k] view, holds input pixel (c, oy*s - p + ky, ox*s - p + kx)
// for each output pixel (oy, ox) of the band, zero where that falls in the padding. Rows are
// `ld` apart, so that several images' bands can sit side by side.
void im2col_rows(const float* x, int64_t C, int64_t H, int64_t W, int64_t k, int64_t s, int64_t p, int64_t o0,
                 int64_t o1, int64_t Wo, float* cols, int64_t ld) {
  at::parallel_for(0, C * k * k, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r / (k * k), ky = (r / k) % k, kx = r % k;
      const float* plane = x + c * H * W;
      // The output columns whose input column ox*s - p + kx lies in [0, W).
      const int64_t ox0 = std::min(Wo, ceil_div_nonnegative(p - kx, s));
      const int64_t ox1 = std::max(ox0, std::min(Wo, ceil_div_nonnegative(W + p - kx, s)));
      for (int64_t oy = o0; oy < o1; ++oy) {
        float* dst = cols + r * ld + (oy - o0) * Wo;
        const int64_t iy = oy * s - p + ky;
        if (iy < 0 || iy >= H) {
          std::fill(dst, dst + Wo, 0.0f);
          continue;
        }
        const float* src = plane + iy * W - p + kx;  // src[ox * s] is output column ox's input
        std::fill(dst, dst + ox0, 0.0f);
        if (s == 1)
          std::copy(src + ox0, src + ox1, dst + ox0);
        else
          for (int64_t ox = ox0; ox < ox1; ++ox) dst[ox] = src[ox * s];
        std::fill(dst + ox1, dst + Wo, 0.0f);
      }
    }
  });
}

// -1: not decided yet; else 0 (oneDNN) or 1 (matrix products).
std::atomic<int> gemm_choice{-1};

}  // namespace

bool gemm_convolutions() {
  int choice = gemm_choice.load();
  if (choice >= 0) return choice == 1;
  const char* env = std::getenv("FAIRDIFF_CONV");
  const std::string want = env ? env : "";
  if (want == "gemm")
    choice = 1;
  else if (want == "onednn" || want.empty())
    choice = 0;
  else
    throw_bad_input("FAIRDIFF_CONV", "expected gemm or onednn, found '" + want + "'",
                    "unset it for oneDNN, the default");
  int expected = -1;
  gemm_choice.compare_exchange_strong(expected, choice);  // a concurrent first call chose the same
  return gemm_choice.load() == 1;
}

void use_gemm_convolutions(bool gemm) { gemm_choice.store(gemm ? 1 : 0); }

void reset_convolution_path() { gemm_choice.store(-1); }

const char* convolution_path() { return gemm_convolutions() ? "gemm" : "onednn"; }

void conv2d_gemm(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, int64_t stride,
                 int64_t padding, at::Tensor& out) {
  // x [n,C,H,W] -> out [n,C_out,H',W'] = weight [C_out, C k k] . columns [C k k, H' W'] + bias, per image
  TORCH_CHECK(x_in.is_cpu() && x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  out.is_contiguous(),
              "conv2d_gemm: float32 on the CPU into a contiguous output");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C_out = weight.size(0), k = weight.size(2), Ho = out.size(2), Wo = out.size(3), K = C * k * k;
  const at::Tensor w = weight.reshape({C_out, K});  // a view of a contiguous weight: no copy
  // out = w cols (+ bias, through addmm: the bias is the product's initial value).
  const at::Tensor b = bias.defined() ? bias.unsqueeze(1) : at::Tensor();
  auto product_into = [&](at::Tensor& o, const at::Tensor& cols) {
    if (b.defined())
      at::addmm_out(o, b, w, cols);
    else
      at::mm_out(o, w, cols);
  };
  if (k == 1 && stride == 1 && padding == 0 && n == 1) {  // the input is its own columns
    at::Tensor o = out.view({C_out, Ho * Wo});
    product_into(o, x.view({C, H * W}));
    return;
  }
  // Bands by the layer's shape alone (never by n): a product's rounding can depend on its width.
  const int64_t band = std::max<int64_t>(1, kGemmColsBytes / (K * Wo * int64_t(sizeof(float))));
  for (int64_t o0 = 0; o0 < Ho; o0 += band) {
    const int64_t o1 = std::min(Ho, o0 + band), cols_per_image = (o1 - o0) * Wo;
    at::Tensor cols = at::empty({K, n * cols_per_image}, x.options());
    for (int64_t i = 0; i < n; ++i)
      im2col_rows(x[i].data_ptr<float>(), C, H, W, k, stride, padding, o0, o1, Wo,
                  cols.data_ptr<float>() + i * cols_per_image, n * cols_per_image);
    if (n == 1) {  // straight into the output's rows [o0, o1): a view with row stride H' W'
      at::Tensor o = out[0].view({C_out, Ho * Wo}).narrow(1, o0 * Wo, cols_per_image);
      product_into(o, cols);
      continue;
    }
    at::Tensor product = at::empty({C_out, n * cols_per_image}, x.options());
    product_into(product, cols);
    for (int64_t i = 0; i < n; ++i)
      out[i].view({C_out, Ho * Wo}).narrow(1, o0 * Wo, cols_per_image)
          .copy_(product.narrow(1, i * cols_per_image, cols_per_image));
  }
}

namespace {
// The RowGroups in scope on this thread, if any.
thread_local const RowGroups* current_row_groups = nullptr;
}  // namespace

RowGroups::RowGroups(const std::vector<int64_t>& sizes) : previous_(current_row_groups) {
  for (int64_t n : sizes) {
    calls_.emplace_back(rows_, n);
    rows_ += n;
  }
  current_row_groups = this;
}

RowGroups::~RowGroups() { current_row_groups = previous_; }

std::vector<std::pair<int64_t, int64_t>> row_calls(int64_t rows, bool grouped) {
  if (grouped && current_row_groups && current_row_groups->rows() == rows) return current_row_groups->calls();
  std::vector<std::pair<int64_t, int64_t>> calls;
  for (int64_t b = 0; b < rows; ++b) calls.emplace_back(b, 1);
  return calls;
}

bool onednn_reorders(at::ScalarType dtype) {
  static const bool bf16 = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512dq");
  return at::hasMKLDNN() && (dtype == at::kFloat || (dtype == at::kBFloat16 && bf16));
}

bool Conv2dImpl::prepack() {
  if (packed_.defined()) return true;
  if (!weight_.is_cpu() || !onednn_reorders(weight_.scalar_type())) return false;
  const std::array<int64_t, 2> stride{stride_, stride_}, padding{padding_, padding_}, dilation{1, 1};
  packed_ = at::mkldnn_reorder_conv2d_weight(weight_.contiguous().to_mkldnn(), padding, stride, dilation, 1);
  return true;
}

void Conv2dImpl::release_weight() {
  // One element standing for all: the parameter keeps its name, shape and dtype.
  at::NoGradGuard no_grad;
  weight_.set_data(at::zeros({1}, weight_.options()).expand(weight_.sizes()));
}

int64_t prepack_convolutions(torch::nn::Module& module, const std::function<void(const at::Tensor&)>& on_released) {
  int64_t n = 0;
  for (const auto& child : module.modules(/*include_self=*/true)) {
    auto* conv = dynamic_cast<leaf::Conv2dImpl*>(child.get());
    if (!conv || !conv->prepack()) continue;
    if (on_released) on_released(conv->weight());
    conv->release_weight();
    ++n;
  }
  return n;
}

int64_t store_weights(torch::nn::Module& module, at::ScalarType dtype,
                      const std::function<void(const at::Tensor&)>& on_replaced) {
  at::NoGradGuard no_grad;
  int64_t n = 0;
  auto store = [&](at::Tensor& weight) {
    if (weight.scalar_type() == dtype) return;
    at::Tensor stored = weight.to(dtype);
    if (on_replaced) on_replaced(weight);
    weight.set_data(stored);  // the parameter itself: its name, shape and place in the module stay
    ++n;
  };
  for (const auto& child : module.modules(/*include_self=*/true)) {
    if (auto* linear = dynamic_cast<leaf::LinearImpl*>(child.get())) store(linear->weight());
    if (auto* conv = dynamic_cast<leaf::Conv2dImpl*>(child.get())) {
      TORCH_CHECK(!conv->prepacked(), "store_weights: a prepacked convolution keeps its dtype");
      store(conv->mutable_weight());
    }
  }
  return n;
}

at::ScalarType compute_dtype(torch::nn::Module& module) {
  for (const auto& p : module.parameters())
    if (p.dim() == 1) return p.scalar_type();
  return module.parameters().front().scalar_type();
}

at::Tensor Conv2dImpl::forward(const at::Tensor& x) const {
  // x [B,C_in,H,W] -> [B,C_out,H',W']
  const int64_t B = x.size(0);
  const int64_t k = weight_.size(2);
  const int64_t Ho = (x.size(2) + 2 * padding_ - k) / stride_ + 1, Wo = (x.size(3) + 2 * padding_ - k) / stride_ + 1;
  profile::Scope scope(profile::kConv2d, 2.0 * static_cast<double>(B * Ho * Wo) *
                                             static_cast<double>(weight_.numel()));  // weight_ = C_out C_in k k
  const std::array<int64_t, 2> stride{stride_, stride_}, padding{padding_, padding_};
  TORCH_CHECK(!packed_.defined() || (x.is_cpu() && x.scalar_type() == weight_.scalar_type()),
              "Conv2d: the prepacked weight runs ", weight_.scalar_type(), " on the CPU only, got ", x.scalar_type(),
              " on ", x.device());
  const at::Tensor weight = packed_.defined() ? weight_ : as_input_dtype(weight_, x);
  if (!c10::InferenceMode::is_enabled() && !packed_.defined()) return at::conv2d(x, weight, bias_, stride, padding);
  const int64_t image_bytes = std::max(x.numel() / B, weight_.size(0) * Ho * Wo) * x.element_size();
  const bool banded = image_bytes > kBandAbove && x.is_cpu();
  // One image (or band) through oneDNN with the prepacked weight, else at::conv2d.
  auto conv = [&](const at::Tensor& input, at::IntArrayRef pads) {
    if (packed_.defined()) return at::mkldnn_convolution(input, packed_, bias_, pads, stride, {1, 1}, 1);
    return at::conv2d(input, weight, bias_, stride, pads);
  };
  // When generating, one image at a time (or one image's rows: RowGroups): LibTorch picks a
  // convolution algorithm by shape, and on small feature maps (8x8, 16x16) a batched call
  // rounds differently from the same image alone (measured here: up to 5e-6), which can flip
  // a pixel level. Per image, an image's bytes never depend on --batch-size. Training (no
  // inference mode) keeps the batched call; norms and attention are batch-invariant already.
  // A call reorders the weight into oneDNN's layout and copies its images' maps into it and
  // back. Rows share a call where the weight is the larger (SD's 1280- and 640-channel
  // layers at 8x8 to 32x32: a 1280-channel 3x3 weight is 59 MB, an image's 8x8 map 0.3 MB).
  // Where the maps are larger (64x64), sharing measured no faster and a shared call holds
  // more of them at once (fast fair guidance, 512x512: peak RSS 4.26-4.35 against 4.17-4.20
  // GiB). Banded maps are the largest: one image per call.
  const bool share = !banded && weight_.nbytes() >= static_cast<size_t>(image_bytes);
  const std::vector<std::pair<int64_t, int64_t>> calls = row_calls(B, share);
  // Or as matrix products (gemm_convolutions), by the same calls, written into the output.
  const bool gemm = !packed_.defined() && x.is_cpu() && x.scalar_type() == at::kFloat &&
                    weight_.size(0) >= kGemmMinOut && gemm_convolutions();
  if (calls.size() == 1 && !banded && !gemm) return conv(x, padding);
  at::Tensor out = at::empty({B, weight_.size(0), Ho, Wo}, x.options());
  for (const auto& [first, count] : calls) {
    at::Tensor rows_out = out.narrow(0, first, count);
    if (gemm)
      conv2d_gemm(x.narrow(0, first, count), weight, bias_, stride_, padding_, rows_out);
    else if (banded)
      conv2d_banded(x.narrow(0, first, count), conv, stride_, padding_, weight_.size(2), rows_out);  // count 1
    else
      rows_out.copy_(conv(x.narrow(0, first, count), padding));
  }
  return out;  // [B,C_out,H',W']
}

GroupNormImpl::GroupNormImpl(int64_t groups, int64_t channels, double eps) : groups_(groups), eps_(eps) {
  weight_ = register_parameter("weight", at::ones({channels}));
  bias_ = register_parameter("bias", at::zeros({channels}));
}

namespace {

// LibTorch 1.13's CPU norms in bfloat16 run 6-10x slower than in float32 (measured here
// on the UNet's and the VAE's shapes). With AVX-512, cpu::group_norm_bf16 and
// layer_norm_bf16 compute them in float32 straight from and to bf16; elsewhere they go
// through float32 tensors, 1.5x faster than LibTorch's bf16 kernels. Either is as accurate
// as those (the statistics are float sums in all three).
bool norm_in_float(const at::Tensor& x) { return x.is_cpu() && x.scalar_type() == at::kBFloat16; }

}  // namespace

at::Tensor GroupNormImpl::forward(const at::Tensor& x) const {
  bool fused = false;
  return normalize(x, /*silu=*/false, &fused);
}

at::Tensor GroupNormImpl::forward_silu(const at::Tensor& x) const {
  bool fused = false;
  at::Tensor y = normalize(x, /*silu=*/true, &fused);
  return fused ? y : silu_fresh(y);  // outside the norm's profile scope, as it was
}

// The norm, and with silu its SiLU too where the kernel fuses it (*fused says so).
at::Tensor GroupNormImpl::normalize(const at::Tensor& x, bool silu, bool* fused) const {
  profile::Scope scope(profile::kGroupNorm, 0);
  *fused = false;
  if (norm_in_float(x)) {
    if (at::Tensor y = cpu::group_norm_bf16(x, groups_, weight_, bias_, eps_, silu); y.defined()) {
      *fused = silu;
      return y;
    }
    return at::group_norm(x.to(at::kFloat), groups_, weight_.to(at::kFloat), bias_.to(at::kFloat), eps_)
        .to(x.scalar_type());
  }
  return at::group_norm(x, groups_, weight_, bias_, eps_);
}

LayerNormImpl::LayerNormImpl(int64_t dim, double eps) : dim_(dim), eps_(eps) {
  weight_ = register_parameter("weight", at::ones({dim}));
  bias_ = register_parameter("bias", at::zeros({dim}));
}

at::Tensor LayerNormImpl::forward(const at::Tensor& x) const {
  profile::Scope scope(profile::kLayerNorm, 0);
  if (norm_in_float(x)) {
    if (x.size(-1) == dim_)
      if (at::Tensor y = cpu::layer_norm_bf16(x, weight_, bias_, eps_); y.defined()) return y;
    return at::layer_norm(x.to(at::kFloat), {dim_}, weight_.to(at::kFloat), bias_.to(at::kFloat), eps_)
        .to(x.scalar_type());
  }
  return at::layer_norm(x, {dim_}, weight_, bias_, eps_);
}

}  // namespace leaf

// ---------------------------------------------------------------------------
// ResnetBlock2D

ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetBlock2DOptions& options) : options_(options) {
  if (options_.out_channels == 0) options_.out_channels = options_.in_channels;
  const int64_t in = options_.in_channels, out = options_.out_channels;
  norm1_ = register_module("norm1", make_group_norm(options_.groups, in, options_.eps));
  conv1_ = register_module("conv1", make_conv(in, out, 3, 1, 1));
  if (options_.temb_channels > 0)
    time_emb_proj_ = register_module("time_emb_proj", make_linear(options_.temb_channels, out));
  norm2_ = register_module("norm2", make_group_norm(options_.groups, out, options_.eps));
  // (dropout sits here in the reference: parameter-free, inactive at inference)
  conv2_ = register_module("conv2", make_conv(out, out, 3, 1, 1));
  // The reference adds a 1x1 shortcut exactly when the channel count changes.
  if (in != out) conv_shortcut_ = register_module("conv_shortcut", make_conv(in, out, 1));
}

namespace {
bool silu_rounds_per_op(const at::Tensor& x) { return x.is_cpu() && x.scalar_type() == at::kBFloat16; }
}  // namespace

at::Tensor silu_in_float(const at::Tensor& x) {
  return silu_rounds_per_op(x) ? at::silu(x.to(at::kFloat)).to(x.scalar_type()) : at::silu(x);
}

at::Tensor silu_fresh(at::Tensor x) {
  // In place where nothing keeps the input for a backward pass: at 512x512 the VAE's
  // feature maps are 128-256 MiB each, and every one not allocated is one less at the peak.
  if (at::GradMode::is_enabled()) return silu_in_float(x);
  return silu_rounds_per_op(x) ? x.copy_(at::silu(x.to(at::kFloat))) : at::silu_(x);
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb) {
  // x [B,C_in,H,W], temb [B,T] -> [B,C_out,H,W]
  const bool in_place = !at::GradMode::is_enabled();
  at::Tensor h = conv1_(norm1_->forward_silu(x));  // [B,C_out,H,W]
  if (time_emb_proj_ && temb.defined()) {
    at::Tensor t = time_emb_proj_(silu_in_float(temb)).unsqueeze(-1).unsqueeze(-1);  // [B,C_out,1,1] broadcast
    h = in_place ? h.add_(t) : h + t;
  }
  h = conv2_(norm2_->forward_silu(h));
  // shortcut + h, in h's memory when allowed (IEEE addition commutes: the same numbers).
  const at::Tensor shortcut = conv_shortcut_ ? conv_shortcut_(x) : x;
  at::Tensor out = in_place ? h.add_(shortcut) : shortcut + h;
  if (options_.output_scale_factor != 1.0)
    out = in_place ? out.div_(options_.output_scale_factor) : out / options_.output_scale_factor;
  return out;
}

// ---------------------------------------------------------------------------
// Attention

AttentionImpl::AttentionImpl(const AttentionOptions& options) : options_(options) {
  const int64_t inner = options_.heads * options_.dim_head;
  const int64_t context_dim = options_.cross_attention_dim > 0 ? options_.cross_attention_dim : options_.query_dim;
  scale_ = 1.0 / std::sqrt(static_cast<double>(options_.dim_head));
  if (options_.norm_num_groups > 0)
    group_norm_ =
        register_module("group_norm", make_group_norm(options_.norm_num_groups, options_.query_dim, options_.eps));
  to_q_ = register_module("to_q", make_linear(options_.query_dim, inner, options_.bias));
  to_k_ = register_module("to_k", make_linear(context_dim, inner, options_.bias));
  to_v_ = register_module("to_v", make_linear(context_dim, inner, options_.bias));
  auto to_out = nn::ModuleList();
  to_out_0_ = make_linear(inner, options_.query_dim, options_.out_bias);
  to_out->push_back(to_out_0_);
  to_out->push_back(nn::Dropout(0.0));  // to_out.1: keeps the index of the reference's dropout
  register_module("to_out", to_out);
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  // x [B,N,C] or [B,C,H,W]; context [B,L,D] -> same shape as x
  const bool spatial = x.dim() == 4;
  at::Tensor h = x;
  if (group_norm_) {
    // GroupNorm over channels: [B,C,H,W] as is, [B,N,C] through [B,C,N].
    h = spatial ? group_norm_(h) : group_norm_(h.transpose(1, 2)).transpose(1, 2);
  }
  const int64_t B = x.size(0);
  int64_t C = 0, H = 0, W = 0;
  if (spatial) {
    C = x.size(1), H = x.size(2), W = x.size(3);
    h = h.reshape({B, C, H * W}).transpose(1, 2);  // [B,N,C]
  }
  const at::Tensor& kv_input = context.defined() ? context : h;
  at::Tensor q = to_q_(h);         // [B,N,h*d]
  at::Tensor k = to_k_(kv_input);  // [B,L,h*d]
  at::Tensor v = to_v_(kv_input);  // [B,L,h*d]
  // On the CPU the fused kernel takes every size: against the batched matmuls and LibTorch's
  // softmax it was 1.9-4.5x faster on each of SD 1.5's UNet attentions and the tiny models',
  // and about even on the VAE's one 512-wide head (Zen 5, README: Performance).
  const int64_t batched_scores = q.is_cpu() ? 0 : kMaxBatchedScores;
  at::Tensor out = multi_head_attention(q, k, v, options_.heads, scale_, options_.upcast_attention,
                                        options_.upcast_softmax, batched_scores);  // [B,N,h*d]
  out = to_out_0_(out);                                            // [B,N,C]
  if (spatial) out = out.transpose(1, 2).reshape({B, C, H, W});    // [B,C,H,W]
  if (options_.residual_connection) out = out + x;
  if (options_.rescale_output_factor != 1.0) out = out / options_.rescale_output_factor;
  return out;
}

namespace {
// Runs every (image, head) pair of an attention call on the CPU's threads: with enough pairs
// each thread takes whole heads, packing each one's k and v once (SD's 8 heads with CFG are
// 16); with few (the VAE's one) the threads share each head's query rows.
// make_head(item) -> cpu::AttentionHead; run_rows(head, item, first row, end row).
template <typename MakeHead, typename RunRows>
void for_each_head(int64_t items, int64_t N, const MakeHead& make_head, const RunRows& run_rows) {
  if (at::get_num_threads() > 1 && items >= 2 * at::get_num_threads() && !at::in_parallel_region()) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) run_rows(make_head(item), item, 0, N);
    });
    return;
  }
  for (int64_t item = 0; item < items; ++item) {
    const cpu::AttentionHead head = make_head(item);
    at::parallel_for(0, N, head.block_rows(), [&](int64_t begin, int64_t end) { run_rows(head, item, begin, end); });
  }
}
}  // namespace

at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale, bool upcast_attention, bool upcast_softmax, int64_t max_score_elements) {
  // q [B,N,h*d], k/v [B,L,h*d] -> [B,N,h*d]
  const int64_t B = q.size(0), N = q.size(1), L = k.size(1), inner = q.size(2);
  const int64_t d = inner / heads;
  const at::ScalarType dtype = q.scalar_type();
  // q k^T and probs v: 2 N L d multiply-adds per batch item and head.
  profile::Scope scope(profile::kAttention, 4.0 * static_cast<double>(B * heads) * static_cast<double>(N) *
                                                static_cast<double>(L) * static_cast<double>(d));
  [[maybe_unused]] const bool upcast =
      (upcast_attention || upcast_softmax) && dtype != at::kFloat && dtype != at::kDouble;

#if TORCH_VERSION_MAJOR >= 2
  // On the GPU, the fused kernel (flash / memory-efficient) when it computes the same thing:
  // its default scale is 1/sqrt(d), and it has no float32 upcast for half inputs. Not on the
  // CPU: there the paths below keep an image's numbers independent of its batch, and run our
  // fused kernels (cpu::AttentionHead, chosen per CPU at run time).
  if (!q.is_cpu() && !upcast && std::abs(scale - 1.0 / std::sqrt(static_cast<double>(d))) < 1e-12) {
    at::Tensor qh = q.reshape({B, N, heads, d}).transpose(1, 2);  // [B,h,N,d]
    at::Tensor kh = k.reshape({B, L, heads, d}).transpose(1, 2);  // [B,h,L,d]
    at::Tensor vh = v.reshape({B, L, heads, d}).transpose(1, 2);  // [B,h,L,d]
    at::Tensor o = at::scaled_dot_product_attention(qh, kh, vh, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                    /*is_causal=*/false);  // [B,h,N,d]
    return o.transpose(1, 2).reshape({B, N, inner});                       // [B,N,h*d]
  }
#endif

  // The path is chosen per image (not per batch), so an image's numbers never depend on
  // the batch it is in.
  if (heads * N * L <= max_score_elements) {
    // When generating, one image at a time, as Linear and Conv2d: LibTorch's bmm takes
    // another path for one matrix than for several (measured here on the VAE's one-head
    // attention: up to 6e-7 apart), so batched images could round unlike the same image alone.
    if (B > 1 && c10::InferenceMode::is_enabled()) {
      at::Tensor out = at::empty({B, N, inner}, q.options());  // [B,N,h*d]
      for (int64_t b = 0; b < B; ++b)
        out[b].copy_(multi_head_attention(q.narrow(0, b, 1), k.narrow(0, b, 1), v.narrow(0, b, 1), heads, scale,
                                          upcast_attention, upcast_softmax, max_score_elements)[0]);
      return out;
    }
    // Small problems: batched matmuls over B*h, as the reference's classic processor does.
    at::Tensor qh = q.reshape({B, N, heads, d}).permute({0, 2, 1, 3}).reshape({B * heads, N, d});  // [Bh,N,d]
    at::Tensor kh = k.reshape({B, L, heads, d}).permute({0, 2, 1, 3}).reshape({B * heads, L, d});  // [Bh,L,d]
    at::Tensor vh = v.reshape({B, L, heads, d}).permute({0, 2, 1, 3}).reshape({B * heads, L, d});  // [Bh,L,d]
    if (upcast_attention) {
      qh = qh.to(at::kFloat);
      kh = kh.to(at::kFloat);
    }
    // Not baddbmm on an uninitialised input with beta = 0 (the reference's form): LibTorch
    // 1.13's small-matrix CPU kernel multiplies that input by beta, so stale NaNs in reused
    // memory leak into the scores. The product then the scale is the same up to rounding.
    at::Tensor scores = at::bmm(qh, kh.transpose(1, 2)).mul_(scale);  // [Bh,N,L]
    if (upcast_softmax) scores = scores.to(at::kFloat);
    at::Tensor out = at::bmm(scores.softmax(-1).to(dtype), vh);  // [Bh,N,d]
    return out.view({B, heads, N, d}).permute({0, 2, 1, 3}).reshape({B, N, inner});  // [B,N,h*d]
  }

  // Above max_score_elements (on the CPU, every size Attention runs: it passes 0), one image
  // and head at a time, in blocks of query rows whose scores stay in cache. The scale
  // multiplies q (N x h*d values) instead of the scores (h x N x L): the same product up to
  // one rounding, at 1/100 of the cost at 64x64 latents.
  if (q.is_cpu()) {
    // On the CPU, fused per head (cpu::AttentionHead): the scores of a block of query rows,
    // their one-pass exponentials and the product with v, both products in registers, and the
    // softmax's division applied to the n x d product: softmax(s) v = (exp(s - max) v) / sum.
    // Scores, sums and the division are float32 whatever the input dtype (LibTorch 1.13's
    // bf16 softmax is slow); for half inputs this is more precise than the reference, which
    // multiplies the probabilities in the input dtype. A bf16 model on a CPU with bf16 dot
    // products runs both products on them, reading its bf16 q, k, v in place and writing bf16
    // (the bits that float32 copies of q, k, v would give; the copies and the output's
    // conversion took a tenth of a bf16 512x512 step's attention); elsewhere q, k, v are
    // copied to float32.
    const bool bf16_products = dtype == at::kBFloat16 && cpu::AttentionHead::bf16_products_supported();
    const at::Tensor qf = bf16_products ? q.contiguous() : (q.to(at::kFloat) * scale).contiguous();  // [B,N,h*d]
    const at::Tensor kf = bf16_products ? k.contiguous() : k.to(at::kFloat).contiguous();  // [B,L,h*d]
    const at::Tensor vf = bf16_products ? v.contiguous() : v.to(at::kFloat).contiguous();  // [B,L,h*d]
    at::Tensor out = at::empty({B, N, inner}, qf.options());  // [B,N,h*d]
    // Image b's head h reads its columns of q, k, v in place (row stride h*d) and writes its
    // columns of the output.
    auto column = [&](int64_t item, int64_t rows) { return (item / heads) * rows * inner + (item % heads) * d; };
    if (bf16_products) {
      const auto* qp = reinterpret_cast<const uint16_t*>(qf.data_ptr<at::BFloat16>());
      const auto* kp = reinterpret_cast<const uint16_t*>(kf.data_ptr<at::BFloat16>());
      const auto* vp = reinterpret_cast<const uint16_t*>(vf.data_ptr<at::BFloat16>());
      auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
      const float scale_f = static_cast<float>(scale);  // what q.to(kFloat) * scale multiplies by
      for_each_head(B * heads, N, [&](int64_t item) {
        return cpu::AttentionHead(kp + column(item, L), inner, vp + column(item, L), inner, L, d);
      }, [&](const cpu::AttentionHead& h, int64_t item, int64_t begin, int64_t end) {
        const int64_t row = column(item, N) + begin * inner;
        h.rows(qp + row, inner, scale_f, end - begin, op + row, inner);
      });
      return out;
    }
    const float* qp = qf.data_ptr<float>();
    const float* kp = kf.data_ptr<float>();
    const float* vp = vf.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for_each_head(B * heads, N, [&](int64_t item) {
      return cpu::AttentionHead(kp + column(item, L), inner, vp + column(item, L), inner, L, d);
    }, [&](const cpu::AttentionHead& h, int64_t item, int64_t begin, int64_t end) {
      const int64_t row = column(item, N) + begin * inner;
      h.rows(qp + row, inner, end - begin, op + row, inner);
    });
    return dtype == at::kFloat ? out : out.to(dtype);
  }
  // Elsewhere (CUDA without LibTorch 2's fused kernel): blocks of rows x L <= max_score_elements
  // scores, each head reading its columns of q, k, v in place (row stride h*d).
  const int64_t rows = std::max<int64_t>(1, max_score_elements / L);
  const at::Tensor qf = (upcast_attention ? q.to(at::kFloat) : q) * scale;
  const at::Tensor kf = upcast_attention ? k.to(at::kFloat) : k;
  at::Tensor out = at::empty({B, N, inner}, v.options());  // [B,N,h*d]
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const at::Tensor qh = qf[b].narrow(1, h * d, d);     // [N,d], row stride h*d
      const at::Tensor kt = kf[b].narrow(1, h * d, d).t();  // [d,L]
      const at::Tensor vh = v[b].narrow(1, h * d, d);       // [L,d]
      const at::Tensor oh = out[b].narrow(1, h * d, d);     // [N,d]
      for (int64_t i = 0; i < N; i += rows) {
        const int64_t n = std::min(rows, N - i);
        at::Tensor scores = at::mm(qh.narrow(0, i, n), kt);  // [n,L], already scaled
        if (upcast_softmax) scores = scores.to(at::kFloat);
        at::Tensor o = oh.narrow(0, i, n);
        at::mm_out(o, scores.softmax(-1).to(dtype), vh);  // [n,d]
      }
    }
  return out;
}

// ---------------------------------------------------------------------------
// GEGLU, FeedForward

GEGLUImpl::GEGLUImpl(int64_t dim_in, int64_t dim_out, bool bias) {
  proj_ = register_module("proj", make_linear(dim_in, dim_out * 2, bias));
}

at::Tensor GEGLUImpl::forward(const at::Tensor& x) {
  // x [B,N,C] -> [B,N,F]
  const at::Tensor projected = proj_(x);  // [B,N,2F]: value, gate
  if (!c10::InferenceMode::is_enabled()) {
    std::vector<at::Tensor> parts = projected.chunk(2, -1);
    return parts[0] * at::gelu(parts[1]);
  }
  // When generating, in place in the projection's output (the same numbers): two [B,N,F]
  // temporaries fewer (84 MB each in an SD 1.5 CFG step at 512x512). The result is a
  // strided view; Linear copies it one image at a time. On x86 CPUs value * gelu(gate) is
  // one pass of cpu::geglu_rows; elsewhere LibTorch's gelu_ and mul_.
  const int64_t F = projected.size(-1) / 2;
  if (projected.is_contiguous()) {
    at::Tensor rows = projected.view({-1, 2 * F});
    if (cpu::geglu_rows(rows)) return projected.narrow(-1, 0, F);
  }
  std::vector<at::Tensor> parts = projected.chunk(2, -1);
  at::gelu_(parts[1]);
  return parts[0].mul_(parts[1]);
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t mult, bool bias) {
  const int64_t inner = dim * mult;
  geglu_ = GEGLU(dim, inner, bias);
  out_ = make_linear(inner, dim, bias);
  auto net = nn::ModuleList();
  net->push_back(geglu_);            // net.0
  net->push_back(nn::Dropout(0.0));  // net.1 (placeholder)
  net->push_back(out_);              // net.2
  register_module("net", net);
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) {
  // x [B,N,C] -> [B,N,C]
  return out_(geglu_(x));
}

// ---------------------------------------------------------------------------
// BasicTransformerBlock

BasicTransformerBlockImpl::BasicTransformerBlockImpl(const BasicTransformerBlockOptions& o) {
  auto layer_norm = [&] { return leaf::LayerNorm(o.dim, o.norm_eps); };
  AttentionOptions self_attention;
  self_attention.query_dim = o.dim;
  self_attention.heads = o.heads;
  self_attention.dim_head = o.dim_head;
  self_attention.bias = o.attention_bias;
  self_attention.upcast_attention = o.upcast_attention;
  AttentionOptions cross_attention = self_attention;
  cross_attention.cross_attention_dim = o.cross_attention_dim;

  norm1_ = register_module("norm1", layer_norm());
  attn1_ = register_module("attn1", Attention(self_attention));
  norm2_ = register_module("norm2", layer_norm());
  attn2_ = register_module("attn2", Attention(cross_attention));
  norm3_ = register_module("norm3", layer_norm());
  ff_ = register_module("ff", FeedForward(o.dim));
}

at::Tensor BasicTransformerBlockImpl::forward(const at::Tensor& x, const at::Tensor& context,
                                              const at::Tensor& spread) {
  // x [B,N,C] (or [G,N,C] with spread [B]), context [B,L,D] -> [B,N,C]
  at::Tensor h = attn1_(norm1_(x)) + x;
  if (spread.defined()) h = h.index_select(0, spread);  // [G,N,C] -> [B,N,C]
  h = attn2_(norm2_(h), context) + h;
  return ff_(norm3_(h)) + h;
}

// ---------------------------------------------------------------------------
// Transformer2DModel

Transformer2DModelImpl::Transformer2DModelImpl(const Transformer2DModelOptions& o) : options_(o) {
  inner_dim_ = o.num_attention_heads * o.attention_head_dim;
  norm_ = register_module("norm", make_group_norm(o.norm_num_groups, o.in_channels, 1e-6));
  if (o.use_linear_projection)
    proj_in_linear_ = register_module("proj_in", make_linear(o.in_channels, inner_dim_));
  else
    proj_in_conv_ = register_module("proj_in", make_conv(o.in_channels, inner_dim_, 1));

  auto blocks = nn::ModuleList();
  BasicTransformerBlockOptions block;
  block.dim = inner_dim_;
  block.heads = o.num_attention_heads;
  block.dim_head = o.attention_head_dim;
  block.cross_attention_dim = o.cross_attention_dim;
  block.upcast_attention = o.upcast_attention;
  for (int64_t i = 0; i < o.num_layers; ++i) {
    blocks_.push_back(BasicTransformerBlock(block));
    blocks->push_back(blocks_.back());
  }
  register_module("transformer_blocks", blocks);

  if (o.use_linear_projection)
    proj_out_linear_ = register_module("proj_out", make_linear(inner_dim_, o.in_channels));
  else
    proj_out_conv_ = register_module("proj_out", make_conv(inner_dim_, o.in_channels, 1));
}

at::Tensor Transformer2DModelImpl::forward(const at::Tensor& x, const at::Tensor& context, const at::Tensor& spread) {
  // x [B,C,H,W] (or [G,C,H,W] with spread [B]), context [B,L,D] -> [B,C,H,W]
  const int64_t G = x.size(0), B = spread.defined() ? spread.size(0) : G;
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor h = norm_(x);
  if (proj_in_conv_) {
    h = proj_in_conv_(h);                                         // [G,I,H,W]
    h = h.permute({0, 2, 3, 1}).reshape({G, H * W, inner_dim_});  // [G,N,I]
  } else {
    h = h.permute({0, 2, 3, 1}).reshape({G, H * W, C});  // [G,N,C]
    h = proj_in_linear_(h);                              // [G,N,I]
  }
  // The first block spreads shared rows (G -> B); the others see B rows.
  for (size_t i = 0; i < blocks_.size(); ++i)
    h = blocks_[i](h, context, i == 0 ? spread : at::Tensor());  // [B,N,I]
  if (proj_out_conv_) {
    h = h.reshape({B, H, W, inner_dim_}).permute({0, 3, 1, 2}).contiguous();  // [B,I,H,W]
    h = proj_out_conv_(h);                                                    // [B,C,H,W]
  } else {
    h = proj_out_linear_(h);                                         // [B,N,C]
    h = h.reshape({B, H, W, C}).permute({0, 3, 1, 2}).contiguous();  // [B,C,H,W]
  }
  return h + (spread.defined() ? x.index_select(0, spread) : x);
}

// ---------------------------------------------------------------------------
// Downsample2D, Upsample2D

Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding) : padding_(padding) {
  conv_ = register_module("conv", make_conv(channels, out_channels, 3, 2, padding));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) {
  // x [B,C,H,W] -> [B,C_out,H',W']
  if (padding_ == 0) return conv_(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));  // [B,C,H+1,W+1] first
  return conv_(x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, int64_t out_channels) {
  conv_ = register_module("conv", make_conv(channels, out_channels, 3, 1, 1));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x, std::optional<std::vector<int64_t>> output_size) {
  // x [B,C,H,W] -> [B,C_out,2H,2W] (or output_size)
  namespace F = torch::nn::functional;
  // The reference interpolates bfloat16 in float32 (nearest has no bfloat16 kernel everywhere).
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor h = bf16 ? x.to(at::kFloat) : x;
  auto options = F::InterpolateFuncOptions().mode(torch::kNearest);
  if (output_size)
    options.size(*output_size);
  else
    options.scale_factor(std::vector<double>{2.0, 2.0});
  h = F::interpolate(h, options);  // [B,C,2H,2W]
  if (bf16) h = h.to(at::kBFloat16);
  return conv_(h);
}

// ---------------------------------------------------------------------------
// Timestep embeddings

at::Tensor get_timestep_embedding(const at::Tensor& timesteps, int64_t embedding_dim, bool flip_sin_to_cos,
                                  double downscale_freq_shift, double scale, double max_period) {
  // timesteps [B] -> [B,dim]
  TORCH_CHECK(timesteps.dim() == 1, "get_timestep_embedding: timesteps must be 1-D, got ", timesteps.sizes());
  const int64_t half = embedding_dim / 2;
  // Same operation order as the reference, in float32: the arguments reach 1000 radians,
  // so the rounding of the frequencies matters at the tolerance we test.
  at::Tensor exponent = at::arange(0, half, timesteps.options().dtype(at::kFloat)) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half) - downscale_freq_shift);
  at::Tensor freqs = at::exp(exponent);                                          // [half]
  at::Tensor args = timesteps.unsqueeze(1).to(at::kFloat) * freqs.unsqueeze(0);  // [B,half]
  if (scale != 1.0) args = args * scale;
  at::Tensor emb = flip_sin_to_cos ? at::cat({at::cos(args), at::sin(args)}, -1)
                                   : at::cat({at::sin(args), at::cos(args)}, -1);  // [B,2 half]
  if (embedding_dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1}, 0);           // [B,dim]
  return emb;
}

TimestepsImpl::TimestepsImpl(int64_t num_channels, bool flip_sin_to_cos, double downscale_freq_shift)
    : num_channels_(num_channels), flip_sin_to_cos_(flip_sin_to_cos), downscale_freq_shift_(downscale_freq_shift) {}

at::Tensor TimestepsImpl::forward(const at::Tensor& timesteps) const {
  // timesteps [B] -> [B,num_channels]
  return get_timestep_embedding(timesteps, num_channels_, flip_sin_to_cos_, downscale_freq_shift_);
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim) {
  linear_1_ = register_module("linear_1", make_linear(in_channels, time_embed_dim));
  linear_2_ = register_module("linear_2", make_linear(time_embed_dim, time_embed_dim));
}

at::Tensor TimestepEmbeddingImpl::forward(const at::Tensor& x) {
  // x [B,in] -> [B,T]
  return linear_2_(silu_fresh(linear_1_(x)));
}

}  // namespace fairdiff
