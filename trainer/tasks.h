// Benchmark tasks scored by log-likelihood exactly as EleutherAI's lm-evaluation-harness 0.4.13
// scores them (lm_eval/api/task.py ConfigurableTask, lm_eval/models/huggingface.py HFLM,
// lm_eval/utils.py get_rolling_token_windows / make_disjoint_window), from local JSONL files in the
// document shapes its tasks use after process_docs:
//   cloze (HellaSwag / ARC / PIQA):  {"query": str, "choices": [str, ...], "gold": int}
//   MMLU:                           {"question": str, "choices": [str, ...], "answer": int, "subject"?: str}
//   perplexity (wikitext-like):     {"text": str}
// Invariant: for the same model, tokenizer and documents, every per-document log-likelihood is
// the one lm-eval's HFLM computes (context/continuation split, BOS, prefix token, left truncation,
// rolling windows), so acc / acc_norm / acc_bytes / word_perplexity / byte_perplexity /
// bits_per_byte are lm-eval's numbers (tests/interop/test_lm_eval.py checks it against lm-eval).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::trainer::tasks {

// What a task file holds; every document of a file has the same kind (from its fields: "query"
// -> Cloze, else "question" -> Mmlu, else "text" -> Rolling).
enum class Kind { Cloze, Mmlu, Rolling };
std::string to_string(Kind k);  // "multiple_choice (cloze)", "multiple_choice (mmlu)", "loglikelihood_rolling"

struct Doc {
  int64_t line = 0;         // 1-based line of the file
  nlohmann::json raw;       // the document as read (few-shot sampling drops docs equal to the eval doc)
  std::string text;         // lm-eval's doc_to_text: the query / the MMLU prompt; Rolling: the text scored
  std::vector<std::string> choices;  // doc_to_choice: continuations without the target delimiter (MMLU: "A", "B", ...)
  int64_t gold = -1;        // doc_to_target: index into choices (-1 for Rolling)
  std::string description;  // MMLU with "subject": "The following are multiple choice questions (with answers) about <subject>.\n\n"
};

struct Task {
  std::string path;  // the file read
  Kind kind = Kind::Cloze;
  std::vector<Doc> docs;
};

// `file_or_name` as a path, else NAME.jsonl (or NAME) in the directories of $QFORGE_TASKS
// (colon-separated) and then ./tasks; InputError naming every place looked at otherwise.
std::string resolve_task_path(const std::string& file_or_name);
// Reads and checks a task file: UTF-8, one JSON object per non-blank line, one document shape for
// the whole file, typed fields (choices: at least 2 non-empty strings; MMLU: at most 26; gold /
// answer an integer index into them). InputError "<file>:<line>: <what was expected>" otherwise.
Task load_task(const std::string& file_or_name);

// lm-eval's fewshot_context for plain-text prompts (no chat template, no gen_prefix):
//   description + sum over shots of (text + target_delimiter + choices[gold] + fewshot_delimiter) + text
// with target_delimiter " " and fewshot_delimiter "\n\n". Rolling documents take no shots.
std::string context(const Doc& d, const std::vector<const Doc*>& shots);
// The first_n sampler (MMLU's): the first n docs of `pool`, leaving out docs equal to `eval_doc`
// when it is given (lm-eval passes it when the few-shot split is the evaluated split).
// InputError when fewer than n remain.
std::vector<const Doc*> first_n(const std::vector<Doc>& pool, const Doc* eval_doc, int64_t n, const std::string& pool_path);

// Python's str.isspace() / re's \s for one code point; count_words is len(re.split(r"\s+", s))
// and count_bytes len(s.encode("utf-8")) (lm-eval's Task.count_words / count_bytes);
// count_chars is len(s) in code points (acc_norm's completion length).
bool py_isspace(uint32_t cp);
int64_t count_words(const std::string& s);
int64_t count_chars(const std::string& s);
inline int64_t count_bytes(const std::string& s) { return static_cast<int64_t>(s.size()); }

// lm-eval's HFLM.tok_encode: BOS first when the tokenizer adds it (add_bos) and the text does not
// already start with its text, then the tokenizer's ids.
struct Encoder {
  const data::Tokenizer* tok = nullptr;
  bool add_bos = false;
  std::vector<int64_t> operator()(const std::string& s, bool special = true) const;
  int64_t prefix_token() const;  // HFLM.prefix_token_id: BOS, else EOS; -1 when neither exists
};

// One loglikelihood request as token ids (lm-eval's (context_enc, continuation_enc)).
struct Request {
  std::vector<int64_t> ctx, cont;
};
// lm-eval's loglikelihood() tokenization of (context, continuation): an empty context conditions
// on the prefix token; otherwise _encode_pair moves the context's trailing whitespace to the
// continuation, encodes context + continuation whole and the context alone, and the continuation
// is the whole's tokens after the context's. InputError (naming `where`) when either side is empty.
Request encode_pair(const Encoder& enc, std::string ctx, std::string cont, const std::string& where);

// lm-eval's get_rolling_token_windows(tokens, prefix, max_len, context_len) pairs, each made
// disjoint (make_disjoint_window): the requests loglikelihood_rolling scores for one document.
std::vector<Request> rolling_windows(const std::vector<int64_t>& tokens, int64_t prefix, int64_t max_len,
                                     int64_t context_len = 1);

struct LogLik {
  double ll = 0;        // sum over the continuation's tokens of log p(token | everything before it)
  bool greedy = false;  // every continuation token is the argmax
};
// HFLM._loglikelihood_tokens: input (ctx + cont)[-(max_len + 1):][:-1], log_softmax in fp32 over
// the logits of the continuation's positions. Requests are run longest first in right-padded
// batches of at most `batch` rows and 16384 tokens (padding after a sequence never reaches its
// positions in a causal model).
std::vector<LogLik> loglikelihood(models::CausalLM& m, const std::vector<Request>& reqs, int64_t max_len,
                                  int64_t batch);

struct Options {
  std::string task;          // FILE|NAME
  int64_t num_fewshot = 0;   // examples before each question (first_n sampler)
  std::string fewshot_from;  // FILE|NAME of the same shape; "" = the task file itself (eval doc left out)
  int64_t limit = 0;         // score the first N documents only (0 = all)
  std::string samples_out;   // JSONL of per-document results ("" = none)
};

struct Result {
  std::string path;
  Kind kind = Kind::Cloze;
  int64_t docs = 0, num_fewshot = 0;
  nlohmann::json metrics;             // acc, acc_stderr, acc_norm, acc_norm_stderr, acc_bytes | word_perplexity, byte_perplexity, bits_per_byte
  std::vector<nlohmann::json> samples;  // one per document (what --samples-out writes)
};
// Scores `o.task` with model `m` (max_len: its context, lm-eval's max_length) and the encoder;
// writes o.samples_out (atomically) when given.
Result run(models::CausalLM& m, const Encoder& enc, int64_t max_len, int64_t batch, const Options& o);
// What `qforge eval --task` prints: one line naming the task, one per metric, then the metrics as
// one JSON object (with task, kind, docs, num_fewshot) on the last line.
std::string summary(const Result& r);
// The checks run() makes before any model is needed (task file, few-shot file, option values).
void check_options(const Options& o);

}  // namespace qf::trainer::tasks
