#include "data/gguf_tokenizer.h"

#include <cstring>
#include <map>

#include "core/error.h"
#include "core/fs.h"
#include "core/gguf_file.h"
#include "data/hf_tokenizer.h"

namespace qf::data {

const char* const kLlama3Split =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";
const char* const kQwen2Split =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";

namespace {

using json = nlohmann::json;

// protobuf wire format, for the sentencepiece ModelProto (field numbers: data/tokenizer.cpp).
void varint(std::string& o, uint64_t v) {
  while (v >= 0x80) {
    o.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  o.push_back(static_cast<char>(v));
}
void field_varint(std::string& o, uint32_t field, uint64_t v) {
  varint(o, (static_cast<uint64_t>(field) << 3) | 0);
  varint(o, v);
}
void field_bytes(std::string& o, uint32_t field, const std::string& b) {
  varint(o, (static_cast<uint64_t>(field) << 3) | 2);
  varint(o, b.size());
  o += b;
}
void field_float(std::string& o, uint32_t field, float f) {
  varint(o, (static_cast<uint64_t>(field) << 3) | 5);
  char b[4];
  std::memcpy(b, &f, 4);
  o.append(b, 4);
}

struct Vocab {
  std::string model;
  std::vector<std::string> tokens;
  std::vector<int32_t> types;  // llama.cpp's token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)
  int32_t bos = -1, eos = -1, pad = -1;
};

Vocab read_vocab(const gguf_in::File& f) {
  Vocab v;
  const std::string& o = f.origin();
  v.model = f.get_string("tokenizer.ggml.model");
  v.tokens = f.get_strings("tokenizer.ggml.tokens");
  QF_CHECK_INPUT(!v.tokens.empty(), o, ": tokenizer.ggml.tokens is empty");
  const size_t n = v.tokens.size();
  v.types.assign(n, 1);
  if (f.find("tokenizer.ggml.token_type")) {
    const auto& t = f.get_nums("tokenizer.ggml.token_type");
    QF_CHECK_INPUT(t.size() == n, o, ": tokenizer.ggml.token_type has ", t.size(), " entries for ", n, " tokens");
    for (size_t i = 0; i < n; ++i) {
      QF_CHECK_INPUT(t[i] >= 0 && t[i] <= 6 && t[i] == static_cast<int32_t>(t[i]), o, ": tokenizer.ggml.token_type[", i,
                     "] is ", t[i], " (expected a llama.cpp token type 0..6)");
      v.types[i] = t[i] == 0 ? 1 : static_cast<int32_t>(t[i]);
    }
  }
  auto id = [&](const char* key) -> int32_t {
    if (!f.find(key)) return -1;
    const int64_t x = f.get_int(key);
    QF_CHECK_INPUT(x >= 0 && x < static_cast<int64_t>(n), o, ": metadata key '", key, "' is ", x, ", outside the ", n,
                   " tokens");
    return static_cast<int32_t>(x);
  };
  v.bos = id("tokenizer.ggml.bos_token_id");
  v.eos = id("tokenizer.ggml.eos_token_id");
  v.pad = id("tokenizer.ggml.padding_token_id");
  return v;
}

// A sentencepiece BPE ModelProto holding the vocabulary as llama.cpp's SPM tokenizer uses it.
std::string spm_proto(const gguf_in::File& f, const Vocab& v) {
  const std::string& o = f.origin();
  const auto& scores = f.get_nums("tokenizer.ggml.scores");
  QF_CHECK_INPUT(scores.size() == v.tokens.size(), o, ": tokenizer.ggml.scores has ", scores.size(), " entries for ",
                 v.tokens.size(), " tokens");
  std::string proto;
  int n_bytes = 0, n_unk = 0;
  std::map<std::string, size_t> seen;
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    QF_CHECK_INPUT(!v.tokens[i].empty(), o, ": tokenizer.ggml.tokens[", i, "] is empty");
    auto [it, fresh] = seen.emplace(v.tokens[i], i);
    QF_CHECK_INPUT(fresh, o, ": tokenizer.ggml.tokens[", i, "] '", v.tokens[i], "' repeats token ", it->second,
                   " (a sentencepiece vocabulary has each piece once)");
    n_bytes += v.types[i] == 6;
    n_unk += v.types[i] == 2;
    std::string piece;
    field_bytes(piece, 1, v.tokens[i]);
    field_float(piece, 2, static_cast<float>(scores[i]));
    field_varint(piece, 3, static_cast<uint64_t>(v.types[i]));
    field_bytes(proto, 1, piece);
  }
  QF_CHECK_INPUT(n_unk == 1, o, ": a llama (SentencePiece) vocabulary needs exactly one unknown token (token type 2); ",
                 "this one has ", n_unk);
  std::string trainer;
  field_varint(trainer, 3, 2);  // model_type BPE: merges by piece score, as llama.cpp's SPM tokenizer
  field_varint(trainer, 35, n_bytes == 256 ? 1 : 0);  // byte_fallback
  field_bytes(proto, 2, trainer);
  std::string norm;
  field_bytes(norm, 1, "identity");
  field_varint(norm, 3, f.get_bool("tokenizer.ggml.add_space_prefix", true) ? 1 : 0);
  field_varint(norm, 4, 0);  // remove_extra_whitespaces: llama.cpp keeps every space
  field_varint(norm, 5, 1);  // escape_whitespaces: " " -> "▁"
  field_bytes(proto, 3, norm);
  return proto;
}

json pre_tokenizer(const gguf_in::File& f) {
  const std::string pre = f.get_string("tokenizer.ggml.pre", "default");
  const json byte_level_regex = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  auto split = [](const char* re) {
    return json{{"type", "Sequence"},
                {"pretokenizers",
                 {{{"type", "Split"}, {"pattern", {{"Regex", re}}}, {"behavior", "Isolated"}, {"invert", false}},
                  {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
  };
  if (pre == "default" || pre == "gpt-2" || pre == "gpt2") return byte_level_regex;
  if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") return split(kLlama3Split);
  if (pre == "qwen2") return split(kQwen2Split);
  throw InputError(f.origin() + ": tokenizer.ggml.pre '" + pre + "' is not a pre-tokenizer qforge reads (it reads "
                   "default, gpt-2, llama-bpe / llama3 and qwen2)");
}

json bpe_json(const gguf_in::File& f, const Vocab& v) {
  const std::string& o = f.origin();
  json vocab = json::object(), added = json::array();
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    QF_CHECK_INPUT(!vocab.contains(v.tokens[i]), o, ": tokenizer.ggml.tokens[", i, "] '", v.tokens[i],
                   "' repeats an earlier token (a BPE vocabulary has each token once)");
    vocab[v.tokens[i]] = i;
    if (v.types[i] == 3 || v.types[i] == 4)
      added.push_back({{"id", i}, {"content", v.tokens[i]}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                       {"normalized", false}, {"special", v.types[i] == 3}});
  }
  json merges = json::array();
  if (f.find("tokenizer.ggml.merges"))
    for (auto& m : f.get_strings("tokenizer.ggml.merges")) merges.push_back(m);
  const std::string pre = f.get_string("tokenizer.ggml.pre", "default");
  const bool ignore_merges = pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3";
  json post = nullptr;  // BOS first when the file says so (transformers' fast tokenizer adds it from here)
  if (v.bos >= 0 && f.get_bool("tokenizer.ggml.add_bos_token", false)) {
    const std::string& b = v.tokens[static_cast<size_t>(v.bos)];
    const json bos = {{"SpecialToken", {{"id", b}, {"type_id", 0}}}};
    post = {{"type", "TemplateProcessing"},
            {"single", {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair", {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, bos, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{b, {{"id", b}, {"ids", {v.bos}}, {"tokens", {b}}}}}}};
  }
  return json{{"version", "1.0"},
              {"added_tokens", added},
              {"normalizer", nullptr},
              {"pre_tokenizer", pre_tokenizer(f)},
              {"post_processor", post},
              {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
              {"model",
               {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                {"ignore_merges", ignore_merges}, {"vocab", vocab}, {"merges", merges}}}};
}

// The vocabulary's tokenizer with the GGUF's own special ids and identity.
class GgufTokenizer final : public Tokenizer {
 public:
  GgufTokenizer(std::unique_ptr<Tokenizer> inner, const Vocab& v, std::string path)
      : inner_(std::move(inner)), bos_(v.bos), eos_(v.eos), pad_(v.pad), path_(std::move(path)) {
    fingerprint_ = "gguf:" + inner_->fingerprint() + ":" + std::to_string(bos_) + "," + std::to_string(eos_) + "," +
                   std::to_string(pad_);
  }
  std::vector<int32_t> encode(const std::string& text) const override { return inner_->encode(text); }
  std::string decode(const std::vector<int32_t>& ids) const override { return inner_->decode(ids); }
  std::string token(int32_t id) const override { return inner_->token(id); }
  Entry entry(int32_t id) const override { return inner_->entry(id); }
  Normalization normalization() const override { return inner_->normalization(); }
  std::string kind() const override { return inner_->kind(); }
  int64_t vocab_size() const override { return inner_->vocab_size(); }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  int32_t pad_id() const override { return pad_; }
  std::string fingerprint() const override { return fingerprint_; }
  std::string path() const override { return path_; }

 private:
  std::unique_ptr<Tokenizer> inner_;
  int32_t bos_, eos_, pad_;
  std::string path_, fingerprint_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const std::string& path) {
  const auto f = gguf_in::File::open(path);
  const Vocab v = read_vocab(*f);
  std::unique_ptr<Tokenizer> inner;
  if (v.model == "llama") {
    inner = load_sentencepiece_proto(path, spm_proto(*f, v));
  } else if (v.model == "gpt2") {
    inner = parse_hf_tokenizer(bpe_json(*f, v).dump(), path);
  } else {
    throw InputError(path + ": tokenizer.ggml.model '" + v.model + "' is not a vocabulary qforge reads (it reads "
                     "llama (SentencePiece) and gpt2 (byte-level BPE))");
  }
  QF_CHECK_INPUT(inner->vocab_size() == static_cast<int64_t>(v.tokens.size()), path, ": the tokenizer rebuilt from ",
                 "tokenizer.ggml.tokens has ", inner->vocab_size(), " tokens, the file lists ", v.tokens.size());
  return std::make_unique<GgufTokenizer>(std::move(inner), v, path);
}

nlohmann::json gguf_bpe_tokenizer_json(const std::string& path) {
  const auto f = gguf_in::File::open(path);
  const Vocab v = read_vocab(*f);
  QF_CHECK_INPUT(v.model == "gpt2", path, ": tokenizer.ggml.model is '", v.model, "', not gpt2 (byte-level BPE)");
  return bpe_json(*f, v);
}

std::string gguf_sentencepiece_model(const std::string& path) {
  const auto f = gguf_in::File::open(path);
  const Vocab v = read_vocab(*f);
  QF_CHECK_INPUT(v.model == "llama", path, ": tokenizer.ggml.model is '", v.model, "', not llama (SentencePiece)");
  return spm_proto(*f, v);
}

bool gguf_adds_bos(const std::string& path) {
  const auto f = gguf_in::File::open(path);
  return f->get_bool("tokenizer.ggml.add_bos_token", f->get_string("tokenizer.ggml.model", "") == "llama");
}

}  // namespace qf::data
