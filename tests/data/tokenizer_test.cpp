// SentencePiece tokenizer: training on a tiny generated corpus, round trips, special ids, atomic
// output, corrupt model files, the tokenizer: config section, and a dataset built on a real model.
#include "data/tokenizer.h"

#include <ATen/ATen.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <cstdlib>
#include <numeric>
#include <sstream>

#include "core/config.h"
#include "core/error.h"
#include "core/fs.h"
#include "data/dataset.h"
#include "tests/test_util.h"

namespace stdfs = std::filesystem;
using namespace qf::data;

namespace {

struct TmpDir : qf::testing::TmpDir {
  TmpDir() : qf::testing::TmpDir("qf_tok") {}
};

void write(const std::string& path, const std::string& text) { qf::testing::write_text(path, text); }

// Deterministic pseudo-English: sentences of words drawn with a fixed LCG.
std::string generated_text(int n_lines, uint64_t seed = 1) {
  static const char* words[] = {"the",   "quick",  "brown", "fox",    "jumps",  "over",  "lazy",   "dog",
                                "model", "weight", "quant", "scale",  "train",  "token", "layer",  "bits",
                                "low",   "error",  "loss",  "step",   "data",   "batch", "grad",   "rank",
                                "int4",  "group",  "zero",  "point",  "export", "alpha", "lora",   "adapter"};
  uint64_t s = seed;
  auto rnd = [&] {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<size_t>(s >> 33);
  };
  std::string out;
  for (int i = 0; i < n_lines; ++i) {
    size_t n = 4 + rnd() % 8;
    for (size_t w = 0; w < n; ++w) {
      std::string word = words[rnd() % (sizeof words / sizeof *words)];
      if (w == 0) word[0] = static_cast<char>(std::toupper(word[0]));
      out += (w ? " " : "") + word;
    }
    out += (i % 3 == 0) ? ", with 12 numbers.\n" : ".\n";
  }
  return out;
}

TokenizerConfig train_config(const std::string& model, const std::string& source, int64_t vocab) {
  TokenizerConfig c;
  c.path = model;
  c.train.enabled = true;
  c.train.sources = {source};
  c.train.vocab_size = vocab;
  c.train.max_sentences = 10000;
  return c;
}

// One tiny model shared by the suite (training takes a moment).
class SentencePieceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TmpDir();
    write(*dir_ / "corpus/a.txt", generated_text(400, 1));
    write(*dir_ / "corpus/sub/b.md", generated_text(200, 2));
    write(*dir_ / "corpus/ignored.bin", "\x01\x02 binary-ish ignored");
    tok_ = load_or_train_tokenizer(train_config(*dir_ / "models/nested/tok.model", *dir_ / "corpus", 400)).release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete dir_;
  }
  static TmpDir* dir_;
  static Tokenizer* tok_;
};
TmpDir* SentencePieceTest::dir_ = nullptr;
Tokenizer* SentencePieceTest::tok_ = nullptr;

}  // namespace

TEST_F(SentencePieceTest, TrainsAtomicallyIntoANewDirectory) {
  ASSERT_NE(tok_, nullptr);
  EXPECT_EQ(tok_->path(), *dir_ / "models/nested/tok.model");
  std::vector<std::string> names;
  for (auto& e : stdfs::directory_iterator(*dir_ / "models/nested")) names.push_back(e.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"tok.model"}) << "no temp or .vocab files left behind";
}

TEST_F(SentencePieceTest, SpecialIdsAndVocab) {
  EXPECT_EQ(tok_->vocab_size(), 400);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->pad_id(), 3);
}

