// Dataset: reading (text splits, directories, JSONL), packing boundaries, loss masks, the token
// cache, corpus errors and the data: config section. Uses a byte-level fake tokenizer so every
// expected token stream can be written out by hand.
#include "data/dataset.h"

#include <ATen/ATen.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/config.h"
#include "core/error.h"
#include "core/fs.h"
#include "tests/test_util.h"

namespace stdfs = std::filesystem;
using namespace qf::data;

namespace {

struct TmpDir : qf::testing::TmpDir {
  TmpDir() : qf::testing::TmpDir("qf_data") {}
};

void write(const std::string& path, const std::string& text) { qf::testing::write_text(path, text); }

// id = 4 + byte; BOS 1, EOS 2, PAD 3.
class ByteTokenizer : public Tokenizer {
 public:
  explicit ByteTokenizer(std::string fp = "bytes-v1") : fp_(std::move(fp)) {}
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids;
    for (unsigned char c : text) ids.push_back(4 + c);
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (auto id : ids)
      if (id >= 4) s.push_back(static_cast<char>(id - 4));
    return s;
  }
  std::string token(int32_t id) const override { return decode({id}); }
  std::string kind() const override { return "bytes"; }
  int64_t vocab_size() const override { return 260; }
  int32_t bos_id() const override { return 1; }
  int32_t eos_id() const override { return 2; }
  int32_t pad_id() const override { return 3; }
  std::string fingerprint() const override { return fp_; }
  std::string path() const override { return "<bytes>"; }

 private:
  std::string fp_;
};

int32_t B(char c) { return 4 + static_cast<unsigned char>(c); }

// A reference stream built by hand: ids and the per-token target mask.
struct Ref {
  std::vector<int64_t> ids;
  std::vector<bool> mask;
  void text(const std::string& s, bool bos = true, bool eos = true) {
    if (bos) push(1, true);
    for (char c : s) push(B(c), true);
    if (eos) push(2, true);
  }
  void instr(const std::string& p, const std::string& r) {
    push(1, false);
    for (char c : p) push(B(c), false);
    for (char c : r) push(B(c), true);
    push(2, true);
  }
  void push(int64_t id, bool m) {
    ids.push_back(id);
    mask.push_back(m);
  }
};

DataConfig config_for(const std::string& path, int64_t seq_len, double val, const std::string& cache_dir = "") {
  DataConfig c;
  SourceConfig s;
  s.path = path;
  c.sources = {s};
  c.seq_len = seq_len;
  c.val_fraction = val;
  c.cache_dir = cache_dir;
  return c;
}

// Checks every packed window (train then val) against the reference stream.
void expect_packed(const Dataset& ds, const Ref& ref, int64_t seq_len) {
  const int64_t W = seq_len + 1;
  const int64_t n = static_cast<int64_t>(ref.ids.size()) / W;
  ASSERT_EQ(ds.n_tokens, static_cast<int64_t>(ref.ids.size()));
  ASSERT_EQ(ds.train.size() + ds.val.size(), n);
  for (const PackedSet* set : {&ds.train, &ds.val}) {
    if (set->size() == 0) continue;
    EXPECT_EQ(set->tokens.sizes(), (at::IntArrayRef{set->size(), W}));
    EXPECT_EQ(set->loss_mask.sizes(), (at::IntArrayRef{set->size(), seq_len}));
    EXPECT_EQ(set->tokens.scalar_type(), at::kLong);
    EXPECT_EQ(set->loss_mask.scalar_type(), at::kBool);
  }
  at::Tensor tokens = ds.val.size() ? at::cat({ds.train.tokens, ds.val.tokens}) : ds.train.tokens;
  at::Tensor mask = ds.val.size() ? at::cat({ds.train.loss_mask, ds.val.loss_mask}) : ds.train.loss_mask;
  auto ta = tokens.accessor<int64_t, 2>();
  auto ma = mask.accessor<bool, 2>();
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t t = 0; t < W; ++t) ASSERT_EQ(ta[r][t], ref.ids[r * W + t]) << "row " << r << " pos " << t;
    for (int64_t t = 0; t < seq_len; ++t)
      ASSERT_EQ(ma[r][t], ref.mask[r * W + t + 1]) << "mask row " << r << " pos " << t;
  }
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Packing

