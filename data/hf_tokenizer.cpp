#include "data/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <functional>
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
const std::string kMeta = "\xe2\x96\x81";  // U+2581 "▁"

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
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

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t i = 0;
  for (size_t p; (p = s.find(from, i)) != std::string::npos; i = p + from.size()) out += s.substr(i, p - i) + to;
  s = out + s.substr(i);
}

// Replace steps chained in a normalizer or decoder can grow text geometrically (" " -> "  " twenty
// times is 2^20x). Real tokenizers grow it by a few times at most (" " -> U+2581 is 3x); past 8x
// + 4 KiB the file is refused rather than allowed to exhaust memory and time.
void check_growth(size_t now, size_t base, const char* stage, const std::string& origin) {
  const size_t limit = 8 * base + 4096;
  if (now > limit)
    throw InputError(str(origin, ": the ", stage, "'s Replace/Prepend steps grow ", base, " bytes of text past ", limit,
                         " bytes (the limit is 8x + 4 KiB); this tokenizer.json's ", stage,
                         " chain is not one a real tokenizer uses"));
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

 private:
  pcre2_code* code_ = nullptr;
};

// Split behaviour "Isolated": matches and the gaps between them all become pieces.
std::vector<std::string> split_isolated(const Regex& re, const std::string& s, const std::string& origin) {
  std::vector<std::string> out;
  size_t prev = 0;
  for (auto [b, e] : re.matches(s, origin)) {
    if (b > prev) out.push_back(s.substr(prev, b - prev));
    out.push_back(s.substr(b, e - b));
    prev = e;
  }
  if (prev < s.size()) out.push_back(s.substr(prev));
  return out;
}

struct PreStep {
  enum Kind { ByteLevel, Split, Metaspace } kind;
  std::shared_ptr<Regex> re;  // ByteLevel(use_regex) / Split
  bool add_prefix_space = false;
  std::string prepend_scheme = "always";  // Metaspace
  bool split = true;                      // Metaspace
};

struct NormStep {
  enum Kind { Prepend, Replace } kind;
  std::string a, b;
};

struct DecStep {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  std::string a, b;
  int64_t start = 0, stop = 0;
  bool prepend = true;
};

class HfTokenizer final : public Tokenizer {
 public:
  // `raw`: the tokenizer.json text; `path`: the file named in messages; `read_config`: look for
  // tokenizer_config.json next to `path`.
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
  void parse(const std::string& raw, bool read_config);
  void bpe(const std::string& piece, std::vector<int32_t>& out) const;
  int32_t token_id(const json& config, const char* key, const std::string& origin) const;
  std::string path_, fingerprint_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::string, int32_t> merge_rank_;  // a + '\0' + b
  std::vector<std::pair<std::string, int32_t>> added_;   // longest first
  std::vector<NormStep> norm_;
  std::vector<PreStep> pre_;
  std::vector<DecStep> dec_;
  bool byte_fallback_ = false, ignore_merges_ = false, fuse_unk_ = false;
  int32_t unk_ = -1, bos_ = -1, eos_ = -1, pad_ = -1;
};

HfTokenizer::HfTokenizer(const std::string& raw, const std::string& path, bool read_config) : path_(path) {
  fingerprint_ = "hf:" + fs::hex64(fs::fnv1a64(raw));
  // A field of the wrong JSON type, a missing key: "<path>: 'model.merges[3][0]': expected a string, found a number".
  json_file::interpret(path_, [&] { parse(raw, read_config); });
}

