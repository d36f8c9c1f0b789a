#include "core/safetensors.h"

#include <ATen/ATen.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"

namespace qf::st {
namespace {
struct DT {
  const char* name;
  at::ScalarType t;
  size_t size;
};
const DT kTypes[] = {{"F64", at::kDouble, 8}, {"F32", at::kFloat, 4},  {"F16", at::kHalf, 2},   {"BF16", at::kBFloat16, 2},
                     {"I64", at::kLong, 8},   {"I32", at::kInt, 4},    {"I16", at::kShort, 2},  {"I8", at::kChar, 1},
                     {"U8", at::kByte, 1},    {"BOOL", at::kBool, 1}};
}  // namespace

std::string dtype_name(at::ScalarType t) {
  for (auto& d : kTypes)
    if (d.t == t) return d.name;
  throw Error(str("safetensors: unsupported dtype ", c10::toString(t)));
}

std::string serialize(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const Metadata& meta) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!meta.empty()) h["__metadata__"] = meta;
  std::vector<at::Tensor> cpu;
  size_t off = 0;
  for (auto& [name, t] : tensors) {
    QF_CHECK(t.defined(), "safetensors: tensor '", name, "' is undefined");
    auto c = t.detach().to(at::kCPU).contiguous();
    size_t nb = c.numel() * c.element_size();
    std::vector<int64_t> shape(c.sizes().begin(), c.sizes().end());
    h[name] = {{"dtype", dtype_name(c.scalar_type())}, {"shape", shape}, {"data_offsets", {off, off + nb}}};
    off += nb;
    cpu.push_back(c);
  }
  std::string header = h.dump();
  while ((8 + header.size()) % 8) header.push_back(' ');
  std::string out;
  out.reserve(8 + header.size() + off);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += header;
  for (auto& c : cpu) out.append(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
  return out;
}

void save(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors, const Metadata& meta) {
  fs::write_atomic(path, serialize(tensors, meta));
}

at::Tensor File::get(const std::string& name) const {
  for (auto& [n, t] : tensors)
    if (n == name) return t;
  throw InputError(str("safetensors: no tensor named '", name, "'"));
}
bool File::has(const std::string& name) const {
  for (auto& [n, t] : tensors)
    if (n == name) return true;
  return false;
}

File load(const std::string& path) {
  std::string bytes = fs::read_file(path);
  auto bad = [&](const std::string& why) { return InputError(str("safetensors file '", path, "': ", why)); };
  if (bytes.size() < 8) throw bad("shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  if (n > 100u * 1024 * 1024) throw bad(str("header length ", n, " exceeds the 100 MB limit"));
  if (8 + n > bytes.size()) throw bad(str("header length ", n, " runs past the end of the file (", bytes.size(), " bytes)"));
  nlohmann::ordered_json h;
  try {
    h = nlohmann::ordered_json::parse(bytes.begin() + 8, bytes.begin() + 8 + n);
  } catch (const std::exception& e) {
    throw bad(str("header is not valid JSON: ", e.what()));
  }
  if (!h.is_object()) throw bad("header is not a JSON object");
  File f;
  const size_t data_len = bytes.size() - 8 - n;
  const char* data = bytes.data() + 8 + n;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) throw bad(str("__metadata__ value for '", m.key(), "' is not a string"));
        f.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const auto& e = it.value();
    auto tb = [&](const std::string& why) { return bad(str("tensor '", it.key(), "': ", why)); };
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      throw tb("expected {dtype, shape, data_offsets}");
    std::string dt = e["dtype"].get<std::string>();
    const DT* d = nullptr;
    for (auto& x : kTypes)
      if (dt == x.name) d = &x;
    if (!d) throw tb("unknown dtype '" + dt + "'");
    std::vector<int64_t> shape;
    size_t numel = 1;
    for (auto& s : e["shape"]) {
      if (!s.is_number_integer() || s.get<int64_t>() < 0) throw tb("shape entries must be non-negative integers");
      int64_t v = s.get<int64_t>();
      if (v != 0 && numel > SIZE_MAX / static_cast<size_t>(v)) throw tb("shape overflows");
      numel *= static_cast<size_t>(v);
      shape.push_back(v);
    }
    auto offs = e["data_offsets"];
    if (!offs.is_array() || offs.size() != 2) throw tb("data_offsets must be [begin, end]");
    size_t b = offs[0].get<size_t>(), en = offs[1].get<size_t>();
    if (b > en || en > data_len) throw tb(str("data_offsets [", b, ", ", en, "] outside the data section of ", data_len, " bytes"));
    if (numel > SIZE_MAX / d->size || en - b != numel * d->size)
      throw tb(str("byte size ", en - b, " != numel ", numel, " x ", d->size));
    auto t = at::empty(shape, at::TensorOptions().dtype(d->t));
    if (en > b) std::memcpy(t.data_ptr(), data + b, en - b);
    f.tensors.emplace_back(it.key(), t);
  }
  return f;
}

}  // namespace qf::st
