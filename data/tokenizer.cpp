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
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/hf_tokenizer.h"

namespace qf::data {

namespace stdfs = std::filesystem;

TokenizerConfig TokenizerConfig::from_config(cfg::Reader& r) {
  TokenizerConfig c;
  c.type = r.choice<Type>("type", Type::SentencePiece,
                         {{"sentencepiece", Type::SentencePiece}, {"huggingface", Type::HuggingFace}});
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
  if (c.type == Type::HuggingFace && c.train.enabled) {
    r.fail("train.enabled", "training is for sentencepiece tokenizers; a huggingface tokenizer.json is loaded as is");
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

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(std::string path, std::string bytes) : path_(std::move(path)) {
    auto st = sp_.LoadFromSerializedProto(bytes);
    if (!st.ok())
      throw InputError(str("tokenizer file '", path_, "' is not a valid sentencepiece model: ", st.ToString()));
    if (sp_.GetPieceSize() <= 0)
      throw InputError(str("tokenizer file '", path_, "' is not a valid sentencepiece model: it has no pieces"));
    fingerprint_ = "spm:" + fs::hex64(fs::fnv1a64(bytes));
  }
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int> ids;
    auto st = sp_.Encode(text, &ids);
    QF_CHECK(st.ok(), "sentencepiece encode failed with '", path_, "': ", st.ToString());
    return std::vector<int32_t>(ids.begin(), ids.end());
  }
  std::string token(int32_t id) const override {
    QF_CHECK(id >= 0 && id < sp_.GetPieceSize(), "token id ", id, " is out of range for tokenizer '", path_, "'");
    return sp_.IdToPiece(id);
  }
  Entry entry(int32_t id) const override {
    Entry e{token(id), sp_.GetScore(id), 1};
    if (sp_.IsUnknown(id)) e.type = 2;
    else if (sp_.IsControl(id)) e.type = 3;
    else if (sp_.IsUnused(id)) e.type = 5;
    else if (sp_.IsByte(id)) e.type = 6;
    return e;
  }
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

std::unique_ptr<Tokenizer> load_tokenizer_dir(const std::string& dir) {
  if (stdfs::exists(dir + "/tokenizer.model")) return load_sentencepiece(dir + "/tokenizer.model");
  if (stdfs::exists(dir + "/tokenizer.json")) return load_hf_tokenizer(dir);
  throw InputError(str("'", dir, "' has neither tokenizer.model (sentencepiece) nor tokenizer.json"));
}

std::unique_ptr<Tokenizer> load_or_train_tokenizer(const TokenizerConfig& cfg) {
  switch (cfg.type) {
    case TokenizerConfig::Type::SentencePiece:
      if (!stdfs::exists(cfg.path)) {
        QF_CHECK_INPUT(cfg.train.enabled, "tokenizer file '", cfg.path,
                       "' does not exist; set tokenizer.train.enabled: true to train one");
        train_sentencepiece(cfg);
      }
      return load_sentencepiece(cfg.path);
    case TokenizerConfig::Type::HuggingFace:
      return load_hf_tokenizer(cfg.path);
  }
  throw Error("internal error: unhandled tokenizer type");
}

}  // namespace qf::data
