#include "core/gguf_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "core/error.h"

namespace qf::gguf_in {
namespace {

constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS

[[noreturn]] void fail(const std::string& origin, const std::string& what) {
  throw InputError(origin + ": " + what);
}

// Little-endian reads from the mapping, each bounded by the bytes left.
class Cursor {
 public:
  Cursor(std::string_view b, const std::string& origin) : b_(b), origin_(origin) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return b_.size() - pos_; }
  void need(uint64_t n, const std::string& what) const {
    if (n > left())
      fail(origin_, what + " runs past the end of the file (needs " + std::to_string(n) + " bytes at offset " +
                        std::to_string(pos_) + ", " + std::to_string(left()) + " left)");
  }
  template <class T>
  T get(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str(const std::string& what) {
    const uint64_t n = get<uint64_t>(what + " (its length)");
    need(n, what + " (a string of " + std::to_string(n) + " bytes)");
    std::string s(b_.data() + pos_, static_cast<size_t>(n));
    pos_ += n;
    return s;
  }

 private:
  std::string_view b_;
  const std::string& origin_;
  uint64_t pos_ = 0;
};

uint64_t scalar_size(ValueType t) {
  switch (t) {
    case ValueType::U8: case ValueType::I8: case ValueType::BOOL: return 1;
    case ValueType::U16: case ValueType::I16: return 2;
    case ValueType::U32: case ValueType::I32: case ValueType::F32: return 4;
    case ValueType::U64: case ValueType::I64: case ValueType::F64: return 8;
    case ValueType::STRING: return 8;  // the least: its length
    case ValueType::ARRAY: return 12;  // element type + count
  }
  return 0;
}

bool known(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::F64); }

// One scalar of type t into v (v.type already t).
void read_scalar(Cursor& c, ValueType t, Value& v, const std::string& what) {
  switch (t) {
    case ValueType::U8: v.i = c.get<uint8_t>(what); break;
    case ValueType::I8: v.i = c.get<int8_t>(what); break;
    case ValueType::U16: v.i = c.get<uint16_t>(what); break;
    case ValueType::I16: v.i = c.get<int16_t>(what); break;
    case ValueType::U32: v.i = c.get<uint32_t>(what); break;
    case ValueType::I32: v.i = c.get<int32_t>(what); break;
    case ValueType::U64: v.u = c.get<uint64_t>(what); v.i = static_cast<int64_t>(std::min<uint64_t>(v.u, INT64_MAX)); break;
    case ValueType::I64: v.i = c.get<int64_t>(what); break;
    case ValueType::F32: v.f = c.get<float>(what); break;
    case ValueType::F64: v.f = c.get<double>(what); break;
    case ValueType::BOOL: {
      const uint8_t b = c.get<uint8_t>(what);
      if (b > 1) throw InputError(what + ": a bool holds " + std::to_string(b) + " (expected 0 or 1)");
      v.i = b;
      break;
    }
    case ValueType::STRING: v.s = c.str(what); break;
    case ValueType::ARRAY: break;  // handled by the caller
  }
  if (t != ValueType::U64 && t != ValueType::F32 && t != ValueType::F64 && t != ValueType::STRING)
    v.u = static_cast<uint64_t>(v.i);
}

double as_double(ValueType t, const Value& v) {
  return t == ValueType::F32 || t == ValueType::F64 ? v.f : t == ValueType::U64 ? static_cast<double>(v.u)
                                                                                : static_cast<double>(v.i);
}

}  // namespace

const char* value_type_name(ValueType t) {
  static const char* n[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? n[i] : "unknown";
}

bool is_gguf_file(const std::string& path) {
  struct stat sb{};
  if (::stat(path.c_str(), &sb) != 0 || !S_ISREG(sb.st_mode)) return false;
  if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".gguf") == 0) return true;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char m[4] = {};
  const bool ok = ::read(fd, m, 4) == 4 && std::memcmp(m, "GGUF", 4) == 0;
  ::close(fd);
  return ok;
}

bool Value::is_int() const {
  switch (type) {
    case ValueType::U8: case ValueType::I8: case ValueType::U16: case ValueType::I16: case ValueType::U32:
    case ValueType::I32: case ValueType::U64: case ValueType::I64: return true;
    default: return false;
  }
}
bool Value::is_float() const { return type == ValueType::F32 || type == ValueType::F64; }

std::vector<int64_t> TensorInfo::shape() const { return std::vector<int64_t>(ne.rbegin(), ne.rend()); }

