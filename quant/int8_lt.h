// LLM.int8 (bitsandbytes 0.50 Int8Params + Linear8bitLt with has_fp16_weights=False): a frozen
// linear stored as int8 rows with one fp32 absmax per output row, multiplied by the outlier-aware
// mixed-precision matmul (MatMul8bitLt).
// Invariants:
//  - int8_quantize(w) == Int8Params._quantize on the CPU byte for byte: the weight is cast to fp16
//    first, SCB = fp32 row absmax of that fp16 tensor, CB = round_half_even(w16 * (reciprocal(SCB) *
//    127)) as int8 (torch's `127.0 / t` is reciprocal(t) * 127); no outlier zeroing for the weight
//    (Int8Params quantizes with threshold 0). A row of zeros gives CB 0 and SCB 0;
//  - int8_lt_forward computes bitsandbytes' CPU/default-backend MatMul8bitLt forward with the same
//    ATen ops in the same order: x cast to fp16; with threshold > 0 the entries |x| >= threshold are
//    zeroed for the row statistics and the quantization, and every column holding one (an outlier
//    column) is zeroed in the int8 activations when there is more than one row; CA x CB^T exactly in
//    int32; times (SCA[row] * SCB[col]) * 6.200124e-05 in fp32 (+ bias), cast to x's dtype; then the
//    outlier columns of x (original dtype) times the dequantized weight columns are added (addmm);
//  - the gradient to x is bitsandbytes' too: grad @ (CB in x's dtype * (SCB * (1/127))). The weight
//    and its statistics are frozen buffers (no gradient).
// On CUDA the same ATen ops run (int32 product through at::_int_mm where its shape rules allow, else
// an exact fp64 product); bitsandbytes' own CUDA kernels fuse some steps, so there the result agrees
// within rounding rather than bit for bit.
#pragma once
#include <ATen/core/Tensor.h>

#include "models/linear.h"

namespace qf::quant {

// bitsandbytes' Int8Params state: CB int8 [out, in] (the `weight` a Linear8bitLt state dict holds),
// SCB fp32 [out] (its `SCB`).
struct Int8Weight {
  at::Tensor cb, scb;
};

// Int8Params' quantization of a [out, in] float weight (any float dtype and device).
Int8Weight int8_quantize(const at::Tensor& w);
// bitsandbytes.functional.int8_vectorwise_dequant: CB * SCB[row] * 7.874015718698502e-3 in fp32, then
// cast to `dtype` (what transformers' dequantize of an 8-bit model returns).
at::Tensor int8_dequantize(const at::Tensor& cb, const at::Tensor& scb, at::ScalarType dtype = at::kFloat);
// The row-wise int8 activations of int8_vectorwise_quant(a, threshold): codes int8, row absmax fp32
// and the outlier columns (int64, empty without outliers or when threshold is 0).
struct Int8Rows {
  at::Tensor codes, absmax, outlier_cols;
};
Int8Rows int8_vectorwise_quant(const at::Tensor& a_half, double threshold);
// MatMul8bitLt's forward of x [..., in] (fp32/bf16/fp16) through CB/SCB with an optional bias, no
// autograd: [..., out] in x's dtype.
at::Tensor int8_lt_forward(const at::Tensor& x, const at::Tensor& cb, const at::Tensor& scb, const at::Tensor& bias,
                           double threshold);

// The LLM.int8 frozen base: buffers `weight` (CB) and `SCB` under bitsandbytes' state-dict names.
// forward is the mixed-precision int8 matmul with the gradient to x as bitsandbytes computes it;
// materialize (effective weight, merges, exports) is int8_dequantize.
class Int8LtLinear : public models::FrozenLinear {
 public:
  // Quantizes a [out, in] weight (any float dtype, any device) as Int8Params does.
  Int8LtLinear(const at::Tensor& weight, const at::Tensor& bias, double threshold);
  // Keeps an already quantized state (a bitsandbytes 8-bit checkpoint) byte for byte.
  Int8LtLinear(const Int8Weight& w, const at::Tensor& bias, double threshold);
  at::Tensor forward(const at::Tensor& x) override;
  at::Tensor materialize(at::ScalarType dtype) const override { return int8_dequantize(weight, scb, dtype); }
  void pretty_print(std::ostream& s) const override;
  at::Tensor weight, scb;
  const double threshold;  // Linear8bitLt's outlier threshold on the activations (0: all int8)
};

}  // namespace qf::quant
