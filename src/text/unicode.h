// UTF-8 for the tokenizers: one decoder, read the way both CLIP (Python's str) and
// SentencePiece read their input.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace fairdiff {

// The well-formed UTF-8 character at the start of `s` (shortest form, no surrogates,
// <= U+10FFFF): its length in bytes, with its code point in *cp; 0 when `s` is empty or
// starts with a malformed or truncated sequence.
size_t utf8_char(std::string_view s, char32_t* cp);

// Decodes UTF-8; each byte that does not start a well-formed character becomes U+FFFD.
std::u32string utf8_decode(std::string_view s);

// Appends the UTF-8 bytes of `cp`.
void utf8_append(std::string& out, char32_t cp);
std::string utf8_encode(const std::u32string& text);

}  // namespace fairdiff
