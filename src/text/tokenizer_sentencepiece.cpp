// SentencePiece tokenizer (T5-style text encoders), read and run by our own code.
//
// Why not libsentencepiece: Debian 12's libsentencepiece.so.0 exports the copy of
// protobuf-lite it embeds, and a process that also loads LibTorch (which links
// libprotobuf.so.32) crashes before main. So this file reads the `.model` file (a
// protobuf `ModelProto`) with a small wire-format reader, and re-implements what
// SentencePieceProcessor::Encode (0.1.97) does for UNIGRAM and BPE models:
//
//   1. normalise: a user-defined symbol is kept verbatim; otherwise the longest rule
//      of the precompiled charsmap (a Darts-clone double array) is applied, or one
//      UTF-8 character is copied (a malformed byte becomes U+FFFD); leading,
//      trailing and repeated spaces are dropped; a dummy space is added in front;
//      spaces become U+2581 "▁".
//   2. segment: UNIGRAM: the best-scoring path through every vocabulary piece that
//      matches (Viterbi); BPE: repeatedly merge the adjacent pair whose merged piece
//      scores best.
//   3. unknown characters: a run of them becomes one <unk> token, or, with
//      byte_fallback, one <0xXX> token per UTF-8 byte.
//
// tests/test_sentencepiece.cpp trains models with the real trainer and requires the
// same ids and pieces as the library. WORD and CHAR models are rejected.
#include <algorithm>
#include <array>
#include <cfloat>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fairdiff/error.h"
#include "string_util.h"
#include "tokenizer.h"
#include "unicode.h"

namespace fairdiff {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kDefaultMaxLength = 77;  // Stable Diffusion's text length
constexpr const char* kModelHint = "expected the spiece.model / tokenizer.model of a T5-style tokenizer";
constexpr std::string_view kSpaceSymbol = "\xe2\x96\x81";      // U+2581, SentencePiece's word marker
constexpr std::string_view kReplacementChar = "\xef\xbf\xbd";  // U+FFFD

// --- The model file: protobuf wire format ------------------------------------------
//
// Field numbers from sentencepiece_model.proto. Unknown fields are skipped, a field
// with an unexpected wire type too (as protobuf does); a repeated optional field or
// message keeps the last value / merges, as protobuf does.

enum class PieceType { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 };
enum class ModelType { Unigram = 1, Bpe = 2, Word = 3, Char = 4 };

struct Piece {
  std::string text;
  float score = 0;
  PieceType type = PieceType::Normal;
};

struct TrainerSpec {
  ModelType model_type = ModelType::Unigram;
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  std::string unk_piece, bos_piece, eos_piece, pad_piece;  // empty: "<unk>", "<s>", "</s>", "<pad>"
};

struct NormalizerSpec {
  std::string name;
  std::string precompiled_charsmap;  // empty: the identity (copy characters)
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

struct ModelProto {
  std::vector<Piece> pieces;
  TrainerSpec trainer;
  NormalizerSpec normalizer;
};

// What went wrong in the file; the loader adds the path.
struct ModelFormatError {
  std::string what;
};

enum WireType { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kStartGroup = 3, kEndGroup = 4, kFixed32 = 5 };

class WireReader {
 public:
  WireReader(std::string_view data, size_t base, const char* message) : data_(data), base_(base), message_(message) {}

  bool done() const { return pos_ >= data_.size(); }

  // The next field's number and wire type.
  void key(uint32_t* field, int* wire_type) {
    const uint64_t k = varint();
    *field = static_cast<uint32_t>(k >> 3);
    *wire_type = static_cast<int>(k & 7);
    if (*field == 0 || k >> 32 != 0) fail("field number " + std::to_string(k >> 3) + " is invalid");
    if (*wire_type > kFixed32) fail("wire type " + std::to_string(*wire_type) + " is invalid");
  }

  uint64_t varint() {
    uint64_t v = 0;
    for (int i = 0; i < 10; ++i) {
      if (pos_ >= data_.size()) fail("truncated varint");
      const auto b = static_cast<uint8_t>(data_[pos_++]);
      v |= static_cast<uint64_t>(b & 0x7F) << (7 * i);
      if (!(b & 0x80)) return v;
    }
    fail("varint longer than 10 bytes");
  }

