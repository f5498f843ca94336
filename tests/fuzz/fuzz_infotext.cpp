// A1111 infotext (the PNG "parameters" text): parse_infotext on the input, then the round
// trip format -> parse of what it found; python_float on the input's first 8 bytes.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>

#include "fuzz_util.h"
#include "infotext.h"

namespace {

// Keys A1111 writes (word characters, spaces, '-', '/', no leading or trailing space) survive
// the round trip; values are quoted as needed. Anything else is not expected to.
bool plain_key(const std::string& key) {
  if (key.size() < 2 || key.front() == ' ' || key.back() == ' ') return false;
  for (unsigned char c : key)
    if (!(std::isalnum(c) || c == '_' || c == ' ' || c == '-' || c == '/')) return false;
  return std::isalnum(static_cast<unsigned char>(key[0])) || key[0] == '_';
}

bool valid_utf8(const std::string& text) {
  try {
    (void)nlohmann::json(text).dump();
    return true;
  } catch (const nlohmann::json::type_error&) {
    return false;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const fairdiff::Infotext info = fairdiff::parse_infotext(text);
  const std::string formatted = fairdiff::format_infotext(info);
  const fairdiff::Infotext again = fairdiff::parse_infotext(formatted);
  // Parameters read from a well-formed line read back the same after formatting.
  // (Invalid UTF-8 in a quoted value is written as U+FFFD, so it cannot read back.)
  bool plain = info.params.size() >= 3 && valid_utf8(text);
  for (const auto& [key, value] : info.params)
    plain = plain && plain_key(key) && key != value && !value.empty() && value.find_first_of("\"\\\n\r") == std::string::npos &&
            value.front() != ' ' && value.back() != ' ';
  if (plain && again.params != info.params) {
    std::fprintf(stderr, "params changed in the round trip:\n%s\n", formatted.c_str());
    std::abort();
  }
  if (size >= 8) {
    double d;
    std::memcpy(&d, data, sizeof d);
    const std::string s = fairdiff::python_float(d);
    if (std::isfinite(d) && std::strtod(s.c_str(), nullptr) != d) {
      std::fprintf(stderr, "python_float(%.17g) = %s does not read back\n", d, s.c_str());
      std::abort();
    }
  }
  return 0;
}
