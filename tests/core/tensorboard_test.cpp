// TensorBoard writer: CRC-32C known answers, and a round trip that parses our own TFRecord framing
// and protobuf encoding back. Live parity with the real reader: tests/interop/check_tensorboard.py.
#include "core/tensorboard.h"
#include "core/fs.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"

namespace {

using qf::core::crc32c;
using qf::core::masked_crc32c;
using qf::core::TensorBoardWriter;
namespace stdfs = std::filesystem;

std::string fresh_dir(const std::string& name) {
  stdfs::path d = stdfs::path(testing::TempDir()) /
                  ("qf_tb_" + name + "_" + std::to_string(::getpid()));
  qf::fs::remove_tree(d.string());
  return d.string();
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

uint64_t le(const std::string& s, size_t off, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(s[off + i])) << (8 * i);
  return v;
}

// Generic protobuf field: varint/fixed values in `num`, length-delimited payloads in `bytes`.
struct Field {
  uint32_t number = 0;
  uint32_t wire = 0;
  uint64_t num = 0;
  std::string bytes;
};

uint64_t read_varint(const std::string& s, size_t& i) {
  uint64_t v = 0;
  for (int shift = 0;; shift += 7) {
    EXPECT_LT(i, s.size());
    if (i >= s.size() || shift > 63) return v;
    unsigned char b = static_cast<unsigned char>(s[i++]);
    v |= static_cast<uint64_t>(b & 0x7F) << shift;
    if (!(b & 0x80)) return v;
  }
}

std::vector<Field> parse_message(const std::string& s) {
  std::vector<Field> out;
  size_t i = 0;
  while (i < s.size()) {
    uint64_t key = read_varint(s, i);
    Field f;
    f.number = static_cast<uint32_t>(key >> 3);
    f.wire = static_cast<uint32_t>(key & 7);
    switch (f.wire) {
      case 0: f.num = read_varint(s, i); break;
      case 1: f.num = le(s, i, 8); i += 8; break;
      case 5: f.num = le(s, i, 4); i += 4; break;
      case 2: {
        uint64_t n = read_varint(s, i);
        f.bytes = s.substr(i, n);
        i += n;
        break;
      }
      default: ADD_FAILURE() << "unexpected wire type " << f.wire; return out;
    }
    out.push_back(f);
  }
  EXPECT_EQ(i, s.size()) << "message overran its length";
  return out;
}

// Splits a TFRecord file into record payloads, checking lengths and both masked CRCs.
std::vector<std::string> read_records(const std::string& file) {
  std::vector<std::string> recs;
  size_t off = 0;
  while (off < file.size()) {
    EXPECT_GE(file.size() - off, 12u) << "truncated header at " << off;
    if (file.size() - off < 12) break;
    const uint64_t len = le(file, off, 8);
    EXPECT_EQ(le(file, off + 8, 4), masked_crc32c(file.data() + off, 8)) << "length crc at " << off;
    EXPECT_GE(file.size() - off - 12, len + 4) << "truncated record at " << off;
    if (file.size() - off - 12 < len + 4) break;
    std::string data = file.substr(off + 12, len);
    EXPECT_EQ(le(file, off + 12 + len, 4), masked_crc32c(data.data(), data.size()))
        << "data crc at " << off;
    recs.push_back(data);
    off += 12 + len + 4;
  }
  return recs;
}

struct Scalar {
  std::string tag;
  int64_t step = 0;
  float value = 0;
  double wall_time = 0;
};

Scalar decode_scalar_event(const std::string& ev) {
  Scalar s;
  int summaries = 0;
  for (const Field& f : parse_message(ev)) {
    if (f.number == 1) {
      EXPECT_EQ(f.wire, 1u);
      std::memcpy(&s.wall_time, &f.num, 8);
    } else if (f.number == 2) {
      EXPECT_EQ(f.wire, 0u);
      s.step = static_cast<int64_t>(f.num);
    } else if (f.number == 5) {
      EXPECT_EQ(f.wire, 2u);
      ++summaries;
      auto values = parse_message(f.bytes);
      EXPECT_EQ(values.size(), 1u);
      EXPECT_EQ(values.at(0).number, 1u);
      for (const Field& v : parse_message(values.at(0).bytes)) {
        if (v.number == 1) {
          EXPECT_EQ(v.wire, 2u);
          s.tag = v.bytes;
        } else if (v.number == 2) {
          EXPECT_EQ(v.wire, 5u);
          uint32_t bits = static_cast<uint32_t>(v.num);
          std::memcpy(&s.value, &bits, 4);
        } else {
          ADD_FAILURE() << "unexpected Summary.Value field " << v.number;
        }
      }
    } else {
      ADD_FAILURE() << "unexpected Event field " << f.number;
    }
  }
  EXPECT_EQ(summaries, 1);
  return s;
}

TEST(Crc32c, KnownAnswers) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  const std::vector<unsigned char> zeros(32, 0);
  EXPECT_EQ(crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  const std::vector<unsigned char> ones(32, 0xFF);
  EXPECT_EQ(crc32c(ones.data(), ones.size()), 0x62A8AB43u);  // RFC 3720 B.4
  EXPECT_EQ(crc32c("", 0), 0u);
}

TEST(Crc32c, Masked) {
  const uint32_t c = crc32c("123456789", 9);
  EXPECT_EQ(masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TensorBoardWriter, RoundTrip) {
  const std::string dir = fresh_dir("roundtrip") + "/nested/run";
  std::string path;
  {
    TensorBoardWriter w(dir);
    path = w.path();
    EXPECT_EQ(stdfs::path(path).parent_path(), stdfs::path(dir));
    const std::string name = stdfs::path(path).filename().string();
    EXPECT_EQ(name.rfind("events.out.tfevents.", 0), 0u) << name;
    EXPECT_EQ(name.substr(name.size() - 7), ".qforge") << name;
    w.add_scalar("train/loss", 3.25, 1);
    w.add_scalar("train/lr", 1e-4, 2);
    w.add_scalar("eval/ppl", -7.5, 1234567890123LL);
    w.add_scalar("neg", 0.5, -3);
    w.flush();
    // After flush() every record is on disk even though the writer is still open.
    EXPECT_EQ(read_records(slurp(path)).size(), 5u);
    w.add_scalar("after_flush", 1.0, 5);
  }  // destructor flushes the last record
  const auto recs = read_records(slurp(path));
  ASSERT_EQ(recs.size(), 6u);

  // First record: Event{wall_time, file_version = "brain.Event:2"}.
  bool saw_version = false, saw_wall = false;
  for (const Field& f : parse_message(recs[0])) {
    if (f.number == 3) {
      EXPECT_EQ(f.bytes, "brain.Event:2");
      saw_version = true;
    } else if (f.number == 1) {
      double wt;
      std::memcpy(&wt, &f.num, 8);
      EXPECT_GT(wt, 1.5e9);
      saw_wall = true;
    }
  }
  EXPECT_TRUE(saw_version);
  EXPECT_TRUE(saw_wall);

  const std::vector<Scalar> want = {{"train/loss", 1, 3.25f},
                                    {"train/lr", 2, 1e-4f},
                                    {"eval/ppl", 1234567890123LL, -7.5f},
                                    {"neg", -3, 0.5f},
                                    {"after_flush", 5, 1.0f}};
  for (size_t i = 0; i < want.size(); ++i) {
    Scalar got = decode_scalar_event(recs[i + 1]);
    EXPECT_EQ(got.tag, want[i].tag);
    EXPECT_EQ(got.step, want[i].step);
    EXPECT_EQ(got.value, want[i].value);  // exact: written as float
    EXPECT_GT(got.wall_time, 1.5e9);
  }
  qf::fs::remove_tree(stdfs::path(dir).parent_path().parent_path().string());
}

TEST(TensorBoardWriter, TwoWritersSameDirDoNotClobber) {
  const std::string dir = fresh_dir("two");
  TensorBoardWriter a(dir), b(dir);
  EXPECT_NE(a.path(), b.path());
  a.add_scalar("x", 1, 1);
  b.add_scalar("y", 2, 1);
  a.flush();
  b.flush();
  EXPECT_EQ(read_records(slurp(a.path())).size(), 2u);
  EXPECT_EQ(read_records(slurp(b.path())).size(), 2u);
  qf::fs::remove_tree(dir);
}

TEST(TensorBoardWriter, UncreatableDirThrowsInputErrorNamingPath) {
  const std::string dir = fresh_dir("bad");
  stdfs::create_directories(dir);
  const std::string blocker = dir + "/a_file";
  std::ofstream(blocker) << "x";
  const std::string logdir = blocker + "/logs";
  try {
    TensorBoardWriter w(logdir);
    FAIL() << "expected qf::InputError";
  } catch (const qf::InputError& e) {
    EXPECT_NE(std::string(e.what()).find(logdir), std::string::npos) << e.what();
  }
  qf::fs::remove_tree(dir);
}

}  // namespace