std::shared_ptr<File> File::open(const std::string& path, const TypeLookup& types) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat sb{};
  if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    ::close(fd);
    throw InputError(path + ": not a regular file (expected a .gguf file)");
  }
  std::shared_ptr<File> f(new File());
  f->origin_ = path;
  const size_t len = static_cast<size_t>(sb.st_size);
  if (len > 0) {
    void* p = ::mmap(nullptr, len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      throw InputError(path + ": cannot map (" + std::strerror(e) + ")");
    }
    f->map_ = p;
    f->map_len_ = len;
    f->bytes_ = std::string_view(static_cast<const char*>(p), len);
  }
  ::close(fd);
  f->parse_header();
  if (types) f->check_tensors(types);
  return f;
}

std::shared_ptr<File> File::parse(std::string_view bytes, const std::string& origin, const TypeLookup& types) {
  std::shared_ptr<File> f(new File());
  f->origin_ = origin;
  f->bytes_ = bytes;
  f->parse_header();
  if (types) f->check_tensors(types);
  return f;
}

File::~File() {
  if (map_) ::munmap(map_, map_len_);
}

void File::parse_header() {
  const std::string& o = origin_;
  Cursor c(bytes_, o);
  if (bytes_.size() < 4 || std::memcmp(bytes_.data(), "GGUF", 4) != 0)
    fail(o, "bad magic (expected the 4 bytes 'GGUF' at offset 0): not a GGUF file");
  c.get<uint32_t>("magic");
  version_ = c.get<uint32_t>("version");
  if (version_ == 1) fail(o, "GGUF version 1 is not supported (32-bit counts; versions 2 and 3 are)");
  if ((version_ & 0xFFFF) == 0 && version_ != 0)
    fail(o, "version " + std::to_string(version_) + " looks byte-swapped: big-endian GGUF files are not supported");
  if (version_ != 2 && version_ != 3)
    fail(o, "unsupported GGUF version " + std::to_string(version_) + " (expected 2 or 3)");
  const uint64_t n_tensors = c.get<uint64_t>("tensor count");
  const uint64_t n_kv = c.get<uint64_t>("metadata key/value count");
  // Each key/value takes at least 13 bytes (key length, one byte of key, type, a u8 value) and each
  // tensor info at least 25 (name length, one byte, n_dims, one dim, type, offset).
  if (n_kv > c.left() / 13)
    fail(o, "metadata key/value count " + std::to_string(n_kv) + " is more than the file's " +
                std::to_string(bytes_.size()) + " bytes could hold");
  if (n_tensors > c.left() / 25)
    fail(o, "tensor count " + std::to_string(n_tensors) + " is more than the file's " + std::to_string(bytes_.size()) +
                " bytes could hold");
  kv_.reserve(static_cast<size_t>(n_kv));
  for (uint64_t k = 0; k < n_kv; ++k) {
    const std::string where = "metadata entry " + std::to_string(k);
    std::string key = c.str(where + "'s key");
    if (key.empty()) fail(o, where + " has an empty key");
    const std::string wk = "metadata key '" + key + "'";
    if (kv_index_.count(key)) fail(o, wk + " appears twice (keys must be unique)");
    const uint32_t t = c.get<uint32_t>(wk + "'s type");
    if (!known(t)) fail(o, wk + " has unknown value type " + std::to_string(t) + " (expected 0..12)");
    Value v;
    v.type = static_cast<ValueType>(t);
    try {
      if (v.type == ValueType::ARRAY) {
        const uint32_t et = c.get<uint32_t>(wk + "'s array element type");
        if (!known(et)) fail(o, wk + " is an array of unknown value type " + std::to_string(et));
        v.elem = static_cast<ValueType>(et);
        if (v.elem == ValueType::ARRAY) fail(o, wk + " is an array of arrays (not supported)");
        const uint64_t n = c.get<uint64_t>(wk + "'s array length");
        if (n > c.left() / scalar_size(v.elem))
          fail(o, wk + ": an array of " + std::to_string(n) + " " + value_type_name(v.elem) +
                      " values runs past the end of the file");
        if (v.elem == ValueType::STRING) v.strs.reserve(static_cast<size_t>(n));
        else v.nums.reserve(static_cast<size_t>(n));
        Value e;
        for (uint64_t i = 0; i < n; ++i) {
          read_scalar(c, v.elem, e, wk + "[" + std::to_string(i) + "]");
          if (v.elem == ValueType::STRING) v.strs.push_back(std::move(e.s));
          else v.nums.push_back(as_double(v.elem, e));
        }
      } else {
        read_scalar(c, v.type, v, wk);
      }
    } catch (const InputError& e) {
      const std::string m = e.what();
      if (m.rfind(o + ":", 0) == 0) throw;
      fail(o, m);
    }
    kv_index_[key] = kv_.size();
    kv_.emplace_back(std::move(key), std::move(v));
  }
  if (const Value* a = find("general.alignment")) {
    if (a->type != ValueType::U32)
      fail(o, std::string("metadata key 'general.alignment' is a ") + value_type_name(a->type) + " (expected u32)");
    if (a->i == 0 || (a->i & (a->i - 1)) != 0)
      fail(o, "metadata key 'general.alignment' is " + std::to_string(a->i) + " (expected a power of two)");
    alignment_ = static_cast<uint32_t>(a->i);
  }
  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo t;
    t.name = c.str("tensor info " + std::to_string(k) + "'s name");
    const std::string wt = "tensor '" + t.name + "'";
    if (t.name.empty()) fail(o, "tensor info " + std::to_string(k) + " has an empty name");
    if (tensor_index_.count(t.name)) fail(o, wt + " appears twice (tensor names must be unique)");
    const uint32_t nd = c.get<uint32_t>(wt + "'s dimension count");
    if (nd == 0 || nd > kMaxDims)
      fail(o, wt + " has " + std::to_string(nd) + " dimensions (expected 1 to " + std::to_string(kMaxDims) + ")");
    int64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t n = c.get<uint64_t>(wt + "'s dimension " + std::to_string(d));
      if (n > static_cast<uint64_t>(INT64_MAX)) fail(o, wt + "'s dimension " + std::to_string(d) + " is negative as int64");
      const int64_t ni = static_cast<int64_t>(n);
      if (ni != 0 && numel > INT64_MAX / ni)
        fail(o, wt + ": the product of its dimensions overflows int64 (a hostile size)");
      numel *= ni;
      t.ne.push_back(ni);
    }
    t.numel = numel;
    t.type = c.get<uint32_t>(wt + "'s type");
    t.offset = c.get<uint64_t>(wt + "'s data offset");
    tensor_index_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
  const uint64_t end = c.pos();
  data_start_ = (end + alignment_ - 1) / alignment_ * alignment_;
  if (n_tensors > 0 && data_start_ > bytes_.size())
    fail(o, "the data section would start at byte " + std::to_string(data_start_) + ", past the end of the file (" +
                std::to_string(bytes_.size()) + " bytes)");
}

