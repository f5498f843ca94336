// Generation parameters in the text format AUTOMATIC1111 writes into the PNG
// `parameters` chunk, so existing PNG-info readers show our images' settings:
//
//   a photo of a doctor
//   Negative prompt: blurry
//   Steps: 50, Sampler: PLMS, Schedule type: Automatic, CFG scale: 7.0, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: sd15
//
// Values containing ',', ':' or a newline are written as JSON strings; numbers
// as Python prints them (7.0, 7.5), since A1111 formats with str().
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fairdiff {

using InfotextParams = std::vector<std::pair<std::string, std::string>>;  // ordered key -> value

struct Infotext {
  std::string prompt;
  std::string negative_prompt;  // the line is left out when empty, as A1111 does
  InfotextParams params;        // "Steps" -> "50", ...
};

std::string format_infotext(const Infotext& info);

// A1111's reader (parse_generation_parameters): prompt lines, "Negative prompt:"
// lines, then the last line of key: value pairs (JSON-quoted values unquoted).
Infotext parse_infotext(const std::string& text);

// Python's repr() of a float: shortest round-trip digits, ".0" on integral values,
// exponent form below 1e-4 and from 1e16.
std::string python_float(double value);

// A1111's quote(): the text itself, or a JSON string when it holds ',', ':' or a newline.
std::string a1111_quote(const std::string& value);

}  // namespace fairdiff