TEST_F(SentencePieceTest, EncodeDecodeRoundTrip) {
  for (std::string s : {"The quick brown fox jumps over the lazy dog.", "Quant scale, with 12 numbers.",
                        "unseen: Zürich ✓ {x}", "a"}) {
    auto ids = tok_->encode(s);
    ASSERT_FALSE(ids.empty()) << s;
    for (auto id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, tok_->vocab_size());
    }
    EXPECT_NE(ids.front(), tok_->bos_id()) << "encode must not add BOS";
    EXPECT_NE(ids.back(), tok_->eos_id()) << "encode must not add EOS";
    EXPECT_EQ(tok_->decode(ids), s);
  }
  // Frequent words compress to fewer pieces than characters.
  EXPECT_LT(tok_->encode("the model weight").size(), std::string("the model weight").size() / 2);
  EXPECT_TRUE(tok_->encode("").empty());
  EXPECT_THROW(tok_->decode({static_cast<int32_t>(tok_->vocab_size())}), qf::Error);
}

TEST_F(SentencePieceTest, FingerprintIsStableAcrossLoadsAndIsTheFileHash) {
  auto again = load_sentencepiece(tok_->path());
  EXPECT_EQ(again->fingerprint(), tok_->fingerprint());
  EXPECT_NE(tok_->fingerprint().find(qf::fs::hash_file(tok_->path())), std::string::npos);
  // An existing model is loaded, not retrained (even with train.enabled).
  auto cfg = train_config(tok_->path(), *dir_ / "corpus", 999);
  EXPECT_EQ(load_or_train_tokenizer(cfg)->vocab_size(), 400);
}

TEST_F(SentencePieceTest, TrainingIsDeterministicAndUnigramWorks) {
  TmpDir d;
  auto a = load_or_train_tokenizer(train_config(d / "a.model", *dir_ / "corpus/a.txt", 360));
  auto b = load_or_train_tokenizer(train_config(d / "b.model", *dir_ / "corpus/a.txt", 360));
  // The .model bytes embed the trainer's temp paths, so compare the vocabularies, not the files.
  ASSERT_EQ(a->vocab_size(), b->vocab_size());
  for (int32_t i = 0; i < a->vocab_size(); ++i) ASSERT_EQ(a->decode({i}), b->decode({i})) << "piece " << i;
  std::string text = generated_text(50, 9);
  EXPECT_EQ(a->encode(text), b->encode(text));
  EXPECT_NE(a->fingerprint(), tok_->fingerprint());
  auto cu = train_config(d / "u.model", *dir_ / "corpus/a.txt", 360);
  cu.train.model_type = TokenizerConfig::ModelType::Unigram;
  auto u = load_or_train_tokenizer(cu);
  EXPECT_EQ(u->decode(u->encode("Lazy dog, with 12 numbers.")), "Lazy dog, with 12 numbers.");
}

TEST_F(SentencePieceTest, CorruptModelFileIsAnInputErrorNamingTheFile) {
  TmpDir d;
  std::string bytes = qf::fs::read_file(tok_->path());
  write(d / "garbage.model", "this is not a sentencepiece model\n");
  write(d / "truncated.model", bytes.substr(0, bytes.size() / 3));
  write(d / "empty.model", "");
  for (auto name : {"garbage.model", "truncated.model", "empty.model"}) {
    try {
      load_sentencepiece(d / name);
      ADD_FAILURE() << name << ": expected InputError";
    } catch (const qf::InputError& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("tokenizer file '" + (d / name) + "' is not a valid sentencepiece model"), std::string::npos)
          << m;
    }
  }
  try {
    load_sentencepiece(d / "missing.model");
    ADD_FAILURE() << "expected InputError";
  } catch (const qf::InputError& e) {
    EXPECT_NE(std::string(e.what()).find(d / "missing.model"), std::string::npos) << e.what();
  }
}