void File::check_tensors(const TypeLookup& types) {
  const std::string& o = origin_;
  const uint64_t avail = bytes_.size() > data_start_ ? bytes_.size() - data_start_ : 0;
  std::vector<std::pair<uint64_t, size_t>> order;  // (offset, index)
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TensorInfo& t = tensors_[i];
    const std::string wt = "tensor '" + t.name + "'";
    const TypeGeometry* g = types(t.type);
    if (!g) fail(o, wt + " has unknown ggml type id " + std::to_string(t.type) + " (not a type qforge knows)");
    if (t.ne[0] % g->block != 0)
      fail(o, wt + ": its rows of " + std::to_string(t.ne[0]) + " values are not a whole number of " + g->name +
                  " blocks of " + std::to_string(g->block));
    uint64_t nb = static_cast<uint64_t>(t.ne[0] / g->block);
    auto mul = [&](uint64_t a, uint64_t b) {
      if (b != 0 && a > std::numeric_limits<uint64_t>::max() / b)
        fail(o, wt + ": its byte size overflows 64 bits (a hostile size)");
      return a * b;
    };
    nb = mul(nb, static_cast<uint64_t>(g->bytes));
    for (size_t d = 1; d < t.ne.size(); ++d) nb = mul(nb, static_cast<uint64_t>(t.ne[d]));
    t.nbytes = nb;
    if (t.offset % alignment_ != 0)
      fail(o, wt + "'s data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                  std::to_string(alignment_));
    if (t.offset > avail || nb > avail - t.offset)
      fail(o, wt + "'s data (" + std::to_string(nb) + " bytes at data offset " + std::to_string(t.offset) +
                  ") runs past the end of the file (the data section holds " + std::to_string(avail) + " bytes)");
    order.emplace_back(t.offset, i);
  }
  std::sort(order.begin(), order.end());
  for (size_t k = 1; k < order.size(); ++k) {
    const TensorInfo& a = tensors_[order[k - 1].second];
    const TensorInfo& b = tensors_[order[k].second];
    if (a.offset + a.nbytes > b.offset)
      fail(o, "tensor '" + b.name + "' (data offset " + std::to_string(b.offset) + ") overlaps tensor '" + a.name +
                  "' (data offset " + std::to_string(a.offset) + ", " + std::to_string(a.nbytes) + " bytes)");
  }
  checked_ = true;
}

