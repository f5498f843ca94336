// The safetensors reader trusts nothing: every malformed header is one clear error.
#include <cstring>
#include <fstream>

#include "safetensors.h"
#include "test_util.h"

namespace fairdiff {
namespace {

using test::TempDir;

// Writes 8-byte length + header + data exactly as given (to craft bad files).
void write_raw(const std::string& path, const std::string& header, size_t data_bytes, int64_t length_field = -1) {
  std::ofstream out(path, std::ios::binary);
  uint64_t n = length_field < 0 ? header.size() : static_cast<uint64_t>(length_field);
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\0');
}

std::vector<uint8_t> floats(std::initializer_list<float> v) {
  std::vector<uint8_t> bytes(v.size() * 4);
  std::memcpy(bytes.data(), v.begin(), bytes.size());
  return bytes;
}

TEST(SafeTensors, RoundTripAllDtypes) {
  TempDir dir;
  const std::string path = dir / "t.safetensors";
  std::vector<TensorData> tensors = {
      {"b.weight", DType::F32, {2, 2}, floats({1, 2, 3, 4})},
      {"a.half", DType::F16, {3}, std::vector<uint8_t>(6, 1)},
      {"c.bf16", DType::BF16, {1, 1}, std::vector<uint8_t>(2, 2)},
      {"d.ids", DType::I64, {2}, std::vector<uint8_t>(16, 3)},
      {"e.empty", DType::F32, {0, 4}, {}},
  };
  write_safetensors(path, tensors, {{"format", "pt"}});
  const SafeTensors st(path);
  ASSERT_EQ(st.tensors().size(), 5u);
  EXPECT_EQ(st.metadata().at("format"), "pt");
  const TensorView& w = st.at("b.weight");
  EXPECT_EQ(w.dtype, DType::F32);
  EXPECT_EQ(w.shape, (std::vector<int64_t>{2, 2}));
  float values[4];
  std::memcpy(values, w.data, 16);
  EXPECT_EQ(values[3], 4.0f);
  EXPECT_EQ(st.at("a.half").dtype, DType::F16);
  EXPECT_EQ(st.at("c.bf16").dtype, DType::BF16);
  EXPECT_EQ(st.at("d.ids").nbytes, 16u);
  EXPECT_EQ(st.find("missing"), nullptr);
  test::expect_error([&] { st.at("missing"); }, ErrorKind::BadInput, {"t.safetensors", "missing"});
}

TEST(SafeTensors, MissingFile) {
  test::expect_error([] { SafeTensors("/nonexistent/x.safetensors"); }, ErrorKind::BadInput,
                     {"/nonexistent/x.safetensors", "cannot open"});
}

TEST(SafeTensors, TruncatedBelowHeaderLength) {
  TempDir dir;
  std::ofstream(dir / "short.safetensors") << "abc";
  test::expect_error([&] { SafeTensors(dir / "short.safetensors"); }, ErrorKind::BadInput,
                     {"short.safetensors", "fewer than the 8-byte"});
}

TEST(SafeTensors, HeaderLengthPastEndOfFile) {
  TempDir dir;
  write_raw(dir / "h.safetensors", "{}", 0, 4096);
  test::expect_error([&] { SafeTensors(dir / "h.safetensors"); }, ErrorKind::BadInput,
                     {"h.safetensors", "header length 4096 runs past the end"});
}

TEST(SafeTensors, TruncatedDataSection) {
  TempDir dir;
  write_raw(dir / "t.safetensors", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  test::expect_error([&] { SafeTensors(dir / "t.safetensors"); }, ErrorKind::BadInput,
                     {"t.safetensors", "'w'", "outside the 8-byte data section"});
}

TEST(SafeTensors, InvalidJson) {
  TempDir dir;
  write_raw(dir / "j.safetensors", R"({"w":{"dtype":"F32",)", 0);
  test::expect_error([&] { SafeTensors(dir / "j.safetensors"); }, ErrorKind::BadInput,
                     {"j.safetensors", "not a well-formed JSON"});
}

TEST(SafeTensors, OffsetsOutOfRange) {
  TempDir dir;
  write_raw(dir / "o.safetensors", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8);
  test::expect_error([&] { SafeTensors(dir / "o.safetensors"); }, ErrorKind::BadInput,
                     {"o.safetensors", "data_offsets [8, 4]"});
}

TEST(SafeTensors, OverlappingTensors) {
  TempDir dir;
  write_raw(dir / "v.safetensors",
            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
            12);
  test::expect_error([&] { SafeTensors(dir / "v.safetensors"); }, ErrorKind::BadInput,
                     {"v.safetensors", "overlaps"});
}

TEST(SafeTensors, GapAndTrailingBytes) {
  TempDir dir;
  write_raw(dir / "g.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8);
  test::expect_error([&] { SafeTensors(dir / "g.safetensors"); }, ErrorKind::BadInput, {"4 unused bytes"});
  write_raw(dir / "e.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8);
  test::expect_error([&] { SafeTensors(dir / "e.safetensors"); }, ErrorKind::BadInput, {"4 bytes after"});
}

TEST(SafeTensors, SizeMustMatchShape) {
  TempDir dir;
  write_raw(dir / "s.safetensors", R"({"w":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}})", 8);
  test::expect_error([&] { SafeTensors(dir / "s.safetensors"); }, ErrorKind::BadInput,
                     {"s.safetensors", "'w' has 8 bytes", "needs 6"});
}

TEST(SafeTensors, UnknownDtype) {
  TempDir dir;
  write_raw(dir / "d.safetensors", R"({"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", 4);
  test::expect_error([&] { SafeTensors(dir / "d.safetensors"); }, ErrorKind::Unsupported,
                     {"d.safetensors", "F8_E4M3"});
}

TEST(SafeTensors, BadShapeAndMetadata) {
  TempDir dir;
  write_raw(dir / "n.safetensors", R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4);
  test::expect_error([&] { SafeTensors(dir / "n.safetensors"); }, ErrorKind::BadInput, {"negative"});
  write_raw(dir / "m.safetensors", R"({"__metadata__":{"k":1}})", 0);
  test::expect_error([&] { SafeTensors(dir / "m.safetensors"); }, ErrorKind::BadInput, {"__metadata__"});
  write_raw(dir / "x.safetensors", R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4);
  test::expect_error([&] { SafeTensors(dir / "x.safetensors"); }, ErrorKind::BadInput, {"larger than"});
}

}  // namespace
}  // namespace fairdiff
