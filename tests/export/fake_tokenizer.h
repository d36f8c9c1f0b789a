// A sentencepiece-like vocabulary of `n` pieces for the exporter tests (the GGUF tokenizer block and
// the HF exporters' tokenizer copy need one); path() is a small file copy_tokenizer can copy.
#pragma once
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "tests/test_util.h"

namespace qf::testing {

class FakeTokenizer : public data::Tokenizer {
 public:
  FakeTokenizer(std::string path, int64_t n) : path_(std::move(path)), n_(n) {
    write_text(path_, "not a real sentencepiece model\n");
  }
  std::vector<int32_t> encode(const std::string&) const override { return {}; }
  std::string decode(const std::vector<int32_t>&) const override { return ""; }
  std::string token(int32_t id) const override { return id == 0 ? "<unk>" : id == 1 ? "<s>" : id == 2 ? "</s>" : "p" + std::to_string(id); }
  Entry entry(int32_t id) const override { return {token(id), -static_cast<float>(id), id == 0 ? 2 : id < 3 ? 3 : 1}; }
  Normalization normalization() const override { return {"identity", true, false}; }
  std::string kind() const override { return "sentencepiece"; }
  int64_t vocab_size() const override { return n_; }
  int32_t bos_id() const override { return 1; }
  int32_t eos_id() const override { return 2; }
  int32_t pad_id() const override { return -1; }
  std::string fingerprint() const override { return "fake"; }
  std::string path() const override { return path_; }

 private:
  std::string path_;
  int64_t n_;
};

}  // namespace qf::testing
