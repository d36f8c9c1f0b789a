#include "data/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <iterator>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "core/error.h"
#include "core/fs.h"
#include "core/json_file.h"
#include "data/utf8.h"

namespace qf::data {
namespace {

using json = nlohmann::json;
namespace sfs = std::filesystem;

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const std::string kMeta = "\xe2\x96\x81";         // U+2581 "▁"
const std::string kReplacement = "\xef\xbf\xbd";  // U+FFFD

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Length of the UTF-8 sequence starting at s[i] (1 for invalid lead bytes).
size_t char_len(const std::string& s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
  return std::min(n, s.size() - i);
}

// The code point of the well-formed sequence of `n` bytes at s[i].
uint32_t code_point(const std::string& s, size_t i, size_t n) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k])); };
  if (n == 1) return b(0);
  uint32_t cp = b(0) & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (b(k) & 0x3F);
  return cp;
}

// Start of the code point that ends at s[end - 1] (end > 0).
size_t char_start_before(const std::string& s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80 && end - i < 4) --i;
  return i;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t i = 0;
  for (size_t p; (p = s.find(from, i)) != std::string::npos; i = p + from.size()) out += s.substr(i, p - i) + to;
  s = out + s.substr(i);
}

// Bytes to text as Rust's String::from_utf8_lossy (and Python's errors="replace"): each maximal
// ill-formed subsequence becomes one U+FFFD. The ByteLevel decoder ends with it.
std::string utf8_lossy(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    const Utf8Lead lead = utf8_lead(b);
    size_t j = i + 1;
    int got = 0;
    for (; got < lead.need && j < s.size(); ++got, ++j) {
      const auto c = static_cast<unsigned char>(s[j]);
      if (got == 0 ? (c < lead.lo || c > lead.hi) : (c & 0xC0) != 0x80) break;
    }
    if (lead.need > 0 && got == lead.need) {
      out.append(s, i, j - i);
    } else {
      out += kReplacement;
      if (lead.need == 0) j = i + 1;
    }
    i = j;
  }
  return out;
}

// Replace steps chained in a normalizer or decoder can grow text geometrically (" " -> "  " twenty
// times is 2^20x). Real tokenizers grow it by a few times at most (" " -> U+2581 is 3x, NFC at most
// 3x); past 8x + 4 KiB the file is refused rather than allowed to exhaust memory and time.
void check_growth(size_t now, size_t base, const char* stage, const std::string& origin) {
  const size_t limit = 8 * base + 4096;
  if (now > limit)
    throw InputError(str(origin, ": the ", stage, "'s Replace/Prepend steps grow ", base, " bytes of text past ", limit,
                         " bytes (the limit is 8x + 4 KiB); this tokenizer.json's ", stage,
                         " chain is not one a real tokenizer uses"));
}

// ---- NFC (Unicode canonical composition), as `tokenizers`' NFC normalizer (Qwen2/2.5/3) ----------
// Tables: data/hf_tokenizer.nfc.inc (tests/data/make_hf_nfc_tables.py): canonical decompositions
// with a flag for the primary composites, and the non-zero canonical combining classes. Hangul
// syllables are composed and decomposed arithmetically (Unicode 3.12).
#include "data/hf_tokenizer.nfc.inc"

constexpr uint32_t kComposes = 1u << 31;
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

int combining_class(uint32_t cp) {
  if (cp < 0x300) return 0;
  const auto* end = std::end(kNfcCcc);
  const auto* it =
      std::lower_bound(std::begin(kNfcCcc), end, cp, [](const uint32_t* r, uint32_t c) { return r[1] < c; });
  return it != end && (*it)[0] <= cp ? static_cast<int>((*it)[2]) : 0;
}

const uint32_t* decomposition(uint32_t cp) {
  const auto* end = std::end(kNfcDecomp);
  const auto* it = std::lower_bound(std::begin(kNfcDecomp), end, cp,
                                    [](const uint32_t* r, uint32_t c) { return (r[0] & ~kComposes) < c; });
  return it != end && ((*it)[0] & ~kComposes) == cp ? *it : nullptr;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t i = cp - kSBase;
    out.push_back(kLBase + i / kNCount);
    out.push_back(kVBase + (i % kNCount) / kTCount);
    if (i % kTCount) out.push_back(kTBase + i % kTCount);
    return;
  }
  const uint32_t* d = cp >= 0xC0 ? decomposition(cp) : nullptr;
  if (!d) {
    out.push_back(cp);
    return;
  }
  decompose(d[1], out);
  if (d[2]) decompose(d[2], out);
}

// The primary composite of (a, b), or 0.
uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  static const std::unordered_map<uint64_t, uint32_t> pairs = [] {
    std::unordered_map<uint64_t, uint32_t> m;
    for (const auto& r : kNfcDecomp)
      if (r[0] & kComposes) m.emplace((uint64_t{r[1]} << 32) | r[2], r[0] & ~kComposes);
    return m;
  }();
  auto it = pairs.find((uint64_t{a} << 32) | b);
  return it == pairs.end() ? 0 : it->second;
}