TEST(Packing, WindowsOfSeqLenPlusOneDropPartialAndSplitFromTheEnd) {
  TmpDir d;
  // 7 lines of 10 chars -> 7 docs of 12 tokens = 84 tokens; seq_len 8 -> 9 per window -> 9 windows
  // (81 tokens), 3 tail tokens dropped; val 0.2 -> ceil(1.8) = 2 val, 7 train.
  std::string text;
  Ref ref;
  for (int i = 0; i < 7; ++i) {
    std::string line = "line" + std::to_string(i) + "abcde";
    text += line + "\n";
    ref.text(line);
  }
  write(d / "c.txt", text);
  auto cfg = config_for(d / "c.txt", 8, 0.2);
  cfg.sources[0].split = SourceConfig::Split::Line;
  ByteTokenizer tok;
  Dataset ds = build_dataset(cfg, tok);
  EXPECT_EQ(ds.n_documents, 7);
  EXPECT_EQ(ds.n_tokens, 84);
  EXPECT_EQ(ds.train.size(), 7);
  EXPECT_EQ(ds.val.size(), 2);
  expect_packed(ds, ref, 8);
  // Validation is the end of the stream: its last window ends at token 81.
  EXPECT_EQ(ds.val.tokens[1][8].item<int64_t>(), ref.ids[80]);
  EXPECT_TRUE(ds.cache_file.empty()) << "cache disabled with cache_dir ''";
}

TEST(Packing, ExactMultipleKeepsEveryWindowAndValFractionZeroHasNoVal) {
  TmpDir d;
  // One doc of 16 chars + BOS/EOS = 18 tokens = exactly 2 windows of 9.
  write(d / "c.txt", "abcdefghijklmnop");
  Ref ref;
  ref.text("abcdefghijklmnop");
  ByteTokenizer tok;
  Dataset ds = build_dataset(config_for(d / "c.txt", 8, 0.0), tok);
  EXPECT_EQ(ds.train.size(), 2);
  EXPECT_EQ(ds.val.size(), 0);
  EXPECT_FALSE(ds.val.tokens.defined());
  expect_packed(ds, ref, 8);
  // Small positive fractions still hold out one window.
  Dataset ds2 = build_dataset(config_for(d / "c.txt", 8, 0.01), tok);
  EXPECT_EQ(ds2.train.size(), 1);
  EXPECT_EQ(ds2.val.size(), 1);
}

TEST(Packing, BosEosFlags) {
  TmpDir d;
  write(d / "c.txt", "abcdefghijklmnopqrstuvwxyz");
  ByteTokenizer tok;
  auto cfg = config_for(d / "c.txt", 8, 0.0);
  cfg.add_bos = false;
  Ref ref;
  ref.text("abcdefghijklmnopqrstuvwxyz", /*bos=*/false, /*eos=*/true);
  Dataset ds = build_dataset(cfg, tok);
  expect_packed(ds, ref, 8);
  cfg.add_eos = false;
  Ref ref2;
  ref2.text("abcdefghijklmnopqrstuvwxyz", false, false);
  expect_packed(build_dataset(cfg, tok), ref2, 8);
}

TEST(Packing, TooFewTokensIsAConfigErrorNamingSeqLen) {
  TmpDir d;
  write(d / "c.txt", "abcdefghijklmnop");  // 18 tokens: 1 window of 17 at seq_len 16
  ByteTokenizer tok;
  std::string m = error_of([&] { build_dataset(config_for(d / "c.txt", 16, 0.1), tok); });
  EXPECT_NE(m.find("data.seq_len: 16"), std::string::npos) << m;
  EXPECT_NE(m.find("18 tokens"), std::string::npos) << m;
  EXPECT_THROW(build_dataset(config_for(d / "c.txt", 16, 0.1), tok), qf::ConfigError);
  // Without validation one window is enough.
  EXPECT_EQ(build_dataset(config_for(d / "c.txt", 16, 0.0), tok).train.size(), 1);
  EXPECT_THROW(build_dataset(config_for(d / "c.txt", 32, 0.0), tok), qf::ConfigError);
}

