// libFuzzer target for tokenizer.json loading, encoding and decoding (data/hf_tokenizer.*), built
// with clang -fsanitize=fuzzer,address,undefined by tests/CMakeLists.txt (no libtorch: the reader
// needs only nlohmann/json, PCRE2 and core/fs) and run for a bounded time by ctest (test
// fuzz_tokenizer_json); `make fuzz` runs it for 10^6 inputs. An input is a tokenizer.json, then a
// NUL byte, then text to encode (any bytes: ill-formed UTF-8 included); without a NUL a few fixed
// texts are encoded. Loading and encoding must either throw qf::InputError or give ids inside the
// vocabulary that decode without error; anything else (another exception, a sanitizer report) is a
// crash. Seeds: tests/fuzz/seeds_tokenizer/ (tests/fuzz/make_seeds_tokenizer.py).
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/hf_tokenizer.h"

namespace {

void check_ids(const qf::data::Tokenizer& tok, const std::vector<int32_t>& ids) {
  for (int32_t id : ids) {
    if (id < 0 || id >= tok.vocab_size()) std::abort();
    (void)tok.token(id);
  }
  (void)tok.decode(ids);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string all(reinterpret_cast<const char*>(data), size);
  const size_t nul = all.find('\0');
  const std::string json = all.substr(0, nul);
  std::vector<std::string> texts;
  if (nul != std::string::npos)
    texts.push_back(all.substr(nul + 1));
  else
    texts = {"Hello world  2024\n", "emoji \xF0\x9F\x98\x80 \xE4\xB8\xAD e\xCC\x81", "abc \xff def"};
  std::unique_ptr<qf::data::Tokenizer> tok;
  try {
    tok = qf::data::parse_hf_tokenizer(json, "<fuzz>");
  } catch (const qf::InputError&) {
    return 0;
  }
  for (auto& t : texts) {
    try {
      check_ids(*tok, tok->encode(t));
    } catch (const qf::InputError&) {
    }
  }
  // Every id decodes, alone and all together (what generate's stream does).
  std::vector<int32_t> every;
  for (int64_t id = 0; id < tok->vocab_size() && id < 4096; ++id) every.push_back(static_cast<int32_t>(id));
  try {
    check_ids(*tok, every);
  } catch (const qf::InputError&) {
  }
  return 0;
}
