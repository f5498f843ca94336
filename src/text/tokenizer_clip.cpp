// CLIP byte-level BPE tokenizer, as transformers' CLIPTokenizer (4.44) runs it:
//
//   1. split off added/special tokens (<|startoftext|>, <|endoftext|>, SD 2.x's "!")
//   2. clean each remaining piece (TextCleaner::Basic = BasicTokenizer, or ftfy)
//   3. pre-tokenise with CLIP's pattern (specials | contractions | letters | a digit |
//      other non-space runs), case-insensitively
//   4. map each piece's UTF-8 bytes to printable code points (bytes_to_unicode)
//   5. BPE with merges ranked by line order, "</w>" on the last symbol; ids from vocab.json
//
// Also here: the shared Tokenizer::tokenize (BOS/EOS, truncation, padding) and the
// load_tokenizer dispatch. The Unicode algorithms (categories, NFC, str.lower())
// follow Python's, from tables generated out of Python's unicodedata.
#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "fairdiff/error.h"
#include "string_util.h"
#include "tokenizer.h"
#include "unicode.h"

namespace fairdiff {
namespace {

namespace ucd {
#include "unicode_tables.inc"
}  // namespace ucd

namespace fs = std::filesystem;
using Text = std::u32string;  // a decoded string: one element per code point

// ---------------------------------------------------------------------------
// Unicode properties (Python's unicodedata / str methods)
// ---------------------------------------------------------------------------

// Value of a run table ((start << 8) | value, sorted) at cp.
template <size_t N>
uint32_t run_value(const uint32_t (&runs)[N], char32_t cp) {
  const uint32_t key = (static_cast<uint32_t>(cp) << 8) | 0xFF;
  const uint32_t* it = std::upper_bound(std::begin(runs), std::end(runs), key);
  return it == std::begin(runs) ? 0 : (*(it - 1) & 0xFF);
}

uint32_t flags(char32_t cp) { return cp > 0x10FFFF ? ucd::kFlagOther : run_value(ucd::kCharClassRuns, cp); }
bool is_letter(char32_t cp) { return flags(cp) & ucd::kFlagLetter; }
bool is_number(char32_t cp) { return flags(cp) & ucd::kFlagNumber; }
bool is_space(char32_t cp) { return flags(cp) & ucd::kFlagIsSpace; }  // str.isspace()
int combining_class(char32_t cp) { return static_cast<int>(run_value(ucd::kCombiningClassRuns, cp)); }

// A {first, last, stride, delta} range table applied to one code point; returns cp
// itself where no range covers it.
template <size_t N>
char32_t map_by_ranges(const int32_t (&ranges)[N][4], char32_t cp) {
  const auto c = static_cast<int32_t>(cp);
  const auto* it = std::upper_bound(std::begin(ranges), std::end(ranges), c,
                                    [](int32_t v, const int32_t(&r)[4]) { return v < r[0]; });
  if (it == std::begin(ranges)) return cp;
  const auto& r = *(it - 1);
  if (c > r[1] || (c - r[0]) % r[2] != 0) return cp;
  return static_cast<char32_t>(c + r[3]);
}

// Appends cp mapped through a range table and its one-to-two special cases.
template <size_t N, size_t M>
void append_mapped(Text& out, char32_t cp, const int32_t (&ranges)[N][4], const uint32_t (&special)[M][3]) {
  for (const auto& s : special) {
    if (s[0] == cp) {
      out.push_back(s[1]);
      out.push_back(s[2]);
      return;
    }
  }
  out.push_back(map_by_ranges(ranges, cp));
}

// Python's str.lower(): full lower-case mapping plus the final-sigma rule (a capital
// sigma preceded by a cased letter, skipping case-ignorable characters, and not
// followed by one becomes the final form).
Text python_lower(const Text& s) {
  Text out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != U'\u03A3') {
      append_mapped(out, s[i], ucd::kLowerRanges, ucd::kLowerSpecial);
      continue;
    }
    auto cased = [](char32_t c) { return (flags(c) & ucd::kFlagCased) != 0; };
    auto ignorable = [](char32_t c) { return (flags(c) & ucd::kFlagCaseIgnorable) != 0; };
    size_t j = i;
    while (j > 0 && ignorable(s[j - 1])) --j;
    bool final_sigma = j > 0 && cased(s[j - 1]);
    if (final_sigma) {
      size_t k = i + 1;
      while (k < s.size() && ignorable(s[k])) ++k;
      final_sigma = k == s.size() || !cased(s[k]);
    }
    out.push_back(final_sigma ? U'\u03C2' : U'\u03C3');
  }
  return out;
}

// --- NFC ---

