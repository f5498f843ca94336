// Tokenizer tests.
//
// TokenizerUnit.* / SentencePieceUnit.*: self-contained (a toy CLIP vocabulary and a
// SentencePiece model trained here, in a temp folder).
// TokenizerFixtures.*: parity with transformers' CLIPTokenizer on the golden fixtures
// (env FAIRDIFF_FIXTURES, else ../shared/fixtures next to the repo); skipped when
// absent. Every `basic` prompt must match; `ftfy` matches are counted and printed.
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include "fairdiff/error.h"
#include "tokenizer.h"

namespace fs = std::filesystem;
using fairdiff::TextCleaner;

namespace {

// --- helpers ---------------------------------------------------------------

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary);
  f << text;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A fresh folder under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("fairdiff_tok_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : " ") + x;
  return s;
}

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (int64_t x : v) s += (s.empty() ? "" : " ") + std::to_string(x);
  return s;
}

// Python's bytes_to_unicode symbol of one byte, as UTF-8 (mirrors the tokenizer's
// table; only used to build the toy vocabulary).
std::string byte_symbol(int b, int& next_extra) {
  const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  const unsigned cp = printable ? static_cast<unsigned>(b) : 256u + static_cast<unsigned>(next_extra++);
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

// A toy CLIP tokenizer folder laid out like the real one: 256 byte symbols (ids
// 0..255), the same with "</w>" (256..511), a few merges, then BOS and EOS.
struct ToyClip {
  static constexpr int64_t kCat = 514, kDog = 516, kBos = 517, kEos = 518, kBang = '!' - '!';  // "!" is id 0
  TempDir dir;

  explicit ToyClip(const std::string& pad_token, int64_t max_length = 77) {
    nlohmann::json vocab = nlohmann::json::object();
    int extra = 0;
    std::vector<std::string> symbols;
    for (int b = 0; b < 256; ++b) symbols.push_back(byte_symbol(b, extra));
    // CLIP orders the byte symbols as bytes_to_unicode lists them: printable first.
    std::vector<std::string> ordered;
    for (int b = 0; b < 256; ++b)
      if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) ordered.push_back(symbols[b]);
    for (int b = 0; b < 256; ++b)
      if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) ordered.push_back(symbols[b]);
    int64_t id = 0;
    for (const auto& s : ordered) vocab[s] = id++;
    for (const auto& s : ordered) vocab[s + "</w>"] = id++;
    vocab["ca"] = id++;        // 512
    vocab["do"] = id++;        // 513
    vocab["cat</w>"] = id++;   // 514
    vocab["dog"] = id++;       // 515
    vocab["dog</w>"] = id++;   // 516
    vocab["<|startoftext|>"] = id++;  // 517
    vocab["<|endoftext|>"] = id++;    // 518
    write_file(dir.path / "vocab.json", vocab.dump());
    write_file(dir.path / "merges.txt", "#version: 0.2\nc a\nd o\nca t</w>\ndo g</w>\ndo g\n");
    nlohmann::json cfg = {{"bos_token", "<|startoftext|>"}, {"eos_token", "<|endoftext|>"},
                          {"unk_token", "<|endoftext|>"},   {"pad_token", pad_token},
                          {"model_max_length", max_length}};
    write_file(dir.path / "tokenizer_config.json", cfg.dump());
  }
};

// Expects `fn` to throw a fairdiff::Error whose message contains `needle`.
template <class Fn>
void expect_error_mentioning(Fn fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected a fairdiff::Error mentioning '" << needle << "'";
  } catch (const fairdiff::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
    EXPECT_EQ(e.kind(), fairdiff::ErrorKind::BadInput);
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "one line please: " << e.what();
  }
}

// --- toy CLIP ---------------------------------------------------------------

