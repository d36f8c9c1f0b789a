// safetensors read/write (format: u64 LE header length N, N bytes of JSON header
// {"name": {"dtype","shape","data_offsets":[begin,end]}, "__metadata__": {str: str}}, then the data).
// Invariant: save() writes atomically with tensors in name order, 8-byte aligned header padding;
// load() validates header/offsets/sizes before touching data and names the file and tensor on error.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/safetensors_header.h"

namespace qf::st {

using Metadata = std::map<std::string, std::string>;

// Serialises (name, tensor) pairs (CPU-copied, contiguous) to bytes / to a file (atomically).
std::string serialize(const std::vector<std::pair<std::string, at::Tensor>>& tensors, const Metadata& meta = {});
void save(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
          const Metadata& meta = {});

struct File {
  std::vector<std::pair<std::string, at::Tensor>> tensors;  // in file order, owning CPU tensors
  Metadata metadata;
  at::Tensor get(const std::string& name) const;            // throws naming the missing tensor
  bool has(const std::string& name) const;
};
// The file stays mapped while any tensor views it: if another process truncates it meanwhile, the
// first touch of a lost page prints "qforge: error: <path> changed or was truncated while mapped ..."
// and exits 1 (a SIGBUS handler, installed at the first mapping, knows every live mapping's file).
// populate=false skips the up-front MADV_POPULATE_READ: pages come in as tensors are touched (a
// one-pass reader that drop_pages() each tensor then never holds the whole file resident).
File load(const std::string& path, bool populate = true);
// Only the validated header (names, dtypes, shapes, offsets): no tensor data is read.
Header read_header(const std::string& path);
at::ScalarType scalar_type(DType d);
// Releases the resident pages under a tensor that views a load()ed file mapping (MADV_DONTNEED on
// the page-aligned interior; untouched data is re-read from the file if used again). For streaming
// a model out once (export). Returns false, touching nothing, for any other memory.
bool drop_pages(const at::Tensor& t);

std::string dtype_name(at::ScalarType t);  // "F32", "BF16", ...

}  // namespace qf::st
