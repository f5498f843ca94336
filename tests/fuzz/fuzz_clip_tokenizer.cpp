// A CLIP BPE tokenizer folder and prompts: the input is vocab.json, merges.txt,
// tokenizer_config.json and a prompt, separated by "\n--8<--\n" lines. A loaded
// tokenizer encodes the prompt with both cleaners and pads/truncates it.
#include "fuzz_util.h"
#include "tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split(data, size, 4);
  const std::string dir = fuzz::scratch_dir();
  fuzz::write_file(dir + "/vocab.json", parts[0]);
  fuzz::write_file(dir + "/merges.txt", parts[1]);
  fuzz::write_file(dir + "/tokenizer_config.json", parts[2].empty() ? "{}" : parts[2]);
  for (auto cleaner : {fairdiff::TextCleaner::Basic, fairdiff::TextCleaner::Ftfy})
    fuzz::refuse_cleanly([&] {
      const auto tok = fairdiff::load_clip_tokenizer(dir, cleaner);
      const fairdiff::TokenizedText t = tok->tokenize(parts[3]);
      if (static_cast<int64_t>(t.input_ids.size()) != tok->model_max_length()) std::abort();
      for (int64_t id : tok->encode_ids(parts[3]))
        if (id < 0) std::abort();
      tok->encode_tokens(parts[3]);
      tok->tokenize(parts[3], 3);
    });
  return 0;
}