constexpr char32_t kHangulSBase = 0xAC00, kHangulLBase = 0x1100, kHangulVBase = 0x1161, kHangulTBase = 0x11A7;
constexpr char32_t kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
constexpr char32_t kHangulNCount = kHangulVCount * kHangulTCount, kHangulSCount = kHangulLCount * kHangulNCount;
constexpr uint32_t kNoCompose = 0x80000000u;  // flag bit in kCanonicalDecomposition[i][0]

const uint32_t* find_decomposition(char32_t cp) {
  const auto* it = std::lower_bound(std::begin(ucd::kCanonicalDecomposition), std::end(ucd::kCanonicalDecomposition),
                                    cp, [](const uint32_t(&r)[3], char32_t v) { return (r[0] & ~kNoCompose) < v; });
  if (it == std::end(ucd::kCanonicalDecomposition) || (it[0][0] & ~kNoCompose) != cp) return nullptr;
  return *it;
}

void decompose(char32_t cp, Text& out) {
  if (cp >= kHangulSBase && cp < kHangulSBase + kHangulSCount) {
    const char32_t s = cp - kHangulSBase;
    out.push_back(kHangulLBase + s / kHangulNCount);
    out.push_back(kHangulVBase + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount != 0) out.push_back(kHangulTBase + s % kHangulTCount);
    return;
  }
  const uint32_t* d = find_decomposition(cp);
  if (!d) {
    out.push_back(cp);
    return;
  }
  decompose(d[1], out);
  if (d[2] != 0) decompose(d[2], out);
}

// The primary composite of (a, b), or 0.
char32_t compose_pair(char32_t a, char32_t b) {
  if (a >= kHangulLBase && a < kHangulLBase + kHangulLCount && b >= kHangulVBase && b < kHangulVBase + kHangulVCount)
    return kHangulSBase + ((a - kHangulLBase) * kHangulVCount + (b - kHangulVBase)) * kHangulTCount;
  if (a >= kHangulSBase && a < kHangulSBase + kHangulSCount && (a - kHangulSBase) % kHangulTCount == 0 &&
      b > kHangulTBase && b < kHangulTBase + kHangulTCount)
    return a + (b - kHangulTBase);
  static const std::unordered_map<uint64_t, char32_t> table = [] {
    std::unordered_map<uint64_t, char32_t> t;
    for (const auto& r : ucd::kCanonicalDecomposition)
      if (!(r[0] & kNoCompose)) t.emplace((uint64_t{r[1]} << 32) | r[2], r[0]);
    return t;
  }();
  const auto it = table.find((uint64_t{a} << 32) | b);
  return it == table.end() ? 0 : it->second;
}

