// Semantic guidance (SEGA) as diffusers' SemanticStableDiffusionPipeline computes it,
// with one concept list per image, so that one batched UNet call can steer image 0
// toward one group and image 1 toward another (Fair Diffusion).
//
//   // One embedding per edit prompt, encoded as the semantic pipeline encodes them.
//   fairdiff::Conditioning table = fairdiff::encode_edit_prompts(model, {"male person", "female person"});  // K rows
//   fairdiff::EditConcept base;                   // reference defaults; Fair Diffusion's settings:
//   base.guidance_scale = 4; base.warmup_steps = 5; base.threshold = 0.95;
//   fairdiff::SemanticGuidanceSettings s;
//   s.momentum_scale = 0.5; s.momentum_beta = 0.6;
//   s.images = {fairdiff::steer_toward(1, 2, base),    // image 0: "female person" forward, "male person" reversed
//               fairdiff::steer_toward(0, 2, base)};   // image 1: the opposite
//   fairdiff::SemanticGuidance sega(table, s);
//   at::Tensor latents = pipe.denoise(*sched, noise, emb, 7.0, &gens, nullptr, &sega);
//   sega.edit_rows_per_step();                     // extra UNet rows of each step (CFG's 2B come on top)
//
// The math is the pure function `semantic_guidance_step`; `SemanticGuidance` only
// picks the rows to evaluate, keeps the momentum and records what happened.
// Shape letters: B images, C latent channels, h/w latent size, K concept embeddings,
// E edit rows evaluated at a step, L tokens (77), D text hidden size.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "pipeline.h"

namespace fairdiff {

// A cool-down that never comes (the reference's edit_cooldown_steps=None).
constexpr int64_t kNeverCoolDown = std::numeric_limits<int64_t>::max();

// One edit concept of one image. Defaults are the reference's defaults.
struct EditConcept {
  int64_t embedding = 0;                   // row of the concept embedding table
  double guidance_scale = 5.0;             // s_e
  int64_t warmup_steps = 10;               // applied from loop index i >= warmup_steps
  int64_t cooldown_steps = kNeverCoolDown; // zeroed from i >= cooldown_steps (still counts as warm)
  double threshold = 0.9;                  // lambda: quantile of |guidance| per (image, channel) below which it is cut
  bool reverse = false;                    // steer away from the concept
  double weight = 1.0;                     // relative weight (negative counts as 0)
};

struct SemanticGuidanceSettings {
  // images[b]: the concepts of image b, in order; lists may differ in length (or be empty).
  std::vector<std::vector<EditConcept>> images;
  double momentum_scale = 0.1;  // s_m
  double momentum_beta = 0.4;   // beta_m
};

// Throws BadInput (naming `where`) unless every threshold is in [0, 1], every scale and
// weight finite, every warm-up and cool-down >= 0 and every embedding in [0, num_embeddings).
void validate(const SemanticGuidanceSettings& settings, int64_t num_embeddings, const std::string& where);

// Fair Diffusion's concept list for one image: concept k uses embedding k (one per group,
// k < groups); the target group's concept goes forward, every other group's is reversed.
std::vector<EditConcept> steer_toward(int64_t target_group, int64_t groups, const EditConcept& settings);

// Whether concept `concept` of image `image` can change the result at loop index `step`
// of `num_steps` (0: unknown, assume it can). It cannot after its cool-down, with a
// weight <= 0 or a scale of 0, nor before its warm-up unless the momentum reaches the
// output (s_m != 0 and every concept of the image warm before the last step).
bool edit_needed(const SemanticGuidanceSettings& settings, int64_t image, size_t edit, int64_t step,
                 int64_t num_steps);

// One extra UNet row: embedding `embedding` evaluated on the latents of image `image`.
struct EditRow {
  int64_t image = 0;
  int64_t embedding = 0;
  bool operator==(const EditRow& o) const { return image == o.image && embedding == o.embedding; }
};

// The rows to evaluate at `step`: each needed (image, embedding) once (two concepts of
// one image on the same embedding share a row), image-major, in concept order.
// `all`: every (image, embedding) of every concept, as the reference does at every step.
std::vector<EditRow> edit_rows(const SemanticGuidanceSettings& settings, int64_t step, int64_t num_steps,
                               bool all = false);

struct SemanticStep {
  at::Tensor guidance;        // [B, C, h, w]: the term added to the CFG term, zero for images without one
  at::Tensor momentum;        // [B, C, h, w]: the momentum for the next step
  std::vector<bool> applied;  // per image: whether a term was added at this step
};

// One step of semantic guidance, exactly as the reference computes it, image by image:
//   d_c = s_e (+-1) (eps_edit_c - eps_uncond), cut where |d_c| < quantile_lambda(|d_c|) per channel
//   (torch.quantile, linear interpolation, float32 even for half models; ties kept);
//   some but not all concepts warm: add sum_warm (W_c / sum_warm W) d_c, without momentum;
//   always: S = sum_c W_c d_c + s_m m, m' = beta m + (1 - beta) S; all warm: add S.
// Cooled-down concepts give zero but count as warm; negative weights count as 0.
// eps_uncond: [B, C, h, w]; eps_edit: [E, C, h, w] with rows[r] naming row r (may be
// undefined when E = 0); momentum: [B, C, h, w], undefined = zeros. A concept without a
// row is taken as zero: allowed only where edit_needed() says it cannot matter (checked).
// Where every warm concept has weight <= 0 during a partial warm-up the reference divides
// 0 by 0 and so does this (NaN guidance), to the letter.
SemanticStep semantic_guidance_step(const SemanticGuidanceSettings& settings, int64_t step, int64_t num_steps,
                                    const at::Tensor& eps_uncond, const at::Tensor& eps_edit,
                                    const std::vector<EditRow>& rows, const at::Tensor& momentum);

// How the semantic pipeline encodes its prompts and edit concepts (TextConditioner::
// encode_edits; for CLIP: token ids cut after 77, so a long prompt loses its EOS, then the
// last hidden state): N rows on the text encoder's device and dtype.
Conditioning encode_edit_prompts(StableDiffusionModel& model, const std::vector<std::string>& prompts);

// What one step saw and did (for parity checks and diagnostics).
struct SemanticStepRecord {
  size_t step = 0;
  at::Tensor eps_uncond, eps_text;  // [B, C, h, w]
  at::Tensor eps_edit;              // [E, C, h, w]; undefined when E = 0
  std::vector<EditRow> rows;        // what each row of eps_edit is
  at::Tensor guidance;              // [B, C, h, w]: the semantic term added (zero where none)
  std::vector<bool> applied;
};

// The sampling-loop side: hands the pipeline the rows to evaluate with CFG in its one
// UNet call per step, and turns the estimates into guidance with semantic_guidance_step.
class SemanticGuidance : public GuidanceExtension {
 public:
  // edit_embeddings: K rows ([K, L, D] context, and pooled / time ids where the model takes
  // them) on the UNet's device and dtype; settings are validated here.
  SemanticGuidance(Conditioning edit_embeddings, SemanticGuidanceSettings settings);