void HfTokenizer::parse(const std::string& raw, bool read_config) {
  const json j = json_file::parse(raw, path_);
  auto bad = [&](const std::string& why) { return InputError(str(path_, ": ", why)); };
  auto quoted = [](const std::string& t) { return json(t).dump(); };
  // Ids are what `tokenizers` stores them as (u32), limited to int32: [0, 2^31).
  auto id_of = [&](const json& v, const std::string& where, const std::string& token) -> int32_t {
    const bool ok = v.is_number_unsigned() ? v.get<uint64_t>() <= INT32_MAX
                                          : v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT32_MAX;
    if (!ok)
      throw bad(str(where, ": token ", quoted(token), " has id ", v.dump(), "; ids must be integers in [0, 2^31)"));
    return static_cast<int32_t>(v.is_number_unsigned() ? v.get<uint64_t>() : v.get<int64_t>());
  };
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) throw bad("no 'model' object; not a tokenizer.json");
  const auto& m = j["model"];
  const std::string type = m.value("type", std::string("BPE"));
  if (type != "BPE") throw bad("model type '" + type + "' is not supported; qforge reads BPE tokenizer.json files");
  if (!m.contains("vocab") || !m["vocab"].is_object()) throw bad("model.vocab must be an object {token: id}");
  std::unordered_map<int32_t, std::string> owner;  // id -> token, to refuse two tokens with one id
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    const int32_t id = id_of(*it, "model.vocab", it.key());
    auto [o, fresh] = owner.emplace(id, it.key());
    if (!fresh)
      throw bad(str("model.vocab: tokens ", quoted(o->second), " and ", quoted(it.key()), " both have id ", id,
                    "; ids must be unique"));
    vocab_[it.key()] = id;
  }
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && !m[k].is_null() && !m[k].get<std::string>().empty())
      throw bad(str("model.", k, " is not supported"));
  if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() > 0)
    throw bad("model.dropout > 0 (BPE dropout) is not supported");
  byte_fallback_ = m.value("byte_fallback", false);
  ignore_merges_ = m.value("ignore_merges", false);
  fuse_unk_ = m.value("fuse_unk", false);
  int32_t rank = 0;
  static const json kNone = json::array();  // (references keep each value's key path for errors)
  const json& merges = m.contains("merges") ? m["merges"] : kNone;
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
        throw bad(str("model.merges[", rank, "] ", mg.dump(), ": token ", quoted(tok),
                      t ? "" : " (the merged pair)", " is not in model.vocab"));
    }
    merge_rank_.emplace(a + '\0' + b, rank++);
  }
  const json& added = j.contains("added_tokens") ? j["added_tokens"] : kNone;
  if (!added.is_array()) throw bad("added_tokens must be a list");
  for (auto& a : added) {
    if (!a.is_object() || !a.contains("content") || !a["content"].is_string() || a["content"].get<std::string>().empty() ||
        !a.contains("id"))
      throw bad("added_tokens entries need 'id' and a non-empty 'content', got " + a.dump());
    const auto content = a["content"].get<std::string>();
    const int32_t id = id_of(a["id"], "added_tokens", content);
    auto v = vocab_.find(content);
    if (v != vocab_.end() && v->second != id)
      throw bad(str("added_tokens: token ", quoted(content), " has id ", id, " but model.vocab gives it id ", v->second));
    auto [o, fresh] = owner.emplace(id, content);
    if (!fresh && o->second != content)
      throw bad(str("added_tokens: token ", quoted(content), " has id ", id, ", which is already token ", quoted(o->second),
                    "; ids must be unique"));
    vocab_[content] = id;
    added_.emplace_back(content, id);
  }
  std::sort(added_.begin(), added_.end(), [](auto& x, auto& y) { return x.first.size() > y.first.size(); });
  // Ids index a table of max_id + 1 rows. `tokenizers` accepts holes (rows no text maps to; they
  // decode to nothing), but one id of 2^31-1 alone would ask for 2^31 rows: holes may be at most as
  // many as the tokens themselves, plus 1024.
  const int64_t n_tokens = static_cast<int64_t>(owner.size());
  int64_t max_id = -1;
  std::string max_tok;
  for (auto& [id, t] : owner)
    if (id > max_id) max_id = id, max_tok = t;
  if (max_id + 1 > 2 * n_tokens + 1024)
    throw bad(str("token ", quoted(max_tok), " has id ", max_id, " but there are only ", n_tokens,
                  " tokens; ids this sparse (", max_id + 1 - n_tokens, " unused below the largest) are not a "
                  "vocabulary qforge can index"));
  const int64_t n_ids = max_id + 1;
  id_to_token_.assign(static_cast<size_t>(n_ids), std::string());
  for (auto& [t, id] : vocab_) id_to_token_[id] = t;
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = vocab_.find(m["unk_token"].get<std::string>());
    if (it != vocab_.end()) unk_ = it->second;
  }

  constexpr int kMaxDepth = 16;  // nested Sequences
  auto items = [&](const json& n, const char* key, int depth) -> const json& {
    if (depth > kMaxDepth) throw bad(str("Sequences nested deeper than ", kMaxDepth));
    const json& v = n.at(key);
    if (!v.is_array()) throw bad(str("Sequence.", key, " must be a list"));
    return v;
  };
  auto string_pattern = [&](const json& n) -> const json* {
    if (!n.contains("pattern")) return nullptr;
    const json& p = n.at("pattern");
    return p.is_object() && p.contains("String") ? &p.at("String") : nullptr;
  };
  // normalizer
  std::function<void(const json&, int)> add_norm = [&](const json& n, int depth) {
    if (n.is_null()) return;
    const std::string t = n.value("type", std::string());
    if (t == "Sequence") {
      for (auto& x : items(n, "normalizers", depth)) add_norm(x, depth + 1);
    } else if (t == "Prepend") {
      norm_.push_back({NormStep::Prepend, n.value("prepend", std::string()), ""});
    } else if (t == "Replace" && string_pattern(n)) {
      norm_.push_back({NormStep::Replace, string_pattern(n)->get<std::string>(), n.value("content", std::string())});
    } else {
      throw bad("normalizer '" + t + "' is not supported (supported: Sequence, Prepend, Replace with a String pattern)");
    }
  };
  if (j.contains("normalizer")) add_norm(j["normalizer"], 0);
  // pre-tokenizer
  std::function<void(const json&, int)> add_pre = [&](const json& n, int depth) {
    if (n.is_null()) return;
    const std::string t = n.value("type", std::string());
    if (t == "Sequence") {
      for (auto& x : items(n, "pretokenizers", depth)) add_pre(x, depth + 1);
    } else if (t == "ByteLevel") {
      PreStep s{PreStep::ByteLevel};
      s.add_prefix_space = n.value("add_prefix_space", false);
      if (n.value("use_regex", true)) s.re = std::make_shared<Regex>(kGpt2Pattern, path_);
      pre_.push_back(s);
    } else if (t == "Split") {
      if (n.value("behavior", std::string()) != "Isolated" || n.value("invert", false))
        throw bad("pre_tokenizer Split is supported with behavior Isolated (not inverted) only");
      PreStep s{PreStep::Split};
      const auto& pat = n.at("pattern");
      std::string rx = pat.is_object() && pat.contains("Regex") ? pat["Regex"].get<std::string>() : std::string();
      if (rx.empty()) throw bad("pre_tokenizer Split needs a Regex pattern");
      s.re = std::make_shared<Regex>(rx, path_);
      pre_.push_back(s);
    } else if (t == "Metaspace") {
      PreStep s{PreStep::Metaspace};
      if (n.value("replacement", kMeta) != kMeta) throw bad("Metaspace with a replacement other than U+2581");
      s.prepend_scheme = n.value("prepend_scheme", n.value("add_prefix_space", true) ? std::string("always") : "never");
      s.split = n.value("split", true);
      pre_.push_back(s);
    } else {
      throw bad("pre_tokenizer '" + t + "' is not supported (supported: ByteLevel, Split, Metaspace, Sequence)");
    }
  };
  if (j.contains("pre_tokenizer")) add_pre(j["pre_tokenizer"], 0);
  // decoder
  std::function<void(const json&, int)> add_dec = [&](const json& n, int depth) {
    if (n.is_null()) return;
    const std::string t = n.value("type", std::string());
    if (t == "Sequence") {
      for (auto& x : items(n, "decoders", depth)) add_dec(x, depth + 1);
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
      s.prepend = n.value("prepend_scheme", n.value("add_prefix_space", true) ? std::string("always") : "never") != "never";
      dec_.push_back(s);
    } else {
      throw bad("decoder '" + t + "' is not supported");
    }
  };
  if (j.contains("decoder")) add_dec(j["decoder"], 0);

  // BOS/EOS/PAD: tokenizer_config.json next to the file, as transformers reads them.
  const std::string tc = (sfs::path(path_).parent_path() / "tokenizer_config.json").string();
  if (read_config && sfs::exists(tc)) {
    const json c = json_file::read(tc);
    if (!c.is_object()) throw InputError(str(tc, ": expected a JSON object"));
    json_file::interpret(tc, [&] {  // (its errors name tokenizer_config.json, not tokenizer.json)
      bos_ = token_id(c, "bos_token", tc);
      eos_ = token_id(c, "eos_token", tc);
      pad_ = token_id(c, "pad_token", tc);
    });
  }
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

