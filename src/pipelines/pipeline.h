// Text-to-image sampling as diffusers' StableDiffusionPipeline computes it:
// encode prompts, draw per-image noise, denoise with classifier-free guidance
// (one batched UNet call per step), decode with the VAE.
//
//   fairdiff::StableDiffusionPipeline pipe(model);
//   auto emb = pipe.encode_prompts({"a photo of a cat"}, {""}, /*clip_skip=*/0, /*cfg=*/true);
//   std::vector<at::Generator> gens;
//   at::Tensor x = pipe.initial_noise({42}, 512, 512, &gens);
//   auto sched = fairdiff::make_scheduler(model.scheduler_config, "", "scheduler_config.json");
//   sched->set_timesteps(50);
//   at::Tensor latents = pipe.denoise(*sched, x, emb, 7.5, &gens);
//   at::Tensor image = fairdiff::StableDiffusionPipeline::to_image(pipe.decode(latents));  // [B,3,H,W] in [0,1]
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

#include "model_folder.h"
#include "scheduler.h"
#include "text_conditioner.h"

namespace fairdiff {


// Extra conditioning evaluated in the same batched UNet call as CFG, and a rule
// that turns all the estimates into the guidance term (semantic guidance).
class GuidanceExtension {
 public:
  virtual ~GuidanceExtension() = default;
  // Called by denoise once before the first step: the number of steps (loop indices
  // 0 .. steps-1) and of images. A run starts here: reset per-run state.
  virtual void begin(size_t /*steps*/, int64_t /*batch_size*/) {}
  // Rows of extra conditioning (E rows, E may be 0) to evaluate at `step`, and for each
  // row the batch item whose latents it is evaluated on. Rows without time ids get their
  // image's (SDXL: an edit row is conditioned on its image's size, like the image's own rows).
  virtual Conditioning embeddings(size_t step, std::vector<int64_t>* latent_rows) = 0;
  // g: the CFG term s_g (eps_t - eps_u) [B,C,h,w]; returns g plus this extension's term.
  virtual at::Tensor apply(size_t step, const at::Tensor& eps_uncond, const at::Tensor& eps_text,
                           const at::Tensor& eps_extra, const at::Tensor& g) = 0;
};

using StepCallback = std::function<void(size_t step, size_t steps, const at::Tensor& latents)>;

class StableDiffusionPipeline {
 public:
  explicit StableDiffusionPipeline(StableDiffusionModel& model);

  at::Device device() const;
  at::ScalarType dtype() const;       // of the UNet and text encoder
  int64_t vae_scale_factor() const;   // 2^(len(vae block_out_channels) - 1): 8 for SD
  int64_t latent_channels() const;    // the UNet's in_channels

  // clip_token_ids (text_conditioner.h) with the model's tokenizer.
  at::Tensor token_ids(const std::vector<std::string>& prompts, bool truncate, std::vector<bool>* truncated) const;

  // Prompt and negative prompt conditioning as encode_prompt computes them, by the model's
  // TextConditioner: clip skip applies to the prompts only (the reference encodes
  // negatives without it).
  PromptEmbeddings encode_prompts(const std::vector<std::string>& prompts, const std::vector<std::string>& negatives,
                                  int64_t clip_skip, bool classifier_free_guidance);
  TextConditioner& conditioner() { return *conditioner_; }

  // Whether the UNet takes size conditioning (SDXL's add_time_ids).
  bool takes_size_conditioning() const;
  // The reference's default: original and target size = the output size, crop 0,0.
  static SizeConditioning default_size_conditioning(int64_t height, int64_t width);
  // Sets add_time_ids on the prompt and negative conditioning (identical rows, as the
  // reference); BadInput (naming --original-size) for a UNet that takes none.
  void condition_on_size(PromptEmbeddings& embeddings, const SizeConditioning& size) const;

  // Initial noise [B, C, H/f, W/f]: image b drawn from its own CPU generator seeded
  // seeds[b], in float32 (equal to torch.randn with torch.Generator("cpu").manual_seed),
  // then moved to the pipeline's device and dtype. The generators are returned for
  // stochastic schedulers.
  at::Tensor initial_noise(const std::vector<int64_t>& seeds, int64_t height, int64_t width,
                           std::vector<at::Generator>* generators) const;

  // The sampling loop. `noise` is N(0,1) (multiplied by init_noise_sigma here).
  // With guidance_scale > 1 each step is one UNet call on [uncond; cond; extra].
  at::Tensor denoise(Scheduler& scheduler, const at::Tensor& noise, const PromptEmbeddings& embeddings,
                     double guidance_scale, std::vector<at::Generator>* generators,
                     const StepCallback& on_step = nullptr, GuidanceExtension* extension = nullptr);

  // vae.decode(latents / scaling_factor): raw decoded images [B, 3, H, W], about [-1, 1].
  at::Tensor decode(const at::Tensor& latents);

  // clamp(decoded / 2 + 0.5, 0, 1) in float32.
  static at::Tensor to_image(const at::Tensor& decoded);
  // [B,3,H,W] in [0,1] -> [B,H,W,3] uint8 on the CPU, rounded as diffusers' numpy_to_pil.
  static at::Tensor to_uint8(const at::Tensor& image);

 private:
  // One CFG step's UNet call on [uncond; cond; extra], each image's rows taken together
  // (leaf::RowGroups); `extra_rows` names the image of each extra row. Returns eps in x's order.
  at::Tensor unet_by_image(const at::Tensor& x, const at::Tensor& t, const Conditioning& cond, int64_t B,
                           const std::vector<int64_t>& extra_rows);

  StableDiffusionModel& model_;
  std::unique_ptr<TextConditioner> conditioner_;
};

}  // namespace fairdiff
