// PNG text chunks and A1111 parameters: what existing PNG-info readers will see.
#include <filesystem>
#include <fstream>

#include <random>

#include "fs_util.h"
#include "hash_cache.h"
#include "infotext.h"
#include "png_io.h"
#include "sha256.h"
#include "test_util.h"

namespace fairdiff {
namespace {

TEST(Infotext, PythonFloat) {
  EXPECT_EQ(python_float(7.0), "7.0");
  EXPECT_EQ(python_float(7.5), "7.5");
  EXPECT_EQ(python_float(0.1), "0.1");
  EXPECT_EQ(python_float(-2.25), "-2.25");
  EXPECT_EQ(python_float(1e-05), "1e-05");
  EXPECT_EQ(python_float(0.0001), "0.0001");
  EXPECT_EQ(python_float(1e16), "1e+16");
  EXPECT_EQ(python_float(1e15), "1000000000000000.0");
  EXPECT_EQ(python_float(123.456), "123.456");
  EXPECT_EQ(python_float(1.0 / 3), "0.3333333333333333");
  EXPECT_EQ(python_float(0.0), "0.0");
}

TEST(Infotext, Quote) {
  EXPECT_EQ(a1111_quote("Euler a"), "Euler a");
  EXPECT_EQ(a1111_quote("a, b"), "\"a, b\"");
  EXPECT_EQ(a1111_quote("k: v"), "\"k: v\"");
  EXPECT_EQ(a1111_quote("line\n\"two\""), "\"line\\n\\\"two\\\"\"");
  EXPECT_EQ(a1111_quote("caf\xc3\xa9, bar"), "\"caf\xc3\xa9, bar\"");
}

TEST(Infotext, FormatMatchesA1111AndParsesBack) {
  Infotext info;
  info.prompt = "a photo of a doctor\nsecond line";
  info.negative_prompt = "blurry, low quality";
  info.params = {{"Steps", "50"},      {"Sampler", "DPM++ 2M"}, {"Schedule type", "Karras"},
                 {"CFG scale", "7.0"}, {"Seed", "42"},          {"Size", "512x512"},
                 {"Model hash", "abcdef0123"}, {"Model", "sd, v1: 5"}};
  const std::string text = format_infotext(info);
  EXPECT_EQ(text,
            "a photo of a doctor\nsecond line\nNegative prompt: blurry, low quality\n"
            "Steps: 50, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 512x512, "
            "Model hash: abcdef0123, Model: \"sd, v1: 5\"");
  const Infotext back = parse_infotext(text);
  EXPECT_EQ(back.prompt, info.prompt);
  EXPECT_EQ(back.negative_prompt, info.negative_prompt);
  EXPECT_EQ(back.params, info.params);
}

TEST(Infotext, NoNegativePromptLine) {
  Infotext info{"cat", "", {{"Steps", "20"}, {"Seed", "1"}, {"Size", "64x64"}}};
  EXPECT_EQ(format_infotext(info), "cat\nSteps: 20, Seed: 1, Size: 64x64");
  EXPECT_EQ(parse_infotext(format_infotext(info)).params.size(), 3u);
}

std::vector<uint8_t> gradient(int w, int h) {
  std::vector<uint8_t> rgb(static_cast<size_t>(w * h * 3));
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 7);
  return rgb;
}

TEST(Png, TextChunksRoundTrip) {
  test::TempDir dir;
  const auto rgb = gradient(5, 3);
  const std::vector<PngText> texts = {{"parameters", "caf\xc3\xa9 \xc3\xbf"}, {"fairdiff", "\xe6\x97\xa5\xe6\x9c\xac"}};
  write_png(dir / "a.png", rgb.data(), 5, 3, texts);
  ASSERT_TRUE(png_is_complete(dir / "a.png"));
  const auto back = read_png_text(dir / "a.png");
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[0].keyword, "parameters");
  EXPECT_EQ(back[0].text, texts[0].text);
  EXPECT_EQ(back[1].text, texts[1].text);
  // Latin-1 text goes into tEXt, anything else into iTXt.
  const std::string bytes = encode_png(rgb.data(), 5, 3, texts);
  EXPECT_NE(bytes.find("tEXtparameters"), std::string::npos);
  EXPECT_NE(bytes.find("iTXtfairdiff"), std::string::npos);
  EXPECT_EQ(bytes.find("iTXtparameters"), std::string::npos);
}

TEST(Png, IncompleteFilesAreDetected) {
  test::TempDir dir;
  const auto rgb = gradient(4, 4);
  const std::string bytes = encode_png(rgb.data(), 4, 4, {{"parameters", "x"}});
  std::ofstream(dir / "cut.png", std::ios::binary) << bytes.substr(0, bytes.size() - 5);
  EXPECT_FALSE(png_is_complete(dir / "cut.png"));
  std::string corrupt = bytes;
  corrupt[40] ^= 0x55;
  std::ofstream(dir / "crc.png", std::ios::binary) << corrupt;
  EXPECT_FALSE(png_is_complete(dir / "crc.png"));
  EXPECT_FALSE(png_is_complete(dir / "absent.png"));
  test::expect_error([&] { read_png_text(dir / "cut.png"); }, ErrorKind::BadInput, {"cut.png", "not a complete PNG"});
}

