// What a denoiser is conditioned on, row by row: the seam between text encoders, the UNet
// and guidance. SD 1.x / 2.x use the context alone; SDXL adds the pooled text embedding and
// its size conditioning (add_time_ids), which the UNet's addition embedding consumes.
//
//   fairdiff::Conditioning c = conditioner.encode({"a photo of a cat"}, 0, nullptr);  // rows: 1
//   at::Tensor eps = unet->forward(latents, t, c);
//   fairdiff::Conditioning both = fairdiff::Conditioning::cat({uncond, c});          // rows: 2
//
// Shape letters: N rows, L tokens, D context width, P pooled width.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fairdiff {

struct Conditioning {
  at::Tensor context;   // [N, L, D] encoder_hidden_states
  at::Tensor pooled;    // [N, P] pooled text embeddings (SDXL's text_embeds); undefined when unused
  at::Tensor time_ids;  // [N, 6] added size conditions (SDXL's add_time_ids); undefined when unused

  Conditioning() = default;
  // A context alone (SD 1.x / 2.x): lets a [N, L, D] tensor stand where conditioning is taken.
  Conditioning(at::Tensor context_) : context(std::move(context_)) {}  // NOLINT(google-explicit-constructor)

  bool defined() const { return context.defined(); }
  int64_t rows() const { return context.defined() ? context.size(0) : 0; }

  // Every defined part, row-wise.
  Conditioning index_select(const at::Tensor& rows) const {
    return map([&](const at::Tensor& t) { return t.index_select(0, rows.to(t.device())); });
  }
  Conditioning narrow(int64_t start, int64_t length) const {
    return map([&](const at::Tensor& t) { return t.narrow(0, start, length); });
  }
  Conditioning to(at::Device device, at::ScalarType dtype) const {
    // Time ids are sizes, exact in float32 and kept so; the rest follows the network's dtype.
    Conditioning out = map([&](const at::Tensor& t) { return t.to(device, dtype); });
    if (time_ids.defined()) out.time_ids = time_ids.to(device);
    return out;
  }
  // Rows of several conditionings, in order; every part defined in all or in none.
  static Conditioning cat(const std::vector<Conditioning>& parts) {
    Conditioning out;
    out.context = cat_part(parts, &Conditioning::context);
    out.pooled = cat_part(parts, &Conditioning::pooled);
    out.time_ids = cat_part(parts, &Conditioning::time_ids);
    return out;
  }

 private:
  template <class F>
  Conditioning map(F f) const {
    Conditioning out;
    if (context.defined()) out.context = f(context);
    if (pooled.defined()) out.pooled = f(pooled);
    if (time_ids.defined()) out.time_ids = f(time_ids);
    return out;
  }
  static at::Tensor cat_part(const std::vector<Conditioning>& parts, at::Tensor Conditioning::*part) {
    std::vector<at::Tensor> tensors;
    for (const Conditioning& c : parts)
      if ((c.*part).defined()) tensors.push_back(c.*part);
    if (tensors.empty()) return {};
    TORCH_CHECK(tensors.size() == parts.size(), "Conditioning::cat: a part is defined in some rows only");
    return at::cat(tensors);
  }
};

}  // namespace fairdiff