// NFC of well-formed UTF-8 text: full canonical decomposition, canonical ordering of combining
// marks, canonical composition.
std::string nfc(const std::string& s) {
  // Below U+0300 every code point is its own NFC and none combines with what precedes it: text
  // without a lead byte >= 0xCC (U+0300 and up) is unchanged.
  if (std::none_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) >= 0xCC; })) return s;
  std::vector<uint32_t> cps;
  cps.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t n = char_len(s, i);
    decompose(code_point(s, i, n), cps);
    i += n;
  }
  std::vector<int> cls(cps.size());
  for (size_t i = 0; i < cps.size(); ++i) cls[i] = combining_class(cps[i]);
  // Canonical ordering: each run of non-starters sorted (stably) by class.
  for (size_t i = 0; i < cps.size();) {
    if (cls[i] == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && cls[j] != 0) ++j;
    std::vector<std::pair<int, uint32_t>> run;
    for (size_t k = i; k < j; ++k) run.emplace_back(cls[k], cps[k]);
    std::stable_sort(run.begin(), run.end(), [](auto& x, auto& y) { return x.first < y.first; });
    for (size_t k = i; k < j; ++k) cls[k] = run[k - i].first, cps[k] = run[k - i].second;
    i = j;
  }
  // Canonical composition: a character joins the last starter unless a character in between has
  // the same or a higher class (blocked), or is a starter itself.
  std::vector<uint32_t> res;
  res.reserve(cps.size());
  size_t starter = SIZE_MAX;
  int last = 256;
  for (size_t i = 0; i < cps.size(); ++i) {
    const int k = cls[i];
    if (starter != SIZE_MAX && (last < k || last == 0)) {
      if (const uint32_t c = compose(res[starter], cps[i])) {
        res[starter] = c;
        continue;
      }
    }
    if (k == 0) starter = res.size();
    last = k;
    res.push_back(cps[i]);
  }
  std::string out;
  out.reserve(s.size());
  for (uint32_t cp : res) out += utf8(cp);
  return out;
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 upwards.
struct ByteMap {
  std::string to_char[256];
  std::unordered_map<std::string, uint8_t> to_byte;
  ByteMap() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<bool> direct(256, false);
    for (int b : bs) direct[b] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t cp = direct[b] ? static_cast<uint32_t>(b) : 256 + n++;
      to_char[b] = utf8(cp);
      to_byte[to_char[b]] = static_cast<uint8_t>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& origin) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err, &off,
                          nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw InputError(str(origin, ": regex '", pattern, "' does not compile at offset ", off, ": ",
                           reinterpret_cast<const char*>(msg)));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
  }
  // A per-thread match context with a JIT stack of up to 8 MiB (PCRE2's default 32 KiB runs out on
  // long runs of one character class); encode() runs on several threads at once.
  struct Context {
    pcre2_match_context* mc = pcre2_match_context_create(nullptr);
    pcre2_jit_stack* js = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    Context() { pcre2_jit_stack_assign(mc, nullptr, js); }
    ~Context() {
      pcre2_jit_stack_free(js);
      pcre2_match_context_free(mc);
    }
  };
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Non-overlapping matches [begin, end) in s.
  // PCRE2_NO_UTF_CHECK is passed (PCRE2 would otherwise re-check the rest of the subject on every
  // call: quadratic), so the subject is validated here, once: JIT matching of ill-formed UTF-8 is
  // undefined behaviour (it crashed `generate --prompt $'abc \xff def'`).
  std::vector<std::pair<size_t, size_t>> matches(const std::string& s, const std::string& origin) const {
    check_utf8(s, origin + ": text given to the pre-tokenizer regex");
    thread_local Context ctx;
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t at = 0;
    while (at <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at, PCRE2_NO_UTF_CHECK, md, ctx.mc);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        throw InputError(str(origin, ": pre-tokenizer regex failed on a piece of ", s.size(), " bytes at offset ", at,
                             ": ", reinterpret_cast<const char*>(msg)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: step one character
        at = e + (e < s.size() ? char_len(s, e) : 1);
        continue;
      }
      out.emplace_back(b, e);
      at = e;
    }
    pcre2_match_data_free(md);
    return out;
  }
  // Whether the pattern matches at s[at] (anchored there); s is well-formed UTF-8.
  bool matches_at(const std::string& s, size_t at) const {
    thread_local Context ctx;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at,
                               PCRE2_NO_UTF_CHECK | PCRE2_ANCHORED, md, ctx.mc);
    pcre2_match_data_free(md);
    return rc >= 0;
  }

 private:
  pcre2_code* code_ = nullptr;
};

