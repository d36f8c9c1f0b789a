// 8-bit blockwise AdamW with bitsandbytes' AdamW8bit semantics (bnb.optim.AdamW8bit of bitsandbytes
// 0.50.2 with its defaults: min_8bit_size 4096, no percentile clipping, no max_unorm, 256-element
// blocks) and its CPU arithmetic.
// Invariants:
//  - a parameter of >= 4096 elements keeps its two moments as uint8 codes: m in the signed dynamic
//    map, v in the unsigned one, each with one fp32 absmax per 256 consecutive elements of the
//    flattened tensor (2 bytes + 8/256 bytes per element, vs AdamW's 8); a smaller one keeps fp32
//    moments and takes bitsandbytes' 32-bit update;
//  - on the CPU, codes, absmax and updated parameters equal bitsandbytes' for the same parameters,
//    gradients and hyperparameters, bit for bit, step after step (tests/interop/test_bnb_adamw8bit.py);
//    on CUDA the same ATen ops run there (same codes from the same fp32 values; the fp32 update may
//    round differently in the last bit);
//  - large parameters are processed in chunks of whole blocks (bounded temporary memory); the result
//    does not depend on the chunk size.
// The param groups take torch::optim::AdamWOptions (lr, betas, eps, weight_decay; amsgrad must be
// false), so a caller sets the learning rate exactly as for torch::optim::AdamW.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qf::trainer {

constexpr int64_t kAdam8BlockSize = 256;   // bitsandbytes' blocksize for blockwise optimizer state
constexpr int64_t kAdam8MinSize = 4096;    // min_8bit_size: smaller parameters keep fp32 moments

// bitsandbytes create_dynamic_map(signed): 256 sorted fp32 codes, in [-0.993, 1] (signed) or [0, 1].
const std::array<float, 256>& dynamic_map(bool is_signed);

// Blockwise 8-bit codes of an fp32 tensor (any device): codes uint8 in x's shape, absmax fp32
// [ceil(numel / 256)]. The code of z = x * (1 / absmax) is the one bitsandbytes' CPU quantize_blockwise
// picks: its lookup search is equivalent to rounding z to a 65536-point grid over [-1, 1] and taking
// the code nearest that grid point (ties to the lower code), which differs from the nearest code by up
// to a few codes near zero (0 itself becomes code 131 = 2.1e-5 signed, 7 = 1.6e-5 unsigned). An
// all-zero block has absmax 0 and code 0.
struct Blockwise8 {
  at::Tensor codes, absmax;
};
Blockwise8 quantize_blockwise8(const at::Tensor& x, bool is_signed);
// code[codes] * absmax of its block, fp32, in codes' shape (bitsandbytes' dequantize_blockwise).
at::Tensor dequantize_blockwise8(const at::Tensor& codes, const at::Tensor& absmax, bool is_signed);

// Per-parameter state, with bitsandbytes' names: state1 = m, state2 = v.
struct AdamW8bitParamState : public torch::optim::OptimizerCloneableParamState<AdamW8bitParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(at::Tensor, state1);   // uint8 codes (8-bit) or fp32 (32-bit), in the parameter's shape
  TORCH_ARG(at::Tensor, state2);
  TORCH_ARG(at::Tensor, absmax1);  // fp32 [ceil(numel / 256)]; undefined for 32-bit state
  TORCH_ARG(at::Tensor, absmax2);

 public:
  bool is_8bit() const { return state1().defined() && state1().scalar_type() == at::kByte; }
};

class AdamW8bit : public torch::optim::Optimizer {
 public:
  explicit AdamW8bit(std::vector<torch::optim::OptimizerParamGroup> groups,
                     torch::optim::AdamWOptions defaults = torch::optim::AdamWOptions());
  explicit AdamW8bit(std::vector<at::Tensor> params,
                     torch::optim::AdamWOptions defaults = torch::optim::AdamWOptions());
  // One update of every parameter with a gradient (bitsandbytes' Optimizer8bit.step).
  at::Tensor step(LossClosure closure = nullptr) override;
  // Elements per chunk of a large parameter's update (a multiple of 256; tests lower it).
  void set_chunk_elements(int64_t n);

 private:
  void update(at::Tensor& p, const torch::optim::AdamWOptions& o, AdamW8bitParamState& s);
  int64_t chunk_ = int64_t{1} << 22;
};

// Checkpoint form (trainer/checkpoint.*): for every trainable parameter of `m` with state,
// "state1/<name>", "state2/<name>", "step/<name>", and for 8-bit state "absmax1/<name>",
// "absmax2/<name>" (bitsandbytes' state_dict names).
std::vector<std::pair<std::string, at::Tensor>> adamw8bit_state(const torch::nn::Module& m, AdamW8bit& opt);
// Restores it for the parameters `opt` holds. Every entry must be 8-bit AdamW state of a trainable
// parameter of `m` that fits it (shape, dtype, block count, 8-bit exactly when it has >= 4096
// elements); anything else throws InputError naming `origin`, the entry and what was expected, then
// `advice`.
void load_adamw8bit_state(const torch::nn::Module& m, AdamW8bit& opt,
                          const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& origin,
                          const std::string& advice);

}  // namespace qf::trainer
