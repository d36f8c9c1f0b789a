// core/gguf_file: the GGUF reader's rules, each on a hand-built file, and the message naming the rule
// (tests/interop/test_gguf_in.py reads the peers' files; tests/fuzz/fuzz_gguf.cpp fuzzes it).
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/gguf_file.h"

namespace {

using qf::gguf_in::File;
using qf::gguf_in::TypeGeometry;
using qf::gguf_in::ValueType;

// A little-endian GGUF writer for the tests: header, raw key/values and tensor infos, then data.
struct Builder {
  uint32_t version = 3;
  std::vector<std::string> kv;  // each already encoded (key, type, value)
  std::vector<std::string> infos;
  std::string data;
  uint64_t n_tensors_override = 0, n_kv_override = 0;

  template <class T>
  static void put(std::string& s, T v) {
    s.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  static void str(std::string& s, const std::string& v) {
    put<uint64_t>(s, v.size());
    s += v;
  }
  void u32(const std::string& key, uint32_t v) {
    std::string s;
    str(s, key);
    put<uint32_t>(s, static_cast<uint32_t>(ValueType::U32));
    put<uint32_t>(s, v);
    kv.push_back(s);
  }
  void string(const std::string& key, const std::string& v) {
    std::string s;
    str(s, key);
    put<uint32_t>(s, static_cast<uint32_t>(ValueType::STRING));
    str(s, v);
    kv.push_back(s);
  }
  void tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
    std::string s;
    str(s, name);
    put<uint32_t>(s, static_cast<uint32_t>(ne.size()));
    for (auto n : ne) put<uint64_t>(s, n);
    put<uint32_t>(s, type);
    put<uint64_t>(s, offset);
    infos.push_back(s);
  }
  std::string bytes(uint32_t alignment = 32) const {
    std::string s = "GGUF";
    put<uint32_t>(s, version);
    put<uint64_t>(s, n_tensors_override ? n_tensors_override : infos.size());
    put<uint64_t>(s, n_kv_override ? n_kv_override : kv.size());
    for (auto& k : kv) s += k;
    for (auto& i : infos) s += i;
    s.resize((s.size() + alignment - 1) / alignment * alignment, '\0');
    return s + data;
  }
};

const TypeGeometry kF32{"F32", 1, 4}, kQ8{"Q8_0", 32, 34};
const TypeGeometry* geometry(uint32_t id) { return id == 0 ? &kF32 : id == 8 ? &kQ8 : nullptr; }

std::string error_of(const std::string& bytes) {
  try {
    File::parse(bytes, "t.gguf", geometry);
  } catch (const qf::InputError& e) {
    return e.what();
  }
  return "";
}

TEST(GgufFile, ReadsMetadataTensorsAndData) {
  Builder b;
  b.string("general.architecture", "llama");
  b.u32("llama.block_count", 2);
  b.tensor("a", {4, 2}, 0, 0);
  b.tensor("q", {32}, 8, 64);
  b.data.assign(64 + 34, '\0');
  const float one = 1.0f;
  std::memcpy(&b.data[4], &one, 4);
  const std::string bytes = b.bytes();
  auto f = File::parse(bytes, "t.gguf", geometry);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->get_string("general.architecture"), "llama");
  EXPECT_EQ(f->get_int("llama.block_count"), 2);
  EXPECT_EQ(f->get_int("missing", 7), 7);
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(f->tensor("a")->shape(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(f->tensor("a")->nbytes, 32u);
  EXPECT_EQ(f->tensor("q")->nbytes, 34u);
  float got;
  std::memcpy(&got, f->data(*f->tensor("a")) + 4, 4);
  EXPECT_EQ(got, 1.0f);
  EXPECT_EQ(f->f32_values("a")[1], 1.0);
}

TEST(GgufFile, TypedGettersNameTheKeyAndType) {
  Builder b;
  b.u32("n", 3);
  const std::string bytes = b.bytes();
  auto f = File::parse(bytes, "t.gguf", geometry);
  try {
    f->get_string("n");
    FAIL();
  } catch (const qf::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("t.gguf: metadata key 'n' is a u32 (expected a string)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(f->get_float("absent"), qf::InputError);
}

TEST(GgufFile, RefusesEachBrokenRuleNamingIt) {
  Builder good;
  good.u32("k", 1);
  good.tensor("w", {32, 2}, 8, 0);
  good.data.assign(68, '\0');
  EXPECT_EQ(error_of(good.bytes()), "");

  EXPECT_NE(error_of("GGUX" + good.bytes().substr(4)).find("bad magic"), std::string::npos);
  Builder v = good;
  v.version = 1;
  EXPECT_NE(error_of(v.bytes()).find("version 1 is not supported"), std::string::npos);
  v.version = 0x03000000;
  EXPECT_NE(error_of(v.bytes()).find("big-endian"), std::string::npos);
  Builder c = good;
  c.n_kv_override = uint64_t{1} << 60;
  EXPECT_NE(error_of(c.bytes()).find("key/value count"), std::string::npos);
  c = good;
  c.n_tensors_override = uint64_t{1} << 60;
  EXPECT_NE(error_of(c.bytes()).find("tensor count"), std::string::npos);
  // a string whose length runs past the end
  Builder s;
  std::string kv;
  Builder::str(kv, "key");
  Builder::put<uint32_t>(kv, static_cast<uint32_t>(ValueType::STRING));
  Builder::put<uint64_t>(kv, uint64_t{1} << 40);
  s.kv.push_back(kv);
  EXPECT_NE(error_of(s.bytes()).find("metadata key 'key'"), std::string::npos);
  EXPECT_NE(error_of(s.bytes()).find("runs past the end of the file"), std::string::npos);
  // duplicate keys, unknown value type, nested arrays
  Builder d = good;
  d.u32("k", 2);
  EXPECT_NE(error_of(d.bytes()).find("metadata key 'k' appears twice"), std::string::npos);
  Builder u;
  kv.clear();
  Builder::str(kv, "odd");
  Builder::put<uint32_t>(kv, 13);
  u.kv.push_back(kv);
  EXPECT_NE(error_of(u.bytes()).find("unknown value type 13"), std::string::npos);
  Builder n;
  kv.clear();
  Builder::str(kv, "nest");
  Builder::put<uint32_t>(kv, static_cast<uint32_t>(ValueType::ARRAY));
  Builder::put<uint32_t>(kv, static_cast<uint32_t>(ValueType::ARRAY));
  Builder::put<uint64_t>(kv, 1);
  n.kv.push_back(kv);
  EXPECT_NE(error_of(n.bytes()).find("array of arrays"), std::string::npos);
  // general.alignment must be a u32 power of two
  Builder al = good;
  al.u32("general.alignment", 24);
  EXPECT_NE(error_of(al.bytes()).find("'general.alignment' is 24 (expected a power of two)"), std::string::npos);
}

TEST(GgufFile, RefusesBadTensorsNamingTheTensorAndRule) {
  auto with = [](std::vector<uint64_t> ne, uint32_t type, uint64_t off, size_t data, const char* second = nullptr,
                 uint64_t off2 = 0) {
    Builder b;
    b.tensor("w", ne, type, off);
    if (second) b.tensor(second, {8}, 0, off2);
    b.data.assign(data, '\0');
    return error_of(b.bytes());
  };
  EXPECT_NE(with({32, 2}, 77, 0, 68).find("tensor 'w' has unknown ggml type id 77"), std::string::npos);
  EXPECT_NE(with({48, 2}, 8, 0, 200).find("tensor 'w': its rows of 48 values are not a whole number of Q8_0 blocks of 32"),
            std::string::npos);
  EXPECT_NE(with({32, 2}, 8, 8, 200).find("tensor 'w''s data offset 8 is not a multiple of the alignment 32"),
            std::string::npos);
  EXPECT_NE(with({32, 2}, 8, 0, 67).find("tensor 'w''s data (68 bytes at data offset 0) runs past the end of the file"),
            std::string::npos);
  EXPECT_NE(with({8}, 0, 0, 64, "v", 0).find("overlaps"), std::string::npos);
  EXPECT_NE(with({uint64_t{1} << 40, uint64_t{1} << 40}, 0, 0, 64).find("overflows"), std::string::npos);
  EXPECT_NE(with({1, 1, 1, 1, 1}, 0, 0, 64).find("has 5 dimensions (expected 1 to 4)"), std::string::npos);
  Builder dup;
  dup.tensor("w", {8}, 0, 0);
  dup.tensor("w", {8}, 0, 32);
  dup.data.assign(64, '\0');
  EXPECT_NE(error_of(dup.bytes()).find("tensor 'w' appears twice"), std::string::npos);
}

}  // namespace