// Unicode White_Space (what Rust's regex `\s` matches; added tokens' lstrip/rstrip take it).
bool white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
// Rust's regex `\w` (Alphabetic, marks, decimal digits, connector punctuation, Join_Control): an
// added token with single_word must not touch one.
bool word_char_at(const std::string& s, size_t at) {
  static const Regex re(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", "<word-character class>");
  return re.matches_at(s, at);
}

// A Split pattern: a regex (PCRE2) or a literal string (which `tokenizers` escapes into a regex:
// the same leftmost, non-overlapping matches).
struct Pattern {
  std::shared_ptr<Regex> re;
  std::string literal;
  std::vector<std::pair<size_t, size_t>> matches(const std::string& s, const std::string& origin) const {
    if (re) return re->matches(s, origin);
    std::vector<std::pair<size_t, size_t>> out;
    for (size_t p = 0; (p = s.find(literal, p)) != std::string::npos; p += literal.size())
      out.emplace_back(p, p + literal.size());
    return out;
  }
};

// `tokenizers`' SplitDelimiterBehavior.
enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// The pieces [begin, end) of s that splitting at `matches` with behaviour `b` keeps (inverted:
// the text between the matches is the delimiter); empty pieces are dropped, as `tokenizers` does.
std::vector<std::pair<size_t, size_t>> split_pieces(size_t n, const std::vector<std::pair<size_t, size_t>>& matches,
                                                    Behavior b, bool invert) {
  struct Part {
    size_t begin, end;
    bool match;
  };
  std::vector<Part> parts;
  size_t prev = 0;
  for (auto [mb, me] : matches) {
    if (mb > prev) parts.push_back({prev, mb, invert});
    parts.push_back({mb, me, !invert});
    prev = me;
  }
  if (prev < n) parts.push_back({prev, n, invert});
  std::vector<Part> kept;
  bool previous_match = false;
  switch (b) {
    case Behavior::Isolated:
      kept.swap(parts);
      for (auto& p : kept) p.match = false;
      break;
    case Behavior::Removed:
      kept.swap(parts);
      break;
    case Behavior::Contiguous:
      for (auto& p : parts) {
        if (!kept.empty() && p.match == previous_match)
          kept.back().end = p.end;
        else
          kept.push_back({p.begin, p.end, false});
        previous_match = p.match;
      }
      break;
    case Behavior::MergedWithPrevious:
      for (auto& p : parts) {
        if (!kept.empty() && p.match && !previous_match)
          kept.back().end = p.end;
        else
          kept.push_back({p.begin, p.end, false});
        previous_match = p.match;
      }
      break;
    case Behavior::MergedWithNext:
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (!kept.empty() && it->match && !previous_match)
          kept.back().begin = it->begin;
        else
          kept.push_back({it->begin, it->end, false});
        previous_match = it->match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  std::vector<std::pair<size_t, size_t>> out;
  for (auto& p : kept)
    if (!p.match && p.end > p.begin) out.emplace_back(p.begin, p.end);
  return out;
}

// An entry of added_tokens, with how `tokenizers` matches it in text.
struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, normalized = false, lstrip = false, rstrip = false, single_word = false;
};

// Added tokens found in text as `tokenizers`' AddedVocabulary does: a leftmost-longest search of
// their patterns (a byte trie here, Aho-Corasick there), then each match's single_word, lstrip and
// rstrip applied.
class AddedMatcher {
 public:
  void add(const std::string& pattern, size_t token) {
    if (pattern.empty()) return;
    if (nodes_.empty()) nodes_.emplace_back();
    size_t at = 0;
    for (unsigned char c : pattern) {
      const size_t n = child(at, c);
      if (n != SIZE_MAX) {
        at = n;
        continue;
      }
      if (at == 0) root_[c] = nodes_.size();
      nodes_[at].next.emplace_back(c, nodes_.size());
      at = nodes_.size();
      nodes_.emplace_back();
    }
    if (nodes_[at].token == SIZE_MAX) nodes_[at].token = token;  // the first of equal patterns
  }
  bool empty() const { return nodes_.empty(); }
  struct Split {
    size_t begin, end;
    size_t token;  // SIZE_MAX: text between tokens
  };
  // Pieces covering s: added tokens and the text between them (never empty).
  std::vector<Split> split(const std::string& s, const std::vector<AddedToken>& tokens) const {
    std::vector<Split> out;
    size_t start_offset = 0;
    for (size_t i = 0; i < s.size();) {
      size_t len = 0, tok = SIZE_MAX;
      for (size_t at = 0, k = i; k < s.size();) {
        at = child(at, static_cast<unsigned char>(s[k]));
        if (at == SIZE_MAX) break;
        ++k;
        if (nodes_[at].token != SIZE_MAX) len = k - i, tok = nodes_[at].token;
      }
      if (tok == SIZE_MAX) {
        ++i;
        continue;
      }
      // The search goes on after the match whatever its options make of it, as an Aho-Corasick
      // iterator does.
      size_t start = i, stop = i + len;
      i = stop;
      const AddedToken& t = tokens[tok];
      if (t.single_word) {
        const bool word_before = start > 0 && word_char_at(s, char_start_before(s, start));
        const bool word_after = stop < s.size() && word_char_at(s, stop);
        if (word_before || word_after) continue;
      }
      if (t.lstrip) {
        size_t b = start;
        while (b > 0) {
          const size_t p = char_start_before(s, b);
          if (!white_space(code_point(s, p, b - p))) break;
          b = p;
        }
        start = std::max(b, start_offset);
      }
      if (t.rstrip) {
        while (stop < s.size()) {
          const size_t n = char_len(s, stop);
          if (!white_space(code_point(s, stop, n))) break;
          stop += n;
        }
      }
      if (start_offset < start) out.push_back({start_offset, start, SIZE_MAX});
      out.push_back({start, std::max(start, stop), tok});
      start_offset = std::max(start_offset, stop);
    }
    if (start_offset < s.size()) out.push_back({start_offset, s.size(), SIZE_MAX});
    return out;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, size_t>> next;
    size_t token = SIZE_MAX;
  };
  size_t child(size_t at, unsigned char c) const {
    if (at == 0) return root_[c];  // the root's children by byte: most text bytes start no token
    for (auto& [b, n] : nodes_[at].next)
      if (b == c) return n;
    return SIZE_MAX;
  }
  std::vector<Node> nodes_;
  std::array<size_t, 256> root_ = make_root();
  static std::array<size_t, 256> make_root() {
    std::array<size_t, 256> r;
    r.fill(SIZE_MAX);
    return r;
  }
};

struct PreStep {
  enum Kind { ByteLevel, Split, Metaspace } kind;
  Pattern pattern;                        // ByteLevel(use_regex): the GPT-2 regex; Split
  Behavior behavior = Behavior::Isolated;  // Split
  bool invert = false;                    // Split
  bool add_prefix_space = false;          // ByteLevel
  std::string prepend_scheme = "always";  // Metaspace
  bool split = true;                      // Metaspace
};

struct NormStep {
  enum Kind { Prepend, Replace, Nfc } kind;
  std::string a, b;
};

struct DecStep {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  std::string a, b;
  int64_t start = 0, stop = 0;
  bool prepend = true;
};

constexpr int kMaxSequenceDepth = 16;  // nested Sequences (normalizer, pre_tokenizer, decoder)

// A JSON string quoted as in the file, for messages.
std::string json_quoted(const std::string& t) { return json(t).dump(); }

// An empty list standing in for an absent one (merges, added_tokens), so that a present one is
// used by reference: references keep each value's key path for errors.
const json& no_items() {
  static const json kNone = json::array();
  return kNone;
}

// A Replace step's String pattern, or nullptr when it has none (or a Regex one).
const json* string_pattern(const json& n) {
  if (!n.contains("pattern")) return nullptr;
  const json& p = n.at("pattern");
  return p.is_object() && p.contains("String") ? &p.at("String") : nullptr;
}

class HfTokenizer final : public Tokenizer {
 public:
  // `raw`: the tokenizer.json text; `path`: the file named in messages; `read_config`: look for
  // tokenizer_config.json (and special_tokens_map.json, config.json) next to `path`.
  HfTokenizer(const std::string& raw, const std::string& path, bool read_config);
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }
  std::string token(int32_t id) const override {
    QF_CHECK_INPUT(id >= 0 && id < static_cast<int32_t>(id_to_token_.size()), path_, ": id ", id, " is outside the vocabulary");
    return id_to_token_[id];
  }
  std::string kind() const override { return "huggingface-bpe"; }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  int32_t pad_id() const override { return pad_; }
  std::string fingerprint() const override { return fingerprint_; }
  std::string path() const override { return path_; }

 private:
  using IdOwners = std::unordered_map<int32_t, std::string>;  // id -> token
  // parse() and, in the order it runs them, its steps; bad, id_of, sequence_items, prepend_scheme
  // and split_step are helpers of those.
  void parse(const std::string& raw, bool read_config);
  InputError bad(const std::string& why) const;  // "<path>: <why>"
  int32_t id_of(const json& v, const std::string& where, const std::string& token) const;
  void read_model_vocab(const json& m, IdOwners& owner);
  void read_merges(const json& m);
  void read_added_tokens(const json& j, IdOwners& owner);
  void index_ids(const IdOwners& owner);
  const json& sequence_items(const json& n, const char* key, int depth) const;
  std::string prepend_scheme(const json& n, const char* where) const;
  void add_normalizer(const json& n, int depth);
  void add_pre_tokenizer(const json& n, int depth);
  PreStep split_step(const json& n) const;
  void add_decoder(const json& n, int depth);
  void build_added_matchers();
  void read_special_tokens();
  std::string normalize(const std::string& s) const;
  void pre_tokenize_and_bpe(const std::string& text, bool origin, std::vector<int32_t>& out) const;
  void bpe(const std::string& piece, std::vector<int32_t>& out) const;
  int32_t token_id(const json& config, const char* key, const std::string& origin) const;
  std::string path_, fingerprint_;
  std::unordered_map<std::string, int32_t> vocab_;        // model.vocab and added_tokens: token -> id
  std::unordered_map<std::string, int32_t> model_vocab_;  // model.vocab alone: what BPE may produce
  std::vector<std::string> id_to_token_;                  // "" for ids no token has
  std::unordered_map<std::string, int32_t> merge_rank_;   // a + '\0' + b
  std::vector<AddedToken> added_;
  AddedMatcher raw_added_, normalized_added_;  // added tokens matched in the text / in the normalized text
  std::vector<NormStep> norm_;
  std::vector<PreStep> pre_;
  std::vector<DecStep> dec_;
  bool byte_fallback_ = false, ignore_merges_ = false, fuse_unk_ = false;
  int32_t unk_ = -1, bos_ = -1, eos_ = -1, pad_ = -1;
};