void HfTokenizer::bpe(const std::string& piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(piece);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<std::string> sym;
  for (size_t i = 0; i < piece.size();) {
    const size_t n = char_len(piece, i);
    std::string c = piece.substr(i, n);
    i += n;
    if (vocab_.count(c)) {
      sym.push_back(c);
    } else if (byte_fallback_) {
      for (unsigned char b : c) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "<0x%02X>", b);
        sym.push_back(vocab_.count(buf) ? std::string(buf) : std::string());
      }
    } else {
      sym.push_back(std::string());  // unknown
    }
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
    out.push_back(vocab_.at(s));
  }
}

std::vector<int32_t> HfTokenizer::encode(const std::string& text) const {
  check_utf8(text, "text given to tokenizer " + path_);
  std::vector<int32_t> out;
  // 1. added tokens are cut out first (leftmost, longest).
  std::vector<std::pair<std::string, int32_t>> segs;
  size_t i = 0, start = 0;
  while (i < text.size()) {
    bool hit = false;
    for (auto& [t, id] : added_) {
      if (text.compare(i, t.size(), t) == 0) {
        if (i > start) segs.emplace_back(text.substr(start, i - start), -1);
        segs.emplace_back(t, id);
        i += t.size();
        start = i;
        hit = true;
        break;
      }
    }
    if (!hit) i += char_len(text, i);
  }
  if (start < text.size()) segs.emplace_back(text.substr(start), -1);
  bool first = true;
  for (auto& [seg, id] : segs) {
    if (id >= 0) {
      out.push_back(id);
      first = false;
      continue;
    }
    // 2. normalizer
    std::string s = seg;
    for (auto& n : norm_) {
      if (n.kind == NormStep::Prepend) {
        if (!s.empty()) s = n.a + s;
      } else {
        replace_all(s, n.a, n.b);
      }
      check_growth(s.size(), seg.size(), "normalizer", path_);
    }
    // 3. pre-tokenizers
    std::vector<std::string> pieces{s};
    for (auto& p : pre_) {
      std::vector<std::string> next;
      for (auto& x : pieces) {
        if (p.kind == PreStep::Split) {
          for (auto& y : split_isolated(*p.re, x, path_)) next.push_back(y);
        } else if (p.kind == PreStep::ByteLevel) {
          std::string y = x;
          if (p.add_prefix_space && !y.empty() && y[0] != ' ') y = " " + y;
          std::vector<std::string> parts = p.re ? split_isolated(*p.re, y, path_) : std::vector<std::string>{y};
          for (auto& part : parts) {
            std::string mapped;
            for (unsigned char b : part) mapped += byte_map().to_char[b];
            next.push_back(mapped);
          }
        } else {  // Metaspace
          std::string y = x;
          replace_all(y, " ", kMeta);
          const bool prepend = p.prepend_scheme == "always" || (p.prepend_scheme == "first" && first);
          if (prepend && y.compare(0, kMeta.size(), kMeta) != 0) y = kMeta + y;
          if (!p.split) {
            next.push_back(y);
            continue;
          }
          size_t b = 0;
          for (size_t k = kMeta.size(); k <= y.size(); ++k) {
            if (k == y.size() || y.compare(k, kMeta.size(), kMeta) == 0) {
              if (k > b) next.push_back(y.substr(b, k - b));
              b = k;
            }
          }
        }
      }
      pieces.swap(next);
    }
    first = false;
    // 4. model
    for (auto& x : pieces) bpe(x, out);
  }
  return out;
}

