// A SentencePiece .model file (our own protobuf reader) and prompts: the input is the
// model's bytes, tokenizer_config.json and a prompt, separated by "\n--8<--\n" lines.
#include "fuzz_util.h"
#include "tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split(data, size, 3);
  const std::string dir = fuzz::scratch_dir();
  fuzz::write_file(dir + "/spiece.model", parts[0]);
  fuzz::write_file(dir + "/tokenizer_config.json", parts[1].empty() ? "{}" : parts[1]);
  fuzz::refuse_cleanly([&] {
    const auto tok = fairdiff::load_sentencepiece_tokenizer(dir + "/spiece.model");
    const fairdiff::TokenizedText t = tok->tokenize(parts[2]);
    if (static_cast<int64_t>(t.input_ids.size()) != tok->model_max_length()) std::abort();
    for (int64_t id : tok->encode_ids(parts[2]))
      if (id < 0 || id >= tok->vocab_size()) std::abort();
    tok->encode_tokens(parts[2]);
    tok->tokenize(parts[2], 3);
  });
  return 0;
}
