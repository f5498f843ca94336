#!/usr/bin/env python3
"""Generate src/text/unicode_tables.inc: the Unicode data the CLIP tokenizer needs.

The tokenizer must reproduce Python's `unicodedata` and `str.lower()` exactly (the
reference tokenizer is Python), so the tables are taken from the running Python rather
than from the UCD text files. Run with the Python whose Unicode version you want:

    python3 scripts/gen_unicode_tables.py > src/text/unicode_tables.inc

The build never runs this script; the generated file is committed.

Tables (all sorted by code point, searched with binary search):
  kCharClassRuns      runs of character flags: (start << 8) | flags, valid up to the next start
  kCombiningClassRuns runs of canonical combining classes: (start << 8) | ccc
  kCanonicalDecomposition  {code point, first, second} one level of canonical decomposition
                      (second = 0 for singletons); bit 31 of the code point marks characters
                      that NFC never composes to (composition exclusions, non-starter
                      decompositions). Hangul syllables are algorithmic and not listed.
  kLowerRanges        {first, last, stride, delta}: str.lower() of every stride-th code point
                      in [first, last] is the code point + delta (single code point results)
  kLowerSpecial       {code point, a, b}: the one-to-two lower-case mappings
  kWidthRanges        ftfy's character-width fix (NFKC of U+FF01..U+FFEF, U+3000), same
                      layout as kLowerRanges; kWidthSpecial its one-to-two mappings
  kCp1252High         windows-1252 bytes 0x80..0x9F as code points, undefined bytes kept as
                      the C1 control of the same value ("sloppy" windows-1252, as ftfy)
  kHtmlEntities       {name without '&' and ';', UTF-8 value}, sorted by name: the HTML 4
                      entities plus &apos; as ftfy decodes them (also their upper-cased forms)
"""

import html
import html.entities
import sys
import unicodedata

MAX_CP = 0x110000

FLAG_LETTER = 1          # general category L*
FLAG_NUMBER = 2          # general category N*
FLAG_OTHER = 4           # general category C* (Cc, Cf, Cs, Co, and Cn = unassigned)
FLAG_SPACE_SEPARATOR = 8 # general category Zs
FLAG_ISSPACE = 16        # Python str.isspace()
FLAG_CASED = 32          # Unicode Cased (the context of the final-sigma rule)
FLAG_CASE_IGNORABLE = 64 # Unicode Case_Ignorable


def is_cased(ch):
    # Cased = Lowercase or Uppercase or Lt; Python exposes exactly these three.
    return ch.islower() or ch.isupper() or ch.istitle()


def is_case_ignorable(ch):
    # Python has no direct accessor, but str.lower() applies the final-sigma rule
    # (a capital sigma after a cased letter, skipping case-ignorable characters, and
    # not followed by one, becomes the final form). Probe that rule.
    if is_cased(ch):
        return (ch + "\u03a3").lower()[-1] == "\u03c3"
    return ("A" + ch + "\u03a3").lower()[-1] == "\u03c2"


def char_flags(cp):
    ch = chr(cp)
    cat = unicodedata.category(ch)
    flags = 0
    if cat[0] == "L":
        flags |= FLAG_LETTER
    if cat[0] == "N":
        flags |= FLAG_NUMBER
    if cat[0] == "C":
        flags |= FLAG_OTHER
    if cat == "Zs":
        flags |= FLAG_SPACE_SEPARATOR
    if ch.isspace():
        flags |= FLAG_ISSPACE
    if is_cased(ch):
        flags |= FLAG_CASED
    if is_case_ignorable(ch):
        flags |= FLAG_CASE_IGNORABLE
    return flags


def runs(value_of):
    out, prev = [], None
    for cp in range(MAX_CP):
        v = value_of(cp)
        if v != prev:
            out.append((cp, v))
            prev = v
    return out


def delta_ranges(mapping):
    """mapping: {cp: mapped cp}. Greedy runs {first, last, stride, delta}."""
    out = []
    cps = sorted(mapping)
    i = 0
    while i < len(cps):
        first = cps[i]
        delta = mapping[first] - first
        best = (first, 1, 0)  # last, stride, count beyond the first
        for stride in (1, 2):
            j, last = i, first
            while j + 1 < len(cps) and cps[j + 1] == last + stride and mapping[cps[j + 1]] - cps[j + 1] == delta:
                j += 1
                last = cps[j]
            if j - i > best[2]:
                best = (last, stride, j - i)
        last, stride, extra = best
        out.append((first, last, stride, delta))
        i += extra + 1
    return out


def c_string(s):
    return '"' + "".join("\\x%02x" % b if (b < 0x20 or b >= 0x7F or b in (0x22, 0x5C)) else chr(b)
                         for b in s.encode("utf-8")) + '"'


