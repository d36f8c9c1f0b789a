// Affine integer quantization and FP8, numerically identical to torchao's fake quantizers
// (torchao.quantization.qat IntxFakeQuantizer / quant_primitives), so a torchao user gets the same
// numbers: symmetric per-channel/per-group (get_group_qparams_symmetric), asymmetric per-group
// (get_groupwise_affine_qparams), asymmetric per-token activations (choose_qparams_affine
// ASYMMETRIC with per-token blocks), per-tensor; FP8 E4M3/E5M2 saturating with amax scaling.
// Invariant: fake_quant(x) == dequantize(quantize(x)) bit for bit for the same qparams.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <utility>

#include "quant/spec.h"

namespace qf::quant {

// Scales and zero points for x viewed as [rows, n_blocks, block] along its last dimension.
// scale: float32 (already rounded through spec.scale_dtype), shape [rows, n_blocks]; zero_point:
// same shape; 0 for symmetric, an integer for per-token and for Rule::IntZeroPoint (AutoAWQ's /
// GPTQ's z in [0, 2^b-1], weight = (q - z) * scale), and torchao's FLOAT-domain zero point
// (min + scale * 2^(b-1), rounded through the scale dtype) for other asymmetric weights
// (see quant/affine.cpp for the exact formulas). For per-token specs, rows = all leading
// dims flattened and n_blocks = 1. For per-tensor: [1, 1].
struct QParams {
  at::Tensor scale, zero_point;
};
QParams choose_qparams(const at::Tensor& x, const QuantSpec& spec);
// Integer codes (int32) for x under qp, clamped to [qmin, qmax], same shape as x.
at::Tensor quantize_affine(const at::Tensor& x, const QParams& qp, const QuantSpec& spec);
at::Tensor dequantize_affine(const at::Tensor& q, const QParams& qp, const QuantSpec& spec, at::ScalarType out);
// dequantize(quantize(x)) plus the STE mask (true where x/scale + zp fell inside [qmin, qmax] before clamping).
std::pair<at::Tensor, at::Tensor> fake_quant_affine(const at::Tensor& x, const QParams& qp, const QuantSpec& spec);
// x viewed as [rows, n_blocks, block] along its last dimension for the spec's granularity
// (throws naming both numbers when a group size does not divide the last dimension).
std::array<int64_t, 3> blocks_of(const at::Tensor& x, const QuantSpec& spec);
// FP8 codes (float8 dtype, [rows, n_blocks, block]) and their float32 scales [rows, n_blocks, 1],
// exactly as fake_quant_fp8 computes them (fake_quant_fp8 == codes.float() * scales).
std::pair<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, const QuantSpec& spec);
// FP8: per-tensor or per-channel scale = amax / max_finite (float32), x / scale cast to the fp8 dtype
// (saturating: clamped to +-max_finite first) and back, times scale.
at::Tensor fake_quant_fp8(const at::Tensor& x, const QuantSpec& spec);

}  // namespace qf::quant