TEST(Sha256, KnownDigests) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_EQ(sha256_hex("abc", false), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

// The SHA-extension code against the portable one on every length around the block and
// padding boundaries (skipped where the CPU has no SHA extensions: nothing else to compare).
TEST(Sha256, AcceleratedEqualsPortable) {
  if (!sha256_accelerated()) GTEST_SKIP() << "this CPU has no SHA extensions";
  std::mt19937 gen(7);
  std::string bytes(1000, '\0');
  for (char& c : bytes) c = static_cast<char>(gen());
  for (size_t n = 0; n <= bytes.size(); n += (n < 200 ? 1 : 37)) {
    const std::string part = bytes.substr(0, n);
    ASSERT_EQ(sha256_hex(part, true), sha256_hex(part, false)) << n << " bytes";
  }
}

TEST(Sha256, FileInChunksEqualsBytes) {
  test::TempDir dir;
  std::string bytes(5 * 1024 * 1024 + 13, '\0');  // more than one 4 MiB read
  std::mt19937 gen(3);
  for (char& c : bytes) c = static_cast<char>(gen());
  std::ofstream(dir.path / "w.bin", std::ios::binary) << bytes;
  EXPECT_EQ(sha256_file((dir.path / "w.bin").string()), sha256_hex(bytes, false));
}

// The model-hash cache (hash_cache.h): a miss computes and stores, a hit reads, a change of
// size or modification time computes again, a corrupt cache is ignored and rewritten.
struct HashCacheTest : ::testing::Test {
  test::TempDir dir;
  std::string file = (dir.path / "model.safetensors").string();
  std::string cache = (dir.path / "cache" / "hashes.json").string();
  void write(const std::string& text) { std::ofstream(file, std::ios::binary | std::ios::trunc) << text; }
  std::string lookup(bool expect_hit) {
    bool hit = !expect_hit;
    const std::string digest = cached_sha256_file(file, cache, &hit);
    EXPECT_EQ(hit, expect_hit);
    return digest;
  }
};

TEST_F(HashCacheTest, MissThenHit) {
  write("abc");
  EXPECT_EQ(lookup(false), sha256_hex("abc"));
  EXPECT_TRUE(std::filesystem::exists(cache));
  EXPECT_EQ(lookup(true), sha256_hex("abc"));
  // A hit reads the cache, not the file: a digest planted for the same stamp comes back.
  std::string text = read_text_file(cache);
  text.replace(text.find(sha256_hex("abc")), 64, std::string(64, 'f'));
  std::ofstream(cache, std::ios::trunc) << text;
  EXPECT_EQ(lookup(true), std::string(64, 'f'));
}

TEST_F(HashCacheTest, SizeChangeInvalidates) {
  write("abc");
  const auto mtime = std::filesystem::last_write_time(file);
  lookup(false);
  write("abcd");
  std::filesystem::last_write_time(file, mtime);  // same time, other size
  EXPECT_EQ(lookup(false), sha256_hex("abcd"));
  EXPECT_EQ(lookup(true), sha256_hex("abcd"));
}

TEST_F(HashCacheTest, MtimeChangeInvalidates) {
  write("abc");
  lookup(false);
  write("xyz");  // same size
  std::filesystem::last_write_time(file, std::filesystem::last_write_time(file) + std::chrono::seconds(5));
  EXPECT_EQ(lookup(false), sha256_hex("xyz"));
  EXPECT_EQ(lookup(true), sha256_hex("xyz"));
}

TEST_F(HashCacheTest, CorruptCacheIsIgnoredAndRewritten) {
  write("abc");
  for (const std::string junk : {"{\"files\": {\"x\": 1", "not json", "[1, 2]", "{\"files\": 3}", ""}) {
    std::filesystem::create_directories(std::filesystem::path(cache).parent_path());
    std::ofstream(cache, std::ios::trunc) << junk;
    EXPECT_EQ(lookup(false), sha256_hex("abc")) << junk;
    EXPECT_EQ(lookup(true), sha256_hex("abc")) << junk;  // rewritten whole
  }
  // An entry of the wrong form counts as a miss too.
  std::ofstream(cache, std::ios::trunc) << "{\"files\": {\"" + std::filesystem::absolute(file).lexically_normal().string() +
                                               "\": {\"size\": \"3\", \"sha256\": 5}}}";
  EXPECT_EQ(lookup(false), sha256_hex("abc"));
}

TEST_F(HashCacheTest, UnwritableCacheIsNotFatal) {
  write("abc");
  std::ofstream(dir.path / "blocker") << "a file where the cache folder should be";
  bool hit = true;
  EXPECT_EQ(cached_sha256_file(file, (dir.path / "blocker" / "hashes.json").string(), &hit), sha256_hex("abc"));
  EXPECT_FALSE(hit);
  test::expect_error([&] { cached_sha256_file((dir.path / "absent").string(), cache); }, ErrorKind::BadInput,
                     {"absent", "cannot read"});
}

TEST(HashCache, Folder) {
  // Restores the variables it changes, whatever they were.
  struct SavedEnv {
    std::string name, value;
    bool set;
    explicit SavedEnv(const char* n) : name(n), set(std::getenv(n) != nullptr) { if (set) value = std::getenv(n); }
    ~SavedEnv() { set ? setenv(name.c_str(), value.c_str(), 1) : unsetenv(name.c_str()); }
  } own("FAIRDIFF_CACHE_DIR"), xdg("XDG_CACHE_HOME");
  setenv("FAIRDIFF_CACHE_DIR", "/somewhere/else", 1);
  setenv("XDG_CACHE_HOME", "/xdg", 1);
  EXPECT_EQ(hash_cache_dir(), "/somewhere/else");
  unsetenv("FAIRDIFF_CACHE_DIR");
  EXPECT_EQ(hash_cache_dir(), "/xdg/fairdiff");
  unsetenv("XDG_CACHE_HOME");
  if (const char* home = std::getenv("HOME")) EXPECT_EQ(hash_cache_dir(), std::string(home) + "/.cache/fairdiff");
}

}  // namespace
}  // namespace fairdiff
