#include "export/gguf_writer.h"

#include <cstring>
#include <algorithm>
#include <memory>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "quant/ggml_types.h"

namespace qf::gguf {
namespace {

// Little-endian host: values are appended as their bytes.
template <class T>
void put(std::string& o, T v) {
  o.append(reinterpret_cast<const char*>(&v), sizeof v);
}
void put_str(std::string& o, const std::string& s) {
  put<uint64_t>(o, s.size());
  o += s;
}

void put_scalar(std::string& o, ValueType t, const std::variant<uint64_t, int64_t, double, bool, std::string>& v) {
  switch (t) {
    case ValueType::U8: put(o, static_cast<uint8_t>(std::get<uint64_t>(v))); break;
    case ValueType::I8: put(o, static_cast<int8_t>(std::get<int64_t>(v))); break;
    case ValueType::U16: put(o, static_cast<uint16_t>(std::get<uint64_t>(v))); break;
    case ValueType::I16: put(o, static_cast<int16_t>(std::get<int64_t>(v))); break;
    case ValueType::U32: put(o, static_cast<uint32_t>(std::get<uint64_t>(v))); break;
    case ValueType::I32: put(o, static_cast<int32_t>(std::get<int64_t>(v))); break;
    case ValueType::F32: put(o, static_cast<float>(std::get<double>(v))); break;
    case ValueType::BOOL: put(o, static_cast<uint8_t>(std::get<bool>(v) ? 1 : 0)); break;
    case ValueType::STRING: put_str(o, std::get<std::string>(v)); break;
    case ValueType::U64: put(o, std::get<uint64_t>(v)); break;
    case ValueType::I64: put(o, std::get<int64_t>(v)); break;
    case ValueType::F64: put(o, std::get<double>(v)); break;
    case ValueType::ARRAY: throw Error("gguf: nested arrays are not supported");
  }
}

void pad_to(std::string& o, uint32_t alignment) {
  while (o.size() % alignment) o.push_back('\0');
}

}  // namespace

// Geometry and names from the one type table (quant/ggml_types.h).
namespace {
const quant::ggml::TypeTraits& row(TensorType t) {
  const auto* r = quant::ggml::traits_by_gguf_id(static_cast<uint32_t>(t));
  QF_CHECK(r, "gguf: tensor type id ", static_cast<uint32_t>(t), " is not in qforge's type table");
  return *r;
}
}  // namespace

int64_t block_elems(TensorType t) { return row(t).block; }
int64_t block_bytes(TensorType t) { return row(t).bytes; }
const char* type_name(TensorType t) { return row(t).gguf_name; }

void Writer::add(const std::string& key, Value v) {
  for (auto& [k, _] : kv_) QF_CHECK(k != key, "gguf: duplicate metadata key '", key, "'");
  kv_.emplace_back(key, std::move(v));
}

void Writer::add_u32(const std::string& k, uint32_t v) { add(k, Value{ValueType::U32, ValueType::U32, uint64_t{v}, {}}); }
void Writer::add_i32(const std::string& k, int32_t v) { add(k, Value{ValueType::I32, ValueType::I32, int64_t{v}, {}}); }
void Writer::add_u64(const std::string& k, uint64_t v) { add(k, Value{ValueType::U64, ValueType::U64, v, {}}); }
void Writer::add_f32(const std::string& k, float v) { add(k, Value{ValueType::F32, ValueType::F32, double{v}, {}}); }
void Writer::add_bool(const std::string& k, bool v) { add(k, Value{ValueType::BOOL, ValueType::BOOL, v, {}}); }
void Writer::add_string(const std::string& k, const std::string& v) {
  add(k, Value{ValueType::STRING, ValueType::STRING, v, {}});
}
void Writer::add_strings(const std::string& k, const std::vector<std::string>& v) {
  Value x{ValueType::ARRAY, ValueType::STRING, uint64_t{0}, {}};
  for (auto& s : v) x.array.emplace_back(s);
  add(k, std::move(x));
}
void Writer::add_f32s(const std::string& k, const std::vector<float>& v) {
  Value x{ValueType::ARRAY, ValueType::F32, uint64_t{0}, {}};
  for (float f : v) x.array.emplace_back(double{f});
  add(k, std::move(x));
}
void Writer::add_i32s(const std::string& k, const std::vector<int32_t>& v) {
  Value x{ValueType::ARRAY, ValueType::I32, uint64_t{0}, {}};
  for (int32_t i : v) x.array.emplace_back(int64_t{i});
  add(k, std::move(x));
}

void Writer::add_tensor(const std::string& name, const std::vector<int64_t>& dims, TensorType type, std::string data) {
  const uint64_t want = tensor_bytes(name, dims, type);
  QF_CHECK(data.size() == want, "gguf: tensor '", name, "' has ", data.size(), " bytes; ", type_name(type),
           " of that shape needs ", want);
  auto held = std::make_shared<std::string>(std::move(data));
  add_tensor(name, dims, type, Producer([held] { return *held; }));
}

uint64_t Writer::tensor_bytes(const std::string& name, const std::vector<int64_t>& dims, TensorType type) const {
  for (auto& t : tensors_) QF_CHECK(t.name != name, "gguf: duplicate tensor '", name, "'");
  QF_CHECK(!dims.empty() && dims.size() <= 4, "gguf: tensor '", name, "' has ", dims.size(), " dims (1..4 allowed)");
  int64_t n = 1;
  for (auto d : dims) {
    QF_CHECK(d > 0, "gguf: tensor '", name, "' has a non-positive dimension");
    n *= d;
  }
  QF_CHECK(dims.back() % block_elems(type) == 0, "gguf: tensor '", name, "' row width ", dims.back(),
           " is not a multiple of the ", type_name(type), " block (", block_elems(type), ")");
  return static_cast<uint64_t>(n / block_elems(type) * block_bytes(type));
}

void Writer::add_tensor(const std::string& name, const std::vector<int64_t>& dims, TensorType type, Producer make) {
  const uint64_t size = tensor_bytes(name, dims, type);
  tensors_.push_back({name, dims, type, size, std::move(make)});
}

std::string Writer::header() const {
  std::string o;
  o += "GGUF";
  put<uint32_t>(o, 3);
  put<uint64_t>(o, tensors_.size());
  const bool has_align = [&] {
    for (auto& [k, v] : kv_)
      if (k == "general.alignment") return true;
    return false;
  }();
  put<uint64_t>(o, kv_.size() + (has_align || alignment_ == 32 ? 0 : 1));
  for (auto& [k, v] : kv_) {
    put_str(o, k);
    put<uint32_t>(o, static_cast<uint32_t>(v.type));
    if (v.type == ValueType::ARRAY) {
      put<uint32_t>(o, static_cast<uint32_t>(v.elem));
      put<uint64_t>(o, v.array.size());
      for (auto& e : v.array) put_scalar(o, v.elem, e);
    } else {
      put_scalar(o, v.type, v.scalar);
    }
  }
  if (!has_align && alignment_ != 32) {
    put_str(o, "general.alignment");
    put<uint32_t>(o, static_cast<uint32_t>(ValueType::U32));
    put<uint32_t>(o, alignment_);
  }
  uint64_t offset = 0;
  for (auto& t : tensors_) {
    put_str(o, t.name);
    put<uint32_t>(o, static_cast<uint32_t>(t.dims.size()));
    for (auto it = t.dims.rbegin(); it != t.dims.rend(); ++it) put<uint64_t>(o, static_cast<uint64_t>(*it));  // ne0 first
    put<uint32_t>(o, static_cast<uint32_t>(t.type));
    put<uint64_t>(o, offset);
    offset = (offset + t.size + alignment_ - 1) / alignment_ * alignment_;
  }
  pad_to(o, alignment_);
  return o;
}

std::string Writer::produce(size_t i) const {
  const auto& t = tensors_[i];
  std::string d = t.make();
  QF_CHECK(d.size() == t.size, "gguf: tensor '", t.name, "' produced ", d.size(), " bytes; ", type_name(t.type),
           " of that shape needs ", t.size);
  return d;
}

std::string Writer::serialize() {
  std::string o = header();
  for (size_t i = 0; i < tensors_.size(); ++i) {
    o += produce(i);
    pad_to(o, alignment_);
  }
  return o;
}

namespace {
struct Cursor {
  std::string_view b;
  const std::string& origin;
  size_t at = 0;
  void need(size_t n) {
    if (n > b.size() || at > b.size() - n)
      throw InputError(str("GGUF file '", origin, "': header runs past the end of the file at byte ", at));
  }
  template <class T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, b.data() + at, sizeof(T));
    at += sizeof(T);
    return v;
  }
  std::string string() {
    const uint64_t n = get<uint64_t>();
    need(n);
    std::string s(b.substr(at, n));
    at += n;
    return s;
  }
  void skip_value(ValueType t) {
    static const size_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    const auto i = static_cast<uint32_t>(t);
    if (i > 12) throw InputError(str("GGUF file '", origin, "': unknown value type ", i));
    if (t == ValueType::STRING) {
      string();
    } else if (t == ValueType::ARRAY) {
      const auto et = static_cast<ValueType>(get<uint32_t>());
      if (et == ValueType::ARRAY) throw InputError(str("GGUF file '", origin, "': nested arrays"));
      const uint64_t n = get<uint64_t>();
      for (uint64_t k = 0; k < n; ++k) skip_value(et);
    } else {
      need(sizes[i]);
      at += sizes[i];
    }
  }
};
}  // namespace

