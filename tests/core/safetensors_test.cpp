// The hardened safetensors reader: every rule of the format rejected with a message naming the
// file, the tensor and the rule; valid files load memory-mapped (copy-on-write: tensors are
// writable, the file is untouched); save -> load round-trips every dtype; a file truncated while
// mapped ends the process with a message naming it (exit 1), not a bare SIGBUS.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "core/safetensors_header.h"
#include "tests/test_util.h"

using namespace qf;

namespace {

std::string file_of(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

std::string error_of(const std::string& bytes) {
  try {
    st::parse_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "x.safetensors");
  } catch (const InputError& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST(Safetensors, EveryFormatRuleIsEnforcedWithANamedMessage) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}})";
  EXPECT_EQ(error_of(file_of(ok, std::string(12, '\0'))), "<no error>");
  struct Case {
    std::string bytes, expect;
  };
  std::string huge(8, '\0');
  huge[4] = 1;  // N = 2^32
  const std::vector<Case> cases = {
      {"abc", "only 3 bytes"},
      {huge + "{}", "exceeds the format's limit of 100000000"},
      {file_of(ok, "").substr(0, 20), "runs past the end of the file"},
      {file_of("[1,2]", ""), "does not start with '{'"},
      {file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})", std::string(4, '\0')), "not valid UTF-8 JSON"},
      {file_of("{\"\xff\xfe\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", std::string(1, '\0')),
       "not valid UTF-8 JSON"},
      {file_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
               std::string(1, '\0')),
       "duplicate key 'a'"},
      {file_of(R"({"a":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}})", std::string(1, '\0')),
       "tensor 'a': unknown dtype 'F4'"},
      {file_of(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", std::string(4, '\0')),
       "tensor 'a': shape entries must be non-negative"},
      {file_of(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", std::string(4, '\0')),
       "tensor 'a': the shape's element count overflows"},
      {file_of(R"({"a":{"dtype":"F64","shape":[3074457345618258602],"data_offsets":[0,8]}})", std::string(8, '\0')),
       "tensor 'a': the byte size (numel x dtype size) overflows"},
      {file_of(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')),
       "tensor 'a': data_offsets span 8 bytes but shape x F32 needs 12"},
      {file_of(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", std::string(2, '\0')),
       "tensor 'a': data_offsets end 4 lies past the data section (2 bytes)"},
      {file_of(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", std::string(4, '\0')),
       "bytes [0, 2) before tensor 'a' belong to no tensor (a hole)"},
      {file_of(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
               std::string(4, '\0')),
       "overlaps tensor 'a'"},
      {file_of(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", std::string(5, '\0')),
       "the tensors cover 2 bytes but the data section has 5"},
      {file_of(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[2,0]}})", std::string(2, '\0')), "has begin > end"},
      {file_of(R"({"a":{"dtype":"U8","shape":[1]}})", ""), "tensor 'a': missing 'data_offsets'"},
      {file_of(R"({"__metadata__":{"k":1}})", ""), "__metadata__['k'] is not a string"},
  };
  for (auto& c : cases) {
    auto err = error_of(c.bytes);
    EXPECT_NE(err.find("x.safetensors"), std::string::npos) << err;
    EXPECT_NE(err.find(c.expect), std::string::npos) << "expected '" << c.expect << "' in: " << err;
  }
}

TEST(Safetensors, LoadIsMemoryMappedCopyOnWriteAndRoundTripsEveryDtype) {
  qf::testing::TmpDir tmp("qf_st");
  std::vector<std::pair<std::string, at::Tensor>> ts;
  for (auto t : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kLong, at::kInt, at::kShort, at::kChar, at::kByte,
                 at::kBool})
    ts.emplace_back(c10::toString(t), (at::arange(12) % 7).to(t).reshape({3, 4}));
  ts.emplace_back("fp8", at::linspace(-2, 2, 8).to(at::kFloat8_e4m3fn));
  ts.emplace_back("empty", at::empty({0, 5}));
  st::save(tmp / "a.safetensors", ts, {{"format", "pt"}});
  const std::string before = fs::read_file(tmp / "a.safetensors");
  auto f = st::load(tmp / "a.safetensors");
  ASSERT_EQ(f.tensors.size(), ts.size());
  EXPECT_EQ(f.metadata.at("format"), "pt");
  for (size_t i = 0; i < ts.size(); ++i) {
    EXPECT_EQ(f.tensors[i].second.scalar_type(), ts[i].second.scalar_type()) << ts[i].first;
    EXPECT_TRUE(at::equal(f.tensors[i].second.view(at::kByte), ts[i].second.contiguous().view(at::kByte))) << ts[i].first;
  }
  f.get("Float").fill_(42);  // private mapping: writable, the file keeps its bytes
  EXPECT_EQ(f.get("Float")[0][0].item<float>(), 42.f);
  EXPECT_EQ(fs::read_file(tmp / "a.safetensors"), before);
  auto kept = f.get("Long");
  f = st::File{};  // tensors outlive the File that mapped them
  EXPECT_EQ(kept[2][3].item<int64_t>(), 11 % 7);
  EXPECT_THROW(st::load(tmp / "missing.safetensors"), InputError);
}

// Another process truncating a file while it is mapped: the next touch of a lost page raises SIGBUS.
// qforge's handler names the file, says what to do and exits 1 instead of dying by the signal; a
// SIGBUS outside every mapping still kills by SIGBUS.
TEST(Safetensors, FileTruncatedWhileMappedExitsOneNamingTheFile) {
  qf::testing::TmpDir tmp("qf_st_trunc");
  const std::string path = tmp / "base.safetensors";
  for (bool populate : {false, true}) {
    st::save(path, {{"w", at::ones({1 << 20})}});  // 4 MiB: far past the page the header lives in
    auto f = st::load(path, populate);
    const auto* p = static_cast<const volatile char*>(f.get("w").data_ptr());
    ASSERT_EQ(::truncate(path.c_str(), 4096), 0);
    // fork()ed child (gtest warns about torch's threads): it only reads one byte, then the handler exits
    EXPECT_EXIT((void)p[(1 << 22) - 1], ::testing::ExitedWithCode(1),
                "qforge: error: .*base\\.safetensors changed or was truncated while mapped \\(SIGBUS reading it\\).*"
                "Restore the file and rerun")
        << "populate=" << populate;
  }
  EXPECT_EXIT(::raise(SIGBUS), ::testing::KilledBySignal(SIGBUS), "");
}
