#include "export/onnx_proto.h"

#include <cstring>

#include "core/error.h"
#include "core/strings.h"

namespace qf::exporter::onnx {
namespace {

// onnx.proto field numbers used below.
namespace F {
// AttributeProto
constexpr int kAttrName = 1, kAttrF = 2, kAttrI = 3, kAttrS = 4, kAttrInts = 8, kAttrType = 20;
// AttributeProto.AttributeType
constexpr int kFloatT = 1, kIntT = 2, kStringT = 3, kIntsT = 7;
// TensorProto
constexpr int kDims = 1, kDataType = 2, kName = 8, kRawData = 9, kExternalData = 13, kDataLocation = 14;
constexpr int kExternal = 1;  // TensorProto.DataLocation.EXTERNAL
// NodeProto
constexpr int kNodeInput = 1, kNodeOutput = 2, kNodeName = 3, kOpType = 4, kAttribute = 5, kDomain = 7;
// GraphProto
constexpr int kGraphNode = 1, kGraphName = 2, kInitializer = 5, kGraphInput = 11, kGraphOutput = 12;
// ModelProto
constexpr int kIrVersion = 1, kProducerName = 2, kProducerVersion = 3, kGraph = 7, kOpsetImport = 8, kMetadata = 14;
// ValueInfoProto / TypeProto / TypeProto.Tensor / TensorShapeProto / Dimension
constexpr int kViName = 1, kViType = 2, kTensorType = 1, kElemType = 1, kShape = 2, kDim = 1, kDimValue = 1,
              kDimParam = 2;
}  // namespace F

constexpr int64_t kIrVersion = 10;  // opset 21's IR version
constexpr uint64_t kAlign = 64;

Msg tensor_header(const std::string& name, DataType t, const std::vector<int64_t>& dims) {
  Msg m;
  for (auto d : dims) m.i64(F::kDims, d);
  m.varint(F::kDataType, static_cast<uint64_t>(t));
  m.bytes(F::kName, name);
  return m;
}

Msg string_entry(const std::string& k, const std::string& v) {
  Msg e;
  e.bytes(1, k).bytes(2, v);
  return e;
}

}  // namespace

void Msg::raw_varint(uint64_t v) {
  while (v >= 0x80) {
    buf_.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  buf_.push_back(static_cast<char>(v));
}
void Msg::tag(int field, int wire) { raw_varint((static_cast<uint64_t>(field) << 3) | static_cast<uint64_t>(wire)); }
Msg& Msg::varint(int field, uint64_t v) {
  tag(field, 0);
  raw_varint(v);
  return *this;
}
Msg& Msg::f32(int field, float v) {
  tag(field, 5);
  char b[4];
  std::memcpy(b, &v, 4);  // little-endian hosts only (as the rest of qforge's file formats)
  buf_.append(b, 4);
  return *this;
}
Msg& Msg::bytes(int field, const void* data, size_t n) {
  tag(field, 2);
  raw_varint(n);
  buf_.append(static_cast<const char*>(data), n);
  return *this;
}
Msg& Msg::bytes(int field, const std::string& s) { return bytes(field, s.data(), s.size()); }

Msg attr_int(const std::string& name, int64_t v) {
  Msg m;
  m.bytes(F::kAttrName, name).i64(F::kAttrI, v).varint(F::kAttrType, F::kIntT);
  return m;
}
Msg attr_float(const std::string& name, float v) {
  Msg m;
  m.bytes(F::kAttrName, name).f32(F::kAttrF, v).varint(F::kAttrType, F::kFloatT);
  return m;
}
Msg attr_ints(const std::string& name, const std::vector<int64_t>& v) {
  Msg m;
  m.bytes(F::kAttrName, name);
  for (auto x : v) m.i64(F::kAttrInts, x);
  m.varint(F::kAttrType, F::kIntsT);
  return m;
}
Msg attr_string(const std::string& name, const std::string& v) {
  Msg m;
  m.bytes(F::kAttrName, name).bytes(F::kAttrS, v).varint(F::kAttrType, F::kStringT);
  return m;
}

Msg value_info(const std::string& name, DataType t, const std::vector<int64_t>& dims,
               const std::vector<std::string>& dim_names) {
  Msg shape;
  for (size_t i = 0; i < dims.size(); ++i) {
    Msg d;
    if (dims[i] >= 0) d.i64(F::kDimValue, dims[i]);
    else d.bytes(F::kDimParam, i < dim_names.size() ? dim_names[i] : str("d", i));
    shape.msg(F::kDim, d);
  }
  Msg tt;
  tt.varint(F::kElemType, static_cast<uint64_t>(t)).msg(F::kShape, shape);
  Msg type;
  type.msg(F::kTensorType, tt);
  Msg vi;
  vi.bytes(F::kViName, name).msg(F::kViType, type);
  return vi;
}

Msg tensor_inline(const std::string& name, DataType t, const std::vector<int64_t>& dims, const void* data, size_t n) {
  Msg m = tensor_header(name, t, dims);
  m.bytes(F::kRawData, data, n);
  return m;
}

ExternalData::ExternalData(const std::string& path, std::string location)
    : f_(path, std::ios::binary | std::ios::trunc), path_(path), location_(std::move(location)) {
  QF_CHECK(f_.good(), "export: cannot create ", path);
}

Msg ExternalData::add(const std::string& name, DataType t, const std::vector<int64_t>& dims, const void* data, size_t n) {
  const uint64_t pad = (kAlign - off_ % kAlign) % kAlign;
  if (pad) {
    static const char zeros[kAlign] = {};
    f_.write(zeros, static_cast<std::streamsize>(pad));
    off_ += pad;
  }
  f_.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  QF_CHECK(f_.good(), "export: writing ", path_, " failed (disk full?)");
  Msg m = tensor_header(name, t, dims);
  m.msg(F::kExternalData, string_entry("location", location_));
  m.msg(F::kExternalData, string_entry("offset", std::to_string(off_)));
  m.msg(F::kExternalData, string_entry("length", std::to_string(n)));
  m.varint(F::kDataLocation, F::kExternal);
  off_ += n;
  return m;
}

void ExternalData::close() {
  f_.flush();
  QF_CHECK(f_.good(), "export: writing ", path_, " failed (disk full?)");
  f_.close();
}

void Graph::node(const std::string& op, const std::vector<std::string>& inputs, const std::vector<std::string>& outputs,
                 const std::vector<Msg>& attrs, const std::string& domain) {
  Msg n;
  for (auto& i : inputs) n.bytes(F::kNodeInput, i);
  for (auto& o : outputs) n.bytes(F::kNodeOutput, o);
  n.bytes(F::kNodeName, str(op, "_", n_nodes_++));
  n.bytes(F::kOpType, op);
  for (auto& a : attrs) n.msg(F::kAttribute, a);
  if (!domain.empty()) n.bytes(F::kDomain, domain);
  Msg wrap;
  wrap.msg(F::kGraphNode, n);
  nodes_ += wrap.str();
}

std::string Graph::model(const std::string& graph_name, int64_t opset, const std::string& producer_version,
                         const std::vector<std::pair<std::string, std::string>>& metadata) const {
  std::string graph = nodes_;
  auto append = [&](int field, const std::string& bytes) {
    Msg w;
    w.bytes(field, bytes);
    graph += w.str();
  };
  append(F::kGraphName, graph_name);
  for (auto& t : init_) append(F::kInitializer, t);
  for (auto& v : in_) append(F::kGraphInput, v);
  for (auto& v : out_) append(F::kGraphOutput, v);
  QF_CHECK(graph.size() < (size_t{1} << 31), "export: the ONNX graph proto is ", graph.size(),
           " bytes; protobuf caps a message at 2 GiB (weights go to the external-data file; this is the graph itself)");
  Msg m;
  m.i64(F::kIrVersion, kIrVersion);
  Msg ai;
  ai.bytes(1, "").i64(2, opset);
  m.msg(F::kOpsetImport, ai);
  Msg ms;
  ms.bytes(1, "com.microsoft").i64(2, 1);
  m.msg(F::kOpsetImport, ms);
  m.bytes(F::kProducerName, "qforge").bytes(F::kProducerVersion, producer_version);
  m.bytes(F::kGraph, graph);
  for (auto& [k, v] : metadata) m.msg(F::kMetadata, string_entry(k, v));
  return m.str();
}

}  // namespace qf::exporter::onnx
