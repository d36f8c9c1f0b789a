// NF4 (QLoRA's 4-bit NormalFloat), bit-exact with bitsandbytes 0.50 (functional.quantize_4bit with
// quant_type="nf4" on CPU, and its double quantization of the block scales).
// Invariants:
//  - packed bytes, absmax, nested absmax and offset equal bitsandbytes' for the same fp32/bf16/fp16
//    input (tests/interop/test_bnb_nf4.py checks this on random tensors of several shapes);
//  - dequantize(quantize(w)) equals bitsandbytes.functional.dequantize_4bit bit for bit (fp32).
// Layout (formats.md): element 2i in the HIGH nibble of byte i; blocks of `blocksize` consecutive
// elements of the flattened tensor, scale = absmax of the block; with double quant the fp32 absmax
// vector minus its mean (`offset`) is quantized blockwise (256) with the signed 8-bit dynamic map.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <vector>

#include "models/linear.h"

namespace qf::quant {

// The 16 NF4 code values, index = 4-bit code (bitsandbytes get_4bit_type("nf4")).
extern const std::array<float, 16> kNf4Code;
// bitsandbytes create_dynamic_map(signed=True): 256 sorted fp32 values in [-0.993, 1].
const std::array<float, 256>& dynamic_map_signed();
// create_dynamic_map(signed=False): 256 sorted fp32 values in [0, 1] (8-bit optimizers' second moment).
const std::array<float, 256>& dynamic_map_unsigned();

struct Nf4Tensor {
  at::Tensor packed;         // uint8 [ceil(numel/2)]
  at::Tensor absmax;         // fp32 [n_blocks], or uint8 [n_blocks] codes when double-quantized
  at::Tensor nested_absmax;  // fp32 [ceil(n_blocks/256)] (double quant only)
  float offset = 0.f;        // mean of the fp32 absmax (double quant only)
  int64_t blocksize = 64;
  int64_t nested_blocksize = 256;
  bool double_quant = true;
  std::vector<int64_t> shape;
  int64_t numel() const;
  int64_t bytes() const;  // storage bytes (packed + scales)
};

// Checks blocksize is a power of two in [32, 4096] (bitsandbytes' allowed set); throws ConfigError.
void check_nf4_blocksize(int64_t blocksize, const std::string& key);

// w: fp32/bf16/fp16 on the CPU (any shape; flattened row-major).
Nf4Tensor nf4_quantize(const at::Tensor& w, int64_t blocksize = 64, bool double_quant = true);
// The fp32 per-block scales (dequantizing the nested statistics when double-quantized).
at::Tensor nf4_scales(const Nf4Tensor& t);
// Dequantized tensor of t.shape in `dtype` (fp32/bf16/fp16; computed in fp32, then cast, as
// bitsandbytes does), on t.packed's device. The one dispatch for this op: on the CPU the reference
// loop; on CUDA the quant/cuda kernel when the build has it; anywhere else nf4_dequantize_aten.
// All equal bit for bit (tests/quant/dequant_dispatch_test.cpp).
at::Tensor nf4_dequantize(const Nf4Tensor& t, at::ScalarType dtype = at::kFloat);
// The portable path of nf4_dequantize: the same fp32 product and cast as ATen ops on t.packed's
// device. What a build without nvcc runs on a GPU.
at::Tensor nf4_dequantize_aten(const Nf4Tensor& t, at::ScalarType dtype = at::kFloat);

// bitsandbytes' 8-bit blockwise quantization with the signed dynamic map (its CPU
// quantize_blockwise, as used for the double quantization): per-block absmax, then the code its
// 65536-point grid table gives for x / absmax.
void quantize_blockwise8(const float* x, int64_t n, int64_t blocksize, uint8_t* q, float* absmax);

// A frozen linear layer whose weight is stored as NF4 (QLoRA's base layer). The packed weight and
// statistics are buffers (never seen by the optimizer); forward dequantizes into the input's dtype
// for the matmul, and backward re-dequantizes (models::FrozenLinear), so only the 4-bit copy
// persists between forward and backward (bitsandbytes' MatMul4Bit does the same).
class Nf4Linear : public models::FrozenLinear {
 public:
  Nf4Linear(models::LinearBase& dense, int64_t blocksize, bool double_quant);
  // From a [out, in] weight (any float dtype, any device) and an optional bias: the same module as
  // from a dense layer holding them (QLoRA's streaming load quantizes straight from the file mapping).
  Nf4Linear(const at::Tensor& weight, const at::Tensor& bias, int64_t blocksize, bool double_quant);
  // From an already quantized [out, in] state (t.shape), kept byte for byte (a bitsandbytes NF4
  // checkpoint's frozen base: models::bnb_packed_nf4). t.nested_blocksize must be 256.
  Nf4Linear(const Nf4Tensor& t, const at::Tensor& bias);
  at::Tensor materialize(at::ScalarType dtype) const override;  // dequantized [out, in]
  void pretty_print(std::ostream& s) const override;
  Nf4Tensor state() const;  // a view of the buffers as an Nf4Tensor
  // Buffers: bitsandbytes' serialized names (weight = packed codes).
  at::Tensor weight, absmax, nested_absmax, offset;
  const int64_t blocksize;
  const bool double_quant;
};

}  // namespace qf::quant
