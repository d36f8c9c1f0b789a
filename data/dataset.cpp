// Datasets: reading (text/JSONL), tokenizing with an on-disk token cache, packing and splitting.
#include "data/dataset.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <fnmatch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "core/fs.h"
#include "core/json_file.h"
#include "core/log.h"
#include "core/strings.h"
#include "data/utf8.h"

namespace qf::data {

const cfg::Names<SourceConfig::Format>& source_format_names() {
  static const cfg::Names<SourceConfig::Format> n{
      {"auto", SourceConfig::Format::Auto}, {"text", SourceConfig::Format::Text}, {"jsonl", SourceConfig::Format::Jsonl}};
  return n;
}

const cfg::Names<SourceConfig::Split>& source_split_names() {
  static const cfg::Names<SourceConfig::Split> n{{"file", SourceConfig::Split::File},
                                                 {"blank_line", SourceConfig::Split::BlankLine},
                                                 {"line", SourceConfig::Split::Line}};
  return n;
}

namespace stdfs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Config

DataConfig DataConfig::from_config(cfg::Reader& r) {
  DataConfig c;
  const size_t n_problems = r.problems()->items.size();
  auto srcs = r.list("sources");
  if (srcs.empty() && !r.has("sources"))
    r.fail("sources", "required: a list of sources, e.g. [{path: corpus/}]");
  else if (srcs.empty() && r.problems()->items.size() == n_problems)  // not already reported as malformed
    r.fail("sources", "at least one source is required, e.g. [{path: corpus/}]");
  for (auto& s : srcs) {
    SourceConfig sc;
    sc.path = s.path("path", "", /*must_exist=*/true);
    if (sc.path.empty()) s.fail("path", "required: a file or a directory");
    sc.format = s.choice<SourceConfig::Format>("format", sc.format, source_format_names());
    sc.pattern = s.str("pattern", sc.pattern);
    if (sc.pattern.empty()) s.fail("pattern", "must not be empty (use '*' for every file)");
    sc.split = s.choice<SourceConfig::Split>("split", sc.split, source_split_names());
    sc.text_field = s.str("text_field", sc.text_field);
    sc.prompt_field = s.str("prompt_field", sc.prompt_field);
    sc.response_field = s.str("response_field", sc.response_field);
    if (sc.text_field.empty()) s.fail("text_field", "must not be empty");
    if (sc.prompt_field.empty()) s.fail("prompt_field", "must not be empty");
    if (sc.response_field.empty()) s.fail("response_field", "must not be empty");
    if (!sc.prompt_field.empty() && sc.prompt_field == sc.response_field)
      s.fail("response_field", "must differ from prompt_field ('" + sc.prompt_field + "')");
    s.finish();
    c.sources.push_back(std::move(sc));
  }
  c.seq_len = r.i64("seq_len", c.seq_len, 8, int64_t{1} << 20);
  c.val_fraction = r.f64("val_fraction", c.val_fraction, 0.0, 0.5);
  c.max_documents = r.i64("max_documents", c.max_documents, 0, std::numeric_limits<int64_t>::max());
  c.add_bos = r.boolean("add_bos", c.add_bos);
  c.add_eos = r.boolean("add_eos", c.add_eos);
  c.cache_dir = r.str("cache_dir", c.cache_dir);
  c.seed = r.i64("seed", c.seed, 0, std::numeric_limits<int64_t>::max());
  r.finish();
  return c;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Files


bool is_jsonl(const SourceConfig& src, const std::string& file) {
  if (src.format != SourceConfig::Format::Auto) return src.format == SourceConfig::Format::Jsonl;
  return ends_with(file, ".jsonl") || ends_with(file, ".json-lines");
}

// Files of one source: the file itself, or the directory's files (recursively, hidden entries
// skipped, file names matched against `pattern`) sorted by path.
std::vector<std::string> source_files(const SourceConfig& src) {
  QF_CHECK_INPUT(stdfs::exists(src.path), "data source '", src.path, "' does not exist");
  if (!stdfs::is_directory(src.path)) return {src.path};
  std::vector<std::string> files;
  for (auto it = stdfs::recursive_directory_iterator(src.path); it != stdfs::recursive_directory_iterator(); ++it) {
    std::string name = it->path().filename().string();
    if (!name.empty() && name[0] == '.') {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file() && ::fnmatch(src.pattern.c_str(), name.c_str(), 0) == 0)
      files.push_back(it->path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

std::string sources_text(const DataConfig& cfg) {
  std::string s;
  for (auto& src : cfg.sources) {
    s += (s.empty() ? "'" : ", '") + src.path + "'";
    if (stdfs::is_directory(src.path)) s += " (pattern '" + src.pattern + "')";
  }
  return s.empty() ? "<no sources>" : s;
}

// ---------------------------------------------------------------------------------------------
// Documents

struct Doc {
  std::string prompt;  // instruction examples only (loss masked)
  std::string text;    // the text, or the response of an instruction example
  bool instruction = false;
};

std::vector<std::string> split_lines(const std::string& bytes) {
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t nl = bytes.find('\n', pos);
    if (nl == std::string::npos) nl = bytes.size();
    std::string line = bytes.substr(pos, nl - pos);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
    pos = nl + 1;
  }
  return lines;
}

bool blank(const std::string& s) { return s.find_first_not_of(" \t\r\n\f\v") == std::string::npos; }

void read_text(const SourceConfig& src, const std::string& bytes, std::vector<Doc>& docs, size_t limit) {
  auto push = [&](std::string t) {
    if (docs.size() < limit && !blank(t)) docs.push_back(Doc{"", std::move(t), false});
  };
  if (src.split == SourceConfig::Split::File) {
    push(bytes);
  } else if (src.split == SourceConfig::Split::Line) {
    for (auto& l : split_lines(bytes)) push(std::move(l));
  } else {  // blank_line
    std::string para;
    for (auto& l : split_lines(bytes)) {
      if (blank(l)) {
        push(std::move(para));
        para.clear();
      } else {
        if (!para.empty()) para += '\n';
        para += l;
      }
    }
    push(std::move(para));
  }
}

std::string json_type(const nlohmann::json& j) { return j.type_name(); }

void read_jsonl(const SourceConfig& src, const std::string& file, const std::string& bytes, std::vector<Doc>& docs,
                size_t limit) {
  const std::string expect = "a JSON object with a string field '" + src.text_field + "' or string fields '" +
                             src.prompt_field + "' and '" + src.response_field + "'";
  auto lines = split_lines(bytes);
  for (size_t i = 0; i < lines.size() && docs.size() < limit; ++i) {
    const std::string& line = lines[i];
    if (blank(line)) continue;
    const std::string where = file + ":" + std::to_string(i + 1);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      throw InputError(str(where, ": malformed JSON (", json_file::describe(e), "); expected one JSON object per line: ", expect));
    }
    if (!j.is_object()) throw InputError(str(where, ": expected ", expect, ", got a JSON ", json_type(j)));
    auto field = [&](const std::string& name) -> const nlohmann::json* {
      auto it = j.find(name);
      if (it == j.end() || it->is_null()) return nullptr;
      if (!it->is_string())
        throw InputError(str(where, ": field '", name, "' must be a string, got a JSON ", json_type(*it), "; expected ", expect));
      return &*it;
    };
    const nlohmann::json* p = field(src.prompt_field);
    const nlohmann::json* r = field(src.response_field);
    if (p && r) {
      Doc d{p->get<std::string>(), r->get<std::string>(), true};
      if (!d.prompt.empty() || !d.text.empty()) docs.push_back(std::move(d));
      continue;
    }
    if (const nlohmann::json* t = field(src.text_field)) {
      std::string text = t->get<std::string>();
      if (!text.empty()) docs.push_back(Doc{"", std::move(text), false});
      continue;
    }
    std::string present;
    for (auto it = j.begin(); it != j.end(); ++it) present += (present.empty() ? "'" : ", '") + it.key() + "'";
    std::string extra;
    if (p || r)
      extra = str(" (has '", p ? src.prompt_field : src.response_field, "' but not '",
                  p ? src.response_field : src.prompt_field, "')");
    throw InputError(str(where, ": record is missing the expected fields", extra, "; expected ", expect,
                         "; fields present: ", present.empty() ? "none" : present));
  }
}

// ---------------------------------------------------------------------------------------------
// Tokenizing (documents are encoded in parallel; results are appended in document order)

template <class F>
void parallel_for(size_t n, F&& fn) {
  size_t hw = std::max<size_t>(1, std::thread::hardware_concurrency());
  size_t nt = std::min<size_t>({hw, size_t{16}, (n + 31) / 32});
  if (nt <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr err;
  std::mutex mu;
  auto work = [&] {
    try {
      for (size_t i; (i = next.fetch_add(1)) < n;) fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu);
      if (!err) err = std::current_exception();
      next.store(n);
    }
  };
  std::vector<std::thread> ts;
  for (size_t t = 1; t < nt; ++t) ts.emplace_back(work);
  work();
  for (auto& t : ts) t.join();
  if (err) std::rethrow_exception(err);
}

struct Stream {
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;
  int64_t n_documents = 0;
};

void tokenize_docs(const std::vector<Doc>& docs, const DataConfig& cfg, const Tokenizer& tok, Stream& s) {
  std::vector<std::vector<int32_t>> prompt(docs.size()), text(docs.size());
  parallel_for(docs.size(), [&](size_t i) {
    if (docs[i].instruction && !docs[i].prompt.empty()) prompt[i] = tok.encode(docs[i].prompt);
    text[i] = tok.encode(docs[i].text);
  });
  const int32_t bos = tok.bos_id(), eos = tok.eos_id();
  for (size_t i = 0; i < docs.size(); ++i) {
    const bool instr = docs[i].instruction;
    if (!instr && text[i].empty()) continue;
    // BOS belongs to the prompt of an instruction example (not a target there); in plain text
    // every token is a target.
    if (cfg.add_bos && bos >= 0) {
      s.ids.push_back(bos);
      s.mask.push_back(instr ? 0 : 1);
    }
    s.ids.insert(s.ids.end(), prompt[i].begin(), prompt[i].end());
    s.mask.insert(s.mask.end(), prompt[i].size(), 0);
    s.ids.insert(s.ids.end(), text[i].begin(), text[i].end());
    s.mask.insert(s.mask.end(), text[i].size(), 1);
    if (cfg.add_eos && eos >= 0) {
      s.ids.push_back(eos);
      s.mask.push_back(1);
    }
    s.n_documents += 1;
  }
}

// ---------------------------------------------------------------------------------------------
// Token cache: header, int32 ids[n], uint8 mask[n]. Written atomically; validated on load.

constexpr char kMagic[8] = {'Q', 'F', 'T', 'O', 'K', 'E', 'N', 'S'};
constexpr uint32_t kCacheVersion = 1;
constexpr uint32_t kEndian = 0x01020304u;

struct CacheHeader {
  char magic[8];
  uint32_t version;
  uint32_t endian;
  int64_t n_tokens;
  int64_t n_documents;
  uint64_t payload_hash;  // fnv1a64 of ids and mask bytes
};
static_assert(sizeof(CacheHeader) == 40, "cache header layout");

std::string cache_key(const DataConfig& cfg, const Tokenizer& tok,
                      const std::vector<std::vector<std::string>>& files) {
  std::string k;
  auto add = [&](const std::string& v) {
    k += v;
    k.push_back('\0');
  };
  add("qforge-tokens-v" + std::to_string(kCacheVersion));
  add(tok.fingerprint());
  add(std::to_string(tok.bos_id()));
  add(std::to_string(tok.eos_id()));
  add(cfg.add_bos ? "bos" : "-");
  add(cfg.add_eos ? "eos" : "-");
  add(std::to_string(cfg.max_documents));
  for (size_t i = 0; i < cfg.sources.size(); ++i) {
    const auto& s = cfg.sources[i];
    add("source");
    add(s.path);
    add(cfg::name_of(source_format_names(), s.format));
    add(s.pattern);
    add(cfg::name_of(source_split_names(), s.split));
    add(s.text_field);
    add(s.prompt_field);
    add(s.response_field);
    for (const auto& f : files[i]) {
      std::error_code ec;
      auto size = stdfs::file_size(f, ec);
      auto mtime = stdfs::last_write_time(f, ec).time_since_epoch().count();
      add(f);
      add(std::to_string(size));
      add(std::to_string(static_cast<long long>(mtime)));
      add(fs::hash_file(f));
    }
  }
  return fs::hex64(fs::fnv1a64(k));
}

uint64_t payload_hash(const Stream& s) {
  uint64_t h = fs::fnv1a64(std::string_view(reinterpret_cast<const char*>(s.ids.data()), s.ids.size() * 4));
  return fs::fnv1a64(std::string_view(reinterpret_cast<const char*>(s.mask.data()), s.mask.size()), h);
}

void write_cache(const std::string& file, const Stream& s) {
  CacheHeader h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = kCacheVersion;
  h.endian = kEndian;
  h.n_tokens = static_cast<int64_t>(s.ids.size());
  h.n_documents = s.n_documents;
  h.payload_hash = payload_hash(s);
  std::string bytes(sizeof h + s.ids.size() * 5, '\0');
  std::memcpy(bytes.data(), &h, sizeof h);
  std::memcpy(bytes.data() + sizeof h, s.ids.data(), s.ids.size() * 4);
  std::memcpy(bytes.data() + sizeof h + s.ids.size() * 4, s.mask.data(), s.mask.size());
  fs::write_atomic(file, bytes);
}

// Returns false (with `why`) when the file is not a complete, valid cache of this version.
bool read_cache(const std::string& file, Stream& s, std::string& why) {
  std::string bytes = fs::read_file(file);
  CacheHeader h{};
  if (bytes.size() < sizeof h) { why = "truncated header"; return false; }
  std::memcpy(&h, bytes.data(), sizeof h);
  if (std::memcmp(h.magic, kMagic, 8) != 0) { why = "bad magic"; return false; }
  if (h.version != kCacheVersion) { why = "version " + std::to_string(h.version); return false; }
  if (h.endian != kEndian) { why = "byte order differs"; return false; }
  if (h.n_tokens < 0 || h.n_documents < 0 ||
      bytes.size() != sizeof h + static_cast<uint64_t>(h.n_tokens) * 5)
    { why = "size does not match its header"; return false; }
  s.ids.resize(static_cast<size_t>(h.n_tokens));
  s.mask.resize(static_cast<size_t>(h.n_tokens));
  std::memcpy(s.ids.data(), bytes.data() + sizeof h, s.ids.size() * 4);
  std::memcpy(s.mask.data(), bytes.data() + sizeof h + s.ids.size() * 4, s.mask.size());
  s.n_documents = h.n_documents;
  if (payload_hash(s) != h.payload_hash) { why = "checksum mismatch"; return false; }
  return true;
}

Stream tokenize_corpus(const DataConfig& cfg, const Tokenizer& tok,
                       const std::vector<std::vector<std::string>>& files) {
  Stream s;
  const size_t limit = cfg.max_documents > 0 ? static_cast<size_t>(cfg.max_documents)
                                             : std::numeric_limits<size_t>::max();
  size_t n_read = 0;
  auto t0 = std::chrono::steady_clock::now(), last = t0;
  size_t n_files = 0, total_files = 0;
  for (auto& f : files) total_files += f.size();
  for (size_t i = 0; i < cfg.sources.size() && n_read < limit; ++i) {
    for (const auto& f : files[i]) {
      if (n_read >= limit) break;
      std::string bytes = fs::read_file(f);
      check_utf8(bytes, f);  // every tokenizer alike: refused with the file, line and byte offset named
      std::vector<Doc> docs;
      if (is_jsonl(cfg.sources[i], f))
        read_jsonl(cfg.sources[i], f, bytes, docs, limit - n_read);
      else
        read_text(cfg.sources[i], bytes, docs, limit - n_read);
      n_read += docs.size();
      tokenize_docs(docs, cfg, tok, s);
      ++n_files;
      auto now = std::chrono::steady_clock::now();
      if (now - last > std::chrono::seconds(10)) {
        last = now;
        qf::log::info("tokenizing: ", n_files, "/", total_files, " files, ", s.n_documents, " documents, ",
                      s.ids.size(), " tokens");
      }
    }
  }
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// build_dataset / make_batch

Dataset build_dataset(const DataConfig& cfg, const Tokenizer& tok) {
  QF_CHECK_INPUT(!cfg.sources.empty(), "data.sources: no data sources configured");
  QF_CHECK(cfg.seq_len >= 1, "data.seq_len must be >= 1, got ", cfg.seq_len);
  std::vector<std::vector<std::string>> files;
  size_t n_files = 0;
  for (auto& src : cfg.sources) {
    files.push_back(source_files(src));
    n_files += files.back().size();
  }
  QF_CHECK_INPUT(n_files > 0, "data corpus is empty: no files found in ", sources_text(cfg));

  Dataset ds;
  Stream s;
  bool have = false;
  if (!cfg.cache_dir.empty()) {
    ds.cache_file = (stdfs::path(cfg.cache_dir) / ("tokens-" + cache_key(cfg, tok, files) + ".bin")).string();
    if (stdfs::is_regular_file(ds.cache_file)) {
      std::string why;
      try {
        have = read_cache(ds.cache_file, s, why);
      } catch (const InputError& e) {
        why = e.what();
      }
      if (!have) {
        qf::log::warn("token cache '", ds.cache_file, "' is invalid (", why, "); rebuilding it");
        s = Stream{};
      }
    }
  }
  ds.cache_hit = have;
  if (!have) {
    s = tokenize_corpus(cfg, tok, files);
    QF_CHECK_INPUT(s.n_documents > 0 && !s.ids.empty(), "data corpus is empty: no documents with text in ",
                   sources_text(cfg));
    if (!cfg.cache_dir.empty()) {
      try {
        fs::ensure_dir(cfg.cache_dir);
        write_cache(ds.cache_file, s);
      } catch (const Error& e) {
        qf::log::warn("cannot write token cache (", e.what(), "); continuing without it");
      }
    }
  }
  QF_CHECK_INPUT(s.n_documents > 0 && !s.ids.empty(), "data corpus is empty: no documents with text in ",
                 sources_text(cfg));
  ds.n_documents = s.n_documents;
  ds.n_tokens = static_cast<int64_t>(s.ids.size());

  // Packing: non-overlapping windows of seq_len+1 ids; the final partial window is dropped.
  const int64_t T = cfg.seq_len, W = T + 1;
  const int64_t N = ds.n_tokens / W;
  const int64_t n_val =
      cfg.val_fraction > 0 ? std::max<int64_t>(1, static_cast<int64_t>(std::ceil(N * cfg.val_fraction - 1e-9))) : 0;
  const int64_t n_train = N - n_val;
  if (n_train < 1) {
    const int64_t need = (cfg.val_fraction > 0 ? 2 : 1) * W;
    throw ConfigError({str("data.seq_len: ", T, " needs ", W, " tokens per sequence and the corpus has ", ds.n_tokens,
                           " tokens (", N, " sequence", N == 1 ? "" : "s", "); at least ", need, " tokens are needed for ",
                           cfg.val_fraction > 0 ? "one train and one validation sequence" : "one train sequence",
                           "; lower data.seq_len or data.val_fraction, or add data")});
  }
  at::Tensor tokens = at::empty({N, W}, at::TensorOptions().dtype(at::kLong));
  at::Tensor mask = at::empty({N, T}, at::TensorOptions().dtype(at::kBool));
  int64_t* tp = tokens.data_ptr<int64_t>();
  bool* mp = mask.data_ptr<bool>();
  for (int64_t r = 0; r < N; ++r) {
    const size_t base = static_cast<size_t>(r * W);
    for (int64_t t = 0; t < W; ++t) tp[r * W + t] = s.ids[base + static_cast<size_t>(t)];
    for (int64_t t = 0; t < T; ++t) mp[r * T + t] = s.mask[base + static_cast<size_t>(t) + 1] != 0;
  }
  ds.train.tokens = tokens.slice(0, 0, n_train);
  ds.train.loss_mask = mask.slice(0, 0, n_train);
  if (n_val > 0) {
    ds.val.tokens = tokens.slice(0, n_train, N);
    ds.val.loss_mask = mask.slice(0, n_train, N);
  }
  qf::log::info("data: ", ds.n_documents, " documents, ", ds.n_tokens, " tokens -> ", N, " sequences of ", W,
                " tokens (train ", n_train, ", val ", n_val, ", ", ds.n_tokens - N * W, " tail tokens dropped); ",
                cfg.cache_dir.empty() ? std::string("token cache disabled")
                                      : str("token cache ", ds.cache_hit ? "hit" : "miss", " (", ds.cache_file, ")"));
  return ds;
}

Batch make_batch(const PackedSet& set, const std::vector<int64_t>& indices) {
  QF_CHECK(set.size() > 0, "make_batch: the packed set is empty");
  QF_CHECK(!indices.empty(), "make_batch: no indices given");
  const int64_t B = static_cast<int64_t>(indices.size());
  at::Tensor idx = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    const int64_t v = indices[static_cast<size_t>(i)];
    QF_CHECK(v >= 0 && v < set.size(), "make_batch: index ", v, " is out of range for a set of ", set.size(),
             " sequences");
    ip[i] = v;
  }
  idx = idx.to(set.tokens.device());
  at::Tensor rows = set.tokens.index_select(0, idx);
  at::Tensor m = set.loss_mask.index_select(0, idx);
  const int64_t W = rows.size(1);
  Batch b;
  b.input_ids = rows.slice(1, 0, W - 1).contiguous();
  b.labels = rows.slice(1, 1, W).masked_fill(m.logical_not(), -100).contiguous();
  return b;
}

}  // namespace qf::data
