// llama.cpp (ggml) block formats, bit-exact with ggml-quants.c's reference quantizers
// (quantize_row_q8_0_ref, q4_0, q4_1, q5_0, q5_1, q2_K, q3_K, q4_K, q5_K, q6_K), their
// importance-weighted variants (quantize_row_*_impl) and their dequantizers.
// Invariant: dequantize(quantize(w)) == fake_quant(w) bit for bit, and quantize(w)'s bytes equal
// what llama.cpp / gguf-py write for the same float32 rows.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "quant/spec.h"

namespace qf::quant::ggml {

int64_t block_size(Rule r);  // 32 (q8_0, q4_0, q4_1, q5_0, q5_1) or 256 (the K-quants)
int64_t type_size(Rule r);   // bytes per block (quant/ggml_types.h): q4_0 18 ... q2_K 84, q3_K 110, q6_K 210

// w: float32 [rows, cols], cols % block_size == 0 (throws qf::Error naming both numbers otherwise).
// Returns uint8 [rows, cols / block_size * type_size]: ggml's row layout. The bytes of
// ggml_quantize_chunk(type, w, dst, 0, rows, cols, NULL) (= quantize_row_<type>_ref for these types).
at::Tensor quantize(const at::Tensor& w, Rule r);
// Importance-weighted quantization, what llama-quantize does with --imatrix: the bytes of
// ggml_quantize_chunk(type, w, dst, 0, rows, cols, imatrix), i.e. quantize_<type> with
// quant_weights (quantize_row_<type>_impl row by row; q8_0 ignores the weights). imatrix: float32
// [cols], one importance per input column (llama.cpp's imatrix for this tensor: the mean of x^2 of
// that input over the calibration tokens), finite (qf::Error otherwise). An undefined imatrix is
// quantize(w, r). Not a fake quant: dequantize(quantize(w, r, imatrix), r, cols) gives its values.
at::Tensor quantize(const at::Tensor& w, Rule r, const at::Tensor& imatrix);
// blocks: uint8 [rows, n_blocks * type_size] on any device -> float32 [rows, cols] on that device.
// The one dispatch for this op: on the CPU the reference loop; on CUDA the quant/cuda kernel when
// the build has it and the rule has one (q8_0/q4_0/q4_1); anywhere else dequantize_aten. All equal
// bit for bit (tests/quant/dequant_dispatch_test.cpp).
at::Tensor dequantize(const at::Tensor& blocks, Rule r, int64_t cols);
// The portable path of dequantize: the reference's float32 operations, in its order, as ATen ops on
// blocks' device (every rule). What a build without nvcc runs on a GPU.
at::Tensor dequantize_aten(const at::Tensor& blocks, Rule r, int64_t cols);
// The 32-element formats whose blocks are one scale (q8_0, q4_0, q5_0) or a scale and a minimum
// (q4_1, q5_1) and per-element codes: what GPTQ can quantize column by column.
bool is_simple(Rule r);
// Blocks of a simple format from explicit parts: codes int32 [rows, cols] (q8_0: [-128, 127];
// others unsigned [0, 2^bits - 1]), d (and m for q4_1/q5_1) fp16 [rows, cols / 32].
// pack_simple(codes, d, m) == quantize(w) when codes, d, m are what quantize_row_*_ref computes.
at::Tensor pack_simple(Rule r, const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m);
// dequantize(quantize(w)) computed directly (fast path for QAT forwards; float32 in and out).
at::Tensor fake_quant(const at::Tensor& w, Rule r);

}  // namespace qf::quant::ggml
