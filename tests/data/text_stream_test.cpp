// data/text_stream: streamed generation output is valid UTF-8 however the bytes are split over
// tokens, special tokens are left out, and the whole equals the sanitized decode.
#include <gtest/gtest.h>

#include "data/text_stream.h"

namespace {

using qf::data::TextStream;
using qf::data::utf8_sanitize;

// A byte-level tokenizer: id i < 256 is byte i; 256 = EOS, 257 = BOS.
class ByteTok final : public qf::data::Tokenizer {
 public:
  std::vector<int32_t> encode(const std::string& t) const override {
    std::vector<int32_t> v;
    for (unsigned char c : t) v.push_back(c);
    return v;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (int32_t i : ids) s += i < 256 ? std::string(1, static_cast<char>(i)) : i == 256 ? "</s>" : "<s>";
    return s;
  }
  std::string token(int32_t id) const override { return decode({id}); }
  std::string kind() const override { return "bytes"; }
  int64_t vocab_size() const override { return 258; }
  int32_t bos_id() const override { return 257; }
  int32_t eos_id() const override { return 256; }
  int32_t pad_id() const override { return -1; }
  std::string fingerprint() const override { return "bytes"; }
  std::string path() const override { return "<bytes>"; }
};

bool valid_utf8(const std::string& s) {
  std::string tail;
  return utf8_sanitize(s, &tail) == s && tail.empty();
}

TEST(TextStream, Utf8SanitizeReplacesMaximalSubparts) {
  EXPECT_EQ(utf8_sanitize("abc"), "abc");
  EXPECT_EQ(utf8_sanitize("\xE4\xB8\xAD"), "\xE4\xB8\xAD");          // 中
  EXPECT_EQ(utf8_sanitize("a\x80" "b"), "a\xEF\xBF\xBD" "b");        // stray continuation
  EXPECT_EQ(utf8_sanitize("\xE4\xB8" "a"), "\xEF\xBF\xBD" "a");      // cut short: one U+FFFD, as Python's
  EXPECT_EQ(utf8_sanitize("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong: two
  EXPECT_EQ(utf8_sanitize("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  std::string tail;
  EXPECT_EQ(utf8_sanitize("ok\xF0\x9F\x98", &tail), "ok");  // incomplete at the end: held
  EXPECT_EQ(tail, "\xF0\x9F\x98");
  EXPECT_EQ(utf8_sanitize("ok\xF0\x9F\x98"), "ok\xEF\xBF\xBD");  // final: replaced
}

TEST(TextStream, EmitsOnlyWholeCodePointsAndSkipsSpecialTokens) {
  ByteTok tok;
  TextStream ts(tok, tok.encode("hi "));
  std::string all;
  const std::string emoji = "\xF0\x9F\x98\x80";  // U+1F600, 4 bytes, one token each
  std::vector<std::string> pieces;
  for (unsigned char b : emoji + "\xE4\xB8\xAD") {
    pieces.push_back(ts.push(b));
    EXPECT_TRUE(valid_utf8(pieces.back())) << pieces.size();
  }
  EXPECT_EQ(pieces[0], "hi ") << "the prompt comes first, the partial emoji is held";
  EXPECT_EQ(pieces[3], emoji);
  EXPECT_EQ(pieces[6], "\xE4\xB8\xAD");
  EXPECT_EQ(ts.push(257), "");  // BOS: nothing
  EXPECT_EQ(ts.push(256), "");  // EOS: nothing, never "</s>"
  EXPECT_EQ(ts.push(0xE4), "");
  EXPECT_EQ(ts.finish(), "\xEF\xBF\xBD") << "an unfinished sequence at the end becomes U+FFFD";
}

TEST(TextStream, RandomBytesAlwaysGiveValidUtf8) {
  ByteTok tok;
  uint32_t x = 12345;
  for (int trial = 0; trial < 50; ++trial) {
    TextStream ts(tok);
    std::string out, raw;
    for (int i = 0; i < 64; ++i) {
      x = x * 1664525u + 1013904223u;
      const int32_t id = static_cast<int32_t>((x >> 8) % 256);
      raw += static_cast<char>(id);
      out += ts.push(id);
    }
    out += ts.finish();
    EXPECT_TRUE(valid_utf8(out)) << trial;
    EXPECT_EQ(out, utf8_sanitize(raw)) << trial;
  }
}

}  // namespace