  std::string_view bytes() {
    const size_t start = pos_;
    const uint64_t n = varint();
    if (n > data_.size() - pos_)
      fail("length " + std::to_string(n) + " at byte " + std::to_string(base_ + start) + " runs past the end");
    const std::string_view out = data_.substr(pos_, n);
    pos_ += n;
    return out;
  }

  float fixed32_float() {
    if (data_.size() - pos_ < 4) fail("truncated fixed32");
    uint32_t bits = 0;
    for (int i = 3; i >= 0; --i) bits = (bits << 8) | static_cast<uint8_t>(data_[pos_ + i]);
    pos_ += 4;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }

  // Skips the value of a field whose key was just read.
  void skip(uint32_t field, int wire_type, int depth = 0) {
    switch (wire_type) {
      case kVarint:
        varint();
        return;
      case kFixed64:
        advance(8);
        return;
      case kLengthDelimited:
        bytes();
        return;
      case kFixed32:
        advance(4);
        return;
      case kStartGroup: {
        if (depth >= 100) fail("groups nested too deeply");
        for (;;) {
          if (done()) fail("unterminated group");
          uint32_t f;
          int wt;
          key(&f, &wt);
          if (wt == kEndGroup) {
            if (f != field) fail("group " + std::to_string(field) + " closed by field " + std::to_string(f));
            return;
          }
          skip(f, wt, depth + 1);
        }
      }
      case kEndGroup:
        fail("unexpected end of group " + std::to_string(field));
    }
  }

  size_t offset() const { return base_ + pos_; }

  [[noreturn]] void fail(const std::string& what) const {
    throw ModelFormatError{std::string(message_) + ": " + what + " (byte " + std::to_string(base_ + pos_) + ")"};
  }

 private:
  void advance(size_t n) {
    if (data_.size() - pos_ < n) fail("truncated field");
    pos_ += n;
  }

  std::string_view data_;
  size_t pos_ = 0;
  size_t base_;  // offset of data_ in the file, for messages
  const char* message_;
};

// A field is read only with the wire type its declaration implies; anything else is
// skipped. Enum values outside the declared ones are errors (protobuf would keep the
// default silently; no real model has them).
template <class F>
void parse_message(std::string_view data, size_t base, const char* name, F&& on_field) {
  WireReader r(data, base, name);
  while (!r.done()) {
    uint32_t field;
    int wire_type;
    r.key(&field, &wire_type);
    if (!on_field(r, field, wire_type)) r.skip(field, wire_type);
  }
}

void parse_piece(std::string_view data, size_t base, Piece* p) {
  parse_message(data, base, "ModelProto.pieces", [&](WireReader& r, uint32_t field, int wt) {
    if (field == 1 && wt == kLengthDelimited) {
      p->text = std::string(r.bytes());
    } else if (field == 2 && wt == kFixed32) {
      p->score = r.fixed32_float();
    } else if (field == 3 && wt == kVarint) {
      const uint64_t t = r.varint();
      if (t < 1 || t > 6) r.fail("piece type " + std::to_string(static_cast<int64_t>(t)) + " is not one of 1..6");
      p->type = static_cast<PieceType>(t);
    } else {
      return false;
    }
    return true;
  });
}

void parse_trainer_spec(std::string_view data, size_t base, TrainerSpec* t) {
  parse_message(data, base, "ModelProto.trainer_spec", [&](WireReader& r, uint32_t field, int wt) {
    if (wt == kVarint && field == 3) {
      const uint64_t m = r.varint();
      if (m < 1 || m > 4) r.fail("model_type " + std::to_string(static_cast<int64_t>(m)) + " is not one of 1..4");
      t->model_type = static_cast<ModelType>(m);
    } else if (wt == kVarint && field == 24) {
      t->treat_whitespace_as_suffix = r.varint() != 0;
    } else if (wt == kVarint && field == 35) {
      t->byte_fallback = r.varint() != 0;
    } else if (wt == kLengthDelimited && field >= 45 && field <= 48) {
      std::string* piece[] = {&t->unk_piece, &t->bos_piece, &t->eos_piece, &t->pad_piece};
      *piece[field - 45] = std::string(r.bytes());
    } else {
      return false;  // vocab_size, ids (40..43: we look the pieces up, as the library does), training options
    }
    return true;
  });
}

void parse_normalizer_spec(std::string_view data, size_t base, NormalizerSpec* n) {
  parse_message(data, base, "ModelProto.normalizer_spec", [&](WireReader& r, uint32_t field, int wt) {
    if (wt == kLengthDelimited && field == 1) {
      n->name = std::string(r.bytes());
    } else if (wt == kLengthDelimited && field == 2) {
      n->precompiled_charsmap = std::string(r.bytes());
    } else if (wt == kVarint && field == 3) {
      n->add_dummy_prefix = r.varint() != 0;
    } else if (wt == kVarint && field == 4) {
      n->remove_extra_whitespaces = r.varint() != 0;
    } else if (wt == kVarint && field == 5) {
      n->escape_whitespaces = r.varint() != 0;
    } else {
      return false;
    }
    return true;
  });
}

ModelProto parse_model_proto(std::string_view file) {
  ModelProto m;
  parse_message(file, 0, "ModelProto", [&](WireReader& r, uint32_t field, int wt) {
    if (wt != kLengthDelimited || field < 1 || field > 3) return false;  // self_test_data, denormalizer_spec, ...
    const std::string_view body = r.bytes();
    const size_t body_base = r.offset() - body.size();
    if (field == 1) {
      m.pieces.emplace_back();
      parse_piece(body, body_base, &m.pieces.back());
    } else if (field == 2) {
      parse_trainer_spec(body, body_base, &m.trainer);
    } else {
      parse_normalizer_spec(body, body_base, &m.normalizer);
    }
    return true;
  });
  return m;
}

// --- UTF-8 as SentencePiece reads it --------------------------------------------------

// Length of the character starting with byte `b`, from its high nibble alone (a
// stray continuation byte counts as 1).
size_t one_char_len(char b) {
  static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[static_cast<uint8_t>(b) >> 4];
}

// "<0x41>": the piece of one UTF-8 byte under byte_fallback.
const std::string& byte_piece(uint8_t b) {
  static const std::array<std::string, 256> kPieces = [] {
    std::array<std::string, 256> t;
    for (int i = 0; i < 256; ++i) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "<0x%02X>", i);
      t[i] = buf;
    }
    return t;
  }();
  return kPieces[b];
}

