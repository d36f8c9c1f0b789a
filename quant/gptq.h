// GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
// Transformers", 2023), as the reference implementation (IST-DASLab/gptq) and GPTQModel run it:
// H = 2/n sum x x^T over the calibration inputs of one linear, dead columns (H_ii = 0) zeroed,
// optional act-order (columns by decreasing H_ii), dampening damp * mean(diag H) on the diagonal,
// upper Cholesky factor of H^-1, columns quantized one at a time with the error spread over the
// not-yet-quantized columns, lazily in blocks of `block_size` columns.
// Invariants: the weights come out in any QuantSpec that GPTQ can quantize column by column
// (affine integer specs; llama.cpp's 32-element single-scale blocks q8_0 q4_0 q4_1 q5_0 q5_1),
// packed exactly as QuantizedLinear stores them (unpack_weight(packed) == weight, checked); with
// H = I (no error to spread) the result equals round-to-nearest bit for bit.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

#include "core/config.h"
#include "quant/ptq_config.h"
#include "quant/qat.h"
#include "quant/spec.h"

namespace qf::quant {


// One weight matrix after PTQ: the dequantized weight and the packed storage QuantizedLinear holds.
struct QuantizedWeight {
  at::Tensor weight;     // float32 [rows, cols]
  // A float weight for QAT to start from: the input weight moved just inside the rounding bin of
  // GPTQ's choice (unchanged where GPTQ agrees with rounding), so fake quant reproduces GPTQ while
  // the weights keep their position inside the bins (latent weights sitting on grid points would
  // need half a step of gradient before any code flips).
  at::Tensor latent;
  PackedStorage packed;  // qweight / scales / zeros as quant::register_packed lays them out
  double damp = 0;       // the dampening that made H positive definite (after escalation)
};

// Empty when GPTQ can quantize `spec`; otherwise why not.
std::string gptq_unsupported(const QuantSpec& spec);

// Quantizes W [rows, cols] given its inputs' Hessian H [cols, cols]. When H + damp is not positive
// definite, the dampening grows x10 up to four times (logged); then qf::Error names `name`.
QuantizedWeight gptq_quantize(const at::Tensor& W, const at::Tensor& H, const QuantSpec& spec, const GptqConfig& cfg,
                              const std::string& name);

// Relative output error of Wq against W for inputs with Hessian H: tr(dW H dW^T) / tr(W H W^T).
double output_error(const at::Tensor& W, const at::Tensor& Wq, const at::Tensor& H);

}  // namespace qf::quant