Text nfc(const Text& s) {
  if (std::all_of(s.begin(), s.end(), [](char32_t c) { return c < 0x300; })) {
    // Below U+0300 nothing composes and only Latin-1 letters decompose to pairs
    // that recompose to themselves: already NFC.
    return s;
  }
  Text d;
  d.reserve(s.size() + 8);
  for (char32_t cp : s) decompose(cp, d);
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (combining_class(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && combining_class(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  // Canonical composition.
  Text out;
  out.reserve(d.size());
  size_t starter = Text::npos;
  int last_class = -1;  // class of the last character after the starter; -1: none yet
  for (char32_t cp : d) {
    const int cc = combining_class(cp);
    const bool blocked = last_class != -1 && (last_class == 0 || last_class >= cc);
    if (starter != Text::npos && !blocked) {
      if (const char32_t c = compose_pair(out[starter], cp)) {
        out[starter] = c;
        continue;
      }
    }
    if (cc == 0) {
      starter = out.size();
      last_class = -1;
    } else {
      last_class = cc;
    }
    out.push_back(cp);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Clean-up: BasicTokenizer (no ftfy)
// ---------------------------------------------------------------------------

// transformers' _is_chinese_char: the CJK Unified Ideograph blocks (not kana/hangul).
bool is_cjk_ideograph(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

// Python's str.split() with no argument: runs of isspace() separate words.
std::vector<Text> split_on_space(const Text& s) {
  std::vector<Text> words;
  Text cur;
  for (char32_t c : s) {
    if (is_space(c)) {
      if (!cur.empty()) words.push_back(std::move(cur)), cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) words.push_back(std::move(cur));
  return words;
}

Text basic_clean(const Text& in) {
  // _clean_text: drop NUL, U+FFFD and category C* (except \t \n \r, which are
  // whitespace); whitespace (those three, ' ' and Zs) becomes ' '. Then
  // _tokenize_chinese_chars: spaces around each CJK ideograph.
  Text t;
  t.reserve(in.size());
  for (char32_t c : in) {
    const uint32_t f = flags(c);
    const bool ws = c == ' ' || c == '\t' || c == '\n' || c == '\r' || (f & ucd::kFlagSpaceSeparator);
    if (c == 0 || c == 0xFFFD || (!ws && (f & ucd::kFlagOther))) continue;
    if (ws) {
      t.push_back(' ');
    } else if (is_cjk_ideograph(c)) {
      t.push_back(' ');
      t.push_back(c);
      t.push_back(' ');
    } else {
      t.push_back(c);
    }
  }
  // NFC, split on whitespace, lower-case each word (accents kept, no punctuation
  // split), join with single spaces.
  Text out;
  for (const Text& w : split_on_space(nfc(t))) {
    if (!out.empty()) out.push_back(' ');
    out += python_lower(w);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Clean-up: ftfy 6.x fix_text (approximation) + whitespace_clean + lower()
// ---------------------------------------------------------------------------

bool is_ascii_alnum(char32_t c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Python html.unescape of one numeric reference body ("#65" or "#x41", no ';').
// Returns false when html.unescape would not consume all of it.
bool unescape_numeric(const Text& body, Text& value) {
  size_t i = 1;
  int base = 10;
  if (i < body.size() && (body[i] == 'x' || body[i] == 'X')) base = 16, ++i;
  if (i == body.size()) return false;
  uint64_t num = 0;
  for (; i < body.size(); ++i) {
    const char32_t c = body[i];
    int digit;
    if (c >= '0' && c <= '9') digit = static_cast<int>(c - '0');
    else if (base == 16 && c >= 'a' && c <= 'f') digit = static_cast<int>(c - 'a' + 10);
    else if (base == 16 && c >= 'A' && c <= 'F') digit = static_cast<int>(c - 'A' + 10);
    else return false;
    num = std::min<uint64_t>(num * base + digit, 0x7FFFFFFF);  // saturate: all > 0x10FFFF alike
  }
  value.clear();
  if (num == 0x00) value = U"\uFFFD";
  else if (num == 0x0D) value = U"\r";
  else if (num >= 0x80 && num <= 0x9F) value.push_back(ucd::kCp1252High[num - 0x80]);
  else if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) value = U"\uFFFD";
  else if ((num >= 0x1 && num <= 0x8) || num == 0xB || (num >= 0xE && num <= 0x1F) || num == 0x7F ||
           (num >= 0xFDD0 && num <= 0xFDEF) || (num & 0xFFFE) == 0xFFFE)
    value.clear();  // html.unescape drops invalid code points
  else value.push_back(static_cast<char32_t>(num));
  return true;
}

// ftfy.fixes.unescape_html: every match of &#?[0-9A-Za-z]{1,24}; that is a known
// entity name or a fully numeric reference is decoded.
Text unescape_html(const Text& s) {
  Text out;
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '&') {
      out.push_back(s[i++]);
      continue;
    }
    size_t j = i + 1;
    const bool numeric = j < s.size() && s[j] == '#';
    if (numeric) ++j;
    const size_t name_begin = j;
    while (j < s.size() && is_ascii_alnum(s[j])) ++j;
    const size_t len = j - name_begin;
    if (len < 1 || len > 24 || j >= s.size() || s[j] != ';') {
      out.push_back(s[i++]);
      continue;
    }
    const Text body = s.substr(i + 1, j - i - 1);  // without '&' and ';'
    Text value;
    bool decoded = false;
    if (!numeric) {
      std::string name;
      for (char32_t c : body) name.push_back(static_cast<char>(c));
      const auto* it = std::lower_bound(std::begin(ucd::kHtmlEntities), std::end(ucd::kHtmlEntities), name,
                                        [](const char* const(&e)[2], const std::string& n) { return e[0] < n; });
      if (it != std::end(ucd::kHtmlEntities) && name == (*it)[0]) value = utf8_decode((*it)[1]), decoded = true;
    } else if (unescape_numeric(body, value)) {
      decoded = value.find(';') == Text::npos;  // ftfy keeps the text when a ';' remains
    }
    if (decoded) {
      out += value;
    } else {
      out.append(s, i, j + 1 - i);
    }
    i = j + 1;
  }
  return out;
}

// The byte a character has in Latin-1 / "sloppy" windows-1252 (ftfy's reading of
// mojibake), or -1.
int sloppy_byte(char32_t c) {
  if (c < 0x80 || (c >= 0xA0 && c <= 0xFF)) return static_cast<int>(c);
  for (int b = 0; b < 32; ++b)
    if (ucd::kCp1252High[b] == c) return 0x80 + b;
  if (c >= 0x80 && c <= 0x9F) return static_cast<int>(c);  // a C1 control, as Latin-1
  return -1;
}

// If s[i..] spells a valid multi-byte UTF-8 sequence in sloppy-1252 bytes, returns
// its length in characters and the decoded code point.
size_t mojibake_at(const Text& s, size_t i, char32_t& decoded) {
  const int b0 = sloppy_byte(s[i]);
  int n;
  if (b0 >= 0xC2 && b0 <= 0xDF) n = 1;
  else if (b0 >= 0xE0 && b0 <= 0xEF) n = 2;
  else if (b0 >= 0xF0 && b0 <= 0xF4) n = 3;
  else return 0;
  if (i + n >= s.size()) return 0;
  std::string bytes(1, static_cast<char>(b0));
  for (int k = 1; k <= n; ++k) {
    const int b = sloppy_byte(s[i + k]);
    if (b < 0x80 || b > 0xBF) return 0;
    bytes.push_back(static_cast<char>(b));
  }
  const Text t = utf8_decode(bytes);
  if (t.size() != 1 || t[0] == 0xFFFD) return 0;  // overlong, surrogate or out of range
  decoded = t[0];
  return static_cast<size_t>(n) + 1;
}

// Simplified ftfy.fix_encoding: text that contains UTF-8 read as Latin-1/windows-1252
// is re-decoded as a whole when it all encodes, else sequence by sequence. (ftfy's
// "badness" heuristic and its other 8-bit encodings are not reproduced.)
Text fix_encoding(const Text& s) {
  bool bad = false;
  for (size_t i = 0; i < s.size() && !bad; ++i) {
    char32_t c;
    bad = mojibake_at(s, i, c) > 0;
  }
  if (!bad) return s;
  for (bool latin1 : {true, false}) {
    std::string bytes;
    bool ok = true;
    for (char32_t c : s) {
      const int b = latin1 ? (c <= 0xFF ? static_cast<int>(c) : -1) : sloppy_byte(c);
      if (b < 0 || (!latin1 && c >= 0x80 && c <= 0x9F && b != static_cast<int>(c))) ok = false;
      if (!ok) break;
      bytes.push_back(static_cast<char>(b));
    }
    if (!ok) continue;
    const Text t = utf8_decode(bytes);
    if (std::find(t.begin(), t.end(), U'\uFFFD') == t.end()) return t;
  }
  Text out;
  for (size_t i = 0; i < s.size();) {
    char32_t c;
    if (const size_t n = mojibake_at(s, i, c)) {
      out.push_back(c);
      i += n;
    } else {
      out.push_back(s[i++]);
    }
  }
  return out;
}

char32_t uncurl_quote(char32_t c) {
  if (c == 0x02BC || (c >= 0x2018 && c <= 0x201B)) return '\'';
  if (c >= 0x201C && c <= 0x201F) return '"';
  return c;
}

// ftfy.fixes.fix_latin_ligatures.
const char* latin_ligature(char32_t c) {
  switch (c) {
    case 0x0132: return "IJ";
    case 0x0133: return "ij";
    case 0x0149: return "\u02BCn";
    case 0x01C4: return "D\u017D";
    case 0x01C5: return "D\u017E";
    case 0x01C6: return "d\u017E";
    case 0x01C7: return "LJ";
    case 0x01C8: return "Lj";
    case 0x01C9: return "lj";
    case 0x01CA: return "NJ";
    case 0x01CB: return "Nj";
    case 0x01CC: return "nj";
    case 0x01F1: return "DZ";
    case 0x01F2: return "Dz";
    case 0x01F3: return "dz";
    case 0xFB00: return "ff";
    case 0xFB01: return "fi";
    case 0xFB02: return "fl";
    case 0xFB03: return "ffi";
    case 0xFB04: return "ffl";
    case 0xFB05: return "\u017Ft";
    case 0xFB06: return "st";
    default: return nullptr;
  }
}

// ftfy's remove_control_chars set (NOT every C* character: ZWJ etc. stay).
bool is_ftfy_control(char32_t c) {
  return c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || (c >= 0x206A && c <= 0x206F) ||
         c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC);
}

// One pass of the character-level fixes, in ftfy's order.
Text ftfy_character_fixes(const Text& s) {
  Text out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    char32_t c = s[i];
    if (c >= 0x80 && c <= 0x9F) c = ucd::kCp1252High[c - 0x80];  // fix_c1_controls
    if (const char* lig = latin_ligature(c)) {                   // fix_latin_ligatures
      out += utf8_decode(lig);
      continue;
    }
    Text w;
    append_mapped(w, c, ucd::kWidthRanges, ucd::kWidthSpecial);  // fix_character_width
    for (char32_t x : w) {
      x = uncurl_quote(x);                                       // uncurl_quotes
      if (x == '\r' && i + 1 < s.size() && s[i + 1] == '\n') continue;  // fix_line_breaks
      if (x == '\r' || x == 0x2028 || x == 0x2029 || x == 0x85) x = '\n';
      out.push_back(x);
    }
  }
  // remove_terminal_escapes (ESC [ digits/semicolons letter), remove_control_chars.
  Text clean;
  clean.reserve(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] == 0x1B && i + 1 < out.size() && out[i + 1] == '[') {
      size_t j = i + 2;
      while (j < out.size() && ((out[j] >= '0' && out[j] <= '9') || out[j] == ';')) ++j;
      if (j < out.size() && out[j] < 0x80 && std::isalpha(static_cast<int>(out[j]))) {
        i = j;
        continue;
      }
    }
    if (!is_ftfy_control(out[i])) clean.push_back(out[i]);
  }
  return clean;
}

Text ftfy_fix_text(const Text& s) {
  Text out;
  const bool unescape = s.find('<') == Text::npos;  // "auto": text with '<' looks like HTML
  for (size_t pos = 0; pos < s.size();) {  // ftfy fixes line by line
    size_t end = s.find('\n', pos);
    end = end == Text::npos ? s.size() : end + 1;
    Text seg = s.substr(pos, end - pos);
    for (int pass = 0; pass < 16; ++pass) {  // ftfy repeats its fixes until nothing changes
      const Text before = seg;
      if (unescape) seg = unescape_html(seg);
      seg = nfc(ftfy_character_fixes(fix_encoding(seg)));
      if (seg == before) break;
    }
    out += seg;
    pos = end;
  }
  return out;
}

Text ftfy_clean(const Text& in) {
  // whitespace_clean: runs of whitespace -> ' ', strip; then lower() the whole text.
  Text t;
  for (const Text& w : split_on_space(ftfy_fix_text(in))) {
    if (!t.empty()) t.push_back(' ');
    t += w;
  }
  return python_lower(t);
}

Text clean(const Text& t, TextCleaner cleaner) {
  return cleaner == TextCleaner::Basic ? basic_clean(t) : ftfy_clean(t);
}

// ---------------------------------------------------------------------------
// CLIP pre-tokenisation:
//   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
// with IGNORECASE, alternatives tried in order at each position (findall).
// ---------------------------------------------------------------------------

// Case-insensitive match of an ASCII literal (lower case) at s[i..]. Simple case
// folding also equates U+017F LONG S with 's' and U+212A KELVIN SIGN with 'k'.
bool literal_at(const Text& s, size_t i, std::string_view lit) {
  if (i + lit.size() > s.size()) return false;
  for (size_t k = 0; k < lit.size(); ++k) {
    const char32_t c = s[i + k];
    const char l = lit[k];
    const bool alpha = l >= 'a' && l <= 'z';
    const bool eq = c == static_cast<char32_t>(l) || (alpha && c == static_cast<char32_t>(l - 'a' + 'A')) ||
                    (l == 's' && c == 0x017F) || (l == 'k' && c == 0x212A);
    if (!eq) return false;
  }
  return true;
}

// U+0345 COMBINING GREEK YPOGEGRAMMENI is Mn but case-folds to a letter (iota), and
// under IGNORECASE the `regex` module then matches it with neither [\p{L}] nor
// [^\s\p{L}\p{N}]: the reference silently drops it. It is the only assigned
// character (Unicode 14) that behaves so.
constexpr char32_t kMatchesNothing = 0x0345;

std::vector<Text> clip_pretokenize(const Text& s) {
  static constexpr std::string_view kLiterals[] = {"<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re",
                                                   "'ve", "'m", "'ll", "'d"};
  std::vector<Text> pieces;
  size_t i = 0;
  while (i < s.size()) {
    size_t len = 0;
    for (std::string_view lit : kLiterals) {
      if (literal_at(s, i, lit)) {
        len = lit.size();
        break;
      }
    }
    if (len == 0) {
      const char32_t c = s[i];
      if (is_letter(c)) {
        while (i + len < s.size() && is_letter(s[i + len])) ++len;
      } else if (is_number(c)) {
        len = 1;
      } else if (!is_space(c) && c != kMatchesNothing) {
        auto other = [](char32_t x) { return !is_space(x) && !is_letter(x) && !is_number(x) && x != kMatchesNothing; };
        while (i + len < s.size() && other(s[i + len])) ++len;
      }
    }
    if (len == 0) {
      ++i;  // whitespace (or U+0345): no match here
      continue;
    }
    pieces.push_back(s.substr(i, len));
    i += len;
  }
  return pieces;
}

// bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100.. in byte order, so every byte has a visible, non-space symbol.
const std::array<std::string, 256>& byte_symbols() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      utf8_append(t[b], printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + next++));
    }
    return t;
  }();
  return table;
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