TEST(TokenizerUnit, BpeMergesByRankAndMarksWordEnds) {
  ToyClip toy("<|endoftext|>");
  auto tok = fairdiff::load_tokenizer(toy.dir.path.string());
  EXPECT_EQ(join(tok->encode_tokens("cat dog dogs")), "cat</w> dog</w> dog s</w>");
  EXPECT_EQ(join(tok->encode_ids("cat dog")), "514 516");
  EXPECT_EQ(tok->bos_id(), ToyClip::kBos);
  EXPECT_EQ(tok->eos_id(), ToyClip::kEos);
  EXPECT_EQ(tok->vocab_size(), 519);
  // Pre-tokenisation: contractions, one token per digit, punctuation runs.
  EXPECT_EQ(join(tok->encode_tokens("DON'T 42?!")), "do n</w> ' t</w> 4</w> 2</w> ? !</w>");
}

TEST(TokenizerUnit, PadsWithEndOfText) {
  ToyClip toy("<|endoftext|>");
  auto tok = fairdiff::load_tokenizer(toy.dir.path.string());
  EXPECT_EQ(tok->pad_id(), ToyClip::kEos);
  const auto t = tok->tokenize("a cat");
  ASSERT_EQ(t.input_ids.size(), 77u);
  ASSERT_EQ(t.attention_mask.size(), 77u);
  const int64_t a = tok->encode_ids("a")[0];
  EXPECT_EQ(join(std::vector<int64_t>(t.input_ids.begin(), t.input_ids.begin() + 6)),
            join({ToyClip::kBos, a, ToyClip::kCat, ToyClip::kEos, ToyClip::kEos, ToyClip::kEos}));
  EXPECT_EQ(join(std::vector<int64_t>(t.attention_mask.begin(), t.attention_mask.begin() + 6)), "1 1 1 1 0 0");
  EXPECT_EQ(t.n_tokens_untruncated, 4);
  EXPECT_FALSE(t.truncated());
}

TEST(TokenizerUnit, PadsWithExclamationMarkAndSplitsItOff) {
  ToyClip toy("!");  // SD 2.x: pad "!" = id 0, and "!" becomes an added token
  auto tok = fairdiff::load_tokenizer(toy.dir.path.string());
  EXPECT_EQ(tok->pad_id(), ToyClip::kBang);
  const auto t = tok->tokenize("cat!");
  EXPECT_EQ(join(std::vector<int64_t>(t.input_ids.begin(), t.input_ids.begin() + 6)),
            join({ToyClip::kBos, ToyClip::kCat, 0, ToyClip::kEos, 0, 0}));
  EXPECT_EQ(join(tok->encode_tokens("cat!!")), "cat</w> ! !");
  EXPECT_EQ(t.attention_mask[3], 1);
  EXPECT_EQ(t.attention_mask[4], 0);
}

TEST(TokenizerUnit, TruncationKeepsBosAnd75TokensAndEos) {
  ToyClip toy("<|endoftext|>");
  auto tok = fairdiff::load_tokenizer(toy.dir.path.string());
  auto cats = [](int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += "cat ";
    return s;
  };
  const auto t = tok->tokenize(cats(100));
  ASSERT_EQ(t.input_ids.size(), 77u);
  EXPECT_EQ(t.input_ids.front(), ToyClip::kBos);
  EXPECT_EQ(t.input_ids.back(), ToyClip::kEos);
  for (int i = 1; i <= 75; ++i) EXPECT_EQ(t.input_ids[i], ToyClip::kCat) << i;
  for (int64_t m : t.attention_mask) EXPECT_EQ(m, 1);
  EXPECT_EQ(t.n_tokens_untruncated, 102);
  EXPECT_TRUE(t.truncated());

  EXPECT_FALSE(tok->tokenize(cats(75)).truncated());
  EXPECT_EQ(tok->tokenize(cats(75)).input_ids.back(), ToyClip::kEos);
  EXPECT_TRUE(tok->tokenize(cats(76)).truncated());

  const auto short_max = tok->tokenize(cats(5), 4);  // explicit max_length
  EXPECT_EQ(join(short_max.input_ids), join({ToyClip::kBos, ToyClip::kCat, ToyClip::kCat, ToyClip::kEos}));
  EXPECT_TRUE(short_max.truncated());
}

