// Shape letters: B prompts, L tokens (77), D text hidden size.
#include "text_conditioner.h"

#include <cstring>

namespace fairdiff {
namespace {

// SD 1.x / 2.x: one CLIPTextModel; the context is its last hidden state, or with clip skip
// k the final layer norm of hidden_states[-(k + 1)].
class CLIPConditioner : public TextConditioner {
 public:
  explicit CLIPConditioner(StableDiffusionModel& model) : model_(model) {}

  PromptEmbeddings encode_prompts(const std::vector<std::string>& prompts, const std::vector<std::string>& negatives,
                                  int64_t clip_skip, bool classifier_free_guidance) override {
    PromptEmbeddings out;
    const int64_t B = static_cast<int64_t>(prompts.size());
    at::Tensor ids = clip_token_ids(*model_.tokenizer, prompts, /*truncate=*/true, &out.truncated);  // [B, L]
    if (classifier_free_guidance) {
      TORCH_CHECK(negatives.size() == prompts.size(), "one negative prompt per prompt");
      ids = at::cat({clip_token_ids(*model_.tokenizer, negatives, /*truncate=*/true, nullptr), ids});  // [2B, L]
    }
    // One prompt at a time: the encoder's products then always have one prompt's rows, so
    // a prompt's embedding never depends on the others encoded with it (BLAS picks its
    // kernel by the row count, and kernels round differently).
    model_.use("text_encoder");
    std::vector<at::Tensor> last, skipped;
    for (int64_t r = 0; r < ids.size(0); ++r) {
      const CLIPTextOutput enc = model_.text_encoder->forward(ids.narrow(0, r, 1).to(device()));
      last.push_back(enc.last_hidden_state);                                  // [1, L, D]
      skipped.push_back(model_.text_encoder->skip_layers(enc, clip_skip));    // [1, L, D]
    }
    const at::Tensor cond = at::cat(skipped);  // [2B|B, L, D]
    if (!classifier_free_guidance) {
      out.cond = cond;
      return out;
    }
    out.uncond = at::cat(last).narrow(0, 0, B);  // the reference skips no layer here
    out.cond = cond.narrow(0, B, B);
    return out;
  }

  Conditioning encode_edits(const std::vector<std::string>& prompts) override {
    if (prompts.empty()) return {};
    const at::Tensor ids = clip_token_ids(*model_.tokenizer, prompts, /*truncate=*/false, nullptr);  // [N, L]
    model_.use("text_encoder");
    std::vector<at::Tensor> rows;  // one prompt at a time, as encode_prompts
    for (int64_t r = 0; r < ids.size(0); ++r)
      rows.push_back(model_.text_encoder->forward(ids.narrow(0, r, 1).to(device())).last_hidden_state);
    return at::cat(rows);  // [N, L, D]
  }

 private:
  at::Device device() const { return model_.text_encoder->parameters().front().device(); }
  StableDiffusionModel& model_;
};

// SDXL (StableDiffusionXLPipeline.encode_prompt): both tokenizers truncate to BOS + 75 + EOS;
// each encoder's hidden_states[-(clip_skip + 2)], WITHOUT final_layer_norm, concatenated on
// the feature axis; the pooled embedding is encoder 2's text_embeds (its projection of the
// final-LN'd end-of-text token). Negatives: hidden_states[-2] whatever the clip skip, and
// zeros (context and pooled) for a missing negative under force_zeros_for_empty_prompt.
class SDXLConditioner : public TextConditioner {
 public:
  explicit SDXLConditioner(StableDiffusionModel& model) : model_(model) {}

  PromptEmbeddings encode_prompts(const std::vector<std::string>& prompts, const std::vector<std::string>& negatives,
                                  int64_t clip_skip, bool classifier_free_guidance) override {
    PromptEmbeddings out;
    std::vector<bool> truncated_2;
    const at::Tensor ids_1 = clip_token_ids(*model_.tokenizer, prompts, true, &out.truncated);  // [B, L]
    const at::Tensor ids_2 = clip_token_ids(*model_.tokenizer_2, prompts, true, &truncated_2);  // [B, L]
    for (size_t i = 0; i < out.truncated.size(); ++i) out.truncated[i] = out.truncated[i] || truncated_2[i];
    out.cond = encode(ids_1, ids_2, clip_skip);
    if (!classifier_free_guidance) return out;
    TORCH_CHECK(negatives.size() == prompts.size(), "one negative prompt per prompt");
    out.uncond = encode(clip_token_ids(*model_.tokenizer, negatives, true, nullptr),
                        clip_token_ids(*model_.tokenizer_2, negatives, true, nullptr), 0);
    // A missing negative prompt is zeros, context and pooled (the reference's
    // negative_prompt=None); per image, so an image does not depend on its batch.
    if (model_.index.force_zeros_for_empty_prompt && empty_negative_is_none) {
      for (size_t i = 0; i < negatives.size(); ++i) {
        if (!negatives[i].empty()) continue;
        out.uncond.context[static_cast<int64_t>(i)].zero_();
        out.uncond.pooled[static_cast<int64_t>(i)].zero_();
      }
    }
    return out;
  }

