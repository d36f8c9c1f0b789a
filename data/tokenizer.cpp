// SentencePiece tokenizer: loading, training (atomic), and the tokenizer: config section.
#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string_view>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"
#include "data/utf8.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/gguf_file.h"
#include "data/gguf_tokenizer.h"
#include "data/hf_tokenizer.h"

namespace qf::data {

namespace stdfs = std::filesystem;

TokenizerConfig TokenizerConfig::from_config(cfg::Reader& r) {
  TokenizerConfig c;
  c.type = r.choice<Type>("type", Type::SentencePiece,
                         {{"sentencepiece", Type::SentencePiece}, {"huggingface", Type::HuggingFace}, {"gguf", Type::Gguf}});
  c.path = r.str("path", "");
  {
    cfg::Reader t = r.child("train");
    c.train.enabled = t.boolean("enabled", c.train.enabled);
    c.train.sources = t.strings("sources", c.train.sources);
    c.train.vocab_size = t.i64("vocab_size", c.train.vocab_size, 32, 1000000);
    c.train.model_type =
        t.choice<ModelType>("model_type", c.train.model_type, {{"bpe", ModelType::Bpe}, {"unigram", ModelType::Unigram}});
    c.train.character_coverage = t.f64("character_coverage", c.train.character_coverage, 0.0, 1.0);
    if (c.train.character_coverage <= 0.0)
      t.fail("character_coverage", "value 0 is out of range; expected a number in (0, 1]");
    c.train.max_sentences = t.i64("max_sentences", c.train.max_sentences, 1, std::numeric_limits<int64_t>::max());
    // The sentencepiece generator seed is an unsigned int; UINT_MAX is reserved (random_device).
    c.train.seed = t.i64("seed", c.train.seed, 0, static_cast<int64_t>(std::numeric_limits<unsigned>::max()) - 1);
    if (c.train.enabled) {
      if (c.train.sources.empty())
        t.fail("sources", "at least one file or directory is required when tokenizer.train.enabled is true");
      for (size_t i = 0; i < c.train.sources.size(); ++i)
        if (!stdfs::exists(c.train.sources[i]))
          t.fail("sources[" + std::to_string(i) + "]", "path '" + c.train.sources[i] + "' does not exist");
    }
    t.finish();
  }
  if (c.type != Type::SentencePiece && c.train.enabled) {
    r.fail("train.enabled", "training is for sentencepiece tokenizers; a huggingface tokenizer.json or a GGUF file's "
                            "vocabulary is loaded as is");
  } else if (c.path.empty()) {
    r.fail("path", c.train.enabled ? "required: where the trained sentencepiece .model file is written"
                                   : "required: a sentencepiece .model file");
  } else if (!c.train.enabled && !stdfs::exists(c.path)) {
    r.fail("path", "tokenizer file '" + c.path +
                       "' does not exist; set tokenizer.train.enabled: true to train one");
  }
  r.finish();
  return c;
}

namespace {

// What libsentencepiece 0.1.x does not expose (its ModelProto headers are not installed): each
// piece's type (USER_DEFINED included) and the normalizer spec, read from the serialized
// ModelProto with protobuf's wire format. Field numbers from sentencepiece_model.proto:
// ModelProto {1: repeated SentencePiece pieces, 3: NormalizerSpec normalizer_spec};
// SentencePiece {1: piece, 2: score, 3: type = NORMAL}; NormalizerSpec {1: name,
// 3: add_dummy_prefix = true, 4: remove_extra_whitespaces = true}.
struct ModelFacts {
  std::vector<int32_t> types;
  Tokenizer::Normalization norm{"", true, true};
};

class WireReader {
 public:
  explicit WireReader(std::string_view b) : b_(b) {}
  bool done() const { return p_ >= b_.size(); }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      QF_CHECK(p_ < b_.size(), "truncated varint");
      uint8_t c = static_cast<uint8_t>(b_[p_++]);
      v |= static_cast<uint64_t>(c & 0x7f) << shift;
      if (!(c & 0x80)) return v;
    }
    QF_CHECK(false, "malformed varint");
    return 0;
  }
  // Reads one field's key; its value is read by the caller (varint/bytes) or skipped.
  std::pair<uint32_t, uint32_t> key() {
    uint64_t k = varint();
    return {static_cast<uint32_t>(k >> 3), static_cast<uint32_t>(k & 7)};
  }
  std::string_view bytes() {
    uint64_t n = varint();
    QF_CHECK(n <= b_.size() - p_, "truncated field");
    auto v = b_.substr(p_, n);
    p_ += n;
    return v;
  }
  void skip(uint32_t wire) {
    switch (wire) {
      case 0: varint(); return;
      case 1: advance(8); return;
      case 2: bytes(); return;
      case 5: advance(4); return;
      default: QF_CHECK(false, "unsupported wire type ", wire);
    }
  }