def emit_u32(name, values, per_line=8):
    lines = ["constexpr uint32_t %s[] = {" % name]
    for i in range(0, len(values), per_line):
        lines.append("    " + ", ".join("0x%x" % v for v in values[i:i + per_line]) + ",")
    lines.append("};")
    return "\n".join(lines)


def emit_rows(name, ctype, rows, per_line=4):
    lines = ["constexpr %s %s[][%d] = {" % (ctype, name, len(rows[0]))]
    for i in range(0, len(rows), per_line):
        lines.append("    " + " ".join("{" + ", ".join(fmt(v) for v in r) + "}," for r in rows[i:i + per_line]))
    lines.append("};")
    return "\n".join(lines)


def fmt(v):
    return ("0x%x" % v) if v >= 0 else ("-0x%x" % -v)


def html_entities():
    # ftfy decodes every HTML5 entity name that ends in ';', plus the upper-cased form of
    # all-lower-case names when that form is not itself an entity (value upper-cased).
    # To keep the table small we keep the HTML 4 names (and &apos;), in any case.
    keep = {n.lower() for n in html.entities.name2codepoint} | {"apos"}
    entities = {}
    for name, value in html.entities.html5.items():
        if not name.endswith(";") or name[:-1].lower() not in keep:
            continue
        entities[name[:-1]] = value
        if name == name.lower():
            upper = name.upper()
            if html.unescape("&" + upper) == "&" + upper:
                entities[upper[:-1]] = value.upper()
    return sorted(entities.items(), key=lambda kv: kv[0].encode("utf-8"))


def main():
    out = []
    out.append("// Generated by scripts/gen_unicode_tables.py from Python %s unicodedata "
               "(Unicode %s). Do not edit." % (sys.version.split()[0], unicodedata.unidata_version))
    out.append("// Layout of each table: see the script's docstring.")
    out.append('constexpr char kUnicodeVersion[] = "%s";' % unicodedata.unidata_version)
    out.append("constexpr uint32_t kFlagLetter = %d, kFlagNumber = %d, kFlagOther = %d, "
               "kFlagSpaceSeparator = %d,\n                   kFlagIsSpace = %d, kFlagCased = %d, "
               "kFlagCaseIgnorable = %d;" % (FLAG_LETTER, FLAG_NUMBER, FLAG_OTHER, FLAG_SPACE_SEPARATOR,
                                            FLAG_ISSPACE, FLAG_CASED, FLAG_CASE_IGNORABLE))

    out.append(emit_u32("kCharClassRuns", [(cp << 8) | f for cp, f in runs(char_flags)]))
    out.append(emit_u32("kCombiningClassRuns",
                        [(cp << 8) | c for cp, c in runs(lambda cp: unicodedata.combining(chr(cp)))]))

    decomp = []
    for cp in range(MAX_CP):
        d = unicodedata.decomposition(chr(cp))
        if not d or d.startswith("<"):
            continue
        parts = [int(x, 16) for x in d.split()]
        assert len(parts) in (1, 2), (hex(cp), d)
        composes = len(parts) == 2 and unicodedata.normalize("NFC", chr(cp)) == chr(cp)
        first = cp | (0 if composes else 0x80000000)
        decomp.append((first, parts[0], parts[1] if len(parts) == 2 else 0))
    out.append(emit_rows("kCanonicalDecomposition", "uint32_t", decomp))

    lower, special = {}, []
    for cp in range(MAX_CP):
        low = chr(cp).lower()
        if low == chr(cp):
            continue
        if len(low) == 1:
            lower[cp] = ord(low)
        else:
            assert len(low) == 2, hex(cp)
            special.append((cp, ord(low[0]), ord(low[1])))
    out.append(emit_rows("kLowerRanges", "int32_t", delta_ranges(lower)))
    out.append(emit_rows("kLowerSpecial", "uint32_t", special))

    width, width_special = {0x3000: 0x20}, []
    for cp in range(0xFF01, 0xFFF0):
        n = unicodedata.normalize("NFKC", chr(cp))
        if n == chr(cp):
            continue
        if len(n) == 1:
            width[cp] = ord(n)
        else:
            assert len(n) == 2, hex(cp)
            width_special.append((cp, ord(n[0]), ord(n[1])))
    out.append(emit_rows("kWidthRanges", "int32_t", delta_ranges(width)))
    out.append(emit_rows("kWidthSpecial", "uint32_t", width_special))

    cp1252 = [ord(bytes([b]).decode("cp1252", errors="ignore") or chr(b)) for b in range(0x80, 0xA0)]
    out.append(emit_u32("kCp1252High", cp1252))

    lines = ["constexpr const char* kHtmlEntities[][2] = {"]
    for name, value in html_entities():
        lines.append("    {%s, %s}," % (c_string(name), c_string(value)))
    lines.append("};")
    out.append("\n".join(lines))

    sys.stdout.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
