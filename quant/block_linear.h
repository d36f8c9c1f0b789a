// A frozen linear whose weight is held as llama.cpp (ggml) blocks: LoRA on the served base
// (`peft.base: q4_k`, any block type of quant/ggml_types.h). The buffer `weight` is the uint8
// [out, n_blocks * type_size] row layout a GGUF file stores for that weight (ggml::quantize of the
// float weight, or the file's own bytes), so what the adapter trains against is exactly what ships.
// Invariants:
//  - forward(x) = x · dequantize(blocks)^T + bias through ggml::dequantize's one dispatch (CPU
//    reference loop, the quant/cuda kernel where the rule has one, ATen ops otherwise); the base
//    gets no gradient (it has no parameters; backward re-dequantizes, models::FrozenLinear);
//  - forward_merged(x, delta) = x · fq_T(dequantize(blocks) + delta)^T + bias with the type's fake
//    quant and a straight-through gradient to delta: LoRA's exact merge, so quantize(W + s·BA)
//    into the same type reproduces the trained layer bit for bit (packed());
//  - packed(w) is the QuantizedLinear convert would hold for this type: its own blocks, or
//    ggml::quantize(w) — the exporters write its qweight as the GGUF tensor's bytes;
//  - with record_type() (bases whose type varies per linear: peft.base mix / gguf) the
//    buffer `ggml_type` (int32 [1], the GGUF type id) saves the type with the blocks, so a checkpoint
//    rebuilds each linear in its own type (peft::install_saved_bases); a single-type base has none.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <ostream>

#include "models/linear.h"
#include "quant/qat.h"
#include "quant/spec.h"

namespace qf::quant {

class BlockLinear : public models::FrozenLinear {
 public:
  // Keeps `blocks` (uint8 [out, cols / block_size(rule) * type_size(rule)], any device; adopted, not
  // copied) as the weight of a linear with `cols` inputs; bias [out] or undefined. Throws qf::Error
  // naming the rule, the expected and the given shape when they do not fit.
  BlockLinear(Rule rule, const at::Tensor& blocks, int64_t cols, const at::Tensor& bias);
  // Quantizes a [out, in] float weight (any float dtype, any device) into `rule`'s blocks: the same
  // bytes llama.cpp's reference quantizer writes for those float32 rows. in % block_size must be 0.
  BlockLinear(const at::Tensor& weight, const at::Tensor& bias, Rule rule);
  at::Tensor materialize(at::ScalarType dtype) const override;  // dequantize(blocks) [out, in]
  // LoRA exact merge: x · fq(dequantize(blocks) + delta)^T + bias, gradient straight through to delta.
  at::Tensor forward_merged(const at::Tensor& x, const at::Tensor& delta) const;
  // fq(dequantize(blocks) + delta) without autograd (float32): the merged layer's weight.
  at::Tensor merged_fake_quant(const at::Tensor& delta) const;
  // The converted layer: a QuantizedLinear of this type holding these blocks (weight undefined) or
  // ggml::quantize(weight) (a merged float weight [out, in]), and the bias.
  std::shared_ptr<QuantizedLinear> packed(const at::Tensor& weight = {}) const;
  const QuantSpec& spec() const { return spec_; }  // the type's preset (quant/spec.h)
  int64_t stored_bytes() const;                    // blocks + bias
  // Adds the `ggml_type` buffer (see above); returns *this.
  BlockLinear& record_type();
  void pretty_print(std::ostream& s) const override;
  at::Tensor weight;  // uint8 blocks, ggml's row layout
  const Rule rule;

 private:
  QuantSpec spec_;
};

}  // namespace qf::quant
