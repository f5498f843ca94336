// SentencePiece tokenizer (T5-style text encoders): a thin wrapper over
// sentencepiece::SentencePieceProcessor. The model file carries its own normaliser
// and its special ids; tokenizer_config.json next to it may set model_max_length
// and the pad token.
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <sentencepiece_processor.h>

#include "fairdiff/error.h"
#include "fairdiff/tokenizer.h"

namespace fairdiff {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kDefaultMaxLength = 77;  // Stable Diffusion's text length

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(std::unique_ptr<sentencepiece::SentencePieceProcessor> sp, SpecialTokenIds special,
                         int64_t max_length, std::string path)
      : Tokenizer(special, max_length), sp_(std::move(sp)), path_(std::move(path)) {}

  std::vector<int64_t> encode_ids(const std::string& utf8) const override {
    std::vector<int> ids;
    check(sp_->Encode(utf8, &ids));
    return {ids.begin(), ids.end()};
  }

  std::vector<std::string> encode_tokens(const std::string& utf8) const override {
    std::vector<std::string> pieces;
    check(sp_->Encode(utf8, &pieces));
    return pieces;
  }

  int64_t vocab_size() const override { return sp_->GetPieceSize(); }

 private:
  void check(const sentencepiece::util::Status& status) const {
    if (!status.ok()) throw Error(ErrorKind::Runtime, path_, "SentencePiece encoding failed: " + status.ToString());
  }

  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string path_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& model_file) {
  if (!fs::is_regular_file(model_file)) throw_bad_input(model_file, "missing SentencePiece model file");
  auto sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = sp->Load(model_file);
  if (!status.ok())
    throw_bad_input(model_file, "not a valid SentencePiece model: " + status.ToString(),
                    "expected the spiece.model / tokenizer.model of a T5-style tokenizer");

  SpecialTokenIds ids;
  ids.bos = sp->bos_id();
  ids.eos = sp->eos_id();
  ids.pad = sp->pad_id();
  ids.unk = sp->unk_id();
  int64_t max_length = kDefaultMaxLength;

  const fs::path config_path = fs::path(model_file).parent_path() / "tokenizer_config.json";
  if (fs::is_regular_file(config_path)) {
    std::ifstream f(config_path, std::ios::binary);
    std::ostringstream text;
    text << f.rdbuf();
    nlohmann::json cfg;
    try {
      cfg = nlohmann::json::parse(text.str());
    } catch (const nlohmann::json::parse_error& e) {
      throw_bad_input(config_path.string(), std::string("malformed JSON: ") + e.what());
    }
    if (!cfg.is_object()) throw_bad_input(config_path.string(), "expected a JSON object");
    // Absurd values (transformers writes 1e30 for "no limit") keep the default.
    if (cfg.contains("model_max_length") && cfg["model_max_length"].is_number()) {
      const double v = cfg["model_max_length"].get<double>();
      if (v >= 2 && v <= 1e6) max_length = static_cast<int64_t>(v);
    }
    if (cfg.contains("pad_token")) {
      const nlohmann::json& p = cfg["pad_token"];
      const nlohmann::json content = p.is_object() && p.contains("content") ? p["content"] : p;
      if (content.is_string()) {
        const std::string piece = content.get<std::string>();
        const int id = sp->PieceToId(piece);
        if (id == sp->unk_id() && piece != sp->IdToPiece(sp->unk_id()))
          throw_bad_input(config_path.string(), "pad_token '" + piece + "' is not a piece of " + model_file);
        ids.pad = id;
      }
    }
  }
  // A model trained without a pad piece (SentencePiece's default) pads with EOS,
  // as most pipelines do.
  if (ids.pad < 0) ids.pad = ids.eos >= 0 ? ids.eos : 0;
  return std::make_unique<SentencePieceTokenizer>(std::move(sp), ids, max_length, model_file);
}

}  // namespace fairdiff
