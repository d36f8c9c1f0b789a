#include "trainer/tasks.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "core/json_file.h"
#include "data/utf8.h"

namespace qf::trainer::tasks {

namespace sfs = std::filesystem;

std::string to_string(Kind k) {
  switch (k) {
    case Kind::Cloze: return "multiple_choice (cloze)";
    case Kind::Mmlu: return "multiple_choice (mmlu)";
    case Kind::Rolling: return "loglikelihood_rolling";
  }
  return "?";
}

// ---- Python string semantics on UTF-8 ----

bool py_isspace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

namespace {

// Code point starting at s[i] (valid UTF-8 assumed: task text is checked on load) and its length.
uint32_t decode_at(const std::string& s, size_t i, size_t* len) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return *len = 1, b;
  const int n = b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : 1;
  uint32_t c = b & (0x3F >> n);
  for (int k = 1; k <= n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *len = n + 1;
  return c;
}

// Start of the code point that ends just before byte `end`.
size_t prev_start(const std::string& s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

// Byte length of the trailing run of Python whitespace (what str.rstrip() removes).
size_t trailing_space_bytes(const std::string& s) {
  size_t end = s.size();
  while (end > 0) {
    const size_t st = prev_start(s, end);
    size_t len;
    if (!py_isspace(decode_at(s, st, &len))) break;
    end = st;
  }
  return s.size() - end;
}

std::string py_strip(const std::string& s) {
  size_t b = 0, len = 0;
  while (b < s.size() && py_isspace(decode_at(s, b, &len))) b += len;
  const size_t t = trailing_space_bytes(s);
  return b >= s.size() - t ? std::string() : s.substr(b, s.size() - t - b);
}

}  // namespace

int64_t count_words(const std::string& s) {
  int64_t runs = 0;
  bool in = false;
  size_t len = 0;
  for (size_t i = 0; i < s.size(); i += len) {
    const bool sp = py_isspace(decode_at(s, i, &len));
    if (sp && !in) ++runs;
    in = sp;
  }
  return runs + 1;
}

int64_t count_chars(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

// ---- task files ----

std::string resolve_task_path(const std::string& file_or_name) {
  QF_CHECK_INPUT(!file_or_name.empty(), "--task: empty; give a task file (JSONL) or a task name");
  if (sfs::is_regular_file(file_or_name)) return file_or_name;
  std::vector<std::string> dirs;
  if (const char* e = std::getenv("QFORGE_TASKS")) {
    std::stringstream ss(e);
    for (std::string d; std::getline(ss, d, ':');)
      if (!d.empty()) dirs.push_back(d);
  }
  dirs.push_back("tasks");
  std::string looked = file_or_name;
  for (auto& d : dirs)
    for (const std::string& f : {d + "/" + file_or_name + ".jsonl", d + "/" + file_or_name}) {
      if (sfs::is_regular_file(f)) return f;
      looked += ", " + f;
    }
  throw InputError(str("--task ", file_or_name, ": no such task file (looked at ", looked,
                       "); a task is a JSONL file of documents, or NAME for NAME.jsonl in $QFORGE_TASKS or ./tasks"));
}

namespace {

// A field of document `d` (at `where`) that must be a string.
const std::string& str_field(const nlohmann::json& d, const char* key, const std::string& where) {
  QF_CHECK_INPUT(d.contains(key), where, ": missing field '", key, "'");
  QF_CHECK_INPUT(d[key].is_string(), where, ": '", key, "': expected a string, found ", d[key].type_name());
  return d[key].get_ref<const std::string&>();
}

std::vector<std::string> choices_field(const nlohmann::json& d, size_t max_n, const std::string& where) {
  QF_CHECK_INPUT(d.contains("choices"), where, ": missing field 'choices' (a list of answer strings)");
  const auto& c = d["choices"];
  QF_CHECK_INPUT(c.is_array(), where, ": 'choices': expected a list of strings, found ", c.type_name());
  QF_CHECK_INPUT(c.size() >= 2 && c.size() <= max_n, where, ": 'choices': expected 2 to ", max_n,
                 " answers, found ", c.size());
  std::vector<std::string> out;
  for (size_t i = 0; i < c.size(); ++i) {
    QF_CHECK_INPUT(c[i].is_string(), where, ": 'choices[", i, "]': expected a string, found ", c[i].type_name());
    QF_CHECK_INPUT(!c[i].get_ref<const std::string&>().empty(), where, ": 'choices[", i,
                   "]': empty answer (its length normalises acc_norm)");
    out.push_back(c[i].get<std::string>());
  }
  return out;
}

int64_t index_field(const nlohmann::json& d, const char* key, size_t n, const std::string& where) {
  QF_CHECK_INPUT(d.contains(key), where, ": missing field '", key, "' (the index of the right answer in 'choices')");
  const auto& g = d[key];
  QF_CHECK_INPUT(g.is_number_integer(), where, ": '", key, "': expected an integer index into 'choices', found ",
                 g.is_number() ? g.dump() : std::string(g.type_name()));
  const int64_t v = g.get<int64_t>();
  QF_CHECK_INPUT(v >= 0 && v < static_cast<int64_t>(n), where, ": '", key, "': ", v, " is not an index into the ", n,
                 " choices (0..", n - 1, ")");
  return v;
}

Doc parse_doc(nlohmann::json j, Kind* kind, int64_t line, const std::string& where) {
  Doc d;
  d.line = line;
  if (j.contains("query")) {
    *kind = Kind::Cloze;
    d.text = str_field(j, "query", where);
    d.choices = choices_field(j, 1u << 20, where);
    d.gold = index_field(j, "gold", d.choices.size(), where);
  } else if (j.contains("question")) {
    *kind = Kind::Mmlu;
    // lm-eval's MMLU template: "{{question.strip()}}\nA. {{choices[0]}}\nB. ...\nAnswer:", choices A, B, ...
    const auto opts = choices_field(j, 26, where);
    d.text = py_strip(str_field(j, "question", where));
    for (size_t i = 0; i < opts.size(); ++i) {
      const std::string letter(1, static_cast<char>('A' + i));
      d.text += "\n" + letter + ". " + opts[i];
      d.choices.push_back(letter);
    }
    d.text += "\nAnswer:";
    d.gold = index_field(j, "answer", opts.size(), where);
    if (j.contains("subject")) {
      std::string s = str_field(j, "subject", where);
      std::replace(s.begin(), s.end(), '_', ' ');
      d.description = "The following are multiple choice questions (with answers) about " + s + ".\n\n";
    }
  } else if (j.contains("text")) {
    *kind = Kind::Rolling;
    d.text = str_field(j, "text", where);
  } else {
    throw InputError(str(where, ": a document needs 'query' + 'choices' + 'gold' (cloze multiple choice), "
                                "'question' + 'choices' + 'answer' (MMLU) or 'text' (perplexity); found keys ",
                         [&] {
                           std::string k;
                           for (auto it = j.begin(); it != j.end(); ++it) k += (k.empty() ? "" : ", ") + it.key();
                           return k.empty() ? std::string("none") : k;
                         }()));
  }
  d.raw = std::move(j);
  return d;
}

}  // namespace

Task load_task(const std::string& file_or_name) {
  Task t;
  t.path = resolve_task_path(file_or_name);
  const std::string bytes = fs::read_file(t.path);
  data::check_utf8(bytes, t.path);
  size_t pos = 0;
  int64_t line = 0;
  int64_t first_line = 0;
  while (pos < bytes.size()) {
    size_t nl = bytes.find('\n', pos);
    if (nl == std::string::npos) nl = bytes.size();
    std::string l = bytes.substr(pos, nl - pos);
    pos = nl + 1;
    ++line;
    if (l.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank line
    const std::string where = str(t.path, ":", line);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(l);
    } catch (const nlohmann::json::parse_error& e) {
      throw InputError(str(where, ": not a JSON document (", json_file::describe(e),
                           "); a task file holds one JSON object per line"));
    }
    QF_CHECK_INPUT(j.is_object(), where, ": expected a JSON object (one document per line), found ", j.type_name());
    Kind k = Kind::Cloze;
    Doc d = parse_doc(std::move(j), &k, line, where);
    if (t.docs.empty()) {
      t.kind = k;
      first_line = line;
    }
    QF_CHECK_INPUT(k == t.kind, where, ": a ", to_string(k), " document, but line ", first_line, " made this a ",
                   to_string(t.kind), " task (one document shape per file)");
    t.docs.push_back(std::move(d));
  }
  QF_CHECK_INPUT(!t.docs.empty(), t.path, ": no documents (expected one JSON object per line)");
  return t;
}

// ---- prompts ----

std::string context(const Doc& d, const std::vector<const Doc*>& shots) {
  std::string s = d.description;
  for (const Doc* x : shots) s += x->text + " " + x->choices[x->gold] + "\n\n";
  return s + d.text;
}

std::vector<const Doc*> first_n(const std::vector<Doc>& pool, const Doc* eval_doc, int64_t n,
                                const std::string& pool_path) {
  std::vector<const Doc*> out;
  int64_t avail = 0;
  for (const auto& d : pool) {
    if (eval_doc && d.raw == eval_doc->raw) continue;
    ++avail;
    if (static_cast<int64_t>(out.size()) < n) out.push_back(&d);
  }
  QF_CHECK_INPUT(static_cast<int64_t>(out.size()) == n, "--num-fewshot ", n, ": ", pool_path, " has only ", avail,
                 " documents to draw examples from", eval_doc ? str(" besides line ", eval_doc->line) : std::string());
  return out;
}

// ---- tokenization ----

std::vector<int64_t> Encoder::operator()(const std::string& s, bool special) const {
  std::vector<int64_t> ids;
  if (special && add_bos && tok->bos_id() >= 0) {
    const std::string bos_text = tok->token(tok->bos_id());
    // has_bos_prefix: a text that already starts with BOS's text gets no second one.
    if (bos_text.empty() || s.compare(0, bos_text.size(), bos_text) != 0) ids.push_back(tok->bos_id());
  }
  for (int32_t t : tok->encode(s)) ids.push_back(t);
  return ids;
}

int64_t Encoder::prefix_token() const { return tok->bos_id() >= 0 ? tok->bos_id() : tok->eos_id(); }

Request encode_pair(const Encoder& enc, std::string ctx, std::string cont, const std::string& where) {
  Request r;
  if (ctx.empty()) {
    r.cont = enc(cont, false);
    QF_CHECK_INPUT(!r.cont.empty(), where, ": the continuation '", cont, "' encodes to no tokens");
    const int64_t p = enc.prefix_token();
    QF_CHECK_INPUT(p >= 0, where, ": empty context and the tokenizer has neither BOS nor EOS to condition on");
    if (p != r.cont[0]) {
      r.ctx = {p};
    } else {
      r.ctx = {r.cont[0]};
      r.cont.erase(r.cont.begin());
    }
  } else {
    const size_t n = trailing_space_bytes(ctx);
    if (n > 0) {
      cont = ctx.substr(ctx.size() - n) + cont;
      ctx.resize(ctx.size() - n);
    }
    auto whole = enc(ctx + cont);
    r.ctx = enc(ctx);
    r.cont.assign(whole.begin() + std::min(whole.size(), r.ctx.size()), whole.end());
  }
  QF_CHECK_INPUT(!r.ctx.empty(), where, ": the context encodes to no tokens (lm-eval refuses it too)");
  QF_CHECK_INPUT(!r.cont.empty(), where, ": the continuation '", cont,
                 "' adds no tokens after the context (lm-eval refuses it too)");
  return r;
}

std::vector<Request> rolling_windows(const std::vector<int64_t>& tl, int64_t prefix, int64_t max_len,
                                     int64_t context_len) {
  QF_CHECK(context_len >= 1 && context_len <= max_len, "rolling_windows: context_len ", context_len,
           " outside [1, ", max_len, "]");
  std::vector<Request> out;
  if (tl.empty()) return out;
  const auto n = static_cast<int64_t>(tl.size());
  const int64_t pred_len = max_len - context_len + 1;
  auto disjoint = [&](std::vector<int64_t> a, std::vector<int64_t> b) {
    a.resize(a.size() - (b.size() - 1));  // make_disjoint_window
    out.push_back({std::move(a), std::move(b)});
  };
  const int64_t first = std::min(max_len, n);
  std::vector<int64_t> a{prefix};
  a.insert(a.end(), tl.begin(), tl.begin() + (first - 1));
  disjoint(std::move(a), std::vector<int64_t>(tl.begin(), tl.begin() + first));
  int64_t predicted = first;
  while (predicted < n) {
    const int64_t wp = std::min(n - predicted, pred_len);
    const int64_t end = predicted + wp;
    disjoint(std::vector<int64_t>(tl.begin() + (end - max_len - 1), tl.begin() + (end - 1)),
             std::vector<int64_t>(tl.begin() + (end - wp), tl.begin() + end));
    predicted += wp;
  }
  return out;
}

// ---- scoring ----

namespace {
constexpr int64_t kBatchTokens = 16384;  // tokens per forward beyond a single row
}  // namespace

std::vector<LogLik> loglikelihood(models::CausalLM& m, const std::vector<Request>& reqs, int64_t max_len,
                                  int64_t batch) {
  QF_CHECK(batch >= 1, "loglikelihood: batch ", batch);
  c10::NoGradGuard ng;
  m.eval();
  const auto dev = m.parameters().front().device();
  std::vector<LogLik> out(reqs.size());
  // The model's input for each request and where its continuation's logits are.
  struct Item {
    std::vector<int64_t> inp;
    size_t contlen;
  };
  std::vector<Item> items(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& r = reqs[i];
    QF_CHECK(!r.ctx.empty() && !r.cont.empty(), "loglikelihood: request ", i, " has an empty side");
    QF_CHECK_INPUT(static_cast<int64_t>(r.cont.size()) <= max_len, "a continuation of ", r.cont.size(),
                   " tokens is longer than the model's context (", max_len, " tokens)");
    std::vector<int64_t> all = r.ctx;
    all.insert(all.end(), r.cont.begin(), r.cont.end());
    const size_t keep = std::min(all.size(), static_cast<size_t>(max_len + 1));
    items[i].inp.assign(all.end() - keep, all.end() - 1);
    items[i].contlen = r.cont.size();
  }
  std::vector<size_t> order(reqs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return items[a].inp.size() > items[b].inp.size(); });
  for (size_t s = 0, e = 0; s < order.size(); s = e) {
    // Longest first: the batch's first input sets its width T; at most `batch` rows and, beyond one
    // row, at most kBatchTokens tokens (long rolling windows of a big model run a few at a time).
    const auto T = static_cast<int64_t>(items[order[s]].inp.size());
    const int64_t rows_cap = std::max<int64_t>(1, std::min<int64_t>(batch, kBatchTokens / std::max<int64_t>(T, 1)));
    e = std::min(order.size(), s + static_cast<size_t>(rows_cap));
    const auto B = static_cast<int64_t>(e - s);
    std::vector<int64_t> ids(B * T, 0), rows, targets;
    for (int64_t b = 0; b < B; ++b) {
      const auto& it = items[order[s + b]];
      const auto& r = reqs[order[s + b]];
      std::copy(it.inp.begin(), it.inp.end(), ids.begin() + b * T);
      const auto L = static_cast<int64_t>(it.inp.size());
      for (size_t k = 0; k < it.contlen; ++k) {
        rows.push_back(b * T + L - static_cast<int64_t>(it.contlen) + static_cast<int64_t>(k));
        targets.push_back(r.cont[k]);
      }
    }
    auto opts = at::TensorOptions().dtype(at::kLong);
    auto x = at::from_blob(ids.data(), {B, T}, opts).clone().to(dev);
    auto h = m.hidden(x);
    h = h.reshape({B * T, h.size(-1)}).index_select(0, at::from_blob(rows.data(), {(int64_t)rows.size()}, opts).to(dev));
    auto lp = at::log_softmax(m.logits(h).to(at::kFloat), -1);
    auto tgt = at::from_blob(targets.data(), {(int64_t)targets.size()}, opts).to(dev);
    auto ll = lp.gather(1, tgt.unsqueeze(1)).squeeze(1).to(at::kDouble).cpu();
    auto greedy = lp.argmax(-1).eq(tgt).cpu();
    const double* llp = ll.data_ptr<double>();
    const bool* gp = greedy.data_ptr<bool>();
    size_t k = 0;
    for (int64_t b = 0; b < B; ++b) {
      auto& o = out[order[s + b]];
      o.greedy = true;
      for (size_t j = 0; j < items[order[s + b]].contlen; ++j, ++k) {
        o.ll += llp[k];
        o.greedy = o.greedy && gp[k];
      }
    }
  }
  return out;
}

// ---- a task end to end ----

namespace {

double mean(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / v.size(); }
// lm-eval's mean_stderr: sample standard deviation / sqrt(n).
double mean_stderr(const std::vector<double>& v) {
  if (v.size() < 2) return std::nan("");
  const double mu = mean(v);
  double s = 0;
  for (double x : v) s += (x - mu) * (x - mu);
  return std::sqrt(s / (v.size() - 1)) / std::sqrt(static_cast<double>(v.size()));
}
// np.argmax: the first maximum.
size_t argmax(const std::vector<double>& v) { return std::max_element(v.begin(), v.end()) - v.begin(); }

}  // namespace

void check_options(const Options& o) {
  QF_CHECK_INPUT(o.num_fewshot >= 0, "--num-fewshot: expected 0 or more, found ", o.num_fewshot);
  QF_CHECK_INPUT(o.limit >= 0, "--limit: expected 0 (all) or more, found ", o.limit);
  const Task t = load_task(o.task);
  QF_CHECK_INPUT(t.kind != Kind::Rolling || o.num_fewshot == 0, "--num-fewshot ", o.num_fewshot, ": ", t.path,
                 " is a perplexity task (field 'text'), which takes no examples");
  QF_CHECK_INPUT(o.fewshot_from.empty() || o.num_fewshot > 0, "--fewshot-from needs --num-fewshot N > 0");
  if (!o.fewshot_from.empty()) {
    const Task f = load_task(o.fewshot_from);
    QF_CHECK_INPUT(f.kind == t.kind, "--fewshot-from ", f.path, ": a ", to_string(f.kind), " file, but ", t.path,
                   " is a ", to_string(t.kind), " task");
  }
}

namespace {

Result score(models::CausalLM& m, const Encoder& enc, int64_t max_len, int64_t batch, const Options& o) {
  const Task t = load_task(o.task);
  const Task shots_file = o.fewshot_from.empty() ? Task{} : load_task(o.fewshot_from);
  const Task& pool = o.fewshot_from.empty() ? t : shots_file;
  const size_t n = o.limit > 0 ? std::min(t.docs.size(), static_cast<size_t>(o.limit)) : t.docs.size();
  Result res;
  res.path = t.path;
  res.kind = t.kind;
  res.docs = static_cast<int64_t>(n);
  res.num_fewshot = o.num_fewshot;
  std::vector<Request> reqs;
  std::vector<size_t> first(n + 1, 0);  // requests of doc i: [first[i], first[i + 1])
  for (size_t i = 0; i < n; ++i) {
    const Doc& d = t.docs[i];
    const std::string where = str(t.path, ":", d.line);
    first[i] = reqs.size();
    if (t.kind == Kind::Rolling) {
      QF_CHECK_INPUT(enc.prefix_token() >= 0, where, ": the tokenizer has neither BOS nor EOS to start a window with");
      for (auto& r : rolling_windows(enc(d.text), enc.prefix_token(), max_len)) reqs.push_back(std::move(r));
    } else {
      const auto shots =
          o.num_fewshot > 0 ? first_n(pool.docs, o.fewshot_from.empty() ? &d : nullptr, o.num_fewshot, pool.path)
                            : std::vector<const Doc*>{};
      const std::string ctx = context(d, shots);
      for (const auto& c : d.choices) reqs.push_back(encode_pair(enc, ctx, " " + c, where));
    }
  }
  first[n] = reqs.size();
  const auto lls = loglikelihood(m, reqs, max_len, batch);
  if (t.kind == Kind::Rolling) {
    double ll = 0, words = 0, bytes = 0;
    for (size_t i = 0; i < n; ++i) {
      const Doc& d = t.docs[i];
      double dl = 0;
      for (size_t r = first[i]; r < first[i + 1]; ++r) dl += lls[r].ll;
      const int64_t w = count_words(d.text), b = count_bytes(d.text);
      ll += dl, words += w, bytes += b;
      res.samples.push_back({{"doc", i}, {"line", d.line}, {"loglikelihood", dl}, {"words", w}, {"bytes", b},
                             {"windows", first[i + 1] - first[i]}});
    }
    res.metrics = {{"word_perplexity", std::exp(-ll / words)},
                   {"byte_perplexity", std::exp(-ll / bytes)},
                   {"bits_per_byte", -ll / bytes / std::log(2.0)}};
    return res;
  }
  std::vector<double> acc, acc_norm, acc_bytes;
  for (size_t i = 0; i < n; ++i) {
    const Doc& d = t.docs[i];
    std::vector<double> ll, by_char, by_byte;
    std::vector<bool> greedy;
    for (size_t r = first[i], c = 0; r < first[i + 1]; ++r, ++c) {
      ll.push_back(lls[r].ll);
      greedy.push_back(lls[r].greedy);
      by_char.push_back(lls[r].ll / static_cast<double>(count_chars(d.choices[c])));
      by_byte.push_back(lls[r].ll / static_cast<double>(count_bytes(d.choices[c])));
    }
    const size_t pred = argmax(ll), pred_norm = argmax(by_char), pred_bytes = argmax(by_byte);
    acc.push_back(pred == static_cast<size_t>(d.gold));
    acc_norm.push_back(pred_norm == static_cast<size_t>(d.gold));
    acc_bytes.push_back(pred_bytes == static_cast<size_t>(d.gold));
    res.samples.push_back({{"doc", i}, {"line", d.line}, {"loglikelihoods", ll}, {"is_greedy", greedy},
                           {"gold", d.gold}, {"pred", pred}, {"pred_norm", pred_norm}, {"acc", acc.back()},
                           {"acc_norm", acc_norm.back()}, {"acc_bytes", acc_bytes.back()}});
  }
  res.metrics = {{"acc", mean(acc)},           {"acc_stderr", mean_stderr(acc)},
                 {"acc_norm", mean(acc_norm)}, {"acc_norm_stderr", mean_stderr(acc_norm)},
                 {"acc_bytes", mean(acc_bytes)}};
  return res;
}

}  // namespace

Result run(models::CausalLM& m, const Encoder& enc, int64_t max_len, int64_t batch, const Options& o) {
  check_options(o);
  Result res = score(m, enc, max_len, batch, o);
  if (!o.samples_out.empty()) {
    std::string text;
    for (const auto& s : res.samples) text += s.dump() + "\n";
    fs::write_atomic(o.samples_out, text);
  }
  return res;
}

std::string summary(const Result& r) {
  std::ostringstream o;
  o << "task " << r.path << " (" << to_string(r.kind) << "): " << r.docs << " documents";
  if (r.num_fewshot > 0) o << ", " << r.num_fewshot << "-shot";
  o << "\n";
  char buf[128];
  for (auto it = r.metrics.begin(); it != r.metrics.end(); ++it) {
    std::snprintf(buf, sizeof buf, "  %-18s %.6f\n", it.key().c_str(),
                  it.value().is_number() ? it.value().get<double>() : std::nan(""));
    o << buf;
  }
  nlohmann::json j = r.metrics;
  j["task"] = r.path;
  j["kind"] = r.kind == Kind::Rolling ? "loglikelihood_rolling" : "multiple_choice";
  j["docs"] = r.docs;
  j["num_fewshot"] = r.num_fewshot;
  o << j.dump() << "\n";
  return o.str();
}

}  // namespace qf::trainer::tasks
