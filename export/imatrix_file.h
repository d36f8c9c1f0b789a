// llama.cpp's importance-matrix files (tools/imatrix/imatrix.cpp and common/imatrix-loader.cpp at
// 0c1e570, the commit llama-cpp-python 0.3.36 vendors), written and read:
//  - GGUF (what llama-imatrix writes by default): general.type = "imatrix", imatrix.datasets
//    (string array), imatrix.chunk_count and imatrix.chunk_size (u32); per weight, in name order,
//    "<name>.in_sum2" F32 [n_mat, ne0] (the sum over tokens of each input column's square) and
//    "<name>.counts" F32 [n_mat, 1] (the tokens summed). qforge's dense weights have n_mat = 1.
//  - legacy .dat (read only): n_entries, then per entry {name, ncall, nval, nval floats of
//    (sum / count) * ncall}, then optionally the chunk count and the dataset name.
// The importance weights llama-quantize hands ggml_quantize_chunk (tools/quantize's load_imatrix):
// GGUF: in_sum2 / count per column (1 where the count is 0); legacy: value / ncall.
// Invariant: read_imatrix(write_imatrix(m)).entries == m.entries, and llama.cpp's loader reads what
// write_imatrix writes (tests/interop/test_imatrix.py reads it with gguf-py and quantizes with it
// through llama.cpp).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qf::exporter {

struct ImatrixEntry {
  std::vector<float> sums;    // [n_mat * ne0]: in_sum2, row-major
  std::vector<float> counts;  // [n_mat]; legacy files: {ncall}
};

struct Imatrix {
  std::map<std::string, ImatrixEntry> entries;  // by GGUF weight name: "blk.0.attn_q.weight"
  // Written as imatrix.*; read_imatrix checks that a GGUF file has them but does not fill them in.
  std::vector<std::string> datasets;
  uint32_t chunk_count = 0, chunk_size = 0;
  bool legacy = false;  // read from a .dat file
  // The column weights llama-quantize uses for weight `name` with `cols` input columns; empty when the
  // file has no entry for it. InputError naming the file, the weight and both sizes when the entry's
  // size is not `cols` (llama-quantize refuses that too).
  std::vector<float> weights(const std::string& name, int64_t cols, const std::string& origin) const;
};

// Writes `m` as llama-imatrix's GGUF (atomically; an existing file is replaced).
void write_imatrix(const std::string& path, const Imatrix& m);
// Reads a GGUF or legacy imatrix file; InputError naming the file and what is wrong (not an imatrix,
// a GGUF without the imatrix.* metadata llama-quantize requires, sums without counts, sizes).
Imatrix read_imatrix(const std::string& path);

}  // namespace qf::exporter
