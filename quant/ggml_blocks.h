// llama.cpp (ggml) block formats, bit-exact with ggml-quants.c's reference quantizers
// (quantize_row_q8_0_ref, q4_0, q4_1, q5_0, q5_1, q4_K, q6_K) and their dequantizers.
// Invariant: dequantize(quantize(w)) == fake_quant(w) bit for bit, and quantize(w)'s bytes equal
// what llama.cpp / gguf-py write for the same float32 rows.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "quant/spec.h"

namespace qf::quant::ggml {

int64_t block_size(Rule r);  // 32 (q8_0/q4_0/q4_1) or 256 (q4_k/q6_k)
int64_t type_size(Rule r);   // bytes per block: 34, 18, 20, 22, 24, 144, 210

// w: float32 [rows, cols], cols % block_size == 0 (throws qf::Error naming both numbers otherwise).
// Returns uint8 [rows, cols / block_size * type_size]: ggml's row layout.
at::Tensor quantize(const at::Tensor& w, Rule r);
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
