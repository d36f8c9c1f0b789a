// Tokenizers behind one interface. Invariant: encode() never adds BOS/EOS (the dataset decides);
// fingerprint() changes whenever the ids produced could change (it keys the token cache).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"

namespace qf::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual std::string token(int32_t id) const = 0;  // the vocabulary entry (e.g. "<s>", "▁the")
  // What a runtime's vocabulary table needs (llama.cpp's token types: 1 normal, 2 unknown,
  // 3 control, 4 user-defined, 5 unused, 6 byte). Tokenizers without scores report 0.
  struct Entry {
    std::string piece;
    float score = 0.f;
    int32_t type = 1;
  };
  virtual Entry entry(int32_t id) const { return {token(id), 0.f, 1}; }
  // A sentencepiece model's normalizer spec: what a runtime must reproduce to give the same ids
  // (llama.cpp's "llama" vocabulary applies none of it except the dummy prefix, its
  // tokenizer.ggml.add_space_prefix). Other tokenizers report {"", false, false}.
  struct Normalization {
    std::string rule;                       // "identity", "nmt_nfkc", ... ("" when not sentencepiece)
    bool add_dummy_prefix = false;          // "▁" prepended to the text before encoding
    bool remove_extra_whitespaces = false;  // leading/trailing spaces dropped, runs collapsed
  };
  virtual Normalization normalization() const { return {}; }
  virtual std::string kind() const = 0;  // "sentencepiece" or "huggingface-bpe"
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when the tokenizer has none
  virtual int32_t eos_id() const = 0;
  virtual int32_t pad_id() const = 0;
  virtual std::string fingerprint() const = 0;
  virtual std::string path() const = 0;
};

// tokenizer: section of a run config.
struct TokenizerConfig {
  enum class Type { SentencePiece, HuggingFace, Gguf };
  enum class ModelType { Bpe, Unigram };
  Type type = Type::SentencePiece;
  std::string path;              // .model file (sentencepiece), tokenizer.json / its directory (huggingface), .gguf file (gguf)
  // When train.enabled and `path` does not exist, a sentencepiece model is trained on these sources,
  // the way Llama's tokenizer was: identity normalisation (text kept byte for byte: newlines,
  // indentation, runs of spaces), whitespace-only pieces, byte fallback, digits split, a dummy "▁"
  // prefix. decode(encode(text)) == text for any UTF-8 text.
  struct Train {
    bool enabled = false;
    std::vector<std::string> sources;  // files or directories (recursively, *.txt/*.rst*/*.md/*.jsonl text)
    int64_t vocab_size = 4096;
    ModelType model_type = ModelType::Bpe;
    double character_coverage = 0.9995;
    int64_t max_sentences = 200000;   // input_sentence_size for the trainer (sampled, seeded)
    int64_t seed = 1234;
  } train;
  static TokenizerConfig from_config(cfg::Reader& r);  // calls r.finish() on what it reads
};

// Loads `cfg.path`, training it first when missing and cfg.train.enabled (atomic: the .model
// file appears only once complete). Throws InputError naming the file on a malformed model.
std::unique_ptr<Tokenizer> load_or_train_tokenizer(const TokenizerConfig& cfg);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path);
// A sentencepiece model from its serialized ModelProto (`origin` names it in messages and is path()).
std::unique_ptr<Tokenizer> load_sentencepiece_proto(const std::string& origin, std::string bytes);
// A Hugging Face checkpoint dir's tokenizer: tokenizer.model (sentencepiece, preferred, as
// convert_hf_to_gguf.py does for Llama) else tokenizer.json; a GGUF file's own (data/gguf_tokenizer.h);
// InputError naming the dir otherwise.
std::unique_ptr<Tokenizer> load_tokenizer_dir(const std::string& dir);

}  // namespace qf::data
