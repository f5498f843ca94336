// UTF-8, one decoder for the whole project: the tokenizers read text with it (as CLIP, in
// Python's str, and SentencePiece read their input) and the run plan checks prompts with it.
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

// Byte offset of the first byte of `s` that is not well-formed UTF-8 (RFC 3629: no
// overlong forms, surrogates or code points above U+10FFFF), or npos when it all is.
// Checked where text comes in, so that an error names the prompt and the byte.
size_t invalid_utf8_offset(std::string_view s);

}  // namespace fairdiff
