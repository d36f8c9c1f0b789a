#include "core/safetensors_header.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "core/json_file.h"

namespace qf::st {

const std::vector<DTypeInfo>& dtypes() {
  static const std::vector<DTypeInfo> t = {
      {DType::F64, "F64", 8},  {DType::F32, "F32", 4},         {DType::F16, "F16", 2},         {DType::BF16, "BF16", 2},
      {DType::I64, "I64", 8},  {DType::I32, "I32", 4},         {DType::I16, "I16", 2},         {DType::I8, "I8", 1},
      {DType::U8, "U8", 1},    {DType::BOOL, "BOOL", 1},       {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
      {DType::U16, "U16", 2},  {DType::U32, "U32", 4},         {DType::U64, "U64", 8}};
  return t;
}

const DTypeInfo& info(DType d) {
  for (auto& x : dtypes())
    if (x.dtype == d) return x;
  throw Error("safetensors: unknown dtype enum");
}

Header parse_header(const uint8_t* file, size_t size, const std::string& origin) {
  auto bad = [&](const std::string& why) { return InputError(str("safetensors file '", origin, "': ", why)); };
  if (size < 8) throw bad(str("only ", size, " bytes; a safetensors file starts with an 8-byte header length"));
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(file[i]) << (8 * i);
  if (n > kMaxHeaderLen) throw bad(str("header length ", n, " exceeds the format's limit of ", kMaxHeaderLen, " bytes"));
  if (n > size - 8) throw bad(str("header length ", n, " runs past the end of the file (", size, " bytes): truncated?"));
  if (n < 2 || file[8] != '{') throw bad("the header does not start with '{' (not a safetensors file?)");

  // Duplicate keys: nlohmann keeps the last silently, so top-level keys are collected while parsing.
  std::set<std::string> keys;
  std::string dup;
  auto cb = [&](int depth, nlohmann::ordered_json::parse_event_t ev, nlohmann::ordered_json& parsed) {
    if (ev == nlohmann::ordered_json::parse_event_t::key && depth == 1 && dup.empty()) {
      auto k = parsed.get<std::string>();
      if (!keys.insert(k).second) dup = k;
    }
    return true;
  };
  nlohmann::ordered_json h;
  try {
    // nlohmann rejects invalid UTF-8 inside strings, so a parse also checks the encoding.
    h = nlohmann::ordered_json::parse(file + 8, file + 8 + n, cb);
  } catch (const nlohmann::json::exception& e) {
    throw bad(str("header is not valid UTF-8 JSON (", json_file::describe(e), ")"));
  }
  if (!dup.empty()) throw bad(str("duplicate key '", dup, "' in the header"));
  if (!h.is_object()) throw bad("header is not a JSON object");

  Header out;
  out.data_start = 8 + n;
  out.data_len = size - 8 - n;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const auto& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) throw bad("__metadata__ is not an object of strings");
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m->is_string()) throw bad(str("__metadata__['", m.key(), "'] is not a string"));
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    auto tb = [&](const std::string& why) { return bad(str("tensor '", name, "': ", why)); };
    if (!e.is_object()) throw tb("expected an object {dtype, shape, data_offsets}");
    for (const char* k : {"dtype", "shape", "data_offsets"})
      if (!e.contains(k)) throw tb(str("missing '", k, "'"));
    if (!e["dtype"].is_string()) throw tb("dtype is not a string");
    Entry en;
    en.name = name;
    const std::string dt = e["dtype"].get<std::string>();
    const DTypeInfo* d = nullptr;
    for (auto& x : dtypes())
      if (dt == x.name) d = &x;
    if (!d) {
      std::string known;
      for (auto& x : dtypes()) known += std::string(known.empty() ? "" : ", ") + x.name;
      throw tb(str("unknown dtype '", dt, "' (known: ", known, ")"));
    }
    en.dtype = d->dtype;
    if (!e["shape"].is_array()) throw tb("shape is not an array");
    uint64_t numel = 1;
    for (auto& s : e["shape"]) {
      if (!s.is_number_unsigned()) throw tb("shape entries must be non-negative integers");
      const uint64_t v = s.get<uint64_t>();
      if (v > static_cast<uint64_t>(INT64_MAX) || (v != 0 && numel > UINT64_MAX / v))
        throw tb("the shape's element count overflows 64 bits");
      numel *= v;
      en.shape.push_back(static_cast<int64_t>(v));
    }
    const auto& offs = e["data_offsets"];
    if (!offs.is_array() || offs.size() != 2 || !offs[0].is_number_unsigned() || !offs[1].is_number_unsigned())
      throw tb("data_offsets must be [begin, end] with non-negative integers");
    en.begin = offs[0].get<uint64_t>();
    en.end = offs[1].get<uint64_t>();
    if (en.begin > en.end) throw tb(str("data_offsets [", en.begin, ", ", en.end, "] has begin > end"));
    if (numel > UINT64_MAX / d->size) throw tb("the byte size (numel x dtype size) overflows 64 bits");
    if (en.end - en.begin != numel * d->size)
      throw tb(str("data_offsets span ", en.end - en.begin, " bytes but shape x ", dt, " needs ", numel * d->size));
    if (en.end > out.data_len)
      throw tb(str("data_offsets end ", en.end, " lies past the data section (", out.data_len, " bytes): truncated file?"));
    out.entries.push_back(std::move(en));
  }
  // The byte ranges must tile [0, data_len) exactly.
  std::vector<const Entry*> order;
  for (auto& e : out.entries) order.push_back(&e);
  std::stable_sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expect = 0;
  const Entry* prev = nullptr;
  for (auto* e : order) {
    if (e->begin < expect)
      throw bad(str("tensor '", e->name, "' [", e->begin, ", ", e->end, ") overlaps tensor '", prev->name, "' (ends at ",
                    expect, ")"));
    if (e->begin > expect)
      throw bad(str("bytes [", expect, ", ", e->begin, ") before tensor '", e->name, "' belong to no tensor (a hole)"));
    expect = e->end;
    prev = e;
  }
  if (expect != out.data_len)
    throw bad(str("the tensors cover ", expect, " bytes but the data section has ", out.data_len,
                  " (trailing bytes or a truncated file)"));
  return out;
}

}  // namespace qf::st