std::string read_file(const fs::path& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw_bad_input(path.string(), "cannot read the " + what + " file");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

nlohmann::json parse_json(const fs::path& path, const std::string& text) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw_bad_input(path.string(), std::string("malformed JSON: ") + e.what());
  }
}

// A special-token entry: "text" or {"content": "text", ...}; empty if absent/null.
std::string token_content(const nlohmann::json& v, const fs::path& file, const std::string& key) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  if (v.is_null()) return {};
  throw_bad_input(file.string(), "'" + key + "' must be a string or an object with a string 'content', found " + v.dump());
}

struct AddedToken {
  std::string content;
  Text text;  // content, decoded
  int64_t id;
};

class ClipTokenizer final : public Tokenizer {
 public:
  struct Data {
    std::unordered_map<std::string, int64_t> vocab;
    std::unordered_map<std::string, int> merge_ranks;  // "first second" -> rank
    std::vector<AddedToken> added;  // split off before BPE, longest first
  };

  ClipTokenizer(Data data, SpecialTokenIds special, int64_t max_length, TextCleaner cleaner)
      : Tokenizer(special, max_length), d_(std::move(data)), cleaner_(cleaner) {}

  std::vector<std::string> encode_tokens(const std::string& utf8) const override {
    std::vector<std::string> tokens;
    const Text text = utf8_decode(utf8);
    size_t start = 0;  // start of the text not yet tokenised
    for (size_t i = 0; i < text.size();) {
      const AddedToken* hit = added_token_at(text, i);
      if (!hit) {
        ++i;
        continue;
      }
      bpe_piece(text.substr(start, i - start), tokens);
      tokens.push_back(hit->content);
      i += hit->text.size();
      start = i;
    }
    bpe_piece(text.substr(start), tokens);
    return tokens;
  }