TEST(TokenizerUnit, ModelMaxLengthFromConfig) {
  ToyClip toy("<|endoftext|>", 16);
  auto tok = fairdiff::load_tokenizer(toy.dir.path.string());
  EXPECT_EQ(tok->model_max_length(), 16);
  EXPECT_EQ(tok->tokenize("cat").input_ids.size(), 16u);
}

TEST(TokenizerUnit, SpecialTokensInsideThePrompt) {
  ToyClip toy("<|endoftext|>");
  auto tok = fairdiff::load_tokenizer(toy.dir.path.string());
  EXPECT_EQ(join(tok->encode_ids("cat <|endoftext|> dog")), join({ToyClip::kCat, ToyClip::kEos, ToyClip::kDog}));
  EXPECT_EQ(join(tok->encode_tokens("<|startoftext|>cat")), "<|startoftext|> cat</w>");
  // Upper case is lowered by the clean-up, then CLIP's pattern still finds the token.
  EXPECT_EQ(join(tok->encode_ids("<|ENDOFTEXT|>")), std::to_string(ToyClip::kEos));
}

TEST(TokenizerUnit, MissingVocabNamesTheFile) {
  ToyClip toy("<|endoftext|>");
  fs::remove(toy.dir.path / "vocab.json");
  expect_error_mentioning([&] { fairdiff::load_clip_tokenizer(toy.dir.path.string()); }, "vocab.json");
  // load_tokenizer still recognises the folder by merges.txt.
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "vocab.json");
}

TEST(TokenizerUnit, MalformedVocabNamesTheFile) {
  ToyClip toy("<|endoftext|>");
  write_file(toy.dir.path / "vocab.json", "{\"a\": 1, ");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "vocab.json");
  write_file(toy.dir.path / "vocab.json", "[1, 2]");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "vocab.json");
  write_file(toy.dir.path / "vocab.json", "{\"a\": \"one\"}");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "vocab.json");
}

TEST(TokenizerUnit, MalformedMergesNamesTheFileAndLine) {
  ToyClip toy("<|endoftext|>");
  write_file(toy.dir.path / "merges.txt", "#version: 0.2\nc a\nd o x\n");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "merges.txt");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "line 3");
  write_file(toy.dir.path / "merges.txt", "#version: 0.2\n");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "merges.txt");
  fs::remove(toy.dir.path / "merges.txt");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "merges.txt");
}

TEST(TokenizerUnit, BadConfigAndFolderErrors) {
  ToyClip toy("<pad>");  // not in the vocabulary
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "pad_token");
  write_file(toy.dir.path / "tokenizer_config.json", "{oops");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(toy.dir.path.string()); }, "tokenizer_config.json");

  TempDir empty;
  expect_error_mentioning([&] { fairdiff::load_tokenizer(empty.path.string()); }, "no tokenizer files");
  expect_error_mentioning([&] { fairdiff::load_tokenizer((empty.path / "nope").string()); }, "not a directory");
}

// --- clean-up (Python semantics) ---------------------------------------------

TEST(TokenizerUnit, BasicCleanerFollowsBasicTokenizer) {
  auto basic = [](const std::string& s) { return fairdiff::clean_text(s, TextCleaner::Basic); };
  EXPECT_EQ(basic("  A  Photo\tOF\na\r\nCat \u00a0 "), "a photo of a cat");
  EXPECT_EQ(basic("zero\u200bwidth\x01"), "zerowidth");                // C* removed
  EXPECT_EQ(basic("\u6771\u4eac\u30bf"), "\u6771 \u4eac \u30bf");      // CJK ideographs split, kana not
  EXPECT_EQ(basic("e\u0301cole"), "\u00e9cole");                        // NFC
  EXPECT_EQ(basic("\u1100\u1161\u11a8"), "\uac01");                     // Hangul composes
  EXPECT_EQ(basic("a\u0323\u0302"), "\u1ead");                          // reordered, then composed
  EXPECT_EQ(basic("\u0130stanbul"), "i\u0307stanbul");                   // full lower-case mapping
  EXPECT_EQ(basic("\u039f\u0394\u039f\u03a3 \u03a3"), "\u03bf\u03b4\u03bf\u03c2 \u03c3");  // final sigma
  EXPECT_EQ(basic("\u00c5NGSTR\u00d6M caf\u00e9"), "\u00e5ngstr\u00f6m caf\u00e9");  // accents kept
  EXPECT_EQ(basic("&amp;"), "&amp;");                                   // no HTML unescape
  EXPECT_EQ(basic(std::string("a\xff" "b")), "ab");                    // invalid UTF-8 -> U+FFFD -> dropped
}

