// Prompts -> Conditioning: the text side of a pipeline, behind one interface so that a
// model with other encoders (SDXL's two, with pooled embeddings and size conditions) plugs
// in without touching the sampling loop or semantic guidance.
//
//   auto enc = fairdiff::make_text_conditioner(model);      // CLIP (SD 1.x / 2.x)
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
  virtual Conditioning encode_edits(const std::vector<std::string>& prompts) = 0;
};

// Token ids [N, L] padded with the tokenizer's pad token; `truncate`: keep BOS + L-2 tokens
// + EOS (StableDiffusionPipeline), else cut after L ids (the semantic pipeline's quirk: the
// EOS of a long prompt is lost).
at::Tensor clip_token_ids(const Tokenizer& tokenizer, const std::vector<std::string>& prompts, bool truncate,
                          std::vector<bool>* truncated);

// The model's conditioner: one CLIP text encoder (SD 1.x / 2.x).
std::unique_ptr<TextConditioner> make_text_conditioner(StableDiffusionModel& model);

}  // namespace fairdiff