TEST_F(SentencePieceTest, TrainingWithoutTextFailsNamingTheSources) {
  TmpDir d;
  write(d / "empty/x.txt", "\n\n   \n");
  try {
    load_or_train_tokenizer(train_config(d / "t.model", d / "empty", 300));
    ADD_FAILURE() << "expected InputError";
  } catch (const qf::InputError& e) {
    EXPECT_NE(std::string(e.what()).find(d / "empty"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(stdfs::exists(d / "t.model"));
}

TEST_F(SentencePieceTest, TooSmallVocabularyNamesTheKey) {
  TmpDir d;
  try {
    load_or_train_tokenizer(train_config(d / "s.model", *dir_ / "corpus/a.txt", 100));
    ADD_FAILURE() << "expected InputError";
  } catch (const qf::InputError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find(d / "s.model"), std::string::npos) << m;
    EXPECT_NE(m.find("byte-fallback"), std::string::npos) << m;
    EXPECT_NE(m.find("tokenizer.train.vocab_size"), std::string::npos) << m;
  }
  for (auto& e : stdfs::directory_iterator(d.path)) ADD_FAILURE() << "left behind: " << e.path();
}

TEST_F(SentencePieceTest, DatasetOnARealModel) {
  TmpDir d;
  std::string text = generated_text(60, 3);
  write(d / "c.txt", text);
  DataConfig dc;
  SourceConfig src;
  src.path = d / "c.txt";
  src.split = qf::data::SourceConfig::Split::Line;
  dc.sources = {src};
  dc.seq_len = 16;
  dc.val_fraction = 0.1;
  dc.cache_dir = d / "cache";
  Dataset ds = build_dataset(dc, *tok_);
  // Expected stream: BOS + ids + EOS per line.
  std::vector<int64_t> stream;
  int64_t docs = 0;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    auto ids = tok_->encode(line);
    stream.push_back(1);
    stream.insert(stream.end(), ids.begin(), ids.end());
    stream.push_back(2);
    ++docs;
  }
  EXPECT_EQ(ds.n_documents, docs);
  EXPECT_EQ(ds.n_tokens, static_cast<int64_t>(stream.size()));
  int64_t n = static_cast<int64_t>(stream.size()) / 17;
  ASSERT_EQ(ds.train.size() + ds.val.size(), n);
  at::Tensor all = at::cat({ds.train.tokens, ds.val.tokens});
  at::Tensor want = at::tensor(std::vector<int64_t>(stream.begin(), stream.begin() + n * 17)).reshape({n, 17});
  EXPECT_TRUE(at::equal(all, want));
  // The tokenizer fingerprint keys the cache: a different model gets a different cache file.
  auto other = load_or_train_tokenizer(train_config(d / "o.model", src.path, 340));
  Dataset ds2 = build_dataset(dc, *other);
  EXPECT_NE(ds2.cache_file, ds.cache_file);
  EXPECT_FALSE(ds2.cache_hit);
}

// ----------------------------------------------------------------------------------------------
// The text is kept (Llama's settings: identity normalisation, whitespace pieces, byte fallback,
// split digits, dummy prefix), trained on indented Python-like code.

namespace {

// Deterministic Python-ish source: functions with 4- and 8-space indentation, blank lines,
// comments, numbers and a tab now and then.
std::string generated_code(int n_funcs, uint64_t seed = 5) {
  static const char* names[] = {"scale", "weight", "token", "layer", "quant", "batch", "group", "point"};
  uint64_t s = seed;
  auto rnd = [&] {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<size_t>(s >> 33);
  };
  std::string out;
  for (int i = 0; i < n_funcs; ++i) {
    std::string a = names[rnd() % 8], b = names[rnd() % 8];
    out += "def " + a + "_" + std::to_string(i) + "(" + b + ", x):\n";
    out += "    \"\"\"Return the " + a + " of " + b + ".\"\"\"\n";
    out += "    if x > " + std::to_string(rnd() % 1000) + ":\n";
    out += "        return " + b + " * x  # " + a + "\n";
    out += "    for i in range(" + std::to_string(rnd() % 100) + "):\n";
    out += "        x = x + " + b + "[i]\n";
    out += (i % 5 == 0) ? "\treturn x\n\n\n" : "    return x\n\n";
  }
  return out;
}

class KeepsTheTextTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TmpDir();
    write(*dir_ / "code.py.txt", generated_code(300) + generated_text(200, 4));
    tok_ = load_or_train_tokenizer(train_config(*dir_ / "code.model", *dir_ / "code.py.txt", 500)).release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete dir_;
  }
  static TmpDir* dir_;
  static Tokenizer* tok_;
};
TmpDir* KeepsTheTextTest::dir_ = nullptr;
Tokenizer* KeepsTheTextTest::tok_ = nullptr;

}  // namespace