TEST(Packing, MakeBatchShiftsLabelsAndMasksWithMinus100) {
  TmpDir d;
  std::string jsonl;
  Ref ref;
  for (int i = 0; i < 6; ++i) {
    jsonl += "{\"prompt\": \"pq\", \"response\": \"xyz\"}\n";
    ref.instr("pq", "xyz");
  }
  write(d / "i.jsonl", jsonl);
  ByteTokenizer tok;
  Dataset ds = build_dataset(config_for(d / "i.jsonl", 8, 0.0), tok);  // 42 tokens -> 4 windows
  ASSERT_EQ(ds.train.size(), 4);
  expect_packed(ds, ref, 8);
  Batch b = make_batch(ds.train, {3, 0, 2});
  ASSERT_EQ(b.input_ids.sizes(), (at::IntArrayRef{3, 8}));
  ASSERT_EQ(b.labels.sizes(), (at::IntArrayRef{3, 8}));
  EXPECT_EQ(b.input_ids.scalar_type(), at::kLong);
  EXPECT_EQ(b.labels.scalar_type(), at::kLong);
  const int64_t rows[] = {3, 0, 2};
  int64_t masked = 0;
  for (int64_t i = 0; i < 3; ++i) {
    for (int64_t t = 0; t < 8; ++t) {
      const size_t at_in = static_cast<size_t>(rows[i] * 9 + t);
      EXPECT_EQ(b.input_ids[i][t].item<int64_t>(), ref.ids[at_in]);
      const int64_t label = b.labels[i][t].item<int64_t>();
      const int64_t next = ref.ids[at_in + 1];
      if (ref.mask[at_in + 1]) {
        EXPECT_EQ(label, next);
      } else {
        EXPECT_EQ(label, -100);
        ++masked;
      }
      // BOS and prompt tokens are never targets; response tokens and EOS always are.
      if (next == 1 || next == B('p') || next == B('q')) {
        EXPECT_EQ(label, -100) << "row " << rows[i] << " t " << t;
      }
      if (next == 2 || next == B('x') || next == B('y') || next == B('z')) {
        EXPECT_EQ(label, next);
      }
    }
  }
  EXPECT_GT(masked, 0);
  EXPECT_THROW(make_batch(ds.train, {4}), qf::Error);
  EXPECT_THROW(make_batch(ds.train, {}), qf::Error);
}

// ----------------------------------------------------------------------------------------------
// Reading

TEST(Reading, TextSplitModes) {
  TmpDir d;
  write(d / "c.txt", "para one\nstill one\n\n  \npara two\n\n\npara three\n");
  ByteTokenizer tok;
  auto cfg = config_for(d / "c.txt", 8, 0.0);
  EXPECT_EQ(build_dataset(cfg, tok).n_documents, 1);
  cfg.sources[0].split = SourceConfig::Split::BlankLine;
  Ref ref;
  ref.text("para one\nstill one");
  ref.text("para two");
  ref.text("para three");
  Dataset ds = build_dataset(cfg, tok);
  EXPECT_EQ(ds.n_documents, 3);
  expect_packed(ds, ref, 8);
  cfg.sources[0].split = SourceConfig::Split::Line;
  EXPECT_EQ(build_dataset(cfg, tok).n_documents, 4);
  cfg.max_documents = 2;
  EXPECT_EQ(build_dataset(cfg, tok).n_documents, 2);
}