Index read_index(std::string_view bytes, const std::string& origin) {
  Cursor c{bytes, origin};
  c.need(4);
  if (bytes.compare(0, 4, "GGUF") != 0) throw InputError(str("GGUF file '", origin, "': bad magic"));
  c.at = 4;
  Index idx;
  idx.version = c.get<uint32_t>();
  if (idx.version != 3) throw InputError(str("GGUF file '", origin, "': version ", idx.version, ", expected 3"));
  const uint64_t n_tensors = c.get<uint64_t>(), n_kv = c.get<uint64_t>();
  if (n_tensors > bytes.size() || n_kv > bytes.size()) throw InputError(str("GGUF file '", origin, "': implausible counts"));
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.string();
    const auto t = static_cast<ValueType>(c.get<uint32_t>());
    if (key == "general.alignment" && t == ValueType::U32) {
      idx.alignment = c.get<uint32_t>();
      if (idx.alignment == 0 || (idx.alignment & (idx.alignment - 1)))
        throw InputError(str("GGUF file '", origin, "': general.alignment ", idx.alignment, " is not a power of two"));
    } else {
      c.skip_value(t);
    }
    idx.keys.emplace_back(std::move(key), t);
  }
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo ti;
    ti.name = c.string();
    const uint32_t nd = c.get<uint32_t>();
    if (nd == 0 || nd > 4) throw InputError(str("GGUF file '", origin, "': tensor '", ti.name, "' has ", nd, " dims"));
    ti.dims.resize(nd);
    for (uint32_t d = 0; d < nd; ++d) ti.dims[nd - 1 - d] = static_cast<int64_t>(c.get<uint64_t>());
    const uint32_t ty = c.get<uint32_t>();
    ti.type = static_cast<TensorType>(ty);
    if (block_elems(ti.type) == 0) throw InputError(str("GGUF file '", origin, "': tensor '", ti.name, "' has type ", ty));
    ti.offset = c.get<uint64_t>();
    idx.tensors.push_back(std::move(ti));
  }
  idx.data_start = (c.at + idx.alignment - 1) / idx.alignment * idx.alignment;
  for (auto& t : idx.tensors) {
    int64_t n = 1;
    for (auto d : t.dims) n *= d;
    const uint64_t size = static_cast<uint64_t>(n / block_elems(t.type) * block_bytes(t.type));
    if (t.offset % idx.alignment || idx.data_start + t.offset + size > bytes.size())
      throw InputError(str("GGUF file '", origin, "': tensor '", t.name, "' data [", t.offset, ", +", size,
                           ") is misaligned or outside the file"));
  }
  return idx;
}

