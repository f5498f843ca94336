// SentencePiece parity: our reader and encoder (src/tokenizer_sentencepiece.cpp)
// against libsentencepiece itself.
//
// Each SentencePieceParity.* test trains a small model here (the library's trainer,
// in a temp folder), then encodes a few thousand varied strings (ASCII, accents,
// full-width forms, CJK, emoji, odd whitespace, control characters, malformed UTF-8,
// characters the model never saw) with both and requires identical ids and pieces.
// SentencePieceRobust.* feeds truncated and corrupted model files to the loader: it
// must throw fairdiff::Error, never crash.
//
// Torch-free on purpose: libsentencepiece must never share a process with LibTorch
// (its exported protobuf clashes with LibTorch's), which is why the library has its
// own reader in the first place.
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fairdiff/error.h"
#include "tokenizer.h"

namespace fs = std::filesystem;

namespace {

// --- helpers -----------------------------------------------------------------------

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("fairdiff_spm_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f << bytes;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A string with non-printable ASCII and malformed bytes as \xNN, for messages.
std::string escaped(const std::string& s) {
  std::string out;
  for (const char c : s) {
    const auto b = static_cast<unsigned char>(c);
    if (b < 0x20 || b == 0x7F || b == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", b);
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

template <class T>
std::string joined(const std::vector<T>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? " | " : "") << v[i];
  return escaped(os.str());
}

// --- text generator ----------------------------------------------------------------

// Fragments the training corpus is made of (with weights favouring ASCII).
// clang-format off
const std::vector<std::string> kCommon = {
    "a", "photo", "of", "the", "cat", "dog", "cats", "dogs", "quick", "brown", "fox", "jumps", "over", "lazy",
    "portrait", "highly", "detailed", "painting", "mars", "astronaut", "riding", "horse", "on", "in", "and",
    "with", "beautiful", "landscape", "sunset", "city", "night", "neon", "lights", "4k", "8K", "HDR", "by",
    "Greg", "Rutkowski", "trending", "artstation", "it's", "don't", "U.S.A.", "(masterpiece:1.2)", "[blue]",
    "e-mail", "x_y", "100%", "$5", "3.14", "2024", "C++", "...", "!", "?", ",", ".", ":", ";", "\"quoted\"",
    "café", "naïve", "Zürich", "façade", "jalapeño", "crème", "brûlée", "São", "Paulo", "straße",
    "猫", "写真", "東京", "日本語", "ひらがな", "カタカナ", "中文", "кошка", "Москва", "γάτα", "😀", "🐱"};

// Fragments only the test strings use: rarer scripts, compatibility forms the
// normaliser rewrites, emoji sequences, odd whitespace, control characters.
const std::vector<std::string> kRare = {
    "Ångström", "Dvořák", "Łódź", "İstanbul", "ﬁnal", "Ⅻ", "①", "x²", "½", "™", "℃", "µ", "e\u0301", "a\u0308",
    "ＡＢＣ", "ｆｕｌｌ", "１２３", "！", "（）", "ｶﾀｶﾅ", "龍", "𠀋", "漢字", "한국어", "고양이", "Ωmega", "قطة",
    "חתול", "แมว", "बिल्ली", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤\ufe0f", "✨", "🦄", "Ꙭ", "ᚠ", "𝔘𝔫𝔦", "ꦲ",
    "“curly”", "‘single’", "«guillemets»", "—", "–", "…", "\u00a0", "\u2003", "\u200b", "\u3000", "\t", "\n",
    "\r\n", "\x01", "\x7f", "\u0085", "\u2581", "\u2581\u2581x", "<unk>", "<s>", "</s>", "<pad>", "<0x41>",
    "\u2047", "<sep>", "[MASK]", "ＡＢ", "ing", "\ufffd"};

// Malformed UTF-8 (a lone lead byte, a truncated sequence, a surrogate, an overlong
// form, beyond U+10FFFF, a stray continuation byte).
const std::vector<std::string> kMalformed = {"\xff", "\xc3", "\xe2\x96", "\xed\xa0\x80", "\xc0\xaf",
                                             "\xf4\x90\x80\x80", "\x80", "\xf0\x9f\x98"};
// clang-format on

// Separators: mostly one space, sometimes none, several, or exotic whitespace.
std::string separator(std::mt19937& rng) {
  static const std::vector<std::string> kSeps = {" ", " ", " ", " ", " ", " ", "", "  ", "   ", "\t", " \u3000 ", "\n"};
  return kSeps[rng() % kSeps.size()];
}

std::string training_sentence(std::mt19937& rng) {
  std::string s;
  const int words = 2 + static_cast<int>(rng() % 12);
  for (int i = 0; i < words; ++i) {
    if (i) s += rng() % 10 == 0 ? "" : " ";
    s += kCommon[rng() % kCommon.size()];
  }
  return s;
}

std::string test_string(std::mt19937& rng) {
  std::string s;
  if (rng() % 4 == 0) s += separator(rng);  // leading whitespace
  const int words = static_cast<int>(rng() % 14);
  for (int i = 0; i < words; ++i) {
    if (i) s += separator(rng);
    const unsigned pick = rng() % 100;
    if (pick < 60) {
      s += kCommon[rng() % kCommon.size()];
    } else if (pick < 92) {
      s += kRare[rng() % kRare.size()];
    } else if (pick < 96) {
      s += kMalformed[rng() % kMalformed.size()];
    } else {  // a random code point, valid or not
      const uint32_t cp = rng() % 0x30000;
      if (cp >= 0xD800 && cp < 0xE000) continue;
      char buf[5] = {};
      if (cp < 0x80) {
        buf[0] = static_cast<char>(cp ? cp : ' ');
      } else if (cp < 0x800) {
        buf[0] = static_cast<char>(0xC0 | cp >> 6), buf[1] = static_cast<char>(0x80 | (cp & 0x3F));
      } else if (cp < 0x10000) {
        buf[0] = static_cast<char>(0xE0 | cp >> 12), buf[1] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        buf[2] = static_cast<char>(0x80 | (cp & 0x3F));
      } else {
        buf[0] = static_cast<char>(0xF0 | cp >> 18), buf[1] = static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        buf[2] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F)), buf[3] = static_cast<char>(0x80 | (cp & 0x3F));
      }
      s += buf;
    }
  }
  if (rng() % 4 == 0) s += separator(rng);  // trailing whitespace
  return s;
}

// The strings every model is checked on: hand-picked edge cases, then random ones.
const std::vector<std::string>& test_strings() {
  static const std::vector<std::string> strings = [] {
    // clang-format off
    std::vector<std::string> v = {
        "", " ", "   ", "\t\n", "\u3000", "\u2581", "\u2581\u2581", " \u2581 ", "a", "a photo of a cat",
        "  a   photo  of a cat  ", "A PHOTO OF A CAT", "ＡＢＣ full width １２３", "café naïve Zürich", "猫の写真",
        "東京 日本語", "😀🐱😀", "🦄🦄🦄 unicorn", "<unk> <s> </s> <pad>", "<0x41><0x42>", "cat<sep>dog",
        "[MASK][MASK]", "catcatcat", "ＡＢＡＢ", "x\u0301y", "\xff\xfe", "\xc3(", "ﬁﬂ", "①②③", "trailing   ",
        "   leading", "tab\tseparated\tvalues", "line\nbreak"};
    // clang-format on
    std::mt19937 rng(20240607);
    while (v.size() < 3000) v.push_back(test_string(rng));
    return v;
  }();
  return strings;
}

// Trains a model in `dir` on the generated corpus; returns the .model path.
std::string train(const fs::path& dir, const std::string& flags) {
  std::string corpus;
  std::mt19937 rng(12345);
  for (int i = 0; i < 3000; ++i) corpus += training_sentence(rng) + "\n";
  write_file(dir / "corpus.txt", corpus);
  const std::string args = "--input=" + (dir / "corpus.txt").string() + " --model_prefix=" + (dir / "m").string() +
                           " --vocab_size=600 --hard_vocab_limit=false --num_threads=2 --minloglevel=2 " + flags;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  EXPECT_TRUE(status.ok()) << status.ToString() << " for " << flags;
  return (dir / "m.model").string();
}

// Encodes every test string with the library and with ours; expects no difference.
void expect_same_encoding(const sentencepiece::SentencePieceProcessor& sp, const fairdiff::Tokenizer& ours,
                          const std::string& label) {
  size_t mismatches = 0, tokens = 0, unknown = 0, bytes = 0, user_defined = 0;  // the last three: coverage
  for (const std::string& text : test_strings()) {
    std::vector<int> ids;
    std::vector<std::string> pieces;
    ASSERT_TRUE(sp.Encode(text, &ids).ok());
    ASSERT_TRUE(sp.Encode(text, &pieces).ok());
    const std::vector<int64_t> our_ids = ours.encode_ids(text);
    const std::vector<std::string> our_pieces = ours.encode_tokens(text);
    tokens += ids.size();
    for (const int id : ids) {
      unknown += sp.IsUnknown(id);
      bytes += sp.IsByte(id);
      user_defined += sp.IdToPiece(id) == "<sep>" || sp.IdToPiece(id) == "[MASK]";  // user-defined only
    }
    const bool same_ids = std::equal(ids.begin(), ids.end(), our_ids.begin(), our_ids.end());
    if (same_ids && pieces == our_pieces) continue;
    if (++mismatches <= 5)
      ADD_FAILURE() << label << ": '" << escaped(text) << "'\n  library: " << joined(pieces) << "\n           "
                    << joined(ids) << "\n  ours:    " << joined(our_pieces) << "\n           " << joined(our_ids);
  }
  std::printf("[ parity   ] %-22s %zu strings, %zu tokens (%zu unknown, %zu bytes, %zu user-defined), %zu mismatches\n",
              label.c_str(), test_strings().size(), tokens, unknown, bytes, user_defined, mismatches);
  EXPECT_EQ(mismatches, 0u) << label;
}

void expect_same_specials(const sentencepiece::SentencePieceProcessor& sp, const fairdiff::Tokenizer& ours) {
  EXPECT_EQ(ours.vocab_size(), sp.GetPieceSize());
  EXPECT_EQ(ours.bos_id(), sp.bos_id());
  EXPECT_EQ(ours.eos_id(), sp.eos_id());
  EXPECT_EQ(ours.unk_id(), sp.unk_id());
  // Without a pad piece we pad with EOS (else 0).
  EXPECT_EQ(ours.pad_id(), sp.pad_id() >= 0 ? sp.pad_id() : (sp.eos_id() >= 0 ? sp.eos_id() : 0));
}

// Trains a model with `flags`, then compares the two encoders on it.
void check_parity(const std::string& label, const std::string& flags) {
  TempDir dir;
  const std::string model = train(dir.path, flags);
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(model).ok());
  const auto ours = fairdiff::load_sentencepiece_tokenizer(model);
  expect_same_specials(sp, *ours);
  expect_same_encoding(sp, *ours, label);
}

const char* const kUserSymbols =
    " --user_defined_symbols=<sep>,[MASK],cat,ing,ＡＢ,😀 --control_symbols=<ctrl>,<2en>";

// --- parity --------------------------------------------------------------------------

TEST(SentencePieceParity, UnigramNfkc) { check_parity("unigram nmt_nfkc", "--model_type=unigram"); }
TEST(SentencePieceParity, UnigramIdentity) {
  check_parity("unigram identity", "--model_type=unigram --normalization_rule_name=identity");
}
TEST(SentencePieceParity, UnigramNfkcCaseFold) {
  check_parity("unigram nmt_nfkc_cf", "--model_type=unigram --normalization_rule_name=nmt_nfkc_cf");
}
TEST(SentencePieceParity, UnigramByteFallback) {
  check_parity("unigram byte_fallback", "--model_type=unigram --byte_fallback=true");
}
TEST(SentencePieceParity, UnigramUserDefined) {
  check_parity("unigram user-defined", std::string("--model_type=unigram") + kUserSymbols);
}
TEST(SentencePieceParity, UnigramNoDummyPrefix) {
  check_parity("unigram no prefix", "--model_type=unigram --add_dummy_prefix=false");
}
TEST(SentencePieceParity, UnigramKeepSpaces) {
  check_parity("unigram keep spaces",
               "--model_type=unigram --remove_extra_whitespaces=false --allow_whitespace_only_pieces=true");
}
TEST(SentencePieceParity, UnigramSuffix) {
  check_parity("unigram ws suffix", "--model_type=unigram --treat_whitespace_as_suffix=true");
}
TEST(SentencePieceParity, UnigramT5Ids) {
  check_parity("unigram T5 ids",
               "--model_type=unigram --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1 --split_digits=true");
}
TEST(SentencePieceParity, UnigramLowCoverage) {
  check_parity(
      "unigram coverage 0.98",
      "--model_type=unigram --character_coverage=0.98 --byte_fallback=true --normalization_rule_name=identity" +
          std::string(kUserSymbols));
}
TEST(SentencePieceParity, BpeNfkc) { check_parity("bpe nmt_nfkc", "--model_type=bpe"); }
TEST(SentencePieceParity, BpeIdentity) {
  check_parity("bpe identity", "--model_type=bpe --normalization_rule_name=identity");
}
TEST(SentencePieceParity, BpeByteFallback) {
  check_parity("bpe byte_fallback", "--model_type=bpe --byte_fallback=true");
}
TEST(SentencePieceParity, BpeUserDefined) {
  check_parity("bpe user-defined", std::string("--model_type=bpe") + kUserSymbols);
}
TEST(SentencePieceParity, BpeNoPrefixKeepSpaces) {
  check_parity("bpe no prefix, spaces", "--model_type=bpe --add_dummy_prefix=false --remove_extra_whitespaces=false");
}
TEST(SentencePieceParity, BpeSuffix) {
  check_parity("bpe ws suffix", "--model_type=bpe --treat_whitespace_as_suffix=true");
}

// UNUSED pieces (the library's SetVocabulary marks every piece outside a list so):
// unigram skips them, BPE merges through them and splits them back.
TEST(SentencePieceParity, UnusedPieces) {
  for (const char* type : {"unigram", "bpe"}) {
    TempDir dir;
    const std::string model = train(dir.path, std::string("--model_type=") + type);
    sentencepiece::SentencePieceProcessor sp;
    ASSERT_TRUE(sp.Load(model).ok());
    std::vector<std::string> keep;
    for (int id = 0; id < sp.GetPieceSize(); ++id)
      if (id % 3 != 0) keep.push_back(sp.IdToPiece(id));
    std::vector<absl::string_view> keep_views(keep.begin(), keep.end());
    ASSERT_TRUE(sp.SetVocabulary(keep_views).ok());
    const fs::path restricted = dir.path / "restricted.model";
    write_file(restricted, sp.serialized_model_proto());
    const auto ours = fairdiff::load_sentencepiece_tokenizer(restricted.string());
    expect_same_encoding(sp, *ours, std::string(type) + " unused pieces");
  }
}

// --- loading --------------------------------------------------------------------------

TEST(SentencePieceLoad, WordAndCharModelsAreUnsupported) {
  TempDir dir;
  const std::string model = train(dir.path, "--model_type=char");
  try {
    fairdiff::load_sentencepiece_tokenizer(model);
    FAIL() << "a CHAR model loaded";
  } catch (const fairdiff::Error& e) {
    EXPECT_EQ(e.kind(), fairdiff::ErrorKind::Unsupported) << e.what();
    EXPECT_NE(std::string(e.what()).find("CHAR"), std::string::npos) << e.what();
  }
}

TEST(SentencePieceLoad, ErrorsNameTheFileAndTheProblem) {
  TempDir dir;
  const auto expect_bad = [&](const std::string& bytes, const std::string& expected) {
    const fs::path p = dir.path / "bad.model";
    write_file(p, bytes);
    try {
      fairdiff::load_sentencepiece_tokenizer(p.string());
      ADD_FAILURE() << "loaded: " << escaped(bytes);
    } catch (const fairdiff::Error& e) {
      EXPECT_EQ(e.kind(), fairdiff::ErrorKind::BadInput) << e.what();
      EXPECT_NE(std::string(e.what()).find("bad.model"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  };
  expect_bad("", "no pieces");
  expect_bad("this is not a protobuf", "not a valid SentencePiece model");
  expect_bad(std::string("\x0a\x05\x0a\x01", 4), "runs past the end");          // truncated piece
  expect_bad(std::string("\x0a\x05\x0a\x01x\x18\x01", 7), "no unknown piece");  // only "x", NORMAL
  expect_bad(std::string("\x0a\x05\x0a\x01x\x18\x09", 7), "piece type 9");      // bad enum
  expect_bad(std::string("\x0a\x05\x0a\x01x\x18\x02\x0a\x05\x0a\x01x\x18\x02", 14), "defined twice");
  expect_bad(std::string("\x0a\x05\x0a\x01x\x18\x06", 7), "byte_fallback is false");  // BYTE piece
}

// --- robustness ----------------------------------------------------------------------

// Truncations and random corruptions of real model files: loading and encoding may
// fail, but only with fairdiff::Error.
TEST(SentencePieceRobust, CorruptModelsThrowNeverCrash) {
  TempDir dir;
  for (const char* flags : {"--model_type=unigram", "--model_type=bpe --byte_fallback=true"}) {
    const fs::path sub = dir.path / (std::string(flags).find("bpe") != std::string::npos ? "bpe" : "unigram");
    fs::create_directories(sub);
    const std::string original = read_file(train(sub, std::string(flags) + kUserSymbols));
    ASSERT_GT(original.size(), 1000u);
    std::mt19937 rng(7);
    std::vector<std::string> variants;
    for (size_t n = 0; n < 64; ++n) variants.push_back(original.substr(0, n));
    for (int i = 1; i < 100; ++i) variants.push_back(original.substr(0, original.size() * i / 100));
    for (int i = 0; i < 400; ++i) {
      std::string v = original;
      const int edits = 1 + static_cast<int>(rng() % 8);
      for (int e = 0; e < edits; ++e) {
        const size_t at = rng() % v.size();
        switch (rng() % 3) {
          case 0:
            v[at] = static_cast<char>(rng());
            break;  // overwrite
          case 1:
            v[at] = static_cast<char>(v[at] ^ (1 << (rng() % 8)));
            break;  // flip a bit
          case 2:
            v.erase(at, 1 + rng() % 4);
            break;  // delete
        }
      }
      variants.push_back(v);
    }
    const fs::path p = sub / "corrupt.model";
    int loaded = 0, rejected = 0;
    for (const std::string& v : variants) {
      write_file(p, v);
      try {
        const auto tok = fairdiff::load_sentencepiece_tokenizer(p.string());
        ++loaded;
        for (size_t i = 0; i < 40; ++i) {
          try {
            tok->encode_ids(test_strings()[i * 7]);
          } catch (const fairdiff::Error&) {
          }
        }
      } catch (const fairdiff::Error&) {
        ++rejected;
      }
    }
    std::printf("[ robust   ] %s: %zu variants, %d loaded, %d rejected\n", flags, variants.size(), loaded, rejected);
  }
}

}  // namespace