  std::vector<int64_t> encode_ids(const std::string& utf8) const override {
    std::vector<int64_t> ids;
    for (const std::string& t : encode_tokens(utf8)) ids.push_back(token_id(t));
    return ids;
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(d_.vocab.size()); }

  int64_t max_id() const override {
    int64_t m = std::max({bos_id(), eos_id(), pad_id(), unk_id()});
    for (const auto& [token, id] : d_.vocab) m = std::max(m, id);
    for (const AddedToken& a : d_.added) m = std::max(m, a.id);
    return m;
  }

 private:
  // The longest added token starting at text[i] (the leftmost match wins, as
  // transformers' trie split).
  const AddedToken* added_token_at(const Text& text, size_t i) const {
    for (const AddedToken& a : d_.added)  // sorted longest first
      if (text.compare(i, a.text.size(), a.text) == 0) return &a;
    return nullptr;
  }

  int64_t token_id(const std::string& token) const {
    for (const AddedToken& a : d_.added)
      if (a.content == token) return a.id;
    const auto it = d_.vocab.find(token);
    return it == d_.vocab.end() ? unk_id() : it->second;
  }

  // CLIPTokenizer._tokenize of one piece between added tokens.
  void bpe_piece(const Text& piece, std::vector<std::string>& out) const {
    if (piece.empty()) return;
    for (const Text& word : clip_pretokenize(clean(piece, cleaner_))) {
      std::string encoded;
      for (unsigned char b : utf8_encode(word)) encoded += byte_symbols()[b];
      bpe(encoded, out);
    }
  }

