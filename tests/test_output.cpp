// PNG text chunks and A1111 parameters: what existing PNG-info readers will see.
#include <filesystem>
#include <fstream>

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
}

}  // namespace
}  // namespace fairdiff