TEST(TokenizerUnit, FtfyCleanerFixesCommonDamage) {
  auto ftfy = [](const std::string& s) { return fairdiff::clean_text(s, TextCleaner::Ftfy); };
  EXPECT_EQ(ftfy("Fish &amp; Chips &lt;3"), "fish & chips <3");
  EXPECT_EQ(ftfy("a &amp;amp; b"), "a & b");
  EXPECT_EQ(ftfy("it&#39;s &#x41;"), "it's a");
  EXPECT_EQ(ftfy("<b>&amp;</b>"), "<b>&amp;</b>");                     // looks like HTML: kept
  EXPECT_EQ(ftfy("\u201ccurly\u201d \u2018q\u2019"), "\"curly\" 'q'");
  EXPECT_EQ(ftfy("\uff21\uff22\uff23\u3000\uff11\uff12"), "abc 12");
  EXPECT_EQ(ftfy("caf\u00c3\u00a9"), "caf\u00e9");                      // UTF-8 read as Latin-1
  EXPECT_EQ(ftfy("\u00e2\u20ac\u0153hi\u00e2\u20ac\u009d"), "\"hi\"");  // ... as windows-1252
  EXPECT_EQ(ftfy("caf\u00e9 na\u00efve \u00a31"), "caf\u00e9 na\u00efve \u00a31");  // legit Latin-1 untouched
  EXPECT_EQ(ftfy("\ufb01ne"), "fine");
  EXPECT_EQ(ftfy("zero\u200bwidth"), "zero\u200bwidth");               // ftfy keeps zero-width chars
}

// --- SentencePiece -------------------------------------------------------------

TEST(SentencePieceUnit, TrainedModelRoundTrips) {
  TempDir dir;
  std::string corpus;
  const char* sentences[] = {"a photo of a cat", "a photo of a dog", "a painting of a horse on mars",
                             "portrait of a doctor, highly detailed", "a nurse in a hospital",
                             "the quick brown fox jumps over the lazy dog"};
  for (int rep = 0; rep < 20; ++rep)
    for (const char* s : sentences) corpus += std::string(s) + "\n";
  write_file(dir.path / "corpus.txt", corpus);
  const std::string args = "--input=" + (dir.path / "corpus.txt").string() + " --model_prefix=" +
                           (dir.path / "spiece").string() +
                           " --vocab_size=40 --hard_vocab_limit=false --model_type=unigram --character_coverage=1.0"
                           " --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1 --minloglevel=2";
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  ASSERT_TRUE(status.ok()) << status.ToString();

  auto tok = fairdiff::load_tokenizer(dir.path.string());  // finds spiece.model
  EXPECT_EQ(tok->bos_id(), -1);
  EXPECT_EQ(tok->eos_id(), 1);
  EXPECT_EQ(tok->pad_id(), 0);
  EXPECT_GT(tok->vocab_size(), 3);
  EXPECT_LE(tok->vocab_size(), 40);

  const std::string text = "a photo of a horse";
  const auto pieces = tok->encode_tokens(text);
  const auto ids = tok->encode_ids(text);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(pieces.size(), ids.size());
  std::string rebuilt;
  for (const auto& p : pieces) rebuilt += p;
  const std::string space = "\xe2\x96\x81";  // U+2581, SentencePiece's word marker
  for (size_t pos; (pos = rebuilt.find(space)) != std::string::npos;) rebuilt.replace(pos, space.size(), " ");
  EXPECT_EQ(rebuilt, " " + text);

  const auto t = tok->tokenize(text);  // no BOS in this model: ids + EOS + padding
  ASSERT_EQ(t.input_ids.size(), 77u);
  EXPECT_EQ(join(std::vector<int64_t>(t.input_ids.begin(), t.input_ids.begin() + ids.size())), join(ids));
  EXPECT_EQ(t.input_ids[ids.size()], 1);
  EXPECT_EQ(t.input_ids[ids.size() + 1], 0);
  EXPECT_EQ(t.attention_mask[ids.size()], 1);
  EXPECT_EQ(t.attention_mask[ids.size() + 1], 0);
  EXPECT_EQ(t.n_tokens_untruncated, static_cast<int64_t>(ids.size()) + 1);

  write_file(dir.path / "tokenizer_config.json", R"({"model_max_length": 8, "pad_token": "</s>"})");
  auto tok8 = fairdiff::load_tokenizer(dir.path.string());
  EXPECT_EQ(tok8->model_max_length(), 8);
  EXPECT_EQ(tok8->pad_id(), 1);
}