  // Byte-pair merging of one pre-token, its last symbol marked with "</w>".
  void bpe(const std::string& token, std::vector<std::string>& out) const {
    if (token == "<|startoftext|>" || token == "<|endoftext|>") {  // CLIPTokenizer's bpe cache
      out.push_back(token);
      return;
    }
    std::vector<std::string> word;
    for (char32_t c : utf8_decode(token)) {
      word.emplace_back();
      utf8_append(word.back(), c);
    }
    word.back() += "</w>";
    while (word.size() > 1) {
      int best_rank = -1;
      size_t best = 0;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const auto it = d_.merge_ranks.find(word[i] + ' ' + word[i + 1]);
        if (it != d_.merge_ranks.end() && (best_rank < 0 || it->second < best_rank)) best_rank = it->second, best = i;
      }
      if (best_rank < 0) break;
      const std::string first = word[best], second = word[best + 1];
      std::vector<std::string> merged;
      merged.reserve(word.size());
      for (size_t i = 0; i < word.size(); ++i) {
        if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
          merged.push_back(first + second);
          ++i;
        } else {
          merged.push_back(std::move(word[i]));
        }
      }
      word = std::move(merged);
    }
    for (std::string& s : word) out.push_back(std::move(s));
  }

  Data d_;
  TextCleaner cleaner_;
};

// transformers reads merges.txt lines [1 : 49152 - 256 - 2 + 1]: the header is
// skipped and at most this many merges are used.
constexpr size_t kMaxClipMerges = 49152 - 256 - 2;
constexpr int64_t kDefaultMaxLength = 77;

}  // namespace

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

std::string clean_text(const std::string& utf8, TextCleaner cleaner) {
  return utf8_encode(clean(utf8_decode(utf8), cleaner));
}

TokenizedText Tokenizer::tokenize(const std::string& utf8) const { return tokenize(utf8, model_max_length()); }

