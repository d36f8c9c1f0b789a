#include "export/imatrix_file.h"

#include <cmath>
#include <cstring>
#include <string_view>

#include "core/error.h"
#include "core/fs.h"
#include "export/gguf_writer.h"

namespace qf::exporter {
namespace {

constexpr const char* kSums = ".in_sum2";
constexpr const char* kCounts = ".counts";

bool strip_suffix(std::string& s, const std::string& suffix) {
  if (s.size() < suffix.size() || s.compare(s.size() - suffix.size(), suffix.size(), suffix) != 0) return false;
  s.resize(s.size() - suffix.size());
  return true;
}

std::vector<float> f32_data(std::string_view bytes, const gguf::Index& idx, const gguf::TensorInfo& t,
                            const std::string& path) {
  QF_CHECK_INPUT(t.type == gguf::TensorType::F32, "imatrix file '", path, "': tensor '", t.name, "' is ",
                 gguf::type_name(t.type), "; llama.cpp's loader requires F32 sums and counts");
  int64_t n = 1;
  for (auto d : t.dims) n *= d;
  std::vector<float> v(static_cast<size_t>(n));
  std::memcpy(v.data(), bytes.data() + idx.data_start + t.offset, v.size() * sizeof(float));
  return v;
}

// common_imatrix_load_legacy: the pre-GGUF binary layout (little endian int32 / float32).
Imatrix read_legacy(const std::string& path, std::string_view b) {
  size_t at = 0;
  auto need = [&](size_t n, const char* what) {
    QF_CHECK_INPUT(at + n <= b.size(), "imatrix file '", path, "': neither GGUF nor a complete legacy imatrix (",
                   what, " runs past the end at byte ", at, ")");
  };
  auto i32 = [&](const char* what) {
    need(4, what);
    int32_t v;
    std::memcpy(&v, b.data() + at, 4);
    at += 4;
    return v;
  };
  Imatrix m;
  m.legacy = true;
  const int32_t n_entries = i32("the entry count");
  QF_CHECK_INPUT(n_entries >= 1 && static_cast<size_t>(n_entries) <= b.size(), "imatrix file '", path,
                 "': neither GGUF nor a legacy imatrix (entry count ", n_entries, ")");
  for (int32_t e = 0; e < n_entries; ++e) {
    const int32_t len = i32("a name length");
    QF_CHECK_INPUT(len > 0, "imatrix file '", path, "': entry ", e, " has name length ", len);
    need(static_cast<size_t>(len), "a name");
    std::string name(b.substr(at, static_cast<size_t>(len)));
    at += static_cast<size_t>(len);
    const int32_t ncall = i32("ncall");
    const int32_t nval = i32("nval");
    QF_CHECK_INPUT(nval >= 1, "imatrix file '", path, "': entry '", name, "' has ", nval, " values");
    need(static_cast<size_t>(nval) * 4, "the values");
    ImatrixEntry& en = m.entries[name];
    en.sums.resize(static_cast<size_t>(nval));
    std::memcpy(en.sums.data(), b.data() + at, en.sums.size() * 4);
    at += en.sums.size() * 4;
    en.counts = {static_cast<float>(ncall)};
  }
  return m;
}

}  // namespace

std::vector<float> Imatrix::weights(const std::string& name, int64_t cols, const std::string& origin) const {
  auto it = entries.find(name);
  if (it == entries.end()) return {};
  const ImatrixEntry& e = it->second;
  QF_CHECK_INPUT(static_cast<int64_t>(e.sums.size()) == cols, "imatrix file '", origin, "': '", name, "' has ",
                 e.sums.size(), " values but the weight has ", cols,
                 " input columns (llama-quantize refuses this too: an imatrix of another model?)");
  std::vector<float> w(e.sums.size());
  if (legacy) {  // (sum / count) * ncall: divide by ncall (values as they are when it is 0)
    const float ncall = e.counts.empty() ? 0.f : e.counts[0];
    for (size_t i = 0; i < w.size(); ++i) w[i] = ncall > 0 ? e.sums[i] / ncall : e.sums[i];
    return w;
  }
  // tools/quantize: the count is lround()ed to an integer on load, then used as float.
  const float count = static_cast<float>(std::lround(e.counts.at(0)));
  for (size_t i = 0; i < w.size(); ++i) w[i] = count > 0.0f ? e.sums[i] / count : 1.0f;
  return w;
}

void write_imatrix(const std::string& path, const Imatrix& m) {
  gguf::Writer w;
  w.add_string("general.type", "imatrix");
  w.add_strings("imatrix.datasets", m.datasets);
  w.add_u32("imatrix.chunk_count", m.chunk_count);
  w.add_u32("imatrix.chunk_size", m.chunk_size);
  for (const auto& [name, e] : m.entries) {  // std::map: name order, as llama-imatrix sorts them
    const auto n_mat = static_cast<int64_t>(e.counts.size());
    QF_CHECK(n_mat > 0 && e.sums.size() % e.counts.size() == 0, "imatrix: entry '", name, "' has ", e.sums.size(),
             " sums for ", n_mat, " counts");
    const auto ne0 = static_cast<int64_t>(e.sums.size()) / n_mat;
    w.add_tensor(name + kSums, {n_mat, ne0}, gguf::TensorType::F32,
                 std::string(reinterpret_cast<const char*>(e.sums.data()), e.sums.size() * sizeof(float)));
    w.add_tensor(name + kCounts, {n_mat, 1}, gguf::TensorType::F32,
                 std::string(reinterpret_cast<const char*>(e.counts.data()), e.counts.size() * sizeof(float)));
  }
  w.write(path);
}

Imatrix read_imatrix(const std::string& path) {
  const std::string bytes = fs::read_file(path);
  if (bytes.compare(0, 4, "GGUF") != 0) return read_legacy(path, bytes);
  const auto idx = gguf::read_index(bytes, path);
  Imatrix m;
  bool has_meta[3] = {false, false, false};
  for (const auto& [key, type] : idx.keys) {
    if (key == "imatrix.datasets") has_meta[0] = true;
    if (key == "imatrix.chunk_count") has_meta[1] = true;
    if (key == "imatrix.chunk_size") has_meta[2] = true;
  }
  QF_CHECK_INPUT(has_meta[0] && has_meta[1] && has_meta[2], "imatrix file '", path,
                 "': a GGUF without imatrix.datasets / imatrix.chunk_count / imatrix.chunk_size (llama-quantize "
                 "refuses it as 'missing imatrix metadata'); is it an imatrix at all?");
  std::map<std::string, std::pair<const gguf::TensorInfo*, const gguf::TensorInfo*>> parts;
  for (const auto& t : idx.tensors) {
    std::string name = t.name;
    if (strip_suffix(name, kSums)) parts[name].first = &t;
    else if (strip_suffix(name, kCounts)) parts[name].second = &t;
  }
  QF_CHECK_INPUT(!parts.empty(), "imatrix file '", path, "': no <weight>.in_sum2 / <weight>.counts tensors");
  for (const auto& [name, p] : parts) {
    QF_CHECK_INPUT(p.first && p.second, "imatrix file '", path, "': '", name, "' has ",
                   p.first ? "in_sum2 but no counts" : "counts but no in_sum2");
    ImatrixEntry& e = m.entries[name];
    e.sums = f32_data(bytes, idx, *p.first, path);
    e.counts = f32_data(bytes, idx, *p.second, path);
    QF_CHECK_INPUT(!e.counts.empty() && e.sums.size() % e.counts.size() == 0, "imatrix file '", path, "': '", name,
                   "' has ", e.sums.size(), " sums for ", e.counts.size(), " counts");
    for (float v : e.sums)
      QF_CHECK_INPUT(std::isfinite(v), "imatrix file '", path, "': '", name,
                     "' holds a non-finite sum (llama-quantize refuses it)");
  }
  return m;
}

}  // namespace qf::exporter
