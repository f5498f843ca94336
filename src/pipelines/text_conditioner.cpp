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

}  // namespace

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
  return std::make_unique<CLIPConditioner>(model);
}

}  // namespace fairdiff