TEST(SentencePieceUnit, BadModelNamesTheFile) {
  TempDir dir;
  write_file(dir.path / "spiece.model", "this is not a protobuf");
  expect_error_mentioning([&] { fairdiff::load_tokenizer(dir.path.string()); }, "spiece.model");
}

// --- golden fixtures ------------------------------------------------------------

fs::path fixtures_root() {
  if (const char* env = std::getenv("FAIRDIFF_FIXTURES")) return env;
#ifdef FAIRDIFF_SOURCE_DIR
  return fs::path(FAIRDIFF_SOURCE_DIR) / ".." / "shared" / "fixtures";
#else
  return "../shared/fixtures";
#endif
}

// out.input_ids of a case's .safetensors file ([N, 77] int64, little-endian).
std::vector<std::vector<int64_t>> read_expected_ids(const fs::path& file, const std::string& key) {
  const std::string bytes = read_file(file);
  if (bytes.size() < 8) return {};
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[i]);
  const auto header = nlohmann::json::parse(bytes.substr(8, header_len));
  const auto& entry = header.at(key);
  const int64_t rows = entry["shape"][0], cols = entry["shape"][1];
  const size_t begin = 8 + header_len + entry["data_offsets"][0].get<size_t>();
  std::vector<std::vector<int64_t>> out(rows, std::vector<int64_t>(cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      uint64_t v = 0;
      const size_t at = begin + 8 * (r * cols + c);
      for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(bytes[at + i]);
      out[r][c] = static_cast<int64_t>(v);
    }
  return out;
}

struct CaseResult {
  int n = 0, matched = 0;
  std::vector<std::string> failures;
};

