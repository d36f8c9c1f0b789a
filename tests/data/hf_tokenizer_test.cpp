// tokenizer.json files from untrusted sources (issue 16): ids outside [0, 2^31) or aliasing one
// another, merges naming unknown tokens, text that is not UTF-8 — each a clear InputError naming the
// file and the token/id/merge/byte offset, never a crash. Byte-level files are built here; the
// `tokenizers` library's own files are compared in tests/interop/test_hf_tokenizers.py.
#include "data/hf_tokenizer.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "core/fs.h"
#include "data/utf8.h"
#include "tests/test_util.h"

namespace {

using nlohmann::json;
using qf::data::parse_hf_tokenizer;

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// GPT-2's byte-level alphabet as the whole vocabulary (id = byte), "<|endoftext|>" = 256, a merge
// "a b" -> "ab" = 257, ByteLevel pre-tokenizer (GPT-2 regex, PCRE2) and decoder.
json byte_level() {
  json vocab = json::object();
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    vocab[utf8(direct ? b : 256 + n++)] = b;
  }
  vocab["ab"] = 257;
  return {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"a b"}}}},
          {"added_tokens", {{{"id", 256}, {"content", "<|endoftext|>"}, {"special", true}}}},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
          {"decoder", {{"type", "ByteLevel"}}}};
}

std::string error_of(const json& j) {
  try {
    parse_hf_tokenizer(j.dump(), "t/tokenizer.json");
  } catch (const qf::InputError& e) {
    return e.what();
  }
  return "<no error>";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(HfTokenizerJson, ByteLevelFileRoundTrips) {
  auto tok = parse_hf_tokenizer(byte_level().dump(), "t/tokenizer.json");
  EXPECT_EQ(tok->vocab_size(), 258);
  const std::string s = "ab cab <|endoftext|> \xC3\xA9\xE2\x96\x81";
  auto ids = tok->encode(s);
  EXPECT_EQ(ids[0], 257);
  EXPECT_EQ(tok->decode(ids), s);
}

TEST(HfTokenizerJson, IdsOutsideInt32AreRefusedNamingTheTokenAndId) {
  auto j = byte_level();
  j["model"]["vocab"]["abc"] = int64_t{1} << 31;
  std::string m = error_of(j);
  EXPECT_TRUE(has(m, "t/tokenizer.json: model.vocab: token \"abc\" has id 2147483648; ids must be integers in [0, 2^31)"))
      << m;
  j["model"]["vocab"]["abc"] = (uint64_t{1} << 32) + 3;  // once silently read as id 3
  m = error_of(j);
  EXPECT_TRUE(has(m, "token \"abc\" has id 4294967299; ids must be integers in [0, 2^31)")) << m;
  j["model"]["vocab"]["abc"] = -1;
  EXPECT_TRUE(has(error_of(j), "token \"abc\" has id -1")) << error_of(j);
  j["model"]["vocab"]["abc"] = 2.5;
  EXPECT_TRUE(has(error_of(j), "token \"abc\" has id 2.5")) << error_of(j);
  j = byte_level();
  j["added_tokens"][0]["id"] = (uint64_t{1} << 32) + 3;
  EXPECT_TRUE(has(error_of(j), "added_tokens: token \"<|endoftext|>\" has id 4294967299")) << error_of(j);
}

TEST(HfTokenizerJson, IdsMustBeUniqueAndNotTooSparse) {
  auto j = byte_level();
  j["model"]["vocab"]["abc"] = 3;
  std::string m = error_of(j);
  EXPECT_TRUE(has(m, "both have id 3; ids must be unique")) << m;
  EXPECT_TRUE(has(m, "\"abc\"")) << m;
  j = byte_level();
  j["model"]["vocab"]["abc"] = int32_t{2147483647};  // would ask for 2^31 entries
  m = error_of(j);
  EXPECT_TRUE(has(m, "token \"abc\" has id 2147483647 but there are only 259 tokens; ids this sparse")) << m;
  // A few holes load (`tokenizers` allows them): they are rows no text maps to, decoding to nothing.
  j = byte_level();
  j["model"]["vocab"]["abc"] = 300;
  auto tok = qf::data::parse_hf_tokenizer(j.dump(), "holes.json");
  EXPECT_EQ(tok->vocab_size(), 301);
  EXPECT_EQ(tok->decode({280}), "");
  j = byte_level();
  j["added_tokens"][0]["id"] = 5;  // taken by another token
  EXPECT_TRUE(has(error_of(j), "added_tokens: token \"<|endoftext|>\" has id 5, which is already token")) << error_of(j);
}

TEST(HfTokenizerJson, MergesOfUnknownTokensAreRefusedNamingTheMerge) {
  auto j = byte_level();
  j["model"]["merges"] = {"a b", "a zz"};
  std::string m = error_of(j);
  EXPECT_TRUE(has(m, "t/tokenizer.json: model.merges[1] \"a zz\": token \"zz\" is not in model.vocab")) << m;
  j["model"]["merges"] = json::array({json::array({"b", "a"})});  // both known, "ba" is not
  m = error_of(j);
  EXPECT_TRUE(has(m, "model.merges[0] [\"b\",\"a\"]: token \"ba\" (the merged pair) is not in model.vocab")) << m;
}

// Issue 16: each names the file and the key, never nlohmann's raw "[json.exception.type_error.302]".
TEST(HfTokenizerJson, WrongJsonTypesAreInputErrors) {
  const std::vector<std::pair<const char*, const char*>> cases = {
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": 5}})", "model.merges must be a list"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "byte_fallback": "yes"}})",
       "'model.byte_fallback': expected a boolean, found a string"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", 1]]}})",
       "'model.merges[0][1]': expected a string, found a number"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "decoder": {"type": "Sequence"}})",
       "'decoder': missing key 'decoders'"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": "NFC"})",
       "'normalizer': expected an object, found a string"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Split"}})",
       "'pre_tokenizer': missing key 'pattern'"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},)"
       R"( "behavior": "Around"}})",
       "pre_tokenizer Split: 'behavior' 'Around' is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, "
       "Contiguous"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "x"}})",
       "pre_tokenizer Metaspace: prepend_scheme 'x' is not one of always, first, never"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "decoder": {"type": "Strip", "content": ""}})", "decoder Strip"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [{"content": "x"}]})",
       "added_tokens entries need 'id'"}};
  for (const auto& [bad, want] : cases) {
    try {
      parse_hf_tokenizer(bad, "t/tokenizer.json");
      ADD_FAILURE() << "accepted: " << bad;
    } catch (const qf::InputError& e) {
      EXPECT_TRUE(has(e.what(), std::string("t/tokenizer.json: ") + want)) << e.what();
      EXPECT_FALSE(has(e.what(), "[json.exception")) << e.what();
    }
  }
}

