// GGUF v3 container writer (llama.cpp's file format; gguf-py gguf_writer.py is the reference):
// "GGUF", version 3, tensor count, metadata count, metadata (typed key/values, arrays), tensor infos
// (name, dims innermost first, ggml type, offset), padding to the alignment (general.alignment,
// 32 by default), then the tensor data, each tensor aligned.
// Invariants: the file appears only complete (temp file + fsync + rename); every tensor's byte size
// is checked against its ggml type and dims before anything is written; keys are unique.
// This is the container only: what llama.cpp expects in it for a model (architecture keys,
// tensor names, tokenizer block) is the exporter's business (export/gguf_export).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace qf::gguf {

enum class ValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12
};

// ggml tensor types qforge writes (GGUF ids); their geometry and names: quant/ggml_types.h.
enum class TensorType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13,
  Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35, Q1_0 = 41, Q2_0 = 42
};
int64_t block_elems(TensorType t);
int64_t block_bytes(TensorType t);
const char* type_name(TensorType t);

struct Value {
  ValueType type = ValueType::U32;
  ValueType elem = ValueType::U32;  // for arrays
  std::variant<uint64_t, int64_t, double, bool, std::string> scalar;
  std::vector<std::variant<uint64_t, int64_t, double, bool, std::string>> array;
};

// What a GGUF file's header says (for the writer's self-check and for tests).
struct TensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // PyTorch order (outermost first)
  TensorType type;
  uint64_t offset;            // relative to the data section
};
struct Index {
  uint32_t version = 0;
  std::vector<std::pair<std::string, ValueType>> keys;
  std::vector<TensorInfo> tensors;
  uint32_t alignment = 32;
  uint64_t data_start = 0;
};
// Parses the header of a GGUF file held in `bytes`; throws InputError naming `origin` on anything
// malformed (bad magic/version, counts or strings running past the end, unknown value or tensor
// types, tensor data outside the file).
Index read_index(std::string_view bytes, const std::string& origin);

class Writer {
 public:
  explicit Writer(uint32_t alignment = 32) : alignment_(alignment) {}
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_u64(const std::string& key, uint64_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_string(const std::string& key, const std::string& v);
  void add_strings(const std::string& key, const std::vector<std::string>& v);
  void add_f32s(const std::string& key, const std::vector<float>& v);
  void add_i32s(const std::string& key, const std::vector<int32_t>& v);
  // dims in PyTorch order ([rows, cols]); stored innermost first as GGUF wants. The data is the
  // row-major bytes (blocks for quantized types, rows of whole blocks); a Producer makes them only
  // when write() reaches the tensor, so a model is streamed out one tensor at a time.
  using Producer = std::function<std::string()>;
  void add_tensor(const std::string& name, const std::vector<int64_t>& dims, TensorType type, std::string data);
  void add_tensor(const std::string& name, const std::vector<int64_t>& dims, TensorType type, Producer make);
  // Streams the file to `path` atomically (fs::AtomicWriter: nothing partial is ever left, a full or
  // read-only disk is an InputError naming the path): header, then each tensor as its producer makes
  // it (its byte count checked against type and dims, a hash kept). Then maps the written file,
  // parses it with read_index and checks every tensor's name, dims, type, offset and data hash.
  // `on_tensor(i, name)` is called before tensor i is produced (progress). Returns the file size.
  int64_t write(const std::string& path, const std::function<void(size_t, const std::string&)>& on_tensor = {});
  // The whole file in memory (tests).
  std::string serialize();
  size_t n_tensors() const { return tensors_.size(); }

 private:
  void add(const std::string& key, Value v);
  uint32_t alignment_;
  std::vector<std::pair<std::string, Value>> kv_;
  struct Tensor {
    std::string name;
    std::vector<int64_t> dims;
    TensorType type;
    uint64_t size;  // bytes
    Producer make;
  };
  // Checks name (unique), dims and block divisibility; returns the tensor's byte size.
  uint64_t tensor_bytes(const std::string& name, const std::vector<int64_t>& dims, TensorType type) const;
  std::string header() const;  // everything before the data section, padded to the alignment
  std::string produce(size_t i) const;
  std::vector<Tensor> tensors_;
};

}  // namespace qf::gguf
