// CUDA kernels that dequantize llama.cpp blocks (q8_0, q4_0, q4_1) and NF4 to float32/bf16/fp16 on
// the GPU. Callers never pick them directly: each op has one dispatch function (ggml::dequantize,
// nf4_dequantize) that runs the kernel when use_cuda_kernel(t) holds and the portable ATen path
// otherwise, so a build without nvcc still runs on a GPU.
// Invariant: each kernel equals the CPU reference (ggml::dequantize / nf4_dequantize on the CPU)
// bit for bit.
// dequant.cu defines these when the CUDA toolkit is present (QFORGE_WITH_CUDA); otherwise
// dequant_stub.cpp does, cuda_kernels_built() is false and the kernel entry points are unreachable.
#pragma once
#include <ATen/core/Tensor.h>

#include "quant/spec.h"

namespace qf::quant {

// Whether this build compiled the kernels below (fixed when qforge_quant is built).
bool cuda_kernels_built();
// The one test every dequant dispatch makes: t lives on a CUDA device and the kernels exist.
inline bool use_cuda_kernel(const at::Tensor& t) { return t.is_cuda() && cuda_kernels_built(); }

namespace cuda {

// The llama.cpp block rules dequantize_ggml has a kernel for (q8_0, q4_0, q4_1).
inline bool has_ggml_kernel(Rule r) { return r == Rule::GgmlQ8_0 || r == Rule::GgmlQ4_0 || r == Rule::GgmlQ4_1; }
// blocks: uint8 [rows, n_blocks * type_size] on a CUDA device -> [rows, cols] of `out` dtype.
at::Tensor dequantize_ggml(const at::Tensor& blocks, Rule rule, int64_t cols, at::ScalarType out);
// NF4 (bitsandbytes layout, high nibble first): packed uint8 [rows*cols/2] and fp32 per-block scales
// (already un-nested) on a CUDA device -> [rows, cols] of `out` dtype.
at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, int64_t rows,
                          int64_t cols, at::ScalarType out);

}  // namespace cuda
}  // namespace qf::quant