// Runs one manifest case; a prompt matches when its BPE tokens, untruncated ids,
// padded ids and attention mask all equal the reference.
CaseResult run_case(const fs::path& root, const nlohmann::json& c) {
  const TextCleaner cleaner = c["params"]["cleaner"] == "ftfy" ? TextCleaner::Ftfy : TextCleaner::Basic;
  auto tok = fairdiff::load_tokenizer((root / c["tokenizer_dir"].get<std::string>()).string(), cleaner);
  EXPECT_EQ(tok->pad_id(), c["params"]["pad_token_id"].get<int64_t>());
  EXPECT_EQ(tok->bos_id(), c["params"]["bos_token_id"].get<int64_t>());
  EXPECT_EQ(tok->eos_id(), c["params"]["eos_token_id"].get<int64_t>());
  const int64_t max_length = c["params"]["max_length"];
  EXPECT_EQ(tok->model_max_length(), max_length);

  const fs::path file = root / "tokenizer" / c["file"].get<std::string>();
  const auto expected_ids = read_expected_ids(file, "out.input_ids");
  const auto expected_mask = read_expected_ids(file, "out.attention_mask");

  CaseResult result;
  for (const auto& p : c["prompts"]) {
    const size_t index = p["index"];
    const std::string prompt = p["prompt"];
    const auto want_tokens = p["bpe_tokens"].get<std::vector<std::string>>();
    const auto want_ids = p["ids_untruncated"].get<std::vector<int64_t>>();

    const auto tokens = tok->encode_tokens(prompt);
    std::vector<int64_t> ids = {tok->bos_id()};
    for (int64_t id : tok->encode_ids(prompt)) ids.push_back(id);
    ids.push_back(tok->eos_id());
    const auto t = tok->tokenize(prompt);

    std::string why;
    if (tokens != want_tokens) why += "\n    tokens   " + join(tokens) + "\n    expected " + join(want_tokens);
    if (ids != want_ids) why += "\n    ids      " + join(ids) + "\n    expected " + join(want_ids);
    if (t.n_tokens_untruncated != static_cast<int64_t>(want_ids.size())) why += "\n    n_tokens_untruncated differs";
    if (index < expected_ids.size() && t.input_ids != expected_ids[index]) why += "\n    padded input_ids differ";
    if (index < expected_mask.size() && t.attention_mask != expected_mask[index]) why += "\n    attention_mask differs";
    if (expected_ids.empty()) why += "\n    cannot read " + file.string();
    ++result.n;
    if (why.empty()) {
      ++result.matched;
    } else {
      result.failures.push_back("#" + std::to_string(index) + " " + nlohmann::json(prompt).dump() + why);
    }
  }
  return result;
}

class TokenizerFixtures : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fixtures_root();
    const fs::path manifest = root_ / "tokenizer" / "manifest.json";
    if (!fs::is_regular_file(manifest))
      GTEST_SKIP() << "no tokenizer fixtures at " << manifest << " (set FAIRDIFF_FIXTURES to the fixtures folder)";
    manifest_ = nlohmann::json::parse(read_file(manifest));
  }
  fs::path root_;
  nlohmann::json manifest_;
};

TEST_F(TokenizerFixtures, BasicCleanerMatchesTransformersExactly) {
  int cases = 0;
  for (const auto& c : manifest_["cases"]) {
    if (c["params"]["cleaner"] != "basic") continue;
    ++cases;
    const CaseResult r = run_case(root_, c);
    std::cout << "[ fixtures ] " << c["name"].get<std::string>() << ": " << r.matched << "/" << r.n
              << " prompts match\n";
    EXPECT_EQ(r.matched, r.n) << c["name"];
    for (const auto& f : r.failures) ADD_FAILURE() << c["name"].get<std::string>() << " " << f;
  }
  EXPECT_EQ(cases, 2);
}

TEST_F(TokenizerFixtures, FtfyCleanerMatchCount) {
  for (const auto& c : manifest_["cases"]) {
    if (c["params"]["cleaner"] != "ftfy") continue;
    const CaseResult r = run_case(root_, c);
    std::cout << "[ fixtures ] " << c["name"].get<std::string>() << ": " << r.matched << "/" << r.n
              << " prompts match (ftfy is approximated; mismatches are reported, not failed)\n";
    for (const auto& f : r.failures) std::cout << "    mismatch " << f << "\n";
  }
}

TEST_F(TokenizerFixtures, LoadsTheFullVocabularyQuickly) {
  const fs::path dir = root_ / "models" / "tiny-sd1" / "tokenizer";
  const auto start = std::chrono::steady_clock::now();
  auto tok = fairdiff::load_tokenizer(dir.string());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::cout << "[ fixtures ] loading 49408 tokens + 48894 merges took " << ms << " ms\n";
  EXPECT_EQ(tok->vocab_size(), 49408);
  EXPECT_LT(ms, 1000.0);
}

}  // namespace
