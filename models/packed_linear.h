// A frozen linear kept as a quantized checkpoint's packed int weight: LoRA on a GPTQ / AWQ /
// compressed-tensors base (`peft.base: packed`) with no float copy of the weight resident.
// Buffers (models/hf_quantized.h PackedInt, GPTQ gptq_v2's layout whatever the file's): qweight
// int32 [ceil(in*bits/32), out], qzeros int32 [groups, ceil(out*bits/32)], scales [groups, out] (the
// file's float dtype), g_idx int32 [in], bias.
// Invariants: materialize() == models::dequantize_linear of the file's parts bit for bit (the weight
// a dequantized load holds), computed per forward on the buffers' device with ATen ops (backward
// re-dequantizes: models::FrozenLinear); the module has no parameters, so the base gets no gradient.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <ostream>
#include <string>

#include "models/hf_quantized.h"
#include "models/linear.h"

namespace qf::models {

class PackedIntLinear : public FrozenLinear {
 public:
  // Adopts p's tensors (bits 2, 4 or 8) for a linear [out, in]; throws qf::Error naming the buffer and
  // the expected shape when they do not fit.
  PackedIntLinear(const PackedInt& p, int64_t out, int64_t in, const at::Tensor& bias);
  // The linear `linear` of a checkpoint quantized as `q` (its parts, checked by load_hf_weights).
  // ConfigError naming the layer for GPTQ int3 (codes straddle words) and compressed-tensors fp8.
  static std::shared_ptr<PackedIntLinear> from_checkpoint(const HfQuant& q, const std::string& linear, int64_t out,
                                                          int64_t in, const std::map<std::string, at::Tensor>& parts,
                                                          const at::Tensor& bias);
  // A zero-filled module of a saved one's geometry, to load that state into (a run's checkpoint
  // rebuilt, peft::install_saved_bases): bits, scale groups and scale dtype as the saved buffers have them.
  static std::shared_ptr<PackedIntLinear> zeros(int bits, int64_t groups, at::ScalarType scale_dtype, int64_t out,
                                                int64_t in, bool bias);
  at::Tensor materialize(at::ScalarType dtype) const override;
  // The buffers as a PackedInt; its group_size is recomputed when g_idx changed since the last call
  // (a state load writes the buffers in place).
  PackedInt state() const;
  int64_t stored_bytes() const;  // packed weight + zeros + scales + g_idx + bias
  void pretty_print(std::ostream& s) const override;
  at::Tensor qweight, qzeros, scales, g_idx;
  const int bits;

 private:
  mutable int64_t group_size_ = 0, g_idx_version_ = -1;
};

}  // namespace qf::models