TEST(Reading, DirectoriesAreWalkedSortedWithPatternAndHiddenSkipped) {
  TmpDir d;
  write(d / "corpus/b.txt", "bbbbbbbbbb");
  write(d / "corpus/a/c.txt", "cccccccccc");
  write(d / "corpus/a/z.md", "zzzzzzzzzz");
  write(d / "corpus/.hidden/h.txt", "hhhhhhhhhh");
  write(d / "corpus/.h.txt", "hhhhhhhhhh");
  ByteTokenizer tok;
  auto cfg = config_for(d / "corpus", 8, 0.0);
  cfg.sources[0].pattern = "*.txt";
  Ref ref;
  ref.text("cccccccccc");  // corpus/a/c.txt sorts before corpus/b.txt
  ref.text("bbbbbbbbbb");
  Dataset ds = build_dataset(cfg, tok);
  EXPECT_EQ(ds.n_documents, 2);
  expect_packed(ds, ref, 8);
  cfg.sources[0].pattern = "*";
  EXPECT_EQ(build_dataset(cfg, tok).n_documents, 3);
}

TEST(Reading, JsonlTextAndInstructionRecordsAndCustomFields) {
  TmpDir d;
  write(d / "mix.jsonl",
        "{\"text\": \"hello world\"}\n\n{\"prompt\": \"Q?\", \"response\": \"A!\", \"text\": \"ignored\"}\n"
        "{\"body\": \"custom field\"}\n");
  ByteTokenizer tok;
  auto cfg = config_for(d / "mix.jsonl", 8, 0.0);
  std::string m = error_of([&] { build_dataset(cfg, tok); });
  EXPECT_NE(m.find(d / "mix.jsonl:4"), std::string::npos) << m;
  cfg.sources[0].text_field = "body";
  write(d / "mix.jsonl",
        "{\"body\": \"hello world\"}\n\n{\"prompt\": \"Q?\", \"response\": \"A!\"}\n{\"body\": \"custom field\"}\n");
  Ref ref;
  ref.text("hello world");
  ref.instr("Q?", "A!");
  ref.text("custom field");
  Dataset ds = build_dataset(cfg, tok);
  EXPECT_EQ(ds.n_documents, 3);
  expect_packed(ds, ref, 8);
  // format: text reads a .jsonl file as plain text.
  cfg.sources[0].format = SourceConfig::Format::Text;
  EXPECT_EQ(build_dataset(cfg, tok).n_tokens, static_cast<int64_t>(qf::fs::read_file(d / "mix.jsonl").size()) + 2);
}

TEST(Reading, MalformedJsonlNamesFileAndLine) {
  TmpDir d;
  write(d / "bad.jsonl", "{\"text\": \"fine\"}\n{\"text\": \"unterminated}\n");
  ByteTokenizer tok;
  std::string m = error_of([&] { build_dataset(config_for(d / "bad.jsonl", 8, 0.0), tok); });
  EXPECT_NE(m.find(d / "bad.jsonl:2: malformed JSON"), std::string::npos) << m;
  EXPECT_NE(m.find("expected one JSON object per line"), std::string::npos) << m;
  EXPECT_NE(m.find("(line 1, column "), std::string::npos) << m;  // nlohmann's position, not its error code
  EXPECT_EQ(m.find("[json.exception"), std::string::npos) << m;
  EXPECT_THROW(build_dataset(config_for(d / "bad.jsonl", 8, 0.0), tok), qf::InputError);

  write(d / "arr.jsonl", "[1, 2]\n");
  m = error_of([&] { build_dataset(config_for(d / "arr.jsonl", 8, 0.0), tok); });
  EXPECT_NE(m.find(d / "arr.jsonl:1: expected a JSON object"), std::string::npos) << m;

  write(d / "num.jsonl", "{\"text\": 5}\n");
  m = error_of([&] { build_dataset(config_for(d / "num.jsonl", 8, 0.0), tok); });
  EXPECT_NE(m.find(d / "num.jsonl:1: field 'text' must be a string, got a JSON number"), std::string::npos) << m;
  EXPECT_EQ(m.find("[json.exception"), std::string::npos) << m;
}

