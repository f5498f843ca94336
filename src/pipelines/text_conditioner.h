// Prompts -> Conditioning: the text side of a pipeline, behind one interface so that a
// model with other encoders (SDXL's two, with pooled embeddings and size conditions) plugs
// in without touching the sampling loop or semantic guidance.
//
//   auto enc = fairdiff::make_text_conditioner(model);      // CLIP (SD 1.x / 2.x) or SDXL's two encoders
//   fairdiff::PromptEmbeddings e = enc->encode_prompts({"a cat"}, {""}, /*clip_skip=*/0, /*cfg=*/true);
//   fairdiff::Conditioning edits = enc->encode_edits({"female person", "male person"});
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "conditioning.h"
#include "model_folder.h"

namespace fairdiff {

// SDXL's size conditioning (micro-conditioning), in pixels, as diffusers' _get_add_time_ids
// orders it: original_size (h, w), crops_coords_top_left (top, left), target_size (h, w).
// The reference's defaults: original and target = the output size, crop 0,0.
struct SizeConditioning {
  int64_t original_height = 0, original_width = 0;
  int64_t crop_top = 0, crop_left = 0;
  int64_t target_height = 0, target_width = 0;
};

// add_time_ids: [rows, 6] float32 (sizes are exact there), on the CPU.
at::Tensor add_time_ids(const SizeConditioning& size, int64_t rows);

struct PromptEmbeddings {
  Conditioning cond;              // [B, ...] prompt conditioning (clip skip applied)
  Conditioning uncond;            // [B, ...] negative prompt conditioning; undefined without CFG
  std::vector<bool> truncated;    // per prompt: longer than the tokenizer's max length
};

class TextConditioner {
 public:
  virtual ~TextConditioner() = default;
  // As the text-to-image pipeline's encode_prompt: prompts cut to the tokenizer's length
  // (truncated[i] tells), `clip_skip` layers skipped for the prompts; with CFG the negatives
  // too, in the same encoder call.
  virtual PromptEmbeddings encode_prompts(const std::vector<std::string>& prompts,
                                          const std::vector<std::string>& negatives, int64_t clip_skip,
                                          bool classifier_free_guidance) = 0;
  // Edit concepts as the semantic pipeline encodes them (its own truncation, no clip skip).
  // Time ids are not the text's: the sampling loop gives each edit row its image's.
  virtual Conditioning encode_edits(const std::vector<std::string>& prompts) = 0;

  // SDXL (model_index.json force_zeros_for_empty_prompt): an empty negative prompt stands
  // for none (diffusers' negative_prompt=None) and gives zero embeddings; false encodes it
  // as the text "" (negative_prompt=""). Ignored by models without the setting.
  bool empty_negative_is_none = true;
};

// Token ids [N, L] padded with the tokenizer's pad token; `truncate`: keep BOS + L-2 tokens
// + EOS (StableDiffusionPipeline), else cut after L ids (the semantic pipeline's quirk: the
// EOS of a long prompt is lost).
at::Tensor clip_token_ids(const Tokenizer& tokenizer, const std::vector<std::string>& prompts, bool truncate,
                          std::vector<bool>* truncated);

// The model's conditioner: one CLIP text encoder (SD 1.x / 2.x), or SDXL's two
// (prompt embeddings: both encoders' hidden_states[-2] without the final layer norm,
// concatenated; pooled: encoder 2's text_embeds).
std::unique_ptr<TextConditioner> make_text_conditioner(StableDiffusionModel& model);

}  // namespace fairdiff