HfTokenizer::HfTokenizer(const std::string& raw, const std::string& path, bool read_config) : path_(path) {
  // The file's hash and the version of this reader's encoding, so that token caches holding the ids
  // an earlier version gave are not reused (v1 ignored added tokens' lstrip/rstrip/single_word/
  // normalized flags).
  fingerprint_ = "hf2:" + fs::hex64(fs::fnv1a64(raw));
  // A field of the wrong JSON type, a missing key: "<path>: 'model.merges[3][0]': expected a string, found a number".
  json_file::interpret(path_, [&] { parse(raw, read_config); });
}

// The tokenizer.json text, in steps (a malformed file is reported by the first step that meets it):
// the model (vocabulary and options, merges), the added tokens, the id table, then the normalizer,
// pre-tokenizer and decoder; last the added-token matchers and, from the files next to it, BOS/EOS/PAD.
void HfTokenizer::parse(const std::string& raw, bool read_config) {
  const json j = json_file::parse(raw, path_);
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) throw bad("no 'model' object; not a tokenizer.json");
  const json& m = j["model"];
  IdOwners owner;  // id -> token, to refuse two tokens with one id
  read_model_vocab(m, owner);
  read_merges(m);
  read_added_tokens(j, owner);
  index_ids(owner);
  // unk_token may name an added token: looked up once both are in vocab_.
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = vocab_.find(m["unk_token"].get<std::string>());
    if (it != vocab_.end()) unk_ = it->second;
  }
  if (j.contains("normalizer")) add_normalizer(j["normalizer"], 0);
  if (j.contains("pre_tokenizer")) add_pre_tokenizer(j["pre_tokenizer"], 0);
  if (j.contains("decoder")) add_decoder(j["decoder"], 0);
  build_added_matchers();
  if (read_config) read_special_tokens();
}

InputError HfTokenizer::bad(const std::string& why) const { return InputError(str(path_, ": ", why)); }

// Ids are what `tokenizers` stores them as (u32), limited to int32: [0, 2^31).
int32_t HfTokenizer::id_of(const json& v, const std::string& where, const std::string& token) const {
  const bool ok = v.is_number_unsigned() ? v.get<uint64_t>() <= INT32_MAX
                                        : v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT32_MAX;
  if (!ok) throw bad(str(where, ": token ", json_quoted(token), " has id ", v.dump(), "; ids must be integers in [0, 2^31)"));
  return static_cast<int32_t>(v.is_number_unsigned() ? v.get<uint64_t>() : v.get<int64_t>());
}

// model: its type, model.vocab (ids unique, recorded in `owner`) and BPE options.
void HfTokenizer::read_model_vocab(const json& m, IdOwners& owner) {
  const std::string type = m.value("type", std::string("BPE"));
  if (type != "BPE") throw bad("model type '" + type + "' is not supported; qforge reads BPE tokenizer.json files");
  if (!m.contains("vocab") || !m["vocab"].is_object()) throw bad("model.vocab must be an object {token: id}");
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    const int32_t id = id_of(*it, "model.vocab", it.key());
    auto [o, fresh] = owner.emplace(id, it.key());
    if (!fresh)
      throw bad(str("model.vocab: tokens ", json_quoted(o->second), " and ", json_quoted(it.key()), " both have id ", id,
                    "; ids must be unique"));
    vocab_[it.key()] = id;
  }
  model_vocab_ = vocab_;
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && !m[k].is_null() && !m[k].get<std::string>().empty())
      throw bad(str("model.", k, " is not supported"));
  if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() > 0)
    throw bad("model.dropout > 0 (BPE dropout) is not supported");
  byte_fallback_ = m.value("byte_fallback", false);
  ignore_merges_ = m.value("ignore_merges", false);
  fuse_unk_ = m.value("fuse_unk", false);
}

// model.merges, "a b" or [a, b], ranked in file order.
void HfTokenizer::read_merges(const json& m) {
  int32_t rank = 0;
  const json& merges = m.contains("merges") ? m["merges"] : no_items();
  if (!merges.is_array()) throw bad("model.merges must be a list");
  for (auto& mg : merges) {
    std::string a, b;
    if (mg.is_string()) {
      const auto s = mg.get<std::string>();
      const auto sp = s.find(' ');
      if (sp == std::string::npos) throw bad("merge '" + s + "' is not 'a b'");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mg.is_array() && mg.size() == 2) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      throw bad("model.merges entries must be 'a b' or [a, b]");
    }
    // As `tokenizers` (MergeTokenOutOfVocabulary): both parts and their concatenation are tokens.
    for (const std::string* t : std::initializer_list<const std::string*>{&a, &b, nullptr}) {
      const std::string tok = t ? *t : a + b;
      if (!vocab_.count(tok))
        throw bad(str("model.merges[", rank, "] ", mg.dump(), ": token ", json_quoted(tok),
                      t ? "" : " (the merged pair)", " is not in model.vocab"));
    }
    merge_rank_.emplace(a + '\0' + b, rank++);
  }
}