TEST(Reading, JsonlRecordMissingFieldsNamesExpectedFields) {
  TmpDir d;
  write(d / "f.jsonl", "{\"text\": \"ok\"}\n{\"prompt\": \"only a prompt\", \"id\": 3}\n");
  ByteTokenizer tok;
  std::string m = error_of([&] { build_dataset(config_for(d / "f.jsonl", 8, 0.0), tok); });
  EXPECT_NE(m.find(d / "f.jsonl:2:"), std::string::npos) << m;
  EXPECT_NE(m.find("'text'"), std::string::npos) << m;
  EXPECT_NE(m.find("'prompt' and 'response'"), std::string::npos) << m;
  EXPECT_NE(m.find("has 'prompt' but not 'response'"), std::string::npos) << m;
  EXPECT_NE(m.find("fields present: 'id', 'prompt'"), std::string::npos) << m;
}

TEST(Reading, MissingOrEmptyCorpusNamesThePath) {
  TmpDir d;
  ByteTokenizer tok;
  std::string m = error_of([&] { build_dataset(config_for(d / "nope.txt", 8, 0.0), tok); });
  EXPECT_NE(m.find(d / "nope.txt"), std::string::npos) << m;
  EXPECT_THROW(build_dataset(config_for(d / "nope.txt", 8, 0.0), tok), qf::InputError);

  write(d / "empty.txt", "\n  \n");
  m = error_of([&] { build_dataset(config_for(d / "empty.txt", 8, 0.0), tok); });
  EXPECT_NE(m.find("empty"), std::string::npos) << m;
  EXPECT_NE(m.find(d / "empty.txt"), std::string::npos) << m;
  EXPECT_THROW(build_dataset(config_for(d / "empty.txt", 8, 0.0), tok), qf::InputError);

  stdfs::create_directories(d / "dir");
  write(d / "dir/notes.md", "words words words");
  auto cfg = config_for(d / "dir", 8, 0.0);
  cfg.sources[0].pattern = "*.txt";
  m = error_of([&] { build_dataset(cfg, tok); });
  EXPECT_NE(m.find("no files found in '" + (d / "dir") + "' (pattern '*.txt')"), std::string::npos) << m;
  EXPECT_THROW(build_dataset(cfg, tok), qf::InputError);
}

// ----------------------------------------------------------------------------------------------
// Token cache

