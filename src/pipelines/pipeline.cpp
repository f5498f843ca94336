// The sampling loop. Shape letters: B images, C latent channels, h/w latent size,
// L tokens (77), D text hidden size, E extra conditioning rows.
#include "pipeline.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstring>

#include "fairdiff/error.h"

namespace fairdiff {

StableDiffusionPipeline::StableDiffusionPipeline(StableDiffusionModel& model)
    : model_(model), conditioner_(make_text_conditioner(model)) {}

at::Device StableDiffusionPipeline::device() const { return model_.unet->parameters().front().device(); }

at::ScalarType StableDiffusionPipeline::dtype() const { return leaf::compute_dtype(*model_.unet); }

int64_t StableDiffusionPipeline::vae_scale_factor() const {
  return int64_t{1} << (model_.vae->config().block_out_channels.size() - 1);
}

int64_t StableDiffusionPipeline::latent_channels() const { return model_.unet->config().in_channels; }

at::Tensor StableDiffusionPipeline::token_ids(const std::vector<std::string>& prompts, bool truncate,
                                              std::vector<bool>* truncated) const {
  return clip_token_ids(*model_.tokenizer, prompts, truncate, truncated);
}

PromptEmbeddings StableDiffusionPipeline::encode_prompts(const std::vector<std::string>& prompts,
                                                         const std::vector<std::string>& negatives,
                                                         int64_t clip_skip, bool classifier_free_guidance) {
  return conditioner_->encode_prompts(prompts, negatives, clip_skip, classifier_free_guidance);
}

bool StableDiffusionPipeline::takes_size_conditioning() const { return model_.unet->takes_text_time(); }

SizeConditioning StableDiffusionPipeline::default_size_conditioning(int64_t height, int64_t width) {
  SizeConditioning s;
  s.original_height = s.target_height = height;
  s.original_width = s.target_width = width;
  return s;
}

void StableDiffusionPipeline::condition_on_size(PromptEmbeddings& e, const SizeConditioning& size) const {
  if (!takes_size_conditioning())
    throw_bad_input("--original-size", "size conditioning is for SDXL; " + model_.dir +
                                           "'s UNet has no addition_embed_type text_time",
                    "drop --original-size, --crop-top-left and --target-size for this model");
  e.cond.time_ids = add_time_ids(size, e.cond.rows()).to(device());
  if (e.uncond.defined()) e.uncond.time_ids = add_time_ids(size, e.uncond.rows()).to(device());
}

at::Tensor StableDiffusionPipeline::initial_noise(const std::vector<int64_t>& seeds, int64_t height, int64_t width,
                                                  std::vector<at::Generator>* generators) const {
  const int64_t f = vae_scale_factor();
  std::vector<at::Tensor> noise;
  if (generators) generators->clear();
  for (int64_t seed : seeds) {
    at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
    noise.push_back(at::randn({1, latent_channels(), height / f, width / f}, gen, at::TensorOptions(at::kFloat)));
    if (generators) generators->push_back(gen);
  }
  return at::cat(noise).to(device(), dtype());  // [B, C, h, w]
}

at::Tensor StableDiffusionPipeline::denoise(Scheduler& scheduler, const at::Tensor& noise,
                                            const PromptEmbeddings& embeddings, double guidance_scale,
                                            std::vector<at::Generator>* generators, const StepCallback& on_step,
                                            GuidanceExtension* extension) {
  const bool cfg = guidance_scale > 1.0;
  TORCH_CHECK(!cfg || embeddings.uncond.defined(), "classifier-free guidance needs negative prompt embeddings");
  const int64_t B = noise.size(0);
  at::Tensor latents = noise * scheduler.init_noise_sigma();  // [B, C, h, w]
  PromptEmbeddings sized;
  const PromptEmbeddings* emb = &embeddings;
  if (takes_size_conditioning() && !embeddings.cond.time_ids.defined()) {
    // Not conditioned on a size: the reference's default, the output size.
    sized = embeddings;
    const int64_t f = vae_scale_factor();
    condition_on_size(sized, default_size_conditioning(noise.size(2) * f, noise.size(3) * f));
    emb = &sized;
  }
  const Conditioning base_cond = cfg ? Conditioning::cat({emb->uncond, emb->cond}) : emb->cond;  // [2B|B, ...]
  const auto& timesteps = scheduler.timesteps();
  if (cfg && extension) extension->begin(timesteps.size(), B);
  model_.use("unet");
  for (size_t i = 0; i < timesteps.size(); ++i) {
    // The UNet sees [x; x] (+ the extension's rows) for CFG: one batched call per step.
    at::Tensor x = cfg ? at::cat({latents, latents}) : latents;  // [2B|B, C, h, w]
    Conditioning cond = base_cond;
    std::vector<int64_t> extra_rows;
    if (cfg && extension) {
      Conditioning extra = extension->embeddings(i, &extra_rows);
      if (extra.rows() > 0) {
        const at::Tensor rows = at::tensor(extra_rows, at::kLong).to(latents.device());
        if (emb->cond.time_ids.defined() && !extra.time_ids.defined())
          extra.time_ids = emb->cond.time_ids.index_select(0, rows.to(emb->cond.time_ids.device()));  // [E, 6]
        x = at::cat({x, latents.index_select(0, rows)});  // [2B + E, C, h, w]
        cond = Conditioning::cat({cond, extra});
      }
    }
    x = scheduler.scale_model_input(x, i);
    // diffusers keeps timesteps as float32 (or int64) tensors; the UNet embeds t as float32.
    const at::Tensor t = at::scalar_tensor(timesteps[i], at::TensorOptions(at::kFloat).device(latents.device()));
    const at::Tensor eps = cfg ? unet_by_image(x, t, cond, B, extra_rows) : model_.unet->forward(x, t, cond);
    at::Tensor noise_pred;
    if (cfg) {
      const at::Tensor eps_u = eps.narrow(0, 0, B), eps_t = eps.narrow(0, B, B);
      at::Tensor g = (eps_t - eps_u) * guidance_scale;
      if (extension) {
        const at::Tensor eps_extra = eps.size(0) > 2 * B ? eps.narrow(0, 2 * B, eps.size(0) - 2 * B) : at::Tensor();
        g = extension->apply(i, eps_u, eps_t, eps_extra, g);
      }
      noise_pred = eps_u + g;
    } else {
      noise_pred = eps;
    }
    latents = scheduler.step(noise_pred, i, latents, generators);
    if (on_step) on_step(i, timesteps.size(), latents);
  }
  return latents;
}

at::Tensor StableDiffusionPipeline::unet_by_image(const at::Tensor& x, const at::Tensor& t, const Conditioning& cond,
                                                int64_t B, const std::vector<int64_t>& extra_rows) {
  // x [2B + E, C, h, w]: B unconditional rows, B text rows, then E extra rows of the images
  // extra_rows names. The UNet sees them image by image, [u_0, c_0, extras of 0, u_1, ...],
  // and its convolutions and linear layers take each image's rows in one call (RowGroups):
  // a fixed set per image and step, so an image's numbers still do not depend on the batch.
  std::vector<int64_t> order, sizes;
  for (int64_t b = 0; b < B; ++b) {
    const size_t start = order.size();
    order.push_back(b);
    order.push_back(B + b);
    for (size_t e = 0; e < extra_rows.size(); ++e)
      if (extra_rows[e] == b) order.push_back(2 * B + static_cast<int64_t>(e));
    sizes.push_back(static_cast<int64_t>(order.size() - start));
  }
  TORCH_CHECK(static_cast<int64_t>(order.size()) == x.size(0), "denoise: ", x.size(0), " UNet rows for ", order.size(),
              " rows of ", B, " images");
  leaf::RowGroups groups(sizes);
  // A permutation of 0..n-1 in increasing order is x's own order: one image, or no edits.
  if (std::is_sorted(order.begin(), order.end())) return model_.unet->forward(x, t, cond);
  const at::Tensor by_image = at::tensor(order, at::kLong).to(x.device());
  const at::Tensor eps = model_.unet->forward(x.index_select(0, by_image), t, cond.index_select(by_image));
  return at::empty_like(eps).index_copy_(0, by_image, eps);  // [2B + E, C, h, w], back in x's order
}

at::Tensor StableDiffusionPipeline::decode(const at::Tensor& latents) {
  model_.use("vae");
  const at::Device vae_device = model_.vae->parameters().front().device();
  const at::Tensor z = latents.to(vae_device, leaf::compute_dtype(*model_.vae)) / model_.vae->config().scaling_factor;
  if (z.size(0) == 1 || !c10::InferenceMode::is_enabled()) return model_.vae->decode(z);
  // When generating, one image at a time: the decoder's memory is one image's, and an image
  // decodes to the same bytes whatever its batch (batched, some decoder operator rounded
  // differently: up to 6e-7 on the toy VAE, enough to move a pixel level).
  std::vector<at::Tensor> images;
  for (int64_t b = 0; b < z.size(0); ++b) images.push_back(model_.vae->decode(z.narrow(0, b, 1)));
  return at::cat(images);  // [B, 3, H, W]
}

at::Tensor StableDiffusionPipeline::to_image(const at::Tensor& decoded) {
  return (decoded.to(at::kFloat) / 2 + 0.5).clamp(0, 1);
}

at::Tensor StableDiffusionPipeline::to_uint8(const at::Tensor& image) {
  // numpy_to_pil: (image * 255).round().astype(uint8), round half to even.
  return (image.to(at::kCPU, at::kFloat).permute({0, 2, 3, 1}) * 255).round().to(at::kByte).contiguous();
}

}  // namespace fairdiff
