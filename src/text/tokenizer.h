// Prompt tokenizers: CLIP byte-level BPE (Stable Diffusion 1.x / 2.x / XL) and
// SentencePiece (T5-style encoders), behind one interface. Torch-free.
//
//   auto tok = fairdiff::load_tokenizer("models/sd15/tokenizer");
//   fairdiff::TokenizedText t = tok->tokenize("a photo of a cat");
//   // t.input_ids: 77 ids, <|startoftext|> a photo of a cat <|endoftext|> + padding
//   if (t.truncated()) { /* the prompt had more than 75 tokens */ }
//
// The CLIP tokenizer reproduces transformers' CLIPTokenizer (4.44) bit for bit,
// including its text clean-up (see TextCleaner), Unicode NFC and Python's
// str.lower(); the Unicode tables come from Python's unicodedata (Unicode 14.0).
// All methods are const and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fairdiff {

// How the CLIP tokenizer cleans a prompt before BPE. transformers picks this
// silently by whether the `ftfy` package is installed; we make it explicit.
enum class TextCleaner {
  // CLIPTokenizer without ftfy (its BasicTokenizer): drop control characters,
  // normalise whitespace, put spaces around CJK ideographs, NFC, lower-case.
  Basic,
  // CLIPTokenizer with ftfy 6.x: fix_text (HTML entities, mojibake, curly quotes,
  // full-width forms, ...), collapse whitespace, lower-case. Approximate: ftfy's
  // mojibake heuristics are simplified, and only HTML 4 entity names (plus &apos;)
  // are decoded.
  Ftfy,
};

// One prompt after adding BOS/EOS, truncation and padding.
struct TokenizedText {
  std::vector<int64_t> input_ids;       // [max_length]
  std::vector<int64_t> attention_mask;  // [max_length]: 1 for BOS..EOS, 0 for padding
  int64_t n_tokens_untruncated = 0;     // BOS + tokens + EOS before truncation

  bool truncated() const { return n_tokens_untruncated > static_cast<int64_t>(input_ids.size()); }
};

// Ids of the special tokens; -1 where the model has none (e.g. no BOS in T5).
struct SpecialTokenIds {
  int64_t bos = -1;
  int64_t eos = -1;
  int64_t pad = -1;
  int64_t unk = -1;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of a UTF-8 prompt: no BOS/EOS, no truncation. Invalid UTF-8 bytes
  // are read as U+FFFD.
  virtual std::vector<int64_t> encode_ids(const std::string& utf8) const = 0;
  // The same tokens as strings (CLIP: byte-level BPE symbols with "</w>" word ends,
  // special tokens as their text; SentencePiece: pieces).
  virtual std::vector<std::string> encode_tokens(const std::string& utf8) const = 0;

  // BOS + ids + EOS, truncated to keep BOS + (max_length - 2) ids + EOS, padded
  // with the pad id to max_length (default: model_max_length()). A missing BOS or
  // EOS (id -1) is left out.
  TokenizedText tokenize(const std::string& utf8) const;
  TokenizedText tokenize(const std::string& utf8, int64_t max_length) const;

  int64_t bos_id() const { return special_.bos; }
  int64_t eos_id() const { return special_.eos; }
  int64_t pad_id() const { return special_.pad; }
  int64_t unk_id() const { return special_.unk; }
  int64_t model_max_length() const { return model_max_length_; }
  virtual int64_t vocab_size() const = 0;
  // The largest id this tokenizer can emit (vocabulary, added and special tokens): the
  // text encoder needs that many embeddings plus one (checked when a model loads).
  virtual int64_t max_id() const = 0;

 protected:
  Tokenizer(SpecialTokenIds special, int64_t model_max_length)
      : special_(special), model_max_length_(model_max_length) {}

 private:
  SpecialTokenIds special_;
  int64_t model_max_length_;
};

// Loads the tokenizer in `dir`, a diffusers/transformers `tokenizer/` folder:
//  - vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json,
//    added_tokens.json): CLIP BPE, cleaned with `cleaner`;
//  - a SentencePiece model (spiece.model, tokenizer.model or another *.model,
//    + optional tokenizer_config.json): SentencePiece; `cleaner` is not used (the
//    model carries its own normaliser).
// Throws fairdiff::Error naming the file for a missing or malformed file.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir, TextCleaner cleaner = TextCleaner::Basic);

// The two back ends, for callers that know which one they want.
std::unique_ptr<Tokenizer> load_clip_tokenizer(const std::string& dir, TextCleaner cleaner = TextCleaner::Basic);
// model_file: the .model file; tokenizer_config.json next to it is read if present.
std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& model_file);

// The text CLIP's BPE step sees for a prompt piece (no special-token splitting):
// BasicTokenizer's words joined by single spaces, or ftfy + whitespace clean-up +
// lower-case. Exposed for tests and for `--explain`-style diagnostics.
std::string clean_text(const std::string& utf8, TextCleaner cleaner);

}  // namespace fairdiff
