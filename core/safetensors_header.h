// The safetensors header validator, kept free of libtorch so tests/fuzz/ can build it with clang's
// libFuzzer. Every rule of the format (formats.md; huggingface/safetensors tensor.rs) is enforced:
//   - the file holds at least the 8-byte little-endian header length N, N <= 100,000,000, 8 + N <= size;
//   - the header is valid UTF-8 JSON, an object, without duplicate keys;
//   - "__metadata__" (optional) maps strings to strings;
//   - every tensor is {dtype: known name, shape: [non-negative ints], data_offsets: [begin, end]};
//   - end - begin == numel x dtype size, computed with overflow checks;
//   - sorted by begin, the byte ranges tile the data section from 0 without holes or overlap, and
//     the last end equals the data section's length (file size - 8 - N).
// Invariant: parse_header either returns a header whose every range lies inside the file, or throws
// InputError naming the origin, the tensor (when there is one) and the rule that failed.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qf::st {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2, U16, U32, U64 };

struct DTypeInfo {
  DType dtype;
  const char* name;  // safetensors' spelling
  uint64_t size;     // bytes per element
};
const std::vector<DTypeInfo>& dtypes();
const DTypeInfo& info(DType d);

struct Entry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // relative to the data section
};

struct Header {
  std::vector<Entry> entries;  // in header order
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;     // 8 + N
  uint64_t data_len = 0;
};

constexpr uint64_t kMaxHeaderLen = 100000000;

Header parse_header(const uint8_t* file, size_t size, const std::string& origin);

}  // namespace qf::st