TokenizedText Tokenizer::tokenize(const std::string& utf8, int64_t max_length) const {
  const std::vector<int64_t> ids = encode_ids(utf8);
  const int64_t n_special = (bos_id() >= 0) + (eos_id() >= 0);
  if (max_length < n_special)
    throw_bad_input("max_length", "must be at least " + std::to_string(n_special) + ", got " + std::to_string(max_length));
  const int64_t keep = std::min<int64_t>(static_cast<int64_t>(ids.size()), max_length - n_special);

  TokenizedText out;
  out.n_tokens_untruncated = static_cast<int64_t>(ids.size()) + n_special;
  out.input_ids.reserve(max_length);
  if (bos_id() >= 0) out.input_ids.push_back(bos_id());
  out.input_ids.insert(out.input_ids.end(), ids.begin(), ids.begin() + keep);
  if (eos_id() >= 0) out.input_ids.push_back(eos_id());
  out.attention_mask.assign(out.input_ids.size(), 1);
  out.input_ids.resize(max_length, pad_id());
  out.attention_mask.resize(max_length, 0);
  return out;
}

namespace {

// vocab.json: {"token": id, ...}
std::unordered_map<std::string, int64_t> read_vocab(const fs::path& path) {
  const nlohmann::json vocab = parse_json(path, read_file(path, "vocabulary"));
  if (!vocab.is_object() || vocab.empty())
    throw_bad_input(path.string(), "expected a non-empty JSON object {token: id}, found " +
                                       std::string(vocab.type_name()));
  std::unordered_map<std::string, int64_t> out;
  out.reserve(vocab.size());
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0)
      throw_bad_input(path.string(), "the id of token '" + token + "' must be a non-negative integer, found " +
                                         id.dump());
    out.emplace(token, id.get<int64_t>());
  }
  return out;
}

// merges.txt: a version header, then one "first second" pair per line, best first.
// Like transformers: the whole file is stripped, line 0 is skipped whatever it
// holds, and lines 1..kMaxClipMerges are read; a blank line is ignored.
std::unordered_map<std::string, int> read_merges(const fs::path& path) {
  std::istringstream lines(trim(read_file(path, "merges")));
  std::string line;
  std::unordered_map<std::string, int> ranks;
  ranks.reserve(kMaxClipMerges);
  for (size_t line_no = 0; std::getline(lines, line) && line_no <= kMaxClipMerges; ++line_no) {
    if (line_no == 0) continue;
    std::istringstream fields(line);
    std::string first, second, extra;
    fields >> first >> second >> extra;
    if (first.empty()) continue;
    if (second.empty() || !extra.empty())
      throw_bad_input(path.string(), "line " + std::to_string(line_no + 1) +
                                         ": expected two symbols separated by a space, found '" + line + "'");
    ranks.insert_or_assign(first + ' ' + second, static_cast<int>(line_no));
  }
  if (ranks.empty()) throw_bad_input(path.string(), "no merges after the header line");
  return ranks;
}

// What the optional config files say about special and added tokens.
struct TokenSettings {
  // CLIPTokenizer's defaults, overridden by tokenizer_config.json, overridden in turn by
  // special_tokens_map.json (transformers' precedence).
  std::unordered_map<std::string, std::string> special = {{"bos_token", "<|startoftext|>"},
                                                          {"eos_token", "<|endoftext|>"},
                                                          {"unk_token", "<|endoftext|>"},
                                                          {"pad_token", "<|endoftext|>"}};
  std::vector<std::pair<std::string, int64_t>> added;  // content, id
  std::vector<std::string> additional;                 // additional_special_tokens
  int64_t max_length = kDefaultMaxLength;
};

// One of tokenizer_config.json / special_tokens_map.json, over `s`.
void read_token_config(const fs::path& path, const char* name, TokenSettings& s) {
  const nlohmann::json cfg = parse_json(path, read_file(path, name));
  if (!cfg.is_object()) throw_bad_input(path.string(), "expected a JSON object");
  for (auto& [key, value] : s.special) {
    if (cfg.contains(key)) value = token_content(cfg[key], path, key);
  }
  if (cfg.contains("additional_special_tokens") && cfg["additional_special_tokens"].is_array())
    for (const auto& t : cfg["additional_special_tokens"])
      s.additional.push_back(token_content(t, path, "additional_special_tokens"));
  if (cfg.contains("added_tokens_decoder") && cfg["added_tokens_decoder"].is_object()) {
    for (const auto& [id, tok] : cfg["added_tokens_decoder"].items()) {
      int64_t n = -1;
      try {
        n = std::stoll(id);
      } catch (const std::exception&) {
      }
      if (n < 0) throw_bad_input(path.string(), "added_tokens_decoder key '" + id + "' is not a token id");
      s.added.emplace_back(token_content(tok, path, "added_tokens_decoder"), n);
    }
  }
  // Absurd values (transformers writes 1e30 for "no limit") keep the CLIP default.
  if (cfg.contains("model_max_length") && cfg["model_max_length"].is_number()) {
    const double v = cfg["model_max_length"].get<double>();
    if (v >= 2 && v <= 1e6) s.max_length = static_cast<int64_t>(v);
  }
}

