// Parity op `tokenize`: every prompt of the case through our tokenizer, compared
// exactly (padded ids, attention mask, untruncated ids, BPE token strings).
#include <cstring>
#include <map>
#include <memory>

#include "tokenizer.h"
#include "parity.h"

namespace fairdiff::parity {
namespace {

void tokenize_case(ParityCase& c) {
  const std::string cleaner_name = c.params().value("cleaner", std::string("basic"));
  const TextCleaner cleaner = cleaner_name == "ftfy" ? TextCleaner::Ftfy : TextCleaner::Basic;
  // The ftfy clean-up is approximate (mojibake heuristics): report, don't fail, unless asked.
  if (cleaner == TextCleaner::Ftfy && !c.options().strict_ftfy) c.set_informational(true);
  const auto tokenizer = load_tokenizer(c.fixtures_path(c.spec().at("tokenizer_dir").get<std::string>()), cleaner);
  const int64_t max_length = c.params().value("max_length", int64_t{77});

  const auto& prompts = c.spec().at("prompts");
  const int64_t n = static_cast<int64_t>(prompts.size());
  at::Tensor ids = at::empty({n, max_length}, at::kLong), mask = at::empty({n, max_length}, at::kLong);
  int matching = 0;
  std::string first_mismatch;
  for (int64_t i = 0; i < n; ++i) {
    const std::string prompt = prompts[i].at("prompt").get<std::string>();
    const TokenizedText t = tokenizer->tokenize(prompt, max_length);
    std::memcpy(ids[i].data_ptr<int64_t>(), t.input_ids.data(), max_length * sizeof(int64_t));
    std::memcpy(mask[i].data_ptr<int64_t>(), t.attention_mask.data(), max_length * sizeof(int64_t));
    std::vector<int64_t> untruncated = {tokenizer->bos_id()};
    for (int64_t id : tokenizer->encode_ids(prompt)) untruncated.push_back(id);
    untruncated.push_back(tokenizer->eos_id());
    const bool same = untruncated == prompts[i].at("ids_untruncated").get<std::vector<int64_t>>() &&
                      tokenizer->encode_tokens(prompt) == prompts[i].at("bpe_tokens").get<std::vector<std::string>>() &&
                      t.n_tokens_untruncated == static_cast<int64_t>(untruncated.size());
    if (same) ++matching;
    else if (first_mismatch.empty()) first_mismatch = "first mismatch: prompt " + std::to_string(i) + " " +
                                                      prompts[i].at("prompt").dump();
  }
  c.note(std::to_string(matching) + "/" + std::to_string(n) + " prompts match (" + cleaner_name + ")" +
         (first_mismatch.empty() ? "" : "; " + first_mismatch));
  if (matching != n) c.fail("prompts", std::to_string(n - matching) + " prompts tokenize differently");
  c.check("input_ids", ids);
  c.check("attention_mask", mask);
}

}  // namespace

void register_tokenizer_ops(OpRegistry& registry) { registry["tokenize"] = tokenize_case; }

}  // namespace fairdiff::parity
