// Benchmark tasks (trainer/tasks.h): task files that are malformed are refused naming file:line and
// what was expected; lm-eval's pieces reproduced (prompt assembly, first_n few-shot sampling,
// _encode_pair's whitespace move and prefix token, rolling windows, count_words as Python's
// re.split(r"\s+")); batched scoring equals one forward per request. The scores themselves are
// checked against lm-eval live in tests/interop/test_lm_eval.py.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "models/transformer.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"
#include "trainer/tasks.h"

using namespace qf;
namespace tk = qf::trainer::tasks;

namespace {

std::string error_of(const std::string& path) {
  try {
    tk::load_task(path);
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

struct TaskFiles : ::testing::Test {
  qf::testing::TmpDir tmp{"qf_tasks"};
  std::string file(const std::string& name, const std::string& text) {
    qf::testing::write_text(tmp / name, text);
    return tmp / name;
  }
};

const char* kCloze = R"({"query": "a b", "choices": ["c", "d"], "gold": 1})";

TEST_F(TaskFiles, MalformedFilesNameTheFileAndLine) {
  struct Case {
    std::string text, want;
  };
  const std::vector<Case> cases = {
      {std::string(kCloze) + "\n\n{\"query\": \"x\", \"choices\": [\"a\", \"b\"], \"gold\": 1\n", ":3: not a JSON document"},
      {std::string(kCloze) + "\n[1, 2]\n", ":2: expected a JSON object (one document per line), found array"},
      {R"({"query": "q", "choices": ["a", "b"]})", ":1: missing field 'gold'"},
      {R"({"query": "q", "choices": ["a", "b"], "gold": 2})", ":1: 'gold': 2 is not an index into the 2 choices (0..1)"},
      {R"({"query": "q", "choices": ["a", "b"], "gold": "1"})", ":1: 'gold': expected an integer index into 'choices', found string"},
      {R"({"query": "q", "choices": ["a", "b"], "gold": 1.5})", ":1: 'gold': expected an integer index into 'choices', found 1.5"},
      {R"({"query": 3, "choices": ["a", "b"], "gold": 0})", ":1: 'query': expected a string, found number"},
      {R"({"query": "q", "choices": "ab", "gold": 0})", ":1: 'choices': expected a list of strings, found string"},
      {R"({"query": "q", "choices": ["a"], "gold": 0})", ":1: 'choices': expected 2 to"},
      {R"({"query": "q", "choices": ["a", 7], "gold": 0})", ":1: 'choices[1]': expected a string, found number"},
      {R"({"query": "q", "choices": ["a", ""], "gold": 0})", ":1: 'choices[1]': empty answer"},
      {R"({"question": "q", "choices": ["a", "b"], "label": 0})", ":1: missing field 'answer'"},
      {R"({"prompt": "q"})", ":1: a document needs 'query' + 'choices' + 'gold' (cloze multiple choice), 'question' + "
                             "'choices' + 'answer' (MMLU) or 'text' (perplexity); found keys prompt"},
      {std::string(kCloze) + "\n{\"text\": \"plain\"}\n",
       ":2: a loglikelihood_rolling document, but line 1 made this a multiple_choice (cloze) task"},
      {"\n  \n", ": no documents (expected one JSON object per line)"},
      {std::string(kCloze) + "\n{\"text\": \"caf\xC3\"}\n", ": not valid UTF-8 at byte offset"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string p = file("bad" + std::to_string(i) + ".jsonl", cases[i].text);
    const std::string e = error_of(p);
    EXPECT_NE(e.find(p + cases[i].want), std::string::npos) << "case " << i << ": " << e;
  }
  // The UTF-8 error says which line.
  EXPECT_NE(error_of(tmp / "bad15.jsonl").find("(line 2,"), std::string::npos);
}

TEST_F(TaskFiles, NamesResolveInQforgeTasksDirs) {
  file("tasks_a/mine.jsonl", std::string(kCloze) + "\n");
  ::setenv("QFORGE_TASKS", (tmp.path + "/none:" + tmp.path + "/tasks_a").c_str(), 1);
  EXPECT_EQ(tk::resolve_task_path("mine"), tmp / "tasks_a/mine.jsonl");
  EXPECT_EQ(tk::load_task("mine").docs.size(), 1u);
  try {
    tk::resolve_task_path("other");
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(tmp.path + "/tasks_a/other.jsonl"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("$QFORGE_TASKS"), std::string::npos) << e.what();
  }
  ::unsetenv("QFORGE_TASKS");
}

TEST_F(TaskFiles, PromptsAreLmEvalsPlainTextFewshotContext) {
  // MMLU's template ({{question.strip()}}, A./B./..., "Answer:"), description from the subject,
  // first_n shots with the eval doc left out, " " before each answer, "\n\n" after each shot.
  const auto t = tk::load_task(file("mmlu.jsonl",
      "{\"question\": \" Two? \\u00a0\", \"choices\": [\"1\", \"2\", \"3\", \"4\"], \"answer\": 1, \"subject\": \"high_school_math\"}\n"
      "{\"question\": \"One?\", \"choices\": [\"1\", \"2\", \"3\", \"4\"], \"answer\": 0, \"subject\": \"high_school_math\"}\n"
      "{\"question\": \"Three?\", \"choices\": [\"1\", \"2\", \"3\", \"4\"], \"answer\": 2, \"subject\": \"high_school_math\"}\n"));
  ASSERT_EQ(t.kind, tk::Kind::Mmlu);
  EXPECT_EQ(t.docs[0].text, "Two?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:");
  EXPECT_EQ(t.docs[0].choices, (std::vector<std::string>{"A", "B", "C", "D"}));
  const auto shots = tk::first_n(t.docs, &t.docs[1], 2, t.path);
  ASSERT_EQ(shots.size(), 2u);
  EXPECT_EQ(shots[0]->line, 1);
  EXPECT_EQ(shots[1]->line, 3);
  EXPECT_EQ(tk::context(t.docs[1], shots),
            "The following are multiple choice questions (with answers) about high school math.\n\n"
            "Two?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
            "Three?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C\n\n"
            "One?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:");
  try {
    tk::first_n(t.docs, &t.docs[1], 3, t.path);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("has only 2 documents to draw examples from besides line 2"), std::string::npos)
        << e.what();
  }
  // Cloze: the answer is the gold choice's text.
  const auto c = tk::load_task(file("c.jsonl", std::string(kCloze) + "\n" +
                                                   R"({"query": "e f", "choices": ["g", "h"], "gold": 0})" "\n"));
  EXPECT_EQ(tk::context(c.docs[1], tk::first_n(c.docs, nullptr, 1, c.path)), "a b d\n\ne f");
}

TEST(Tasks, CountWordsIsPythonsReSplitOnWhitespace) {
  // len(re.split(r"\s+", s)) in Python 3: leading/trailing runs count an empty piece.
  EXPECT_EQ(tk::count_words(""), 1);
  EXPECT_EQ(tk::count_words("a"), 1);
  EXPECT_EQ(tk::count_words("a b\n"), 3);
  EXPECT_EQ(tk::count_words("  a \t\n b  "), 4);
  EXPECT_EQ(tk::count_words("a\xC2\xA0" "b"), 2);         // U+00A0 is whitespace to Python
  EXPECT_EQ(tk::count_words("a\xE2\x80\x8B" "b"), 1);     // U+200B is not
  EXPECT_EQ(tk::count_words("a\x1C" "b\xE3\x80\x80" "c"), 3);  // U+001C and U+3000 are
  EXPECT_EQ(tk::count_chars("caf\xC3\xA9 \xF0\x9F\x98\x80"), 6);
  EXPECT_EQ(tk::count_bytes("caf\xC3\xA9"), 5);
}

TEST(Tasks, RollingWindowsAreLmEvalsDisjointWindows) {
  // get_rolling_token_windows(list(range(1, 11)), prefix 0, max_seq_len 4, context_len 1) made disjoint:
  // ([0], [1, 2, 3, 4]), ([4], [5, 6, 7, 8]), ([6, 7, 8], [9, 10]) (lm_eval 0.4.13, lm_eval/utils.py).
  std::vector<int64_t> t(10);
  for (int i = 0; i < 10; ++i) t[i] = i + 1;
  const auto w = tk::rolling_windows(t, 0, 4);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[0].ctx, (std::vector<int64_t>{0}));
  EXPECT_EQ(w[0].cont, (std::vector<int64_t>{1, 2, 3, 4}));
  EXPECT_EQ(w[1].ctx, (std::vector<int64_t>{4}));
  EXPECT_EQ(w[1].cont, (std::vector<int64_t>{5, 6, 7, 8}));
  EXPECT_EQ(w[2].ctx, (std::vector<int64_t>{6, 7, 8}));
  EXPECT_EQ(w[2].cont, (std::vector<int64_t>{9, 10}));
  // Every token is predicted exactly once, whatever the lengths.
  for (int64_t n : {1, 3, 4, 5, 17, 64}) {
    std::vector<int64_t> u(n);
    for (int64_t i = 0; i < n; ++i) u[i] = 100 + i;
    std::vector<int64_t> predicted;
    for (auto& r : tk::rolling_windows(u, 7, 5)) predicted.insert(predicted.end(), r.cont.begin(), r.cont.end());
    EXPECT_EQ(predicted, u) << n;
  }
  EXPECT_TRUE(tk::rolling_windows({}, 0, 4).empty());
}

// One token per byte (ids 3..258), BOS 1, EOS 2: enough to see what _encode_pair does.
struct ByteTok : data::Tokenizer {
  std::vector<int32_t> encode(const std::string& s) const override {
    std::vector<int32_t> v;
    for (unsigned char c : s) v.push_back(3 + c);
    return v;
  }
  std::string decode(const std::vector<int32_t>&) const override { return ""; }
  std::string token(int32_t id) const override { return id == 1 ? "<s>" : id == 2 ? "</s>" : std::string(1, char(id - 3)); }
  std::string kind() const override { return "test"; }
  int64_t vocab_size() const override { return 259; }
  int32_t bos_id() const override { return 1; }
  int32_t eos_id() const override { return 2; }
  int32_t pad_id() const override { return -1; }
  std::string fingerprint() const override { return "byte"; }
  std::string path() const override { return ""; }
};

std::vector<int64_t> ids(const std::string& s) {
  std::vector<int64_t> v;
  for (unsigned char c : s) v.push_back(3 + c);
  return v;
}

TEST(Tasks, EncodePairMovesTrailingSpaceAndConditionsEmptyContextsOnThePrefix) {
  ByteTok tok;
  const tk::Encoder with_bos{&tok, true}, plain{&tok, false};
  // "Answer: \u3000" + " B": the trailing spaces (U+3000 too) move to the continuation.
  auto r = tk::encode_pair(with_bos, "Answer: \xE3\x80\x80", " B", "t:1");
  std::vector<int64_t> want_ctx{1};
  for (auto x : ids("Answer:")) want_ctx.push_back(x);
  EXPECT_EQ(r.ctx, want_ctx);
  EXPECT_EQ(r.cont, ids(" \xE3\x80\x80 B"));
  // A text starting with BOS's text gets no second BOS (has_bos_prefix).
  EXPECT_EQ(with_bos("<s>x")[0], ids("<")[0]);
  // Empty context: the prefix token (BOS), the continuation without special tokens.
  r = tk::encode_pair(with_bos, "", " c", "t:2");
  EXPECT_EQ(r.ctx, (std::vector<int64_t>{1}));
  EXPECT_EQ(r.cont, ids(" c"));
  r = tk::encode_pair(plain, "q", " c", "t:3");
  EXPECT_EQ(r.ctx, ids("q"));
  try {
    tk::encode_pair(plain, "   ", "", "f.jsonl:4");
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("f.jsonl:4: the context encodes to no tokens"), std::string::npos) << e.what();
  }
}

TEST(Tasks, BatchedScoringEqualsOneForwardPerRequest) {
  at::manual_seed(0);
  auto m = models::build_model(qf::testing::tiny_llama(64, 16, 0.3));
  m->eval();
  std::vector<tk::Request> reqs = {{{1, 2, 3}, {4, 5}}, {{7}, {8, 9, 10, 11, 12}}, {{9, 9}, {1}},
                                   // 14 + 6 tokens > max_len 16 + 1: left-truncated to the last 16 inputs
                                   {std::vector<int64_t>(14, 3), {5, 6, 7, 8, 9, 10}}};
  const auto got = tk::loglikelihood(*m, reqs, 16, 3);
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::vector<int64_t> all = reqs[i].ctx;
    all.insert(all.end(), reqs[i].cont.begin(), reqs[i].cont.end());
    if (all.size() > 17) all.erase(all.begin(), all.end() - 17);
    all.pop_back();
    at::NoGradGuard ng;
    auto x = at::tensor(all, at::kLong).unsqueeze(0);
    auto lp = at::log_softmax(m->forward(x)[0].to(at::kFloat), -1);
    const auto n = static_cast<int64_t>(all.size()), c = static_cast<int64_t>(reqs[i].cont.size());
    double want = 0;
    bool greedy = true;
    for (int64_t k = 0; k < c; ++k) {
      want += lp[n - c + k][reqs[i].cont[k]].item<double>();
      greedy = greedy && lp[n - c + k].argmax().item<int64_t>() == reqs[i].cont[k];
    }
    EXPECT_NEAR(got[i].ll, want, 1e-5) << i;
    EXPECT_EQ(got[i].greedy, greedy) << i;
  }
  try {
    tk::loglikelihood(*m, {{{1}, std::vector<int64_t>(17, 2)}}, 16, 1);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("longer than the model's context (16 tokens)"), std::string::npos) << e.what();
  }
}

}  // namespace
