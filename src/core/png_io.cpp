#include "png_io.h"

#include <array>
#include <cstdio>
#include <cstring>

#include "fairdiff/error.h"
#include "fs_util.h"

#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#include <stb_image_write.h>

namespace fairdiff {
namespace {

const char kSignature[8] = {'\x89', 'P', 'N', 'G', '\r', '\n', '\x1a', '\n'};

uint32_t crc32(const std::string& bytes, size_t begin, size_t end) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = begin; i < end; ++i) c = table[(c ^ static_cast<uint8_t>(bytes[i])) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void put_u32(std::string& out, uint32_t v) {
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

uint32_t get_u32(const std::string& s, size_t at) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

std::string chunk(const std::string& type, const std::string& data) {
  std::string out;
  put_u32(out, static_cast<uint32_t>(data.size()));
  out += type;
  out += data;
  put_u32(out, crc32(out, 4, out.size()));
  return out;
}

std::string text_chunk(const PngText& t) {
  std::string latin1;
  if (utf8_to_latin1(t.text, &latin1)) return chunk("tEXt", t.keyword + '\0' + latin1);
  // iTXt: keyword, 0, compression flag 0, method 0, empty language tag, 0, empty translated keyword, 0, UTF-8 text.
  return chunk("iTXt", t.keyword + '\0' + '\0' + '\0' + '\0' + '\0' + t.text);
}

void append_bytes(void* context, void* data, int size) {
  static_cast<std::string*>(context)->append(static_cast<const char*>(data), static_cast<size_t>(size));
}

struct Chunk {
  std::string type;
  size_t data_begin, length;
};

// Walks the chunks; returns false on any structural problem.
bool parse_chunks(const std::string& png, std::vector<Chunk>* chunks) {
  if (png.size() < 8 || std::memcmp(png.data(), kSignature, 8) != 0) return false;
  size_t at = 8;
  while (at + 12 <= png.size()) {
    const uint32_t length = get_u32(png, at);
    if (length > png.size() - at - 12) return false;
    Chunk c{png.substr(at + 4, 4), at + 8, length};
    if (crc32(png, at + 4, at + 8 + length) != get_u32(png, at + 8 + length)) return false;
    chunks->push_back(c);
    at += 12 + length;
    if (c.type == "IEND") return at == png.size();
  }
  return false;
}

std::string latin1_to_utf8(const std::string& latin1) {
  std::string out;
  for (unsigned char c : latin1) {
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

}  // namespace

bool utf8_to_latin1(const std::string& utf8, std::string* latin1) {
  latin1->clear();
  for (size_t i = 0; i < utf8.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(utf8[i]);
    if (c < 0x80) {
      latin1->push_back(static_cast<char>(c));
    } else if ((c == 0xC2 || c == 0xC3) && i + 1 < utf8.size() && (utf8[i + 1] & 0xC0) == 0x80) {
      latin1->push_back(static_cast<char>(((c & 0x03) << 6) | (utf8[i + 1] & 0x3F)));
      ++i;
    } else {
      return false;
    }
  }
  return true;
}

std::string encode_png(const uint8_t* rgb, int width, int height, const std::vector<PngText>& texts) {
  std::string png;
  if (!stbi_write_png_to_func(append_bytes, &png, width, height, 3, rgb, width * 3))
    throw Error(ErrorKind::Runtime, "", "PNG encoding failed");
  // Signature (8 bytes) + IHDR (4 length + 4 type + 13 data + 4 CRC): text goes right after.
  constexpr size_t kAfterIhdr = 8 + 25;
  std::string texts_bytes;
  for (const auto& t : texts) texts_bytes += text_chunk(t);
  png.insert(kAfterIhdr, texts_bytes);
  return png;
}

void write_png(const std::string& path, const uint8_t* rgb, int width, int height, const std::vector<PngText>& texts,
               const std::string& owner) {
  write_file_atomic(path, encode_png(rgb, width, height, texts), owner);
}

std::vector<PngText> read_png_text(const std::string& path) {
  const std::string png = read_text_file(path);
  std::vector<Chunk> chunks;
  if (!parse_chunks(png, &chunks)) throw_bad_input(path, "is not a complete PNG file", "regenerate the image");
  std::vector<PngText> texts;
  for (const auto& c : chunks) {
    const std::string data = png.substr(c.data_begin, c.length);
    const size_t nul = data.find('\0');
    if (nul == std::string::npos) continue;
    if (c.type == "tEXt") {
      texts.push_back({data.substr(0, nul), latin1_to_utf8(data.substr(nul + 1))});
    } else if (c.type == "iTXt" && nul + 2 < data.size() && data[nul + 1] == '\0') {
      // Uncompressed only (what we write); skip language tag and translated keyword.
      size_t at = data.find('\0', nul + 3);
      if (at == std::string::npos) continue;
      at = data.find('\0', at + 1);
      if (at == std::string::npos) continue;
      texts.push_back({data.substr(0, nul), data.substr(at + 1)});
    }
  }
  return texts;
}

PngSize read_png_size(const std::string& path) {
  // Signature (8), IHDR's length (4) and type (4), then width and height (4 each).
  std::string head(24, '\0');
  std::FILE* f = std::fopen(path.c_str(), "rb");
  const size_t n = f ? std::fread(&head[0], 1, head.size(), f) : 0;
  if (f) std::fclose(f);
  if (n < head.size() || std::memcmp(head.data(), kSignature, 8) != 0 || head.compare(12, 4, "IHDR") != 0)
    throw_bad_input(path, "is not a PNG file (no signature and IHDR chunk)", "regenerate the image");
  return {get_u32(head, 16), get_u32(head, 20)};
}

bool png_is_complete(const std::string& path) {
  if (!is_regular_file(path)) return false;
  std::vector<Chunk> chunks;
  return parse_chunks(read_text_file(path), &chunks);
}

}  // namespace fairdiff