// Issue 16: tokenizer_config.json's special tokens are token strings or {"content": ...} objects;
// anything else is an InputError naming that file (not tokenizer.json) and the key.
TEST(HfTokenizerJson, TokenizerConfigOfWrongTypesNamesThatFileAndKey) {
  qf::testing::TmpDir tmp("qf_hf_tokcfg");
  qf::fs::write_atomic(tmp / "tokenizer.json", byte_level().dump());
  qf::fs::write_atomic(tmp / "tokenizer_config.json", R"({"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}})");
  auto tok = qf::data::load_hf_tokenizer(tmp / "tokenizer.json");
  EXPECT_EQ(tok->bos_id(), 256);
  EXPECT_EQ(tok->eos_id(), 256);
  for (const auto& [cfg, want] : std::vector<std::pair<const char*, const char*>>{
           {R"({"bos_token": 1})",
            R"(tokenizer_config.json: 'bos_token': expected a token string such as "<s>" or an object {"content": "<s>"}, found a number 1)"},
           {R"({"eos_token": {"content": 5}})", R"(tokenizer_config.json: 'eos_token': expected a token string such as "<s>" or )"
                                          R"(an object {"content": "<s>"}, found an object {"content":5})"},
           {R"({"pad_token": "<pad>"})", "tokenizer_config.json: 'pad_token': special token '<pad>' is not in the vocabulary"},
           {R"({"bos_token": "<|endoftext|>",})", "tokenizer_config.json: not valid JSON (line 1, column "}}) {
    qf::fs::write_atomic(tmp / "tokenizer_config.json", cfg);
    try {
      qf::data::load_hf_tokenizer(tmp / "tokenizer.json");
      ADD_FAILURE() << "accepted: " << cfg;
    } catch (const qf::InputError& e) {
      EXPECT_TRUE(has(e.what(), want)) << e.what();
      EXPECT_FALSE(has(e.what(), "[json.exception")) << e.what();
    }
  }
}

// Decided behaviour (README "Text encoding"): text that is not UTF-8 is refused with its byte
// offset named, before PCRE2 sees it (it crashed the JIT matcher).
TEST(HfTokenizerJson, InvalidUtf8IsRefusedWithTheByteOffset) {
  auto tok = parse_hf_tokenizer(byte_level().dump(), "t/tokenizer.json");
  for (const std::string& bad : {std::string("abc \xff def"), std::string("ab\xC3("), std::string("\xE2\x96"),
                                std::string("\xED\xA0\x80"), std::string("\xC0\xAF"), std::string("\xF4\x90\x80\x80")}) {
    try {
      tok->encode(bad);
      ADD_FAILURE() << "accepted invalid UTF-8";
    } catch (const qf::InputError& e) {
      EXPECT_TRUE(has(e.what(), "text given to tokenizer t/tokenizer.json: not valid UTF-8 at byte offset")) << e.what();
    }
  }
  try {
    tok->encode("abc \xff def");
  } catch (const qf::InputError& e) {
    EXPECT_TRUE(has(e.what(), "byte offset 4 (line 1, byte 0xFF)")) << e.what();
  }
}

TEST(Utf8, ValidatorFollowsUnicodeTable3_7) {
  using qf::data::utf8_invalid_at;
  constexpr size_t ok = std::string_view::npos;
  EXPECT_EQ(utf8_invalid_at(""), ok);
  EXPECT_EQ(utf8_invalid_at("plain"), ok);
  EXPECT_EQ(utf8_invalid_at("\xC3\xA9\xE2\x96\x81\xF0\x9F\x98\x80\xF4\x8F\xBF\xBF"), ok);
  EXPECT_EQ(utf8_invalid_at("ab\x80"), 2u);              // stray continuation
  EXPECT_EQ(utf8_invalid_at("a\xC1\xBF"), 1u);           // overlong
  EXPECT_EQ(utf8_invalid_at("a\xE0\x80\x80"), 1u);       // overlong
  EXPECT_EQ(utf8_invalid_at("\xED\xA0\x80"), 0u);        // surrogate
  EXPECT_EQ(utf8_invalid_at("xy\xF4\x90\x80\x80"), 2u);  // above U+10FFFF
  EXPECT_EQ(utf8_invalid_at("xyz\xF0\x9F\x98"), 3u);     // cut off by the end
  EXPECT_EQ(utf8_invalid_at("\xFF"), 0u);
}

}  // namespace