std::string HfTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<std::string> toks;
  size_t in_bytes = 0;
  for (int32_t id : ids) {
    if (id < 0 || id >= static_cast<int32_t>(id_to_token_.size()))
      throw InputError(str(path_, ": id ", id, " is outside the vocabulary of ", id_to_token_.size()));
    toks.push_back(id_to_token_[id]);
    in_bytes += toks.back().size();
  }
  auto is_byte_tok = [](const std::string& t) {
    return t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::isxdigit(t[3]) && std::isxdigit(t[4]);
  };
  for (auto& d : dec_) {
    switch (d.kind) {
      case DecStep::ByteLevel: {
        std::string bytes;
        for (auto& t : toks) {
          for (size_t i = 0; i < t.size();) {
            const size_t n = char_len(t, i);
            auto it = byte_map().to_byte.find(t.substr(i, n));
            if (it != byte_map().to_byte.end()) {
              bytes += static_cast<char>(it->second);
            } else {
              bytes += t.substr(i, n);
            }
            i += n;
          }
        }
        toks = {bytes};
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
        std::vector<std::string> next;
        std::string run;
        auto flush = [&] {
          if (!run.empty()) next.push_back(run);
          run.clear();
        };
        for (auto& t : toks) {
          if (is_byte_tok(t)) {
            run += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
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
        for (size_t i = 0; i < toks.size(); ++i) {
          replace_all(toks[i], kMeta, " ");
          if (i == 0 && d.prepend && !toks[i].empty() && toks[i][0] == ' ') toks[i] = toks[i].substr(1);
        }
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
