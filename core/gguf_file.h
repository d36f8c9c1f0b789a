// GGUF files in (llama.cpp's container; gguf-py gguf_reader.py and ggml/src/gguf.cpp are the
// references): a read-only memory mapping of the file, its metadata (every value type, arrays of
// any non-array type) and its tensor infos, validated before anything is handed out. Torch-free
// (tests/fuzz/fuzz_gguf.cpp builds it with libFuzzer).
// Rules enforced (each failure is an InputError naming the file, the key or tensor, and the rule):
//   - magic "GGUF"; version 2 or 3 (1 and big-endian files are refused, saying so);
//   - tensor and key counts no larger than the bytes left could hold; every string's and array's
//     length inside the file; known value types; no nested arrays; keys non-empty and unique;
//   - general.alignment (when present) a u32 power of two;
//   - tensor names non-empty and unique; 1..4 dims, each >= 0, their product without int64 overflow;
//   - with a type table (check_tensors): a known ggml type id, the innermost dim a multiple of the
//     type's block, the byte size without overflow, offsets aligned, data inside the file and no two
//     tensors' data overlapping.
// Invariant: a File whose check_tensors has returned hands out only tensor data that lies inside the
// mapping, sized exactly as its type and dims say.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qf::gguf_in {

enum class ValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12
};
const char* value_type_name(ValueType t);  // "u32", "string", "array", ...
// True when `path` names a GGUF file: a regular file ending in .gguf, or one starting with "GGUF".
bool is_gguf_file(const std::string& path);

// One metadata value. Scalars: the integer ones in `i` (u64 above INT64_MAX also in `u`), floats in
// `f`, bools in `i` (0/1), strings in `s`. Arrays: `elem` and the values in `strs` (strings) or `nums`
// (every numeric / bool element as a double: exact for the 32-bit and smaller types).
struct Value {
  ValueType type = ValueType::U32;
  ValueType elem = ValueType::U32;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0.0;
  std::string s;
  std::vector<std::string> strs;
  std::vector<double> nums;
  bool is_int() const;     // an integer scalar type (u8..i64)
  bool is_float() const;   // f32 / f64
};

// The block geometry of a ggml type id (from the one table, quant/ggml_types.h, plus the
// dequantize-only rows of quant/ggml_more.h): nullptr for an id qforge does not know.
struct TypeGeometry {
  const char* name;  // "Q4_K" (gguf-py's spelling)
  int64_t block;     // values per block
  int64_t bytes;     // bytes per block
};
using TypeLookup = std::function<const TypeGeometry*(uint32_t id)>;

struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // GGUF order: ne[0] is the innermost (row length)
  uint32_t type = 0;
  uint64_t offset = 0;      // relative to the data section
  uint64_t nbytes = 0;      // set by check_tensors
  int64_t numel = 0;
  std::vector<int64_t> shape() const;  // PyTorch order (outermost first)
  int64_t rows() const { return ne.empty() || ne[0] == 0 ? 0 : numel / ne[0]; }
};

class File {
 public:
  // Maps `path` and parses its header (metadata + tensor infos); with `types`, also check_tensors.
  static std::shared_ptr<File> open(const std::string& path, const TypeLookup& types = nullptr);
  // The same over bytes held elsewhere (the fuzzer; tests); `origin` names them in messages. The
  // bytes must outlive the File.
  static std::shared_ptr<File> parse(std::string_view bytes, const std::string& origin,
                                     const TypeLookup& types = nullptr);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // The type, size, alignment, bounds and overlap rules of every tensor (see the header comment).
  void check_tensors(const TypeLookup& types);

  const std::string& origin() const { return origin_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_start() const { return data_start_; }
  uint64_t size() const { return bytes_.size(); }
  const std::vector<std::pair<std::string, Value>>& metadata() const { return kv_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  const Value* find(const std::string& key) const;
  const TensorInfo* tensor(const std::string& name) const;
  // Typed getters: InputError naming the file and key when the key is missing (the ones without a
  // default) or holds another type. get_int accepts any integer type, get_float any float or integer.
  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t dflt) const;
  double get_float(const std::string& key) const;
  double get_float(const std::string& key, double dflt) const;
  bool get_bool(const std::string& key, bool dflt) const;
  std::string get_string(const std::string& key) const;
  std::string get_string(const std::string& key, const std::string& dflt) const;
  const std::vector<std::string>& get_strings(const std::string& key) const;  // an array of strings
  const std::vector<double>& get_nums(const std::string& key) const;         // an array of numbers
  // An F32 tensor's values (type 0; bounds checked here, so before check_tensors too): small tables
  // such as rope_freqs. InputError naming the file and tensor otherwise.
  std::vector<double> f32_values(const std::string& name) const;
  // The tensor's bytes (check_tensors must have run).
  const uint8_t* data(const TensorInfo& t) const;
  // Drops the pages of a tensor's bytes from the mapping (they are read again from the file if used).
  void drop_pages(const TensorInfo& t) const;

 private:
  File() = default;
  void parse_header();
  std::string origin_;
  std::string_view bytes_;
  void* map_ = nullptr;
  size_t map_len_ = 0;
  uint32_t version_ = 0, alignment_ = 32;
  uint64_t data_start_ = 0;
  bool checked_ = false;
  std::vector<std::pair<std::string, Value>> kv_;
  std::map<std::string, size_t> kv_index_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace qf::gguf_in
