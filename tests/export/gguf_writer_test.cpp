// GGUF container writer: header layout (magic, version, counts), tensor data aligned, and the
// refusals (wrong byte size for the type and shape, row width not a block multiple, duplicates).
// gguf-py reads what it writes in tests/interop/test_gguf_writer.py.
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "export/gguf_writer.h"

using namespace qf::gguf;

TEST(GgufWriter, HeaderCountsAndAlignedData) {
  Writer w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.block_count", 2);
  w.add_tensor("a", {2, 32}, TensorType::Q8_0, std::string(2 * 34, '\x01'));
  w.add_tensor("b", {3}, TensorType::F32, std::string(12, '\x02'));
  const auto s = w.serialize();
  ASSERT_GE(s.size(), 24u);
  EXPECT_EQ(s.substr(0, 4), "GGUF");
  uint32_t version;
  uint64_t n_tensors, n_kv;
  std::memcpy(&version, s.data() + 4, 4);
  std::memcpy(&n_tensors, s.data() + 8, 8);
  std::memcpy(&n_kv, s.data() + 16, 8);
  EXPECT_EQ(version, 3u);
  EXPECT_EQ(n_tensors, 2u);
  EXPECT_EQ(n_kv, 2u);
  EXPECT_EQ(s.size() % 32, 0u);
  // data section: tensor a (68 bytes of 0x01), padding to 32, then b.
  const auto a = s.find(std::string(68, '\x01'));
  ASSERT_NE(a, std::string::npos);
  EXPECT_EQ(a % 32, 0u);
  EXPECT_EQ(s.find(std::string(12, '\x02')), a + 96);
}

TEST(GgufWriter, RefusesInconsistentTensorsAndDuplicates) {
  Writer w;
  EXPECT_THROW(w.add_tensor("x", {2, 32}, TensorType::Q4_0, std::string(35, '\0')), qf::Error);  // needs 36
  EXPECT_THROW(w.add_tensor("y", {2, 100}, TensorType::Q4_K, std::string(10, '\0')), qf::Error);  // width % 256
  w.add_tensor("z", {4}, TensorType::F16, std::string(8, '\0'));
  EXPECT_THROW(w.add_tensor("z", {4}, TensorType::F16, std::string(8, '\0')), qf::Error);
  w.add_u32("k", 1);
  EXPECT_THROW(w.add_u32("k", 2), qf::Error);
}

TEST(GgufWriter, ReadIndexParsesWhatWasWrittenAndRefusesDamage) {
  Writer w(64);
  w.add_strings("tokenizer.ggml.tokens", {"a", "bb"});
  w.add_f32s("tokenizer.ggml.scores", {0.5f, -1.f});
  w.add_tensor("blk.0.attn_q.weight", {2, 32}, TensorType::Q4_0, std::string(36, '\x07'));
  w.add_tensor("norm", {5}, TensorType::F32, std::string(20, '\x09'));
  const auto s = w.serialize();
  auto idx = read_index(s, "t.gguf");
  EXPECT_EQ(idx.alignment, 64u);
  ASSERT_EQ(idx.tensors.size(), 2u);
  EXPECT_EQ(idx.tensors[0].dims, (std::vector<int64_t>{2, 32}));
  EXPECT_EQ(idx.tensors[1].offset % 64, 0u);
  EXPECT_EQ(s.substr(idx.data_start + idx.tensors[1].offset, 20), std::string(20, '\x09'));
  EXPECT_EQ(idx.keys.size(), 3u);  // + general.alignment
  auto bad = s;
  bad[0] = 'X';
  EXPECT_THROW(read_index(bad, "t.gguf"), qf::InputError);
  EXPECT_THROW(read_index(s.substr(0, 40), "t.gguf"), qf::InputError);
  EXPECT_THROW(read_index(s.substr(0, s.size() - 64), "t.gguf"), qf::InputError);  // data cut off
}