 private:
  void advance(size_t n) {
    QF_CHECK(n <= b_.size() - p_, "truncated field");
    p_ += n;
  }
  std::string_view b_;
  size_t p_ = 0;
};

ModelFacts model_facts(std::string_view model) {
  ModelFacts f;
  WireReader r(model);
  while (!r.done()) {
    auto [field, wire] = r.key();
    if (field == 1 && wire == 2) {
      WireReader piece(r.bytes());
      int32_t type = 1;
      while (!piece.done()) {
        auto [pf, pw] = piece.key();
        if (pf == 3 && pw == 0) type = static_cast<int32_t>(piece.varint());
        else piece.skip(pw);
      }
      f.types.push_back(type);
    } else if (field == 3 && wire == 2) {
      WireReader spec(r.bytes());
      while (!spec.done()) {
        auto [sf, sw] = spec.key();
        if (sf == 1 && sw == 2) f.norm.rule = std::string(spec.bytes());
        else if (sf == 3 && sw == 0) f.norm.add_dummy_prefix = spec.varint() != 0;
        else if (sf == 4 && sw == 0) f.norm.remove_extra_whitespaces = spec.varint() != 0;
        else spec.skip(sw);
      }
    } else {
      r.skip(wire);
    }
  }
  return f;
}

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(std::string path, std::string bytes) : path_(std::move(path)) {
    auto st = sp_.LoadFromSerializedProto(bytes);
    if (!st.ok())
      throw InputError(str("tokenizer file '", path_, "' is not a valid sentencepiece model: ", st.ToString()));
    if (sp_.GetPieceSize() <= 0)
      throw InputError(str("tokenizer file '", path_, "' is not a valid sentencepiece model: it has no pieces"));
    fingerprint_ = "spm:" + fs::hex64(fs::fnv1a64(bytes));
    try {
      facts_ = model_facts(bytes);
    } catch (const Error& e) {
      throw InputError(str("tokenizer file '", path_, "' is not a valid sentencepiece model: ", e.what()));
    }
    if (static_cast<int>(facts_.types.size()) != sp_.GetPieceSize())
      throw InputError(str("tokenizer file '", path_, "' is not a valid sentencepiece model: ", facts_.types.size(),
                           " pieces read, sentencepiece loaded ", sp_.GetPieceSize()));
  }
  std::vector<int32_t> encode(const std::string& text) const override {
    // sentencepiece itself would map ill-formed bytes to U+FFFD silently; qforge refuses them for
    // every tokenizer alike (data/utf8.h).
    check_utf8(text, "text given to tokenizer " + path_);
    std::vector<int> ids;
    auto st = sp_.Encode(text, &ids);
    QF_CHECK(st.ok(), "sentencepiece encode failed with '", path_, "': ", st.ToString());
    return std::vector<int32_t>(ids.begin(), ids.end());
  }
  std::string token(int32_t id) const override {
    QF_CHECK(id >= 0 && id < sp_.GetPieceSize(), "token id ", id, " is out of range for tokenizer '", path_, "'");
    return sp_.IdToPiece(id);
  }
  // sentencepiece's piece types are llama.cpp's token types (NORMAL 1, UNKNOWN 2, CONTROL 3,
  // USER_DEFINED 4, UNUSED 5, BYTE 6), as convert_hf_to_gguf.py copies them.
  Entry entry(int32_t id) const override { return {token(id), sp_.GetScore(id), facts_.types[id]}; }
  Normalization normalization() const override { return facts_.norm; }
  std::string kind() const override { return "sentencepiece"; }
  std::string decode(const std::vector<int32_t>& ids) const override {
    const int n = sp_.GetPieceSize();
    std::vector<int> v;
    v.reserve(ids.size());
    for (int32_t id : ids) {
      QF_CHECK(id >= 0 && id < n, "token id ", id, " is out of range for tokenizer '", path_, "' (vocab size ", n, ")");
      v.push_back(id);
    }
    std::string out;
    auto st = sp_.Decode(v, &out);
    QF_CHECK(st.ok(), "sentencepiece decode failed with '", path_, "': ", st.ToString());
    return out;
  }
  int64_t vocab_size() const override { return sp_.GetPieceSize(); }
  int32_t bos_id() const override { return sp_.bos_id(); }
  int32_t eos_id() const override { return sp_.eos_id(); }
  int32_t pad_id() const override { return sp_.pad_id(); }
  std::string fingerprint() const override { return fingerprint_; }
  std::string path() const override { return path_; }

 private:
  std::string path_;
  std::string fingerprint_;
  ModelFacts facts_;
  sentencepiece::SentencePieceProcessor sp_;
};