  void begin(size_t steps, int64_t batch_size) override;
  Conditioning embeddings(size_t step, std::vector<int64_t>* latent_rows) override;
  at::Tensor apply(size_t step, const at::Tensor& eps_uncond, const at::Tensor& eps_text,
                   const at::Tensor& eps_extra, const at::Tensor& g) override;

  // Evaluate every (image, embedding) at every step, as the reference does (its cost).
  void set_evaluate_all(bool on) { evaluate_all_ = on; }
  void set_observer(std::function<void(const SemanticStepRecord&)> observer) { observer_ = std::move(observer); }

  const SemanticGuidanceSettings& settings() const { return settings_; }
  // Extra UNet rows evaluated at each step of the current run, and their sum.
  const std::vector<int64_t>& edit_rows_per_step() const { return rows_per_step_; }
  int64_t edit_rows_total() const;
  // Every UNet row of the run so far, CFG's 2 per image and step included (divide by
  // the batch size for UNet evaluations per image).
  int64_t unet_rows_total() const { return 2 * batch_ * static_cast<int64_t>(rows_per_step_.size()) + edit_rows_total(); }
  const at::Tensor& momentum() const { return momentum_; }

 private:
  Conditioning table_;  // K rows
  SemanticGuidanceSettings settings_;
  int64_t num_steps_ = 0;  // 0 until begin(): unknown
  int64_t batch_ = 0;
  bool evaluate_all_ = false;
  std::function<void(const SemanticStepRecord&)> observer_;
  size_t rows_step_ = std::numeric_limits<size_t>::max();
  std::vector<EditRow> rows_;  // of step rows_step_
  at::Tensor momentum_;        // [B, C, h, w]; undefined = zeros
  std::vector<int64_t> rows_per_step_;
};

}  // namespace fairdiff