const Value* File::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const TensorInfo* File::tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
[[noreturn]] void missing(const std::string& o, const std::string& key, const char* what) {
  throw InputError(o + ": metadata key '" + key + "' is missing (expected " + what + ")");
}
[[noreturn]] void wrong(const std::string& o, const std::string& key, const Value& v, const char* what) {
  std::string t = value_type_name(v.type);
  if (v.type == ValueType::ARRAY) t += std::string(" of ") + value_type_name(v.elem);
  throw InputError(o + ": metadata key '" + key + "' is a " + t + " (expected " + what + ")");
}
}  // namespace

int64_t File::get_int(const std::string& key) const {
  const Value* v = find(key);
  if (!v) missing(origin_, key, "an integer");
  if (!v->is_int()) wrong(origin_, key, *v, "an integer");
  if (v->type == ValueType::U64 && v->u > static_cast<uint64_t>(INT64_MAX))
    throw InputError(origin_ + ": metadata key '" + key + "' is " + std::to_string(v->u) + ", out of range");
  return v->i;
}
int64_t File::get_int(const std::string& key, int64_t dflt) const { return find(key) ? get_int(key) : dflt; }

double File::get_float(const std::string& key) const {
  const Value* v = find(key);
  if (!v) missing(origin_, key, "a number");
  if (v->is_float()) return v->f;
  if (v->is_int()) return v->type == ValueType::U64 ? static_cast<double>(v->u) : static_cast<double>(v->i);
  wrong(origin_, key, *v, "a number");
}
double File::get_float(const std::string& key, double dflt) const { return find(key) ? get_float(key) : dflt; }

bool File::get_bool(const std::string& key, bool dflt) const {
  const Value* v = find(key);
  if (!v) return dflt;
  if (v->type != ValueType::BOOL) wrong(origin_, key, *v, "a bool");
  return v->i != 0;
}

std::string File::get_string(const std::string& key) const {
  const Value* v = find(key);
  if (!v) missing(origin_, key, "a string");
  if (v->type != ValueType::STRING) wrong(origin_, key, *v, "a string");
  return v->s;
}
std::string File::get_string(const std::string& key, const std::string& dflt) const {
  return find(key) ? get_string(key) : dflt;
}

const std::vector<std::string>& File::get_strings(const std::string& key) const {
  const Value* v = find(key);
  if (!v) missing(origin_, key, "an array of strings");
  if (v->type != ValueType::ARRAY || v->elem != ValueType::STRING) wrong(origin_, key, *v, "an array of strings");
  return v->strs;
}

const std::vector<double>& File::get_nums(const std::string& key) const {
  const Value* v = find(key);
  if (!v) missing(origin_, key, "an array of numbers");
  if (v->type != ValueType::ARRAY || v->elem == ValueType::STRING) wrong(origin_, key, *v, "an array of numbers");
  return v->nums;
}

std::vector<double> File::f32_values(const std::string& name) const {
  const TensorInfo* t = tensor(name);
  if (!t) throw InputError(origin_ + ": tensor '" + name + "' is missing");
  if (t->type != 0) throw InputError(origin_ + ": tensor '" + name + "' has type id " + std::to_string(t->type) + " (expected F32)");
  const uint64_t avail = bytes_.size() > data_start_ ? bytes_.size() - data_start_ : 0;
  const uint64_t nb = static_cast<uint64_t>(t->numel) * 4;
  if (t->numel > (1 << 24) || t->offset > avail || nb > avail - t->offset || t->offset % alignment_ != 0)
    throw InputError(origin_ + ": tensor '" + name + "' (" + std::to_string(nb) + " bytes at data offset " +
                     std::to_string(t->offset) + ") is misaligned, too large or runs past the end of the file");
  std::vector<double> v(static_cast<size_t>(t->numel));
  const char* p = bytes_.data() + data_start_ + t->offset;
  for (size_t i = 0; i < v.size(); ++i) {
    float x;
    std::memcpy(&x, p + 4 * i, 4);
    v[i] = x;
  }
  return v;
}

const uint8_t* File::data(const TensorInfo& t) const {
  if (!checked_) throw Error(origin_ + ": tensor data asked for before check_tensors");
  return reinterpret_cast<const uint8_t*>(bytes_.data()) + data_start_ + t.offset;
}

void File::drop_pages(const TensorInfo& t) const {
  if (!map_ || t.nbytes == 0) return;
  const long page = ::sysconf(_SC_PAGESIZE);
  const uintptr_t b = reinterpret_cast<uintptr_t>(data(t));
  const uintptr_t lo = (b + page - 1) / page * page, hi = (b + t.nbytes) / page * page;
  if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

}  // namespace qf::gguf_in
