// The ONNX model protobuf (onnx/onnx.proto, IR version 10), written directly in the protobuf wire
// format: qforge only ever writes the handful of messages a causal-LM graph needs (ModelProto,
// GraphProto, NodeProto, AttributeProto, TensorProto, ValueInfoProto, OperatorSetIdProto), so the
// encoder is a few varint/length-delimited helpers instead of a protobuf runtime + protoc-generated
// onnx.pb.cc. Why not libprotobuf/libonnx: the pinned torch wheel's libtorch carries its own onnx
// and protobuf symbols (a second copy is an ODR/version clash waiting to happen), protoc output is
// tied to the exact runtime version, and a single protobuf message is capped at 2 GiB anyway, so
// weights of any real model must live in ONNX's external-data file, which this writer streams to
// disk tensor by tensor (the graph proto holds only nodes and small constants).
// Field numbers and enum values are onnx.proto's; the test suite parses every file qforge writes
// with the `onnx` Python package (onnx.checker) and runs it in onnxruntime.
#pragma once
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace qf::exporter::onnx {

// TensorProto.DataType
enum DataType : int32_t { kFloat = 1, kUint8 = 2, kInt8 = 3, kInt32 = 6, kInt64 = 7, kBool = 9, kFloat16 = 10 };

// A protobuf message being built: fields appended in any order (the wire format allows it).
class Msg {
 public:
  Msg& varint(int field, uint64_t v);            // int32/int64/enum/bool (wire type 0)
  Msg& i64(int field, int64_t v) { return varint(field, static_cast<uint64_t>(v)); }
  Msg& f32(int field, float v);                  // float (wire type 5)
  Msg& bytes(int field, const std::string& s);   // string/bytes (wire type 2)
  Msg& bytes(int field, const void* data, size_t n);
  Msg& msg(int field, const Msg& m) { return bytes(field, m.buf_); }
  const std::string& str() const { return buf_; }
  size_t size() const { return buf_.size(); }

 private:
  void tag(int field, int wire);
  void raw_varint(uint64_t v);
  std::string buf_;
};

// AttributeProto builders.
Msg attr_int(const std::string& name, int64_t v);
Msg attr_float(const std::string& name, float v);
Msg attr_ints(const std::string& name, const std::vector<int64_t>& v);
Msg attr_string(const std::string& name, const std::string& v);

// ValueInfoProto of a tensor; a dim < 0 is symbolic, named by `dim_names` at the same index.
Msg value_info(const std::string& name, DataType t, const std::vector<int64_t>& dims,
               const std::vector<std::string>& dim_names = {});

// The external-data file beside model.onnx: tensors appended at 64-byte aligned offsets.
class ExternalData {
 public:
  ExternalData(const std::string& path, std::string location);  // location: the name model.onnx refers to
  // Appends `n` bytes; returns the TensorProto (dims, type, name, external_data, data_location) to add.
  Msg add(const std::string& name, DataType t, const std::vector<int64_t>& dims, const void* data, size_t n);
  void close();
  uint64_t bytes() const { return off_; }

 private:
  std::ofstream f_;
  std::string path_, location_;
  uint64_t off_ = 0;
};

// TensorProto with the data inline (raw_data).
Msg tensor_inline(const std::string& name, DataType t, const std::vector<int64_t>& dims, const void* data, size_t n);

// A graph under construction: nodes, initializers, inputs and outputs in the order added.
class Graph {
 public:
  void node(const std::string& op, const std::vector<std::string>& inputs, const std::vector<std::string>& outputs,
            const std::vector<Msg>& attrs = {}, const std::string& domain = "");
  void initializer(const Msg& tensor) { init_.push_back(tensor.str()); }
  void input(const Msg& vi) { in_.push_back(vi.str()); }
  void output(const Msg& vi) { out_.push_back(vi.str()); }
  int64_t n_nodes() const { return n_nodes_; }
  // ModelProto bytes: ir_version 10, opset_import {"" : opset, "com.microsoft": 1}, this graph.
  std::string model(const std::string& graph_name, int64_t opset, const std::string& producer_version,
                    const std::vector<std::pair<std::string, std::string>>& metadata) const;

 private:
  std::string nodes_;
  std::vector<std::string> init_, in_, out_;
  int64_t n_nodes_ = 0;
};

}  // namespace qf::exporter::onnx
