// PNG files with text chunks: written with stb_image_write, text chunks
// (tEXt when the text is Latin-1, iTXt otherwise) inserted after IHDR so that
// PNG-info readers (PIL, A1111's "PNG Info", exiftool) find them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fairdiff {

struct PngText {
  std::string keyword;  // 1-79 Latin-1 characters, e.g. "parameters"
  std::string text;     // UTF-8
};

// Encodes 8-bit RGB pixels (row-major, height x width x 3) as PNG bytes.
std::string encode_png(const uint8_t* rgb, int width, int height, const std::vector<PngText>& texts);

// Writes the PNG atomically (temporary name, then rename; see write_file_atomic for `owner`).
void write_png(const std::string& path, const uint8_t* rgb, int width, int height, const std::vector<PngText>& texts,
               const std::string& owner = {});

// The tEXt/iTXt chunks of a PNG file (text as UTF-8); throws BadInput when the
// file is not a complete PNG (bad signature, truncated chunk, CRC mismatch, no IEND).
std::vector<PngText> read_png_text(const std::string& path);

// The width and height that a PNG's IHDR chunk claims, read without decoding anything
// (check them before decoding: a small file can claim gigapixels). Throws BadInput when
// the file does not start with the PNG signature and an IHDR chunk.
struct PngSize {
  int64_t width = 0, height = 0;
};
PngSize read_png_size(const std::string& path);

// True when `path` is a complete PNG (signature, every chunk's CRC, IEND at the end).
bool png_is_complete(const std::string& path);

// UTF-8 -> Latin-1 when every code point is <= U+00FF; false otherwise.
bool utf8_to_latin1(const std::string& utf8, std::string* latin1);

}  // namespace fairdiff