int64_t Writer::write(const std::string& path, const std::function<void(size_t, const std::string&)>& on_tensor) {
  std::vector<uint64_t> hashes;
  {
    fs::AtomicWriter out(path);
    out.write(header());
    static const std::string zeros(256, '\0');
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (on_tensor) on_tensor(i, tensors_[i].name);
      const std::string d = produce(i);
      hashes.push_back(fs::hash64(d));
      out.write(d);
      const uint64_t pad = (alignment_ - out.size() % alignment_) % alignment_;
      for (uint64_t left = pad; left > 0; left -= std::min<uint64_t>(left, zeros.size()))
        out.write(std::string_view(zeros).substr(0, std::min<uint64_t>(left, zeros.size())));
    }
    out.commit();
  }
  // Re-read what is on disk: the header parses, and every tensor is where it should be, as written.
  fs::MappedFile f(path);
  const auto bytes = f.bytes();
  const auto idx = read_index(bytes, path);
  QF_CHECK(idx.tensors.size() == tensors_.size() && idx.keys.size() >= kv_.size(), "gguf: self-check of ", path,
           " found ", idx.tensors.size(), " tensors and ", idx.keys.size(), " keys");
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto& a = tensors_[i];
    const auto& b = idx.tensors[i];
    QF_CHECK(a.name == b.name && a.dims == b.dims && a.type == b.type &&
                 fs::hash64(bytes.substr(idx.data_start + b.offset, a.size)) == hashes[i],
             "gguf: self-check of ", path, " failed on tensor '", a.name, "'");
  }
  return static_cast<int64_t>(bytes.size());
}

}  // namespace qf::gguf