TEST_F(KeepsTheTextTest, NewlinesAndIndentationGiveDifferentIds) {
  auto a = tok_->encode("def f(x):\n    return x");
  auto b = tok_->encode("def f(x): return x");
  EXPECT_NE(a, b);
  EXPECT_EQ(tok_->decode(a), "def f(x):\n    return x");
  EXPECT_EQ(tok_->decode(b), "def f(x): return x");
  // A newline is the <0x0A> byte piece, as in Llama's vocabulary; indentation is kept as pieces
  // of spaces (whitespace-only pieces are learned from the indented corpus).
  auto nl = tok_->encode("a\nb");
  std::vector<std::string> pieces;
  for (auto id : nl) pieces.push_back(tok_->token(id));
  EXPECT_NE(std::find(pieces.begin(), pieces.end(), "<0x0A>"), pieces.end());
  bool spaces_piece = false;
  for (int32_t i = 0; i < tok_->vocab_size(); ++i)
    spaces_piece |= tok_->token(i) == "\u2581\u2581\u2581\u2581" || tok_->token(i) == "\u2581\u2581\u2581";
  EXPECT_TRUE(spaces_piece) << "no whitespace-only piece learned from 4-space indentation";
  EXPECT_NE(tok_->encode("x  y"), tok_->encode("x y"));
  EXPECT_NE(tok_->encode("x\ty"), tok_->encode("x y"));
  EXPECT_NE(tok_->encode(" x"), tok_->encode("x"));
}

TEST_F(KeepsTheTextTest, DecodeRoundTripsAnyText) {
  for (std::string s :
       {std::string("def f(x):\n    return x"), std::string("class A:\n\tdef g(self):\n\t\tpass\n"),
        std::string("runs   of    spaces     and\ttabs\t\tand\n\n\nblank lines"),
        std::string("  leading and trailing  "), std::string("\n"), std::string(" "), std::string("   "),
        std::string("\n\n  x"), std::string("caf\u00e9 na\u00efve \u00e9t\u00e9"),
        std::string("\u4e2d\u6587\u5b57\u7b26"), std::string("emoji \U0001F600\U0001F389 mixed\U0001F44D\U0001F3FDtext"),
        std::string("ﬁ ligature, full-width \uff21\uff22 and \u2126 (NFKC would change these)"),
        std::string("crlf\r\nline"), std::string("x = 1234567890 + 3.14159")}) {
    auto ids = tok_->encode(s);
    EXPECT_EQ(tok_->decode(ids), s) << "ids of '" << s << "' do not decode back to it";
  }
  // Characters outside the vocabulary are byte pieces, never <unk>.
  for (auto id : tok_->encode("\u4e2d\u6587 \U0001F600")) EXPECT_NE(id, 0) << "unknown piece";
}

TEST_F(KeepsTheTextTest, DigitsAreSplit) {
  auto ids = tok_->encode("x = 1234567890 + 3.14159 and 1000 items");
  int64_t digits = 0;
  for (auto id : ids) {
    std::string p = tok_->token(id);
    int64_t n = std::count_if(p.begin(), p.end(), [](char c) { return c >= '0' && c <= '9'; });
    EXPECT_LE(n, 1) << "piece '" << p << "' holds several digits";
    digits += n;
  }
  EXPECT_EQ(digits, 10 + 6 + 4);
}

