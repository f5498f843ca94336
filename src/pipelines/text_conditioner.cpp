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
    // One text-encoder call for prompts and negatives together.
    model_.use("text_encoder");
    const CLIPTextOutput enc = model_.text_encoder->forward(ids.to(device()));
    const at::Tensor cond = model_.text_encoder->skip_layers(enc, clip_skip);  // [2B|B, L, D]
    if (!classifier_free_guidance) {
      out.cond = cond;
      return out;
    }
    out.uncond = enc.last_hidden_state.narrow(0, 0, B);  // the reference skips no layer here
    out.cond = cond.narrow(0, B, B);
    return out;
  }

  Conditioning encode_edits(const std::vector<std::string>& prompts) override {
    if (prompts.empty()) return {};
    const at::Tensor ids = clip_token_ids(*model_.tokenizer, prompts, /*truncate=*/false, nullptr);  // [N, L]
    model_.use("text_encoder");
    return model_.text_encoder->forward(ids.to(device())).last_hidden_state;  // [N, L, D]
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
