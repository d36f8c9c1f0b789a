// GGUF container writer: header layout (magic, version, counts), tensor data aligned, and the
// refusals (wrong byte size for the type and shape, row width not a block multiple, duplicates).
// gguf-py reads what it writes in tests/interop/test_gguf_writer.py.
#include <gtest/gtest.h>

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>

#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/fs.h"
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

// Streaming write: producers run one at a time in order; a failing producer, a read-only directory
// or a full disk leaves no file (and no temp file) behind, and an existing file is untouched.
TEST(GgufWriter, StreamsAtomicallyAndLeavesNothingOnFailure) {
  namespace stdfs = std::filesystem;
  const auto dir = stdfs::temp_directory_path() / ("qf_gguf_stream_" + std::to_string(::getpid()));
  stdfs::create_directories(dir);
  const std::string path = (dir / "m.gguf").string();
  std::vector<std::string> order;
  {
    Writer w;
    w.add_u32("k", 1);
    w.add_tensor("a", {32}, TensorType::Q8_0, Writer::Producer([&] { order.push_back("a"); return std::string(34, 'a'); }));
    w.add_tensor("b", {4}, TensorType::F32, Writer::Producer([&] { order.push_back("b"); return std::string(16, 'b'); }));
    std::vector<std::string> seen;
    const auto n = w.write(path, [&](size_t, const std::string& name) { seen.push_back(name); });
    EXPECT_EQ(n, static_cast<int64_t>(stdfs::file_size(path)));
    EXPECT_EQ(order, (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(seen, order);
  }
  const auto before = stdfs::file_size(path);
  {
    Writer w;
    w.add_tensor("a", {32}, TensorType::Q8_0, Writer::Producer([] { return std::string(34, 'x'); }));
    w.add_tensor("b", {4}, TensorType::F32, Writer::Producer([]() -> std::string { throw qf::Error("producer failed"); }));
    EXPECT_THROW(w.write(path), qf::Error);
  }
  {
    Writer w;  // a producer that returns the wrong byte count is caught before it reaches the disk
    w.add_tensor("a", {32}, TensorType::Q8_0, Writer::Producer([] { return std::string(33, 'x'); }));
    EXPECT_THROW(w.write(path), qf::Error);
  }
  EXPECT_EQ(stdfs::file_size(path), before);
  size_t files = 0;
  for (auto& e : stdfs::directory_iterator(dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);  // no temp file left
  {
    // A full disk, emulated without root by a file-size limit: write() fails (EFBIG) part way through
    // the data. The error names the file and nothing is left behind.
    struct rlimit old {};
    ::getrlimit(RLIMIT_FSIZE, &old);
    auto prev = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old;
    small.rlim_cur = 4096;
    ::setrlimit(RLIMIT_FSIZE, &small);
    Writer w;
    w.add_tensor("big", {1024, 32}, TensorType::F32, std::string(1024 * 32 * 4, 'x'));
    std::string msg;
    try {
      w.write(path + ".full");
    } catch (const qf::InputError& e) {
      msg = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, prev);
    EXPECT_NE(msg.find(path + ".full"), std::string::npos) << msg;
    EXPECT_FALSE(stdfs::exists(path + ".full"));
  }
  files = 0;
  for (auto& e : stdfs::directory_iterator(dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);
  {
    Writer w;  // a directory that does not exist / cannot be written
    w.add_tensor("a", {32}, TensorType::Q8_0, std::string(34, 'x'));
    try {
      w.write("/proc/qforge_cannot_write.gguf");
      ADD_FAILURE() << "writing under /proc succeeded";
    } catch (const qf::InputError& e) {
      EXPECT_NE(std::string(e.what()).find("/proc/qforge_cannot_write.gguf"), std::string::npos) << e.what();
    }
  }
  qf::fs::remove_tree(dir.string());
}