TEST_F(KeepsTheTextTest, NormalizationAndPieceTypesAreWhatARuntimeNeeds) {
  auto n = tok_->normalization();
  EXPECT_EQ(n.rule, "identity");
  EXPECT_TRUE(n.add_dummy_prefix);
  EXPECT_FALSE(n.remove_extra_whitespaces);
  // llama.cpp token types: <unk> unknown, <s> </s> <pad> control, <0xNN> byte, the rest normal.
  EXPECT_EQ(tok_->entry(0).type, 2);
  for (int32_t i : {1, 2, 3}) EXPECT_EQ(tok_->entry(i).type, 3) << tok_->token(i);
  int64_t bytes = 0;
  for (int32_t i = 4; i < tok_->vocab_size(); ++i) {
    auto e = tok_->entry(i);
    bool byte_piece = e.piece.size() == 6 && e.piece.rfind("<0x", 0) == 0 && e.piece.back() == '>';
    EXPECT_EQ(e.type, byte_piece ? 6 : 1) << e.piece;
    bytes += byte_piece;
  }
  EXPECT_EQ(bytes, 256);
  EXPECT_EQ(tok_->token(4 + 0x0A), "<0x0A>");
}

// ----------------------------------------------------------------------------------------------
// tokenizer: config section

namespace {

TokenizerConfig parse(const std::string& yaml) { return qf::testing::parse_section<TokenizerConfig>(yaml, "tokenizer"); }

std::string config_error(const std::string& yaml) {
  return qf::testing::config_error_of([&] { parse(yaml); });
}

}  // namespace

TEST(TokenizerConfig, ReadsAllKeys) {
  TmpDir d;
  write(d / "src.txt", "x\n");
  auto c = parse("tokenizer:\n  type: sentencepiece\n  path: " + (d / "t.model") +
                 "\n  train:\n    enabled: true\n    sources: [" + (d / "src.txt") +
                 "]\n    vocab_size: 500\n    model_type: unigram\n    character_coverage: 1.0\n"
                 "    max_sentences: 77\n    seed: 9\n");
  EXPECT_EQ(c.path, d / "t.model");
  EXPECT_TRUE(c.train.enabled);
  EXPECT_EQ(c.train.sources, std::vector<std::string>{d / "src.txt"});
  EXPECT_EQ(c.train.vocab_size, 500);
  EXPECT_EQ(c.train.model_type, TokenizerConfig::ModelType::Unigram);
  EXPECT_EQ(c.train.character_coverage, 1.0);
  EXPECT_EQ(c.train.max_sentences, 77);
  EXPECT_EQ(c.train.seed, 9);
}

TEST(TokenizerConfig, MissingFileWithoutTrainingSaysHowToTrain) {
  std::string m = config_error("tokenizer:\n  path: /nonexistent/tok.model\n");
  EXPECT_NE(m.find("tokenizer.path: tokenizer file '/nonexistent/tok.model' does not exist; set "
                   "tokenizer.train.enabled: true to train one"),
            std::string::npos)
      << m;
  // With training enabled a missing file is fine, but each training source must exist.
  m = config_error("tokenizer:\n  path: /nonexistent/tok.model\n  train: {enabled: true, sources: [/nope/x.txt]}\n");
  EXPECT_EQ(m.find("tokenizer.path"), std::string::npos) << m;
  EXPECT_NE(m.find("tokenizer.train.sources[0]: path '/nope/x.txt' does not exist"), std::string::npos) << m;
}

TEST(TokenizerConfig, AllProblemsReportedWithFullKeyPaths) {
  std::string m = config_error(
      "tokenizer:\n  type: tiktoken\n  path: /nonexistent\n  colour: red\n  train:\n    enabled: true\n"
      "    sources: []\n    vocab_size: 8\n    model_type: wordpiece\n    character_coverage: 0\n    vocab: 3\n");
  for (auto want : {"tokenizer.type: 'tiktoken' is not allowed; expected one of sentencepiece",
                    "tokenizer.colour: unknown key", "tokenizer.train.vocab: unknown key",
                    "tokenizer.train.vocab_size: value 8 is out of range", "tokenizer.train.model_type: 'wordpiece'",
                    "bpe|unigram", "tokenizer.train.character_coverage: value 0 is out of range",
                    "tokenizer.train.sources: at least one"})
    EXPECT_NE(m.find(want), std::string::npos) << "missing '" << want << "' in:\n" << m;
}