// added_tokens: each with its flags; an id model.vocab (or an earlier entry) gives another token is refused.
void HfTokenizer::read_added_tokens(const json& j, IdOwners& owner) {
  const json& added = j.contains("added_tokens") ? j["added_tokens"] : no_items();
  if (!added.is_array()) throw bad("added_tokens must be a list");
  for (auto& a : added) {
    if (!a.is_object() || !a.contains("content") || !a["content"].is_string() || a["content"].get<std::string>().empty() ||
        !a.contains("id"))
      throw bad("added_tokens entries need 'id' and a non-empty 'content', got " + a.dump());
    AddedToken t;
    t.content = a["content"].get<std::string>();
    t.id = id_of(a["id"], "added_tokens", t.content);
    // Flags as `tokenizers` reads them (it requires each; absent ones default as its
    // AddedToken(content, special) constructor does: normalized = !special, the rest false).
    t.special = a.value("special", false);
    t.normalized = a.value("normalized", !t.special);
    t.lstrip = a.value("lstrip", false);
    t.rstrip = a.value("rstrip", false);
    t.single_word = a.value("single_word", false);
    auto v = vocab_.find(t.content);
    if (v != vocab_.end() && v->second != t.id)
      throw bad(str("added_tokens: token ", json_quoted(t.content), " has id ", t.id, " but model.vocab gives it id ",
                    v->second));
    auto [o, fresh] = owner.emplace(t.id, t.content);
    if (!fresh && o->second != t.content)
      throw bad(str("added_tokens: token ", json_quoted(t.content), " has id ", t.id, ", which is already token ",
                    json_quoted(o->second), "; ids must be unique"));
    vocab_[t.content] = t.id;
    added_.push_back(t);
  }
}

// Ids index a table of max_id + 1 rows. `tokenizers` accepts holes (rows no text maps to; they
// decode to nothing), but one id of 2^31-1 alone would ask for 2^31 rows: holes may be at most as
// many as the tokens themselves, plus 1024.
void HfTokenizer::index_ids(const IdOwners& owner) {
  const int64_t n_tokens = static_cast<int64_t>(owner.size());
  int64_t max_id = -1;
  std::string max_tok;
  for (auto& [id, t] : owner)
    if (id > max_id) max_id = id, max_tok = t;
  if (max_id + 1 > 2 * n_tokens + 1024)
    throw bad(str("token ", json_quoted(max_tok), " has id ", max_id, " but there are only ", n_tokens,
                  " tokens; ids this sparse (", max_id + 1 - n_tokens, " unused below the largest) are not a "
                  "vocabulary qforge can index"));
  const int64_t n_ids = max_id + 1;
  id_to_token_.assign(static_cast<size_t>(n_ids), std::string());
  for (auto& [t, id] : vocab_) id_to_token_[id] = t;
}

// A Sequence's list of steps (`key`), at nesting `depth`.
const json& HfTokenizer::sequence_items(const json& n, const char* key, int depth) const {
  if (depth > kMaxSequenceDepth) throw bad(str("Sequences nested deeper than ", kMaxSequenceDepth));
  const json& v = n.at(key);
  if (!v.is_array()) throw bad(str("Sequence.", key, " must be a list"));
  return v;
}

// A Metaspace pre-tokenizer's or decoder's prepend_scheme (older files: add_prefix_space).
std::string HfTokenizer::prepend_scheme(const json& n, const char* where) const {
  const std::string s = n.value("prepend_scheme", n.value("add_prefix_space", true) ? std::string("always") : "never");
  if (s != "always" && s != "first" && s != "never")
    throw bad(str(where, " Metaspace: prepend_scheme '", s, "' is not one of always, first, never"));
  return s;
}

// normalizer: appended to norm_, Sequences flattened.
void HfTokenizer::add_normalizer(const json& n, int depth) {
  if (n.is_null()) return;
  const std::string t = n.value("type", std::string());
  if (t == "Sequence") {
    for (auto& x : sequence_items(n, "normalizers", depth)) add_normalizer(x, depth + 1);
  } else if (t == "Prepend") {
    norm_.push_back({NormStep::Prepend, n.value("prepend", std::string()), ""});
  } else if (t == "Replace" && string_pattern(n)) {
    norm_.push_back({NormStep::Replace, string_pattern(n)->get<std::string>(), n.value("content", std::string())});
  } else if (t == "NFC") {
    norm_.push_back({NormStep::Nfc, "", ""});
  } else {
    throw bad("normalizer '" + t + "' is not supported (supported: Sequence, Prepend, Replace with a String pattern, NFC)");
  }
}

// pre_tokenizer: appended to pre_, Sequences flattened.
void HfTokenizer::add_pre_tokenizer(const json& n, int depth) {
  if (n.is_null()) return;
  const std::string t = n.value("type", std::string());
  if (t == "Sequence") {
    for (auto& x : sequence_items(n, "pretokenizers", depth)) add_pre_tokenizer(x, depth + 1);
  } else if (t == "ByteLevel") {
    PreStep s{PreStep::ByteLevel};
    s.add_prefix_space = n.value("add_prefix_space", false);
    if (n.value("use_regex", true)) s.pattern.re = std::make_shared<Regex>(kGpt2Pattern, path_);
    pre_.push_back(s);
  } else if (t == "Split") {
    pre_.push_back(split_step(n));
  } else if (t == "Metaspace") {
    PreStep s{PreStep::Metaspace};
    if (n.value("replacement", kMeta) != kMeta) throw bad("Metaspace with a replacement other than U+2581");
    s.prepend_scheme = prepend_scheme(n, "pre_tokenizer");
    s.split = n.value("split", true);
    s.pattern.literal = kMeta;
    pre_.push_back(s);
  } else {
    throw bad("pre_tokenizer '" + t + "' is not supported (supported: ByteLevel, Split, Metaspace, Sequence)");
  }
}

