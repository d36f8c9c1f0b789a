#include "export/gguf_writer.h"

#include <cstring>
#include <set>

#include "core/error.h"
#include "core/fs.h"

namespace qf::gguf {
namespace {

void put_u32(std::string& o, uint32_t v) { o.append(reinterpret_cast<const char*>(&v), 4); }  // little-endian host
void put_u64(std::string& o, uint64_t v) { o.append(reinterpret_cast<const char*>(&v), 8); }
void put_str(std::string& o, const std::string& s) {
  put_u64(o, s.size());
  o += s;
}

void put_scalar(std::string& o, ValueType t, const std::variant<uint64_t, int64_t, double, bool, std::string>& v) {
  switch (t) {
    case ValueType::U8: o.push_back(static_cast<char>(std::get<uint64_t>(v))); break;
    case ValueType::I8: o.push_back(static_cast<char>(std::get<int64_t>(v))); break;
    case ValueType::U16: {
      uint16_t x = static_cast<uint16_t>(std::get<uint64_t>(v));
      o.append(reinterpret_cast<const char*>(&x), 2);
      break;
    }
    case ValueType::I16: {
      int16_t x = static_cast<int16_t>(std::get<int64_t>(v));
      o.append(reinterpret_cast<const char*>(&x), 2);
      break;
    }
    case ValueType::U32: put_u32(o, static_cast<uint32_t>(std::get<uint64_t>(v))); break;
    case ValueType::I32: {
      int32_t x = static_cast<int32_t>(std::get<int64_t>(v));
      o.append(reinterpret_cast<const char*>(&x), 4);
      break;
    }
    case ValueType::F32: {
      float x = static_cast<float>(std::get<double>(v));
      o.append(reinterpret_cast<const char*>(&x), 4);
      break;
    }
    case ValueType::BOOL: o.push_back(std::get<bool>(v) ? 1 : 0); break;
    case ValueType::STRING: put_str(o, std::get<std::string>(v)); break;
    case ValueType::U64: put_u64(o, std::get<uint64_t>(v)); break;
    case ValueType::I64: {
      int64_t x = std::get<int64_t>(v);
      o.append(reinterpret_cast<const char*>(&x), 8);
      break;
    }
    case ValueType::F64: {
      double x = std::get<double>(v);
      o.append(reinterpret_cast<const char*>(&x), 8);
      break;
    }
    case ValueType::ARRAY: throw Error("gguf: nested arrays are not supported");
  }
}

void pad_to(std::string& o, uint32_t alignment) {
  while (o.size() % alignment) o.push_back('\0');
}

}  // namespace

int64_t block_elems(TensorType t) {
  switch (t) {
    case TensorType::F32: case TensorType::F16: case TensorType::BF16: return 1;
    case TensorType::Q4_0: case TensorType::Q4_1: case TensorType::Q8_0: return 32;
    case TensorType::Q4_K: case TensorType::Q6_K: return 256;
  }
  return 0;
}

int64_t block_bytes(TensorType t) {
  switch (t) {
    case TensorType::F32: return 4;
    case TensorType::F16: case TensorType::BF16: return 2;
    case TensorType::Q4_0: return 18;
    case TensorType::Q4_1: return 20;
    case TensorType::Q8_0: return 34;
    case TensorType::Q4_K: return 144;
    case TensorType::Q6_K: return 210;
  }
  return 0;
}

const char* type_name(TensorType t) {
  switch (t) {
    case TensorType::F32: return "F32";
    case TensorType::F16: return "F16";
    case TensorType::BF16: return "BF16";
    case TensorType::Q4_0: return "Q4_0";
    case TensorType::Q4_1: return "Q4_1";
    case TensorType::Q8_0: return "Q8_0";
    case TensorType::Q4_K: return "Q4_K";
    case TensorType::Q6_K: return "Q6_K";
  }
  return "?";
}

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
  for (auto& t : tensors_) QF_CHECK(t.name != name, "gguf: duplicate tensor '", name, "'");
  QF_CHECK(!dims.empty() && dims.size() <= 4, "gguf: tensor '", name, "' has ", dims.size(), " dims (1..4 allowed)");
  int64_t n = 1;
  for (auto d : dims) {
    QF_CHECK(d > 0, "gguf: tensor '", name, "' has a non-positive dimension");
    n *= d;
  }
  QF_CHECK(dims.back() % block_elems(type) == 0, "gguf: tensor '", name, "' row width ", dims.back(),
           " is not a multiple of the ", type_name(type), " block (", block_elems(type), ")");
  const int64_t want = n / block_elems(type) * block_bytes(type);
  QF_CHECK(static_cast<int64_t>(data.size()) == want, "gguf: tensor '", name, "' has ", data.size(), " bytes; ",
           type_name(type), " of that shape needs ", want);
  tensors_.push_back({name, dims, type, std::move(data)});
}

std::string Writer::serialize() const {
  std::string o;
  o += "GGUF";
  put_u32(o, 3);
  put_u64(o, tensors_.size());
  const bool has_align = [&] {
    for (auto& [k, v] : kv_)
      if (k == "general.alignment") return true;
    return false;
  }();
  put_u64(o, kv_.size() + (has_align || alignment_ == 32 ? 0 : 1));
  for (auto& [k, v] : kv_) {
    put_str(o, k);
    put_u32(o, static_cast<uint32_t>(v.type));
    if (v.type == ValueType::ARRAY) {
      put_u32(o, static_cast<uint32_t>(v.elem));
      put_u64(o, v.array.size());
      for (auto& e : v.array) put_scalar(o, v.elem, e);
    } else {
      put_scalar(o, v.type, v.scalar);
    }
  }
  if (!has_align && alignment_ != 32) {
    put_str(o, "general.alignment");
    put_u32(o, static_cast<uint32_t>(ValueType::U32));
    put_u32(o, alignment_);
  }
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (auto& t : tensors_) {
    put_str(o, t.name);
    put_u32(o, static_cast<uint32_t>(t.dims.size()));
    for (auto it = t.dims.rbegin(); it != t.dims.rend(); ++it) put_u64(o, static_cast<uint64_t>(*it));  // ne0 first
    put_u32(o, static_cast<uint32_t>(t.type));
    put_u64(o, offset);
    offsets.push_back(offset);
    offset += t.data.size();
    offset = (offset + alignment_ - 1) / alignment_ * alignment_;
  }
  pad_to(o, alignment_);
  const size_t base = o.size();
  for (size_t i = 0; i < tensors_.size(); ++i) {
    o.resize(base + offsets[i], '\0');
    o += tensors_[i].data;
  }
  pad_to(o, alignment_);
  return o;
}

int64_t Writer::write(const std::string& path) const {
  auto bytes = serialize();
  fs::write_atomic(path, bytes);
  return static_cast<int64_t>(bytes.size());
}

}  // namespace qf::gguf