bool hidden(const stdfs::path& p) {
  auto n = p.filename().string();
  return !n.empty() && n[0] == '.';
}

bool has_suffix(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// Files used as training text when a source is a directory.
bool is_text_name(const std::string& name) {
  return has_suffix(name, ".txt") || has_suffix(name, ".md") || has_suffix(name, ".jsonl") ||
         name.find(".rst") != std::string::npos;
}

std::vector<std::string> training_files(const std::vector<std::string>& sources) {
  std::vector<std::string> out;
  for (auto& s : sources) {
    QF_CHECK_INPUT(stdfs::exists(s), "tokenizer training source '", s, "' does not exist");
    if (!stdfs::is_directory(s)) {
      out.push_back(s);
      continue;
    }
    std::vector<std::string> files;
    for (auto it = stdfs::recursive_directory_iterator(s); it != stdfs::recursive_directory_iterator(); ++it) {
      if (hidden(it->path())) {
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      if (it->is_regular_file() && is_text_name(it->path().filename().string())) files.push_back(it->path().string());
    }
    std::sort(files.begin(), files.end());
    out.insert(out.end(), files.begin(), files.end());
  }
  return out;
}

void append_line(std::string& out, std::string line, int64_t& n) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  if (line.find_first_not_of(" \t") == std::string::npos) return;
  out += line;
  out += '\n';
  ++n;
}

// Text of every string value in a JSON value (for .jsonl training sources).
void json_strings(const nlohmann::json& j, std::vector<std::string>& out) {
  if (j.is_string()) {
    out.push_back(j.get<std::string>());
  } else if (j.is_object() || j.is_array()) {
    for (auto& v : j) json_strings(v, out);
  }
}

struct TempDir {
  std::string path;
  TempDir() {
    static std::atomic<int> counter{0};
    auto base = stdfs::temp_directory_path() /
                ("qforge-spm-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_tree(base.string());
    fs::ensure_dir(base.string());
    path = base.string();
  }
  ~TempDir() { fs::remove_tree(path); }
};

void train_sentencepiece(const TokenizerConfig& cfg) {
  const auto& t = cfg.train;
  auto files = training_files(t.sources);
  std::string text;
  int64_t n_lines = 0;
  for (auto& f : files) {
    std::string bytes = fs::read_file(f);
    bool jsonl = has_suffix(f, ".jsonl");
    size_t pos = 0;
    while (pos < bytes.size()) {
      size_t nl = bytes.find('\n', pos);
      if (nl == std::string::npos) nl = bytes.size();
      std::string line = bytes.substr(pos, nl - pos);
      pos = nl + 1;
      if (jsonl) {
        auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (!j.is_discarded()) {
          std::vector<std::string> parts;
          json_strings(j, parts);
          for (auto& p : parts) {
            size_t q = 0;
            while (q <= p.size()) {
              size_t e = p.find('\n', q);
              if (e == std::string::npos) e = p.size();
              append_line(text, p.substr(q, e - q), n_lines);
              q = e + 1;
            }
          }
          continue;
        }
      }
      append_line(text, std::move(line), n_lines);
    }
  }
  std::string src_list;
  for (auto& s : t.sources) src_list += (src_list.empty() ? "'" : ", '") + s + "'";
  QF_CHECK_INPUT(n_lines > 0, "cannot train tokenizer '", cfg.path, "': no text found in ", src_list,
                 " (directories are searched for *.txt, *.md, *.rst*, *.jsonl)");

  TempDir tmp;
  std::string sentences = tmp.path + "/sentences.txt";
  fs::write_atomic(sentences, text);
  text.clear();
  text.shrink_to_fit();

  stdfs::path out(cfg.path);
  if (out.has_parent_path()) fs::ensure_dir(out.parent_path().string());
  std::string prefix = cfg.path + ".tmp" + std::to_string(::getpid());

  qf::log::info("training sentencepiece ", t.model_type == TokenizerConfig::ModelType::Bpe ? "bpe" : "unigram",
                " tokenizer (vocab ", t.vocab_size, ") on ", n_lines, " lines from ", files.size(), " file",
                files.size() == 1 ? "" : "s", " -> ", cfg.path);
  // sentencepiece 0.1.x has no `random_seed` trainer option; its sampling/shuffling generator is
  // seeded through this process-wide setter instead.
  sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned>(t.seed));
  std::unordered_map<std::string, std::string> kw = {
      {"input", sentences},
      {"model_prefix", prefix},
      {"model_type", t.model_type == TokenizerConfig::ModelType::Bpe ? "bpe" : "unigram"},
      {"vocab_size", std::to_string(t.vocab_size)},
      {"character_coverage", str(t.character_coverage)},
      {"input_sentence_size", std::to_string(t.max_sentences)},
      {"shuffle_input_sentence", "true"},
      // Llama's settings: the text is kept as it is (no NFKC, newlines and indentation survive;
      // a newline, never inside a training line, encodes as the <0x0A> byte piece), runs of
      // spaces may be pieces of their own, characters outside the vocabulary fall back to bytes,
      // numbers are split into digits, and a "▁" is prepended (llama.cpp's add_space_prefix).
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"add_dummy_prefix", "true"},
      {"split_digits", "true"},
      {"byte_fallback", "true"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "3"},
      {"num_threads", "2"},
      {"minloglevel", "2"},
  };
  auto st = sentencepiece::SentencePieceTrainer::Train(kw);
  std::string model = prefix + ".model", vocab = prefix + ".vocab";
  std::error_code ec;
  stdfs::remove(vocab, ec);
  if (!st.ok()) {
    stdfs::remove(model, ec);
    std::string msg = st.ToString(), hint;
    if (msg.find("required_chars") != std::string::npos)
      hint = " (the vocabulary holds 256 byte-fallback pieces + 4 special pieces + every character of the corpus; "
             "raise tokenizer.train.vocab_size)";
    throw InputError(str("training tokenizer '", cfg.path, "' failed: ", msg, hint));
  }
  fs::fsync_path(model);
  fs::rename_atomic(model, cfg.path);
}

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path) {
  QF_CHECK_INPUT(stdfs::exists(model_path), "tokenizer file '", model_path, "' does not exist");
  QF_CHECK_INPUT(stdfs::is_regular_file(model_path), "tokenizer file '", model_path, "' is not a regular file");
  return std::make_unique<SentencePieceTokenizer>(model_path, fs::read_file(model_path));
}

