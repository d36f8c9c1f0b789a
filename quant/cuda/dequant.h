// CUDA dequantization of llama.cpp blocks (q8_0, q4_0, q4_1) and NF4 to float32/bf16/fp16 on the GPU.
// Invariant: equals ggml::dequantize on the CPU bit for bit (fp16 scale times small integer).
// Compiled when the CUDA toolkit is present (QFORGE_WITH_CUDA); without it dequant_stub.cpp defines
// these and compiled_with_cuda() is false: callers check it before taking the CUDA path.
#pragma once
#include <ATen/core/Tensor.h>

#include "quant/spec.h"

namespace qf::quant::cuda {

bool compiled_with_cuda();
// blocks: uint8 [rows, n_blocks * type_size] on a CUDA device -> [rows, cols] of `out` dtype.
at::Tensor dequantize_ggml(const at::Tensor& blocks, Rule rule, int64_t cols, at::ScalarType out);
// NF4 (bitsandbytes layout, high nibble first): packed uint8 [rows*cols/2] and fp32 per-block scales
// (already un-nested) on a CUDA device -> [rows, cols] of `out` dtype; equals nf4_dequantize on the CPU.
at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& scales, int64_t blocksize, int64_t rows,
                          int64_t cols, at::ScalarType out);

}  // namespace qf::quant::cuda