  // No reference exists for SEGA on SDXL: an edit concept is encoded as a prompt is (both
  // encoders, the reference's truncation, no clip skip), pooled included.
  Conditioning encode_edits(const std::vector<std::string>& prompts) override {
    if (prompts.empty()) return {};
    return encode(clip_token_ids(*model_.tokenizer, prompts, true, nullptr),
                  clip_token_ids(*model_.tokenizer_2, prompts, true, nullptr), 0);
  }

 private:
  // ids [N, L] for each tokenizer -> context [N, L, D1 + D2], pooled [N, P]; one prompt at a
  // time for the reason CLIPConditioner gives.
  Conditioning encode(const at::Tensor& ids_1, const at::Tensor& ids_2, int64_t clip_skip) {
    const at::Device device = model_.text_encoder->parameters().front().device();
    auto penultimate = [&](const CLIPTextOutput& enc) {
      const int64_t n = static_cast<int64_t>(enc.hidden_states.size());  // layers + 1
      TORCH_CHECK(clip_skip + 2 <= n, "clip skip ", clip_skip, " exceeds the ", n - 1, " text encoder layers");
      return enc.hidden_states[static_cast<size_t>(n - 2 - clip_skip)];  // [1, L, D]
    };
    std::vector<at::Tensor> h1, h2, pooled;
    model_.use("text_encoder");
    for (int64_t r = 0; r < ids_1.size(0); ++r) h1.push_back(penultimate(model_.text_encoder->forward(ids_1.narrow(0, r, 1).to(device))));
    model_.use("text_encoder_2");
    for (int64_t r = 0; r < ids_2.size(0); ++r) {
      const CLIPTextOutput enc = model_.text_encoder_2->forward(ids_2.narrow(0, r, 1).to(device));
      h2.push_back(penultimate(enc));
      pooled.push_back(enc.text_embeds);  // [1, P]
    }
    Conditioning c;
    c.context = at::cat({at::cat(h1), at::cat(h2).to(h1.front().scalar_type())}, -1);  // [N, L, D1 + D2]
    c.pooled = at::cat(pooled);                                                          // [N, P]
    return c;
  }

  StableDiffusionModel& model_;
};

}  // namespace

at::Tensor add_time_ids(const SizeConditioning& s, int64_t rows) {
  const at::Tensor one = at::tensor(std::vector<float>{static_cast<float>(s.original_height), static_cast<float>(s.original_width),
                                                       static_cast<float>(s.crop_top), static_cast<float>(s.crop_left),
                                                       static_cast<float>(s.target_height), static_cast<float>(s.target_width)},
                                    at::kFloat);  // [6]
  return one.unsqueeze(0).repeat({rows, 1});       // [rows, 6]
}

at::Tensor clip_token_ids(const Tokenizer& tok, const std::vector<std::string>& prompts, bool truncate,
                          std::vector<bool>* truncated) {
  const int64_t L = tok.model_max_length();
  at::Tensor ids = at::empty({static_cast<int64_t>(prompts.size()), L}, at::kLong);  // [N, L]
  if (truncated) truncated->clear();
  for (size_t i = 0; i < prompts.size(); ++i) {
    TokenizedText t;
    if (truncate) {
      t = tok.tokenize(prompts[i], L);
    } else {
      // BOS + every token + EOS, padded, then the first L ids: a long prompt loses its EOS.
      t = tok.tokenize(prompts[i], std::max<int64_t>(L, static_cast<int64_t>(tok.encode_ids(prompts[i]).size()) + 2));
      t.input_ids.resize(static_cast<size_t>(L));
    }
    std::memcpy(ids[static_cast<int64_t>(i)].data_ptr<int64_t>(), t.input_ids.data(), L * sizeof(int64_t));
    if (truncated) truncated->push_back(t.truncated());
  }
  return ids;
}

std::unique_ptr<TextConditioner> make_text_conditioner(StableDiffusionModel& model) {
  if (model.xl()) return std::make_unique<SDXLConditioner>(model);
  return std::make_unique<CLIPConditioner>(model);
}

}  // namespace fairdiff