std::unique_ptr<Tokenizer> load_sentencepiece_proto(const std::string& origin, std::string bytes) {
  return std::make_unique<SentencePieceTokenizer>(origin, std::move(bytes));
}

std::unique_ptr<Tokenizer> load_tokenizer_dir(const std::string& dir) {
  if (gguf_in::is_gguf_file(dir)) return load_gguf_tokenizer(dir);
  if (stdfs::exists(dir + "/tokenizer.model")) return load_sentencepiece(dir + "/tokenizer.model");
  if (stdfs::exists(dir + "/tokenizer.json")) return load_hf_tokenizer(dir);
  throw InputError(str("'", dir, "' has neither tokenizer.model (sentencepiece) nor tokenizer.json"));
}

std::unique_ptr<Tokenizer> load_or_train_tokenizer(const TokenizerConfig& cfg) {
  switch (cfg.type) {
    case TokenizerConfig::Type::SentencePiece: {
      if (!stdfs::exists(cfg.path)) {
        QF_CHECK_INPUT(cfg.train.enabled, "tokenizer file '", cfg.path,
                       "' does not exist; set tokenizer.train.enabled: true to train one");
        train_sentencepiece(cfg);
        return load_sentencepiece(cfg.path);
      }
      auto tok = load_sentencepiece(cfg.path);
      // An existing file wins over the train: settings; say so when it is an older qforge model
      // that loses text (its ids then also differ from llama.cpp's on an exported GGUF).
      auto n = tok->normalization();
      if (cfg.train.enabled && (n.rule != "identity" || n.remove_extra_whitespaces))
        log::warn("tokenizer '", cfg.path, "' exists and is used as is, but it normalizes text (", n.rule,
                  n.remove_extra_whitespaces ? ", extra whitespace removed" : "",
                  "), so newlines and indentation are not kept; delete it to retrain with identity normalisation");
      return tok;
    }
    case TokenizerConfig::Type::HuggingFace:
      return load_hf_tokenizer(cfg.path);
    case TokenizerConfig::Type::Gguf:
      return load_gguf_tokenizer(cfg.path);
  }
  throw Error("internal error: unhandled tokenizer type");
}

}  // namespace qf::data