TEST(Cache, HitReturnsIdenticalTensorsAndInvalidatesOnChange) {
  TmpDir d;
  std::string text;
  for (int i = 0; i < 40; ++i) text += "document number " + std::to_string(i) + "\n";
  write(d / "c.txt", text);
  write(d / "i.jsonl", "{\"prompt\": \"question\", \"response\": \"answer\"}\n");
  ByteTokenizer tok;
  DataConfig cfg = config_for(d / "c.txt", 16, 0.1, d / "cache");
  cfg.sources[0].split = SourceConfig::Split::Line;
  SourceConfig s2;
  s2.path = d / "i.jsonl";
  cfg.sources.insert(cfg.sources.begin(), s2);  // first, so its masked prompt lands in train window 0

  Dataset a = build_dataset(cfg, tok);
  EXPECT_FALSE(a.cache_hit);
  ASSERT_FALSE(a.cache_file.empty());
  EXPECT_TRUE(stdfs::is_regular_file(a.cache_file));
  EXPECT_EQ(stdfs::path(a.cache_file).parent_path(), stdfs::path(d / "cache"));

  Dataset b = build_dataset(cfg, tok);
  EXPECT_TRUE(b.cache_hit);
  EXPECT_EQ(b.cache_file, a.cache_file);
  EXPECT_EQ(b.n_documents, a.n_documents);
  EXPECT_EQ(b.n_tokens, a.n_tokens);
  EXPECT_TRUE(at::equal(a.train.tokens, b.train.tokens));
  EXPECT_TRUE(at::equal(a.train.loss_mask, b.train.loss_mask));
  EXPECT_TRUE(at::equal(a.val.tokens, b.val.tokens));
  EXPECT_TRUE(at::equal(a.val.loss_mask, b.val.loss_mask));
  EXPECT_FALSE(a.train.loss_mask.all().item<bool>()) << "instruction prompt is masked (and cached)";

  // seq_len / val_fraction re-pack the cached stream.
  DataConfig cfg2 = cfg;
  cfg2.seq_len = 8;
  Dataset c = build_dataset(cfg2, tok);
  EXPECT_TRUE(c.cache_hit);
  EXPECT_EQ(c.n_tokens, a.n_tokens);

  // A different tokenizer or token-changing option uses another cache file.
  ByteTokenizer other("bytes-v2");
  Dataset e = build_dataset(cfg, other);
  EXPECT_FALSE(e.cache_hit);
  EXPECT_NE(e.cache_file, a.cache_file);
  DataConfig cfg3 = cfg;
  cfg3.add_eos = false;
  EXPECT_NE(build_dataset(cfg3, tok).cache_file, a.cache_file);

  // A changed source file misses.
  write(d / "i.jsonl", "{\"prompt\": \"question\", \"response\": \"other answer\"}\n");
  Dataset f = build_dataset(cfg, tok);
  EXPECT_FALSE(f.cache_hit);
  EXPECT_NE(f.cache_file, a.cache_file);
  EXPECT_EQ(f.n_tokens, a.n_tokens + 6);
}

TEST(Cache, CorruptCacheIsRebuilt) {
  TmpDir d;
  std::string text;
  for (int i = 0; i < 20; ++i) text += "line " + std::to_string(i) + " of the corpus\n";
  write(d / "c.txt", text);
  ByteTokenizer tok;
  DataConfig cfg = config_for(d / "c.txt", 8, 0.1, d / "cache");
  Dataset a = build_dataset(cfg, tok);
  std::string bytes = qf::fs::read_file(a.cache_file);
  for (std::string bad : {bytes.substr(0, bytes.size() - 1), bytes.substr(0, 10), std::string("garbage"),
                          bytes.substr(0, 50) + "X" + bytes.substr(51)}) {
    write(a.cache_file, bad);
    Dataset b = build_dataset(cfg, tok);
    EXPECT_FALSE(b.cache_hit);
    EXPECT_TRUE(at::equal(a.train.tokens, b.train.tokens));
    EXPECT_TRUE(at::equal(a.val.loss_mask, b.val.loss_mask));
    EXPECT_EQ(qf::fs::read_file(a.cache_file), bytes) << "rewritten";
    EXPECT_TRUE(build_dataset(cfg, tok).cache_hit);
  }
}

// ----------------------------------------------------------------------------------------------
// data: config section

namespace {

DataConfig parse(const std::string& yaml, YAML::Node* resolved = nullptr) {
  return qf::testing::parse_section<DataConfig>(yaml, "data", resolved);
}

std::string config_error(const std::string& yaml) {
  return qf::testing::config_error_of([&] { parse(yaml); });
}

}  // namespace

