// The llama.cpp tensor types qforge only reads (GGUF in, never computes or writes): the IQ family's
// grid formats (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M), the microscaling FP4 formats
// (MXFP4, NVFP4) and the plain integer / double types (I8, I16, I32, I64, F64). Their rows extend the
// one table (quant/ggml_types.h) for reading only: gguf_type_geometry answers for both.
// Invariant: dequantize_more computes what gguf-py 0.19's dequantize (gguf/quants.py) computes, bit
// for bit: the same float32 operations in the same order, on the grids it holds (quant/ggml_grids.inc,
// generated from gguf-py by scripts/gen_ggml_grids.py). Torch-free (the GGUF fuzz target builds it).
#pragma once
#include <cstdint>
#include <string>

#include "core/gguf_file.h"

namespace qf::quant::ggml {

struct MoreType {
  uint32_t gguf_id;
  const char* gguf_name;  // gguf-py's spelling
  int64_t block, bytes;   // values and bytes per block (ggml-common.h)
  void (*dequant)(const uint8_t* block, float* out);  // one block
};
// nullptr when `id` is not one of these rows.
const MoreType* more_type(uint32_t id);
// The block geometry of any ggml type qforge reads (the table's rows, then these); nullptr otherwise.
const gguf_in::TypeGeometry* gguf_type_geometry(uint32_t id);
// gguf-py's name of any type id ("Q4_K", "IQ2_XS"; "type <id>" when unknown).
std::string gguf_type_name(uint32_t id);
// Dequantizes n values (a multiple of the block) of type `t` from `src` into float32 `dst`.
void dequantize_more(const MoreType& t, const uint8_t* src, float* dst, int64_t n);

}  // namespace qf::quant::ggml