// The legacy added_tokens.json: {content: id}.
void read_added_tokens(const fs::path& path, TokenSettings& s) {
  const nlohmann::json a = parse_json(path, read_file(path, "added tokens"));
  if (!a.is_object()) throw_bad_input(path.string(), "expected a JSON object {token: id}");
  for (const auto& [token, id] : a.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0)
      throw_bad_input(path.string(), "the id of '" + token + "' must be a non-negative integer, found " + id.dump());
    s.added.emplace_back(token, id.get<int64_t>());
  }
}

}  // namespace

// The tokenizer folder, in steps: (1) vocab.json, (2) merges.txt, (3) the optional token
// configs, (4) the special tokens' ids, (5) the tokens split off before BPE.
std::unique_ptr<Tokenizer> load_clip_tokenizer(const std::string& dir, TextCleaner cleaner) {
  const fs::path root(dir);
  const fs::path vocab_path = root / "vocab.json", merges_path = root / "merges.txt";
  if (!fs::is_regular_file(vocab_path))
    throw_bad_input(vocab_path.string(), "missing", "a CLIP tokenizer folder has vocab.json and merges.txt");
  if (!fs::is_regular_file(merges_path))
    throw_bad_input(merges_path.string(), "missing", "a CLIP tokenizer folder has vocab.json and merges.txt");

  ClipTokenizer::Data data;
  data.vocab = read_vocab(vocab_path);
  data.merge_ranks = read_merges(merges_path);

  TokenSettings settings;
  for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"})
    if (fs::is_regular_file(root / name)) read_token_config(root / name, name, settings);
  if (fs::is_regular_file(root / "added_tokens.json")) read_added_tokens(root / "added_tokens.json", settings);

  auto& added = settings.added;
  auto& special = settings.special;
  auto id_of = [&](const std::string& token, const std::string& key) -> int64_t {
    for (const auto& a : added)
      if (a.first == token) return a.second;
    const auto it = data.vocab.find(token);
    if (it == data.vocab.end())
      throw_bad_input((root / "tokenizer_config.json").string(), key + " '" + token + "' is not in vocab.json");
    return it->second;
  };
  SpecialTokenIds ids;
  ids.bos = id_of(special["bos_token"], "bos_token");
  ids.eos = id_of(special["eos_token"], "eos_token");
  ids.unk = id_of(special["unk_token"], "unk_token");
  ids.pad = id_of(special["pad_token"], "pad_token");

  // Every special token is also split off before BPE (transformers adds them to its
  // added-token trie), e.g. SD 2.x's pad token "!".
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"})
    added.emplace_back(special[key], id_of(special[key], key));
  for (const std::string& t : settings.additional) added.emplace_back(t, id_of(t, "additional_special_tokens"));
  std::stable_sort(added.begin(), added.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  for (const auto& token : added) {
    const auto& [content, id] = token;
    const bool seen =
        std::any_of(data.added.begin(), data.added.end(), [&](const AddedToken& d) { return d.content == token.first; });
    if (!content.empty() && !seen) data.added.push_back({content, utf8_decode(content), id});
  }

  return std::make_unique<ClipTokenizer>(std::move(data), ids, settings.max_length, cleaner);
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir, TextCleaner cleaner) {
  const fs::path root(dir);
  if (!fs::is_directory(root))
    throw_bad_input(dir, "not a directory", "pass a tokenizer folder, e.g. <model>/tokenizer");
  if (fs::exists(root / "vocab.json") || fs::exists(root / "merges.txt")) return load_clip_tokenizer(dir, cleaner);

  std::vector<fs::path> models;
  for (const char* preferred : {"spiece.model", "tokenizer.model"})
    if (fs::is_regular_file(root / preferred)) return load_sentencepiece_tokenizer((root / preferred).string());
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_regular_file() && e.path().extension() == ".model") models.push_back(e.path());
  if (models.size() == 1) return load_sentencepiece_tokenizer(models[0].string());
  if (models.size() > 1)
    throw_bad_input(dir, "several SentencePiece *.model files, cannot tell which to use",
                    "keep one, or name it spiece.model");
  const bool nested = fs::is_directory(root / "tokenizer");
  throw_bad_input(dir, "no tokenizer files: expected vocab.json + merges.txt (CLIP) or a SentencePiece *.model",
                  nested ? "this looks like a model folder: pass its tokenizer/ subfolder" : "");
}

}  // namespace fairdiff