TEST(DataConfig, ReadsAllKeysAndFillsDefaults) {
  TmpDir d;
  write(d / "a.jsonl", "{}\n");
  stdfs::create_directories(d / "dir");
  YAML::Node res;
  DataConfig c = parse("data:\n  sources:\n    - {path: " + (d / "a.jsonl") +
                           ", format: jsonl, text_field: body, prompt_field: q, response_field: a}\n"
                           "    - {path: " +
                           (d / "dir") +
                           ", pattern: '*.rst.txt', split: blank_line}\n"
                           "  seq_len: 128\n  val_fraction: 0.1\n  max_documents: 10\n  add_bos: false\n"
                           "  add_eos: false\n  cache_dir: /tmp/x\n  seed: 7\n",
                       &res);
  ASSERT_EQ(c.sources.size(), 2u);
  EXPECT_EQ(c.sources[0].format, SourceConfig::Format::Jsonl);
  EXPECT_EQ(c.sources[0].text_field, "body");
  EXPECT_EQ(c.sources[0].prompt_field, "q");
  EXPECT_EQ(c.sources[0].response_field, "a");
  EXPECT_EQ(c.sources[1].format, SourceConfig::Format::Auto);
  EXPECT_EQ(c.sources[1].pattern, "*.rst.txt");
  EXPECT_EQ(c.sources[1].split, SourceConfig::Split::BlankLine);
  EXPECT_EQ(c.seq_len, 128);
  EXPECT_DOUBLE_EQ(c.val_fraction, 0.1);
  EXPECT_EQ(c.max_documents, 10);
  EXPECT_FALSE(c.add_bos);
  EXPECT_FALSE(c.add_eos);
  EXPECT_EQ(c.cache_dir, "/tmp/x");
  EXPECT_EQ(c.seed, 7);
  // The resolved tree holds defaults too.
  EXPECT_EQ(res["data"]["sources"][1]["text_field"].as<std::string>(), "text");
  EXPECT_EQ(res["data"]["sources"][1]["format"].as<std::string>(), "auto");
}

TEST(DataConfig, AllProblemsReportedWithFullKeyPaths) {
  TmpDir d;
  write(d / "a.txt", "x");
  std::string m = config_error("data:\n  sources:\n    - {path: " + (d / "a.txt") +
                               ", formatt: text, split: sentence}\n    - {path: /nonexistent/corpus}\n"
                               "    - {format: yaml}\n  seq_len: 4\n  val_fraction: 0.9\n  shuffle: true\n");
  for (auto want : {"data.sources[0].formatt: unknown key", "data.sources[0].split: 'sentence' is not allowed",
                    "file|blank_line|line", "data.sources[1].path: path '/nonexistent/corpus' does not exist",
                    "data.sources[2].path: required", "data.sources[2].format: 'yaml' is not allowed",
                    "auto|text|jsonl",
                    "data.seq_len: value 4 is out of range; expected an integer in [8, 1048576]",
                    "data.val_fraction: value 0.9 is out of range", "data.shuffle: unknown key"})
    EXPECT_NE(m.find(want), std::string::npos) << "missing '" << want << "' in:\n" << m;
}

TEST(DataConfig, SourcesAreRequired) {
  EXPECT_NE(config_error("data:\n  seq_len: 64\n").find("data.sources: required"), std::string::npos);
  EXPECT_NE(config_error("data:\n  sources: []\n").find("data.sources: at least one source"), std::string::npos);
  EXPECT_NE(config_error("data:\n  sources: corpus.txt\n").find("data.sources: expected a list of mappings"),
            std::string::npos);
}

// Issue 16: a corpus line that is not UTF-8 is refused, naming the file, the line and the byte
// offset, whatever the tokenizer (this one would take any bytes); JSONL alike.
TEST(Reading, InvalidUtf8NamesFileLineAndByteOffset) {
  TmpDir d;
  write(d / "c.txt", "fine line\nsecond\nabc \xff def\n");
  ByteTokenizer tok;
  std::string m = error_of([&] { build_dataset(config_for(d / "c.txt", 8, 0.0), tok); });
  EXPECT_NE(m.find(d / "c.txt: not valid UTF-8 at byte offset 21 (line 3, byte 0xFF)"), std::string::npos) << m;
  EXPECT_THROW(build_dataset(config_for(d / "c.txt", 8, 0.0), tok), qf::InputError);
  write(d / "j.jsonl", "{\"text\": \"caf\xc3\"}\n");
  m = error_of([&] { build_dataset(config_for(d / "j.jsonl", 8, 0.0), tok); });
  EXPECT_NE(m.find(d / "j.jsonl: not valid UTF-8 at byte offset 13 (line 1, byte 0xC3)"), std::string::npos) << m;
}