// A Split pre-tokenizer: a String or Regex pattern, a delimiter behaviour, inverted or not.
PreStep HfTokenizer::split_step(const json& n) const {
  PreStep s{PreStep::Split};
  const json& pat = n.at("pattern");
  if (pat.is_object() && pat.contains("Regex")) {
    const std::string rx = pat.at("Regex").get<std::string>();
    if (rx.empty()) throw bad("pre_tokenizer Split: 'pattern.Regex' is empty");
    s.pattern.re = std::make_shared<Regex>(rx, path_);
  } else if (pat.is_object() && pat.contains("String")) {
    s.pattern.literal = pat.at("String").get<std::string>();
    if (s.pattern.literal.empty()) throw bad("pre_tokenizer Split: 'pattern.String' is empty");
  } else {
    throw bad("pre_tokenizer Split: 'pattern' must be {\"String\": ...} or {\"Regex\": ...}, got " + pat.dump());
  }
  const std::string b = n.at("behavior").get<std::string>();
  static const std::pair<const char*, Behavior> kBehaviors[] = {
      {"Removed", Behavior::Removed}, {"Isolated", Behavior::Isolated},
      {"MergedWithPrevious", Behavior::MergedWithPrevious}, {"MergedWithNext", Behavior::MergedWithNext},
      {"Contiguous", Behavior::Contiguous}};
  auto it = std::find_if(std::begin(kBehaviors), std::end(kBehaviors), [&](auto& kb) { return b == kb.first; });
  if (it == std::end(kBehaviors))
    throw bad("pre_tokenizer Split: 'behavior' '" + b +
              "' is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
  s.behavior = it->second;
  s.invert = n.value("invert", false);
  return s;
}

// decoder: appended to dec_, Sequences flattened.
void HfTokenizer::add_decoder(const json& n, int depth) {
  if (n.is_null()) return;
  const std::string t = n.value("type", std::string());
  if (t == "Sequence") {
    for (auto& x : sequence_items(n, "decoders", depth)) add_decoder(x, depth + 1);
  } else if (t == "ByteLevel") {
    dec_.push_back({DecStep::ByteLevel});
  } else if (t == "Replace" && string_pattern(n)) {
    dec_.push_back({DecStep::Replace, string_pattern(n)->get<std::string>(), n.value("content", std::string())});
  } else if (t == "ByteFallback") {
    dec_.push_back({DecStep::ByteFallback});
  } else if (t == "Fuse") {
    dec_.push_back({DecStep::Fuse});
  } else if (t == "Strip") {
    DecStep s{DecStep::Strip, n.value("content", std::string(" "))};
    s.start = n.value("start", int64_t{0});
    s.stop = n.value("stop", int64_t{0});
    // `tokenizers` holds content as one char and start/stop as counts.
    if (s.a.empty() || s.a.size() != char_len(s.a, 0) || s.start < 0 || s.stop < 0)
      throw bad(str("decoder Strip needs one character as content and start/stop >= 0, got ", n.dump()));
    dec_.push_back(s);
  } else if (t == "Metaspace") {
    DecStep s{DecStep::Metaspace};
    if (n.value("replacement", kMeta) != kMeta) throw bad("Metaspace with a replacement other than U+2581");
    s.prepend = prepend_scheme(n, "decoder") != "never";
    dec_.push_back(s);
  } else {
    throw bad("decoder '" + t + "' is not supported");
  }
}

// Added tokens are found in the text before it is normalized, or, those with normalized = true,
// in each normalized piece between those, as their content normalized (`tokenizers`'
// AddedVocabulary: special tokens first, then the others, in file order). Needs norm_ read.
void HfTokenizer::build_added_matchers() {
  std::vector<size_t> order(added_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_partition(order.begin(), order.end(), [&](size_t i) { return added_[i].special; });
  for (size_t i : order) {
    if (added_[i].normalized)
      normalized_added_.add(normalize(added_[i].content), i);
    else
      raw_added_.add(added_[i].content, i);
  }
}

// transformers' tokenizer classes for the families qforge reads, with the special tokens each
// class's constructor defaults to (nullptr: none).
struct ClassDefaults {
  const char* cls;
  const char* bos;
  const char* eos;
  const char* pad;
};
const ClassDefaults kClassDefaults[] = {
    {"GPT2Tokenizer", "<|endoftext|>", "<|endoftext|>", nullptr},
    {"LlamaTokenizer", "<s>", "</s>", nullptr},
    {"GemmaTokenizer", "<bos>", "<eos>", "<pad>"},
    {"Qwen2Tokenizer", nullptr, "<|endoftext|>", "<|endoftext|>"},
};
// config.json's model_type -> the class AutoTokenizer picks for it (transformers' tokenization_auto).
const std::pair<const char*, const char*> kModelTypeClass[] = {
    {"gpt2", "GPT2Tokenizer"},    {"opt", "GPT2Tokenizer"},       {"llama", "LlamaTokenizer"},
    {"mistral", "LlamaTokenizer"}, {"phi3", "LlamaTokenizer"},     {"qwen2", "Qwen2Tokenizer"},
    {"qwen3", "Qwen2Tokenizer"},  {"gemma", "GemmaTokenizer"},    {"gemma2", "GemmaTokenizer"},
    {"gemma3", "GemmaTokenizer"}, {"gemma3_text", "GemmaTokenizer"},
};

// BOS/EOS/PAD as transformers' AutoTokenizer finds them for the directory holding the file:
// tokenizer_config.json's key (null: none); else special_tokens_map.json's; else the default of
// the tokenizer class (tokenizer_config.json's tokenizer_class, else the class config.json's
// model_type maps to); GPT-2's own tokenizer_config.json names none of them. A class default that is
// not in the vocabulary is none (transformers would append it as a new token).
void HfTokenizer::read_special_tokens() {
  const sfs::path dir = sfs::path(path_).parent_path();
  auto read_object = [](const std::string& f) {
    if (!sfs::exists(f)) return json::object();
    json c = json_file::read(f);
    if (!c.is_object()) throw InputError(str(f, ": expected a JSON object"));
    return c;
  };
  const std::string tc = (dir / "tokenizer_config.json").string(), sm = (dir / "special_tokens_map.json").string();
  const json config = read_object(tc), map = read_object(sm);
  std::string cls;
  json_file::interpret(tc, [&] {
    if (config.contains("tokenizer_class") && config["tokenizer_class"].is_string())
      cls = config["tokenizer_class"].get<std::string>();
  });
  if (cls.empty() && sfs::exists(dir / "config.json")) {
    try {  // config.json is the model's: its own errors are reported where the model is read
      const json c = json_file::read((dir / "config.json").string());
      if (c.is_object() && c.contains("model_type") && c["model_type"].is_string())
        for (auto& [mt, k] : kModelTypeClass)
          if (c["model_type"].get<std::string>() == mt) cls = k;
    } catch (const InputError&) {
    }
  }
  if (cls.size() > 4 && cls.compare(cls.size() - 4, 4, "Fast") == 0) cls.resize(cls.size() - 4);
  const ClassDefaults* defaults = nullptr;
  for (auto& d : kClassDefaults)
    if (cls == d.cls) defaults = &d;
  auto special = [&](const char* key, const char* ClassDefaults::*field) {
    int32_t id = -1;
    if (config.contains(key)) {
      json_file::interpret(tc, [&] { id = token_id(config, key, tc); });  // (its errors name that file)
    } else if (map.contains(key)) {
      json_file::interpret(sm, [&] { id = token_id(map, key, sm); });
    } else if (defaults && defaults->*field) {
      auto it = vocab_.find(defaults->*field);
      if (it != vocab_.end()) id = it->second;
    }
    return id;
  };
  bos_ = special("bos_token", &ClassDefaults::bos);
  eos_ = special("eos_token", &ClassDefaults::eos);
  pad_ = special("pad_token", &ClassDefaults::pad);
}

// tokenizer_config.json's `key`, as transformers takes it: absent/null (none), a token string, or an
// AddedToken object {"content": "<s>", ...}.
int32_t HfTokenizer::token_id(const json& c, const char* key, const std::string& origin) const {
  if (!c.contains(key) || c[key].is_null()) return -1;
  const json& t = c[key];
  if (!t.is_string() && !(t.is_object() && t.contains("content") && t["content"].is_string()))
    throw InputError(str(origin, ": '", key, "': expected a token string such as \"<s>\" or an object {\"content\": \"<s>\"}, found ",
                         t.type_name() == std::string("array") || t.type_name() == std::string("object") ? "an " : "a ",
                         t.type_name(), " ", t.dump()));
  const std::string s = t.is_string() ? t.get<std::string>() : t["content"].get<std::string>();
  if (s.empty()) return -1;
  auto it = vocab_.find(s);
  if (it == vocab_.end()) throw InputError(str(origin, ": '", key, "': special token '", s, "' is not in the vocabulary"));
  return it->second;
}

std::string HfTokenizer::normalize(const std::string& s) const {
  std::string out = s;
  for (auto& n : norm_) {
    if (n.kind == NormStep::Prepend) {
      if (!out.empty()) out = n.a + out;
    } else if (n.kind == NormStep::Replace) {
      replace_all(out, n.a, n.b);
    } else {
      out = nfc(out);
    }
    check_growth(out.size(), s.size(), "normalizer", path_);
  }
  return out;
}

void HfTokenizer::bpe(const std::string& piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    auto it = model_vocab_.find(piece);
    if (it != model_vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<std::string> sym;
  for (size_t i = 0; i < piece.size();) {
    const size_t n = char_len(piece, i);
    std::string c = piece.substr(i, n);
    i += n;
    if (model_vocab_.count(c)) {
      sym.push_back(c);
      continue;
    }
    if (byte_fallback_) {  // <0xXX> tokens for each byte, if all of them are tokens
      std::vector<std::string> bytes;
      for (unsigned char b : c) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "<0x%02X>", b);
        if (!model_vocab_.count(buf)) break;
        bytes.emplace_back(buf);
      }
      if (bytes.size() == c.size()) {
        sym.insert(sym.end(), bytes.begin(), bytes.end());
        continue;
      }
    }
    sym.push_back(std::string());  // unknown
  }
  // Merges, lowest rank first and leftmost among equal ranks, as `tokenizers`' Word::merge_all
  // does with its heap: O(n log n) in the piece's length, so a Llama-2-style tokenizer (no
  // pre-tokenizer: a whole line is one piece) stays fast on long lines. An empty symbol is an
  // unknown character and never merges.
  struct Cand {
    int32_t rank;
    size_t left, right;
    uint32_t gen_left, gen_right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  const size_t n = sym.size();
  std::vector<size_t> prev(n), next(n);
  std::vector<uint32_t> gen(n, 0);
  std::vector<char> alive(n, 1);
  for (size_t i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1;  // i - 1 wraps for i = 0: "none"
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto consider = [&](size_t l, size_t r) {
    if (l >= n || r >= n || sym[l].empty() || sym[r].empty()) return;
    auto it = merge_rank_.find(sym[l] + '\0' + sym[r]);
    if (it != merge_rank_.end()) heap.push({it->second, l, r, gen[l], gen[r]});
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(i, i + 1);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    if (!alive[c.left] || !alive[c.right] || next[c.left] != c.right || gen[c.left] != c.gen_left ||
        gen[c.right] != c.gen_right)
      continue;  // stale: one side has merged since
    sym[c.left] += sym[c.right];
    ++gen[c.left];
    alive[c.right] = 0;
    next[c.left] = next[c.right];
    if (next[c.left] < n) prev[next[c.left]] = c.left;
    consider(prev[c.left], c.left);
    consider(c.left, next[c.left]);
  }
  std::vector<std::string> merged;
  for (size_t i = 0; i < n; ++i)
    if (alive[i]) merged.push_back(std::move(sym[i]));
  sym.swap(merged);
  bool prev_unk = false;
  for (auto& s : sym) {
    if (s.empty()) {
      if (unk_ < 0) throw InputError(str(path_, ": text needs a token outside the vocabulary and there is no unk_token"));
      if (!(fuse_unk_ && prev_unk)) out.push_back(unk_);
      prev_unk = true;
      continue;
    }
    prev_unk = false;
    out.push_back(model_vocab_.at(s));
  }
}

// Pre-tokenizers, then the model, on one normalized piece of text. `origin`: the piece starts the
// text (what Metaspace's prepend_scheme "first" asks of a piece's original offset).
void HfTokenizer::pre_tokenize_and_bpe(const std::string& text, bool origin, std::vector<int32_t>& out) const {
  struct Piece {
    std::string text;
    bool origin;
  };
  std::vector<Piece> pieces{{text, origin}};
  for (auto& p : pre_) {
    std::vector<Piece> next;
    for (auto& x : pieces) {
      auto keep = [&](const std::string& s, const std::vector<std::pair<size_t, size_t>>& parts) {
        for (auto [b, e] : parts) next.push_back({s.substr(b, e - b), x.origin && b == 0});
      };
      if (p.kind == PreStep::Split) {
        keep(x.text, split_pieces(x.text.size(), p.pattern.matches(x.text, path_), p.behavior, p.invert));
      } else if (p.kind == PreStep::ByteLevel) {
        std::string y = x.text;
        if (p.add_prefix_space && y[0] != ' ') y = " " + y;
        const auto parts = p.pattern.re ? split_pieces(y.size(), p.pattern.matches(y, path_), Behavior::Isolated, false)
                                        : std::vector<std::pair<size_t, size_t>>{{0, y.size()}};
        for (auto [b, e] : parts) {
          std::string mapped;
          for (size_t k = b; k < e; ++k) mapped += byte_map().to_char[static_cast<unsigned char>(y[k])];
          next.push_back({mapped, x.origin && b == 0});
        }
      } else {  // Metaspace
        std::string y = x.text;
        replace_all(y, " ", kMeta);
        const bool prepend = p.prepend_scheme == "always" || (p.prepend_scheme == "first" && x.origin);
        if (prepend && y.compare(0, kMeta.size(), kMeta) != 0) y = kMeta + y;
        if (p.split)
          keep(y, split_pieces(y.size(), p.pattern.matches(y, path_), Behavior::MergedWithNext, false));
        else
          next.push_back({y, x.origin});
      }
    }
    pieces.swap(next);
  }
  for (auto& x : pieces) bpe(x.text, out);
}

std::vector<int32_t> HfTokenizer::encode(const std::string& text) const {
  check_utf8(text, "text given to tokenizer " + path_);
  std::vector<int32_t> out;
  // As `tokenizers`: 1. added tokens (normalized = false) are cut out of the text; 2. each piece
  // between them is normalized and the normalized added tokens cut out of it; 3. pre-tokenizers
  // and the model run on each piece left. Empty pieces are dropped at every step.
  auto normalized_piece = [&](const std::string& piece, bool origin) {
    const std::string s = norm_.empty() ? piece : normalize(piece);
    if (s.empty()) return;
    if (normalized_added_.empty()) return pre_tokenize_and_bpe(s, origin, out);
    for (auto& sp : normalized_added_.split(s, added_)) {
      if (sp.token != SIZE_MAX)
        out.push_back(added_[sp.token].id);
      else
        pre_tokenize_and_bpe(s.substr(sp.begin, sp.end - sp.begin), origin && sp.begin == 0, out);
    }
  };
  if (text.empty()) return out;
  if (raw_added_.empty()) {
    normalized_piece(text, true);
    return out;
  }
  for (auto& sp : raw_added_.split(text, added_)) {
    if (sp.token != SIZE_MAX)
      out.push_back(added_[sp.token].id);
    else
      normalized_piece(text.substr(sp.begin, sp.end - sp.begin), sp.begin == 0);
  }
  return out;
}

// "<0xXX>": the byte `tokenizers`' ByteFallback decoder reads from it (Rust's u8::from_str_radix
// on the two characters, which also takes "+X"), or -1.
int byte_token(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  const auto hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
  if (hex(t[3]) && hex(t[4])) return std::stoi(t.substr(3, 2), nullptr, 16);
  if (t[3] == '+' && hex(t[4])) return std::stoi(t.substr(4, 1), nullptr, 16);
  return -1;
}

std::string HfTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<std::string> toks;
  size_t in_bytes = 0;
  for (int32_t id : ids) {
    if (id < 0 || id >= static_cast<int32_t>(id_to_token_.size()))
      throw InputError(str(path_, ": id ", id, " is outside the vocabulary of ", id_to_token_.size()));
    if (id_to_token_[id].empty()) continue;  // an id no token has: `tokenizers` leaves it out
    toks.push_back(id_to_token_[id]);
    in_bytes += toks.back().size();
  }
  if (dec_.empty()) {  // no decoder: `tokenizers` joins the tokens with spaces
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) out += (i ? " " : "") + toks[i];
    return out;
  }
  for (auto& d : dec_) {
    switch (d.kind) {
      case DecStep::ByteLevel: {
        // Each token back to bytes, one whose characters are not all in the byte map kept as its
        // UTF-8 (an added token such as "<|im_start|>" or "中文"); the bytes read as UTF-8 lossily.
        std::string bytes;
        for (auto& t : toks) {
          std::string mapped;
          bool all = true;
          for (size_t i = 0; i < t.size() && all;) {
            const size_t n = char_len(t, i);
            auto it = byte_map().to_byte.find(t.substr(i, n));
            if (it == byte_map().to_byte.end())
              all = false;
            else
              mapped += static_cast<char>(it->second);
            i += n;
          }
          bytes += all ? mapped : t;
        }
        toks = {utf8_lossy(bytes)};
        break;
      }
      case DecStep::Replace: {
        size_t total = 0;
        for (auto& t : toks) {
          replace_all(t, d.a, d.b);
          total += t.size();
          check_growth(total, in_bytes, "decoder", path_);
        }
        break;
      }
      case DecStep::ByteFallback: {
        // A run of <0xXX> tokens becomes its bytes if they are UTF-8, else one U+FFFD per token.
        std::vector<std::string> next;
        std::string run;
        auto flush = [&] {
          if (run.empty()) return;
          if (utf8_invalid_at(run) == std::string_view::npos) {
            next.push_back(run);
          } else {
            for (size_t k = 0; k < run.size(); ++k) next.push_back(kReplacement);
          }
          run.clear();
        };
        for (auto& t : toks) {
          const int b = byte_token(t);
          if (b >= 0) {
            run += static_cast<char>(b);
          } else {
            flush();
            next.push_back(t);
          }
        }
        flush();
        toks.swap(next);
        break;
      }
      case DecStep::Fuse: {
        std::string all;
        for (auto& t : toks) all += t;
        toks = {all};
        break;
      }
      case DecStep::Strip:
        for (auto& t : toks) {
          int64_t a = 0;
          while (a < d.start && (a + 1) * d.a.size() <= t.size() && t.compare(a * d.a.size(), d.a.size(), d.a) == 0) ++a;
          t = t.substr(a * d.a.size());
          int64_t z = 0;
          while (z < d.stop && t.size() >= d.a.size() && t.compare(t.size() - d.a.size(), d.a.size(), d.a) == 0) {
            t.resize(t.size() - d.a.size());
            ++z;
          }
        }
        break;
      case DecStep::Metaspace:
        // U+2581 becomes a space, except in the first token, where (unless prepend_scheme is
        // "never") every U+2581 is dropped, as `tokenizers` does.
        for (size_t i = 0; i < toks.size(); ++i) replace_all(toks[i], kMeta, i == 0 && d.prepend ? "" : " ");
        break;
    }
  }
  std::string out;
  for (auto& t : toks) out += t;
  return out;
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& p) {
  const std::string path = sfs::is_directory(p) ? p + "/tokenizer.json" : p;
  return std::make_unique<HfTokenizer>(fs::read_file(path), path, /*read_config=*/true);
}

std::unique_ptr<Tokenizer> parse_hf_tokenizer(const std::string& json_text, const std::string& origin) {
  return std::make_unique<HfTokenizer>(json_text, origin, /*read_config=*/false);
}

}  // namespace qf::data
