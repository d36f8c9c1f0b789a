// UTF-8 validation for text from outside (prompts, corpus files, text handed to a tokenizer).
// Invariant: utf8_invalid_at(s) == npos exactly when s is well-formed UTF-8 per Unicode Table 3-7
// (no overlongs, no surrogates, nothing above U+10FFFF, no truncated sequence), the same rule as
// PCRE2's UTF check, Python's bytes.decode("utf-8") and Rust's str::from_utf8. Text that fails it
// is refused with the byte offset named (qforge never guesses an encoding; see README "Text encoding").
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "core/error.h"

namespace qf::data {

// A lead byte's continuation count and the allowed range of its first continuation byte (Unicode
// Table 3-7: no overlongs, no surrogates, nothing above U+10FFFF); need == 0: not a lead byte.
struct Utf8Lead {
  int need;
  unsigned char lo, hi;
};
inline Utf8Lead utf8_lead(unsigned char b) {
  if (b >= 0xC2 && b <= 0xDF) return {1, 0x80, 0xBF};
  if (b == 0xE0) return {2, 0xA0, 0xBF};
  if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) return {2, 0x80, 0xBF};
  if (b == 0xED) return {2, 0x80, 0x9F};
  if (b == 0xF0) return {3, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {3, 0x80, 0xBF};
  if (b == 0xF4) return {3, 0x80, 0x8F};
  return {0, 0x80, 0xBF};
}

// Offset of the first byte of the first ill-formed sequence, or std::string_view::npos.
inline size_t utf8_invalid_at(std::string_view s) {
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      ++i;
      continue;
    }
    const auto [need, lo, hi] = utf8_lead(b);
    if (need == 0 || i + need >= n) return i;  // not a lead byte, or cut off by the end
    for (int k = 1; k <= need; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if (k == 1 ? (c < lo || c > hi) : (c & 0xC0) != 0x80) return i;
    }
    i += need + 1;
  }
  return std::string_view::npos;
}

// "byte offset 4 (line 1, byte 0xFF)": where an ill-formed sequence starts, for messages.
inline std::string utf8_where(std::string_view s, size_t at) {
  size_t line = 1;
  for (size_t i = 0; i < at && i < s.size(); ++i) line += s[i] == '\n';
  char hex[8];
  std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned>(static_cast<unsigned char>(s[at])));
  return str("byte offset ", at, " (line ", line, ", byte ", hex, ")");
}

// Throws InputError "<what>: not valid UTF-8 at byte offset N (line L, byte 0xXX); ..." when s is
// ill-formed. `what` names the source: "--prompt", "corpus.txt", "tokenizer input".
inline void check_utf8(std::string_view s, const std::string& what) {
  const size_t at = utf8_invalid_at(s);
  if (at == std::string_view::npos) return;
  throw InputError(str(what, ": not valid UTF-8 at ", utf8_where(s, at),
                       "; qforge reads UTF-8 text only (convert it first, e.g. iconv -f latin1 -t utf-8)"));
}

}  // namespace qf::data
