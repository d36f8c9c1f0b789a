// llama.cpp's (ggml's) non-linear, ternary and binary block formats: IQ4_NL, IQ4_XS, TQ1_0, TQ2_0,
// Q1_0, Q2_0, block by block, bit-exact with what ggml_quantize_chunk writes for them at llama.cpp
// 0c1e570 (ggml-quants.c: quantize_iq4_nl / quantize_iq4_xs via quantize_row_iq4_nl_impl with
// ntry = 7, with or without quant_weights; quantize_row_tq1_0_ref, quantize_row_tq2_0_ref,
// quantize_row_q1_0_ref, quantize_row_q2_0_ref) and with dequantize_row_* for each.
// Invariants: dequant(quant(x)) is what llama.cpp computes from those bytes; the importance weights
// change IQ4_NL / IQ4_XS blocks only (ggml ignores them for the other four, and so does this file).
// quant/ggml_blocks.cpp dispatches to these codecs through its format table; geometry (block, bytes,
// GGUF id) lives in quant/ggml_types.cpp's rows.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "quant/spec.h"

namespace qf::quant::ggml::iq {

// One block, unweighted (ggml_quantize_chunk without an imatrix): x (the block's values) -> y (the
// type's bytes).
void quant_iq4_nl(const float* x, uint8_t* y);  // 32 values -> 18 bytes
void quant_iq4_xs(const float* x, uint8_t* y);  // 256 values -> 136 bytes
void quant_tq1_0(const float* x, uint8_t* y);   // 256 values -> 54 bytes
void quant_tq2_0(const float* x, uint8_t* y);   // 256 values -> 66 bytes
void quant_q1_0(const float* x, uint8_t* y);    // 128 values -> 18 bytes
void quant_q2_0(const float* x, uint8_t* y);    // 64 values -> 18 bytes
// One row of n values with its importance weights qw (one per column: quantize_iq4_nl /
// quantize_iq4_xs with quant_weights). TQ1_0, TQ2_0, Q1_0, Q2_0 have none: ggml ignores the weights.
void quant_row_iq4_nl_imatrix(const float* x, const float* qw, int64_t n, uint8_t* y);
void quant_row_iq4_xs_imatrix(const float* x, const float* qw, int64_t n, uint8_t* y);

void dequant_iq4_nl(const uint8_t* y, float* x);
void dequant_iq4_xs(const uint8_t* y, float* x);
void dequant_tq1_0(const uint8_t* y, float* x);
void dequant_tq2_0(const uint8_t* y, float* x);
void dequant_q1_0(const uint8_t* y, float* x);
void dequant_q2_0(const uint8_t* y, float* x);

// The dequantizers as ATen ops on b's device (the same float32 operations as dequant_*):
// b = uint8 [n_blocks, type_size] (one block per row) -> float32 [n_blocks, block].
at::Tensor dequantize_blocks_aten(const at::Tensor& b, Rule r);

}  // namespace qf::quant::ggml::iq