// --- Byte tries ---------------------------------------------------------------------

// Vocabulary pieces (or user-defined symbols) by their bytes: finds every key that
// is a prefix of a text, shortest first.
class PieceTrie {
 public:
  void insert(std::string_view key, int value) {
    uint32_t node = 0;
    for (const char c : key) {
      const uint64_t edge = (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(c);
      auto it = edges_.find(edge);
      if (it == edges_.end()) {
        it = edges_.emplace(edge, static_cast<uint32_t>(values_.size())).first;
        values_.push_back(-1);
      }
      node = it->second;
    }
    values_[node] = value;
  }

  bool empty() const { return edges_.empty(); }

  // Calls f(length, value) for each key that is a prefix of `text`, shortest first.
  template <class F>
  void for_each_prefix(std::string_view text, F&& f) const {
    uint32_t node = 0;
    for (size_t i = 0; i < text.size(); ++i) {
      const auto it = edges_.find((static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(text[i]));
      if (it == edges_.end()) return;
      node = it->second;
      if (values_[node] >= 0) f(i + 1, values_[node]);
    }
  }

  // Length of the longest key that is a prefix of `text`; 0 if none.
  size_t longest_prefix(std::string_view text) const {
    size_t longest = 0;
    for_each_prefix(text, [&](size_t len, int) { longest = len; });
    return longest;
  }

 private:
  std::unordered_map<uint64_t, uint32_t> edges_;  // (node << 8 | byte) -> child node
  std::vector<int> values_ = {-1};                // per node; node 0 is the root
};

// The normaliser's precompiled charsmap: a 4-byte little-endian size, a Darts-clone
// double array of that many bytes, then NUL-terminated replacement strings that the
// array's values index. Each 32-bit unit of the array packs:
//   bits 0-7: the label (the byte leading to this unit), bit 31 set on leaf units;
//   bit 8: this node has a leaf child (i.e. a key ends here);
//   bits 10-31: the offset to the children, shifted left by 8 more when bit 9 is set;
//   on a leaf unit, bits 0-30: the value.
// The child reached by byte c from unit i (at index n) is at n ^ offset(i) ^ c; the
// leaf of a node is at n ^ offset(node).
class CharsMap {
 public:
  CharsMap() = default;
  CharsMap(std::string_view blob, std::string where) : where_(std::move(where)) {
    if (blob.size() <= 4) throw ModelFormatError{"normalizer_spec.precompiled_charsmap is too short"};
    const uint32_t trie_size = static_cast<uint32_t>(static_cast<uint8_t>(blob[0])) |
                               static_cast<uint32_t>(static_cast<uint8_t>(blob[1])) << 8 |
                               static_cast<uint32_t>(static_cast<uint8_t>(blob[2])) << 16 |
                               static_cast<uint32_t>(static_cast<uint8_t>(blob[3])) << 24;
    blob.remove_prefix(4);
    if (trie_size > blob.size() || trie_size < 4)
      throw ModelFormatError{"normalizer_spec.precompiled_charsmap: trie size " + std::to_string(trie_size) +
                             " does not fit its " + std::to_string(blob.size()) + " bytes"};
    units_.resize(trie_size / 4);
    for (size_t i = 0; i < units_.size(); ++i) {
      const auto* p = reinterpret_cast<const uint8_t*>(blob.data()) + 4 * i;
      units_[i] = uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
    }
    strings_ = std::string(blob.substr(trie_size));
    if ((offset(units_[0]) | 0xFF) >= units_.size())
      throw ModelFormatError{"normalizer_spec.precompiled_charsmap: the trie's root points outside it"};
  }

  bool empty() const { return units_.empty(); }

  // The longest rule matching the start of `text`: true, its length and its
  // replacement; false when no rule matches. Like the library, only the first 32
  // matches are considered.
  bool longest_match(std::string_view text, size_t* length, std::string_view* replacement) const {
    constexpr size_t kMaxMatches = 32;
    size_t matches = 0;
    uint32_t best_value = 0;
    *length = 0;
    size_t n = offset(unit(0));
    for (size_t i = 0; i < text.size(); ++i) {
      const auto c = static_cast<uint8_t>(text[i]);
      n ^= c;
      const uint32_t u = unit(n);
      if (label(u) != c) break;
      n ^= offset(u);
      if (has_leaf(u)) {
        if (matches++ < kMaxMatches) {
          *length = i + 1;
          best_value = unit(n) & 0x7FFFFFFFu;
        }
      }
    }
    if (*length == 0) return false;
    if (best_value >= strings_.size()) corrupt("a rule points past the replacement strings");
    const size_t end = strings_.find('\0', best_value);
    if (end == std::string::npos) corrupt("a replacement string is not NUL-terminated");
    *replacement = std::string_view(strings_).substr(best_value, end - best_value);
    return true;
  }

 private:
  static uint32_t label(uint32_t u) { return u & ((1u << 31) | 0xFFu); }
  static bool has_leaf(uint32_t u) { return (u >> 8) & 1u; }
  static size_t offset(uint32_t u) { return size_t{u >> 10} << ((u & (1u << 9)) >> 6); }

  uint32_t unit(size_t i) const {
    if (i >= units_.size()) corrupt("the trie points outside itself");
    return units_[i];
  }
  [[noreturn]] void corrupt(const std::string& what) const {
    throw_bad_input(where_, "normalizer_spec.precompiled_charsmap is corrupt: " + what, kModelHint);
  }

  std::vector<uint32_t> units_;
  std::string strings_;
  std::string where_;
};

// --- The tokenizer ------------------------------------------------------------------

// A segment of the normalised text and its vocabulary id.
struct Token {
  std::string_view piece;
  int id;
};

// The loaded model: vocabulary, normaliser and segmentation. Immutable after loading.
class SentencePieceModel {
 public:
  SentencePieceModel(ModelProto model, const std::string& path);

  // The library's Encode: ids and/or pieces of a UTF-8 text.
  void encode(const std::string& utf8, std::vector<int64_t>* ids, std::vector<std::string>* pieces) const;

  int64_t size() const { return static_cast<int64_t>(pieces_.size()); }
  // The library's PieceToId: reserved pieces (control, unknown, byte) first, then the
  // others, else the unknown id.
  int piece_to_id(std::string_view piece) const {
    if (const auto it = reserved_ids_.find(std::string(piece)); it != reserved_ids_.end()) return it->second;
    if (const auto it = ids_.find(std::string(piece)); it != ids_.end()) return it->second;
    return unk_id_;
  }
  const std::string& id_to_piece(int id) const { return pieces_.at(id).text; }
  int unk_id() const { return unk_id_; }
  // The id of a special piece when it exists with the expected type, else -1 (as the
  // library's bos_id() etc.).
  int special_id(const std::string& piece, PieceType type) const {
    const int id = piece_to_id(piece);
    return pieces_[id].type == type ? id : -1;
  }

 private:
  std::string normalize(std::string_view input) const;
  std::pair<std::string_view, size_t> normalize_prefix(std::string_view input) const;
  std::vector<Token> encode_unigram(std::string_view normalized) const;
  std::vector<Token> encode_bpe(std::string_view normalized) const;
  PieceType type(int id) const { return pieces_[id].type; }

  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int> ids_;           // normal, user-defined and unused pieces
  std::unordered_map<std::string, int> reserved_ids_;  // control, unknown and byte pieces
  PieceTrie vocab_;                                    // ids_ by bytes (unigram)
  PieceTrie user_defined_;                             // user-defined symbols: never normalised, never split
  CharsMap charsmap_;
  std::array<int, 256> byte_ids_{};
  ModelType model_type_;
  bool byte_fallback_;
  bool suffix_whitespace_;
  NormalizerSpec spec_;
  int unk_id_ = -1;
  float min_score_ = FLT_MAX, max_score_ = FLT_MIN;  // over normal pieces (FLT_MIN as the library)
  std::string path_;
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(std::unique_ptr<const SentencePieceModel> model, SpecialTokenIds special, int64_t max_length)
      : Tokenizer(special, max_length), model_(std::move(model)) {}

  std::vector<int64_t> encode_ids(const std::string& utf8) const override {
    std::vector<int64_t> ids;
    model_->encode(utf8, &ids, nullptr);
    return ids;
  }

  std::vector<std::string> encode_tokens(const std::string& utf8) const override {
    std::vector<std::string> pieces;
    model_->encode(utf8, nullptr, &pieces);
    return pieces;
  }

  int64_t vocab_size() const override { return model_->size(); }
  int64_t max_id() const override { return model_->size() - 1; }  // ids are piece indices

 private:
  std::unique_ptr<const SentencePieceModel> model_;
};

// The library's checks at load time (model_interface.cc InitializePieces), as errors.
SentencePieceModel::SentencePieceModel(ModelProto model, const std::string& path)
    : pieces_(std::move(model.pieces)),
      model_type_(model.trainer.model_type),
      byte_fallback_(model.trainer.byte_fallback),
      suffix_whitespace_(model.trainer.treat_whitespace_as_suffix),
      spec_(std::move(model.normalizer)),
      path_(path) {
  if (model_type_ == ModelType::Word || model_type_ == ModelType::Char)
    throw_unsupported(path, std::string("SentencePiece ") + (model_type_ == ModelType::Word ? "WORD" : "CHAR") +
                                " models are not supported, only UNIGRAM and BPE");
  const auto bad = [&](const std::string& what) {
    throw_bad_input(path, "not a valid SentencePiece model: " + what, kModelHint);
  };

  if (pieces_.empty()) bad("it has no pieces");
  if (pieces_.size() > (1u << 30)) bad("too many pieces");
  byte_ids_.fill(-1);
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const Piece& p = pieces_[i];
    const int id = static_cast<int>(i);
    if (p.text.empty()) bad("piece " + std::to_string(i) + " is empty");
    if (p.text.find('\0') != std::string::npos) bad("piece " + std::to_string(i) + " contains a NUL byte");
    const bool ordinary =
        p.type == PieceType::Normal || p.type == PieceType::UserDefined || p.type == PieceType::Unused;
    if (!(ordinary ? ids_ : reserved_ids_).emplace(p.text, id).second)
      bad("piece '" + p.text + "' is defined twice (ids " +
          std::to_string((ordinary ? ids_ : reserved_ids_).at(p.text)) + " and " + std::to_string(i) + ")");
    if (p.type == PieceType::UserDefined) user_defined_.insert(p.text, id);
    if (p.type == PieceType::Unknown) {
      if (unk_id_ >= 0) bad("two unknown pieces (ids " + std::to_string(unk_id_) + " and " + std::to_string(i) + ")");
      unk_id_ = id;
    }
    if (p.type == PieceType::Byte) {
      if (!byte_fallback_) bad("byte piece '" + p.text + "' although trainer_spec.byte_fallback is false");
      const uint8_t byte =
          p.text.size() == 6 ? static_cast<uint8_t>(std::strtoul(p.text.substr(3, 2).c_str(), nullptr, 16)) : 0;
      if (p.text != byte_piece(byte)) bad("byte piece '" + p.text + "' is not of the form <0xXX> (upper-case hex)");
      byte_ids_[byte] = id;
    }
    if (p.type == PieceType::Normal) {
      min_score_ = std::min(min_score_, p.score);
      max_score_ = std::max(max_score_, p.score);
    }
  }
  if (unk_id_ < 0) bad("it has no unknown piece (type UNKNOWN)");
  if (byte_fallback_ && std::find(byte_ids_.begin(), byte_ids_.end(), -1) != byte_ids_.end())
    bad("trainer_spec.byte_fallback is set but the 256 <0xXX> byte pieces are not all there");
  if (model_type_ == ModelType::Unigram) {
    if (ids_.empty()) bad("it has no NORMAL, USER_DEFINED or UNUSED pieces");
    for (const auto& [text, id] : ids_) vocab_.insert(text, id);
  }
  if (!spec_.precompiled_charsmap.empty()) {
    try {
      charsmap_ = CharsMap(spec_.precompiled_charsmap, path);
    } catch (const ModelFormatError& e) {
      bad(e.what);
    }
    spec_.precompiled_charsmap.clear();
  }
}

// One normalisation step at the start of `input` (non-empty): the text it becomes and
// the number of input bytes it consumes.
std::pair<std::string_view, size_t> SentencePieceModel::normalize_prefix(std::string_view input) const {
  if (const size_t n = user_defined_.longest_prefix(input); n > 0) return {input.substr(0, n), n};
  size_t n = 0;
  std::string_view replacement;
  if (!charsmap_.empty() && charsmap_.longest_match(input, &n, &replacement)) return {replacement, n};
  char32_t cp = 0;
  n = utf8_char(input, &cp);
  if (n == 0) return {kReplacementChar, 1};  // one malformed byte
  return {input.substr(0, n), n};
}

std::string SentencePieceModel::normalize(std::string_view input) const {
  const bool squeeze = spec_.remove_extra_whitespaces;
  if (squeeze) {
    while (!input.empty()) {  // leading spaces, after normalisation (U+3000 counts)
      const auto [text, consumed] = normalize_prefix(input);
      if (text != " ") break;
      input.remove_prefix(consumed);
    }
  }
  std::string out;
  if (input.empty()) return out;
  const std::string_view space = spec_.escape_whitespaces ? kSpaceSymbol : std::string_view(" ");
  if (spec_.add_dummy_prefix && !suffix_whitespace_) out += space;

  bool prev_space = squeeze;  // the output so far ends with a space (or is at the start)
  while (!input.empty()) {
    auto [text, consumed] = normalize_prefix(input);
    while (prev_space && !text.empty() && text.front() == ' ') text.remove_prefix(1);
    if (!text.empty()) {
      for (const char c : text) {
        if (c == ' ')
          out += space;
        else
          out += c;
      }
      prev_space = text.back() == ' ';
    }
    input.remove_prefix(consumed);
    if (!squeeze) prev_space = false;
  }
  if (squeeze)  // trailing spaces (a U+2581 typed by the user goes too, as in the library)
    while (ends_with(out, space)) out.resize(out.size() - space.size());
  if (spec_.add_dummy_prefix && suffix_whitespace_) out += space;
  return out;
}

// UNIGRAM: the best path through the lattice of all matching pieces, built on the fly
// (the library's EncodeOptimized). best[e] is the best path covering normalized[0, e).
std::vector<Token> SentencePieceModel::encode_unigram(std::string_view s) const {
  constexpr float kUnkPenalty = 10.0f;
  const float unk_score = min_score_ - kUnkPenalty;
  struct Best {
    int id = -1;
    float score = 0;
    int64_t start = -1;  // -1: not reached yet
  };
  std::vector<Best> best(s.size() + 1);
  for (size_t start = 0; start < s.size();) {
    const size_t char_len = std::min(one_char_len(s[start]), s.size() - start);
    const float score_here = best[start].score;
    bool has_char_piece = false;  // a piece covers exactly the first character
    vocab_.for_each_prefix(s.substr(start), [&](size_t len, int id) {
      if (type(id) == PieceType::Unused) return;
      // The library adds in double here (its user-defined bonus is a double
      // expression) and stores the sum as float; ties go to the first candidate.
      const double piece_score = type(id) == PieceType::UserDefined
                                     ? static_cast<double>(static_cast<float>(len) * max_score_) - 0.1
                                     : static_cast<double>(pieces_[id].score);
      const double candidate = piece_score + score_here;
      Best& b = best[start + len];
      if (b.start < 0 || candidate > b.score) b = {id, static_cast<float>(candidate), static_cast<int64_t>(start)};
      if (len == char_len) has_char_piece = true;
    });
    if (!has_char_piece) {
      const float candidate = unk_score + score_here;  // float, as the library
      Best& b = best[start + char_len];
      if (b.start < 0 || candidate > b.score) b = {unk_id_, candidate, static_cast<int64_t>(start)};
    }
    start += char_len;
  }
  std::vector<Token> out;
  for (size_t end = s.size(); end > 0;) {
    const Best& b = best[end];
    if (b.start < 0) throw Error(ErrorKind::Runtime, path_, "SentencePiece encoding failed: no path through the text");
    out.push_back({s.substr(b.start, end - b.start), b.id});
    end = static_cast<size_t>(b.start);
  }
  std::reverse(out.begin(), out.end());
  return out;
}

// BPE: start from characters (a user-defined symbol is one frozen symbol), then
// repeatedly merge the adjacent pair whose concatenation is the best-scoring piece
// (ties: leftmost). Unused pieces may be merged through but are split back at the end.
std::vector<Token> SentencePieceModel::encode_bpe(std::string_view s) const {
  struct Symbol {
    int prev, next;  // -1 at the ends
    bool frozen;
    std::string_view piece;  // empty once merged into its left neighbour
  };
  struct Pair {
    float score;
    int left, right;
    size_t size;  // bytes of the merged piece when queued; a mismatch later means stale
  };
  const auto worse = [](const Pair& a, const Pair& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> queue(worse);
  std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> unused_split;

  std::vector<Symbol> symbols;
  for (size_t pos = 0; pos < s.size();) {
    size_t len = user_defined_.longest_prefix(s.substr(pos));
    const bool frozen = len > 0;
    if (!frozen) len = std::min(one_char_len(s[pos]), s.size() - pos);
    const int i = static_cast<int>(symbols.size());
    pos += len;
    symbols.push_back({i - 1, pos < s.size() ? i + 1 : -1, frozen, s.substr(pos - len, len)});
  }
  if (symbols.empty()) return {};

  const auto maybe_queue = [&](int left, int right) {
    if (left < 0 || right < 0 || symbols[left].frozen || symbols[right].frozen) return;
    const std::string_view merged(symbols[left].piece.data(), symbols[left].piece.size() + symbols[right].piece.size());
    const auto it = ids_.find(std::string(merged));
    if (it == ids_.end()) return;
    queue.push({pieces_[it->second].score, left, right, merged.size()});
    if (type(it->second) == PieceType::Unused) unused_split[merged] = {symbols[left].piece, symbols[right].piece};
  };
  for (size_t i = 1; i < symbols.size(); ++i) maybe_queue(static_cast<int>(i) - 1, static_cast<int>(i));

  while (!queue.empty()) {
    const Pair top = queue.top();
    queue.pop();
    Symbol& l = symbols[top.left];
    Symbol& r = symbols[top.right];
    if (l.piece.empty() || r.piece.empty() || l.piece.size() + r.piece.size() != top.size) continue;  // stale
    l.piece = std::string_view(l.piece.data(), top.size);
    l.next = r.next;
    if (r.next >= 0) symbols[r.next].prev = top.left;
    r.piece = {};
    maybe_queue(l.prev, top.left);
    maybe_queue(top.left, l.next);
  }

  std::vector<Token> out;
  const std::function<void(std::string_view)> emit = [&](std::string_view w) {
    const int id = piece_to_id(w);
    if (type(id) == PieceType::Unused) {
      if (const auto it = unused_split.find(w); it != unused_split.end()) {
        emit(it->second.first);
        emit(it->second.second);
        return;
      }
    }
    out.push_back({w, id});
  };
  for (int i = 0; i >= 0; i = symbols[i].next) emit(symbols[i].piece);
  return out;
}

void SentencePieceModel::encode(const std::string& utf8, std::vector<int64_t>* ids,
                                std::vector<std::string>* pieces) const {
  const std::string normalized = normalize(utf8);
  if (normalized.empty()) return;
  const std::vector<Token> tokens = model_type_ == ModelType::Bpe ? encode_bpe(normalized) : encode_unigram(normalized);

  bool prev_unknown = false;
  for (const Token& t : tokens) {
    const bool unknown = type(t.id) == PieceType::Unknown;
    if (type(t.id) == PieceType::Control)  // the library fails the same way
      throw Error(ErrorKind::Runtime, path_,
                  "SentencePiece encoding failed: control piece '" + std::string(t.piece) + "' in the segmentation");
    if (unknown && byte_fallback_) {
      for (const char c : t.piece) {
        const auto b = static_cast<uint8_t>(c);
        if (ids) ids->push_back(byte_ids_[b]);
        if (pieces) pieces->push_back(byte_piece(b));
      }
    } else if (unknown && prev_unknown) {  // a run of unknown characters is one token
      if (pieces) pieces->back() += t.piece;
    } else {
      if (ids) ids->push_back(t.id);
      if (pieces) pieces->emplace_back(t.piece);
    }
    prev_unknown = unknown;
  }
}

std::string read_model_file(const std::string& model_file) {
  constexpr std::uintmax_t kMaxBytes = std::uintmax_t{1} << 30;
  std::error_code ec;
  const auto size = fs::file_size(model_file, ec);
  if (ec) throw Error(ErrorKind::Runtime, model_file, "cannot read: " + ec.message());
  if (size > kMaxBytes)
    throw_bad_input(model_file, "not a valid SentencePiece model: " + std::to_string(size) + " bytes, over 1 GiB",
                    kModelHint);
  std::ifstream f(model_file, std::ios::binary);
  std::string bytes(static_cast<size_t>(size), '\0');
  if (!f.read(bytes.data(), static_cast<std::streamsize>(bytes.size())))
    throw Error(ErrorKind::Runtime, model_file, "cannot read the file");
  return bytes;
}

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& model_file) {
  if (!fs::is_regular_file(model_file)) throw_bad_input(model_file, "missing SentencePiece model file");
  ModelProto proto;
  try {
    proto = parse_model_proto(read_model_file(model_file));
  } catch (const ModelFormatError& e) {
    throw_bad_input(model_file, "not a valid SentencePiece model: " + e.what, kModelHint);
  }
  const auto piece_or = [](const std::string& p, const char* fallback) {
    return p.empty() ? std::string(fallback) : p;
  };
  const std::string unk_piece = piece_or(proto.trainer.unk_piece, "<unk>");
  const std::string bos_piece = piece_or(proto.trainer.bos_piece, "<s>");
  const std::string eos_piece = piece_or(proto.trainer.eos_piece, "</s>");
  const std::string pad_piece = piece_or(proto.trainer.pad_piece, "<pad>");
  auto sp = std::make_unique<const SentencePieceModel>(std::move(proto), model_file);

  SpecialTokenIds ids;
  ids.bos = sp->special_id(bos_piece, PieceType::Control);
  ids.eos = sp->special_id(eos_piece, PieceType::Control);
  ids.pad = sp->special_id(pad_piece, PieceType::Control);
  ids.unk = sp->special_id(unk_piece, PieceType::Unknown);
  int64_t max_length = kDefaultMaxLength;

  const fs::path config_path = fs::path(model_file).parent_path() / "tokenizer_config.json";
  if (fs::is_regular_file(config_path)) {
    std::ifstream f(config_path, std::ios::binary);
    std::ostringstream text;
    text << f.rdbuf();
    nlohmann::json cfg;
    try {
      cfg = nlohmann::json::parse(text.str());
    } catch (const nlohmann::json::exception& e) {
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
        const int id = sp->piece_to_id(piece);
        if (id == sp->unk_id() && piece != sp->id_to_piece(sp->unk_id()))
          throw_bad_input(config_path.string(), "pad_token '" + piece + "' is not a piece of " + model_file);
        ids.pad = id;
      }
    }
  }
  // A model trained without a pad piece (SentencePiece's default) pads with EOS,
  // as most pipelines do.
  if (ids.pad < 0) ids.pad = ids.eos >= 0 ? ids.eos : 0;
  return std::make_unique<SentencePieceTokenizer>(std::move(sp), ids, max_length);
}

}  // namespace fairdiff
