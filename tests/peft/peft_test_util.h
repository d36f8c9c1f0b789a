// Shared by the tests/peft suites: the token ids every LoRA test forwards, the model's logits on them,
// and non-zero LoRA B factors (a fresh adapter's B is zero, which hides most mistakes).
#pragma once
#include <ATen/ATen.h>

#include "models/transformer.h"
#include "peft/lora.h"

namespace qf::testing {

// [2, 12] ids below 64 (tiny_llama's vocabulary), the same stream in every test.
inline at::Tensor lora_ids() {
  auto g = at::detail::createCPUGenerator(3);
  return at::randint(64, {2, 12}, g, at::kLong);
}

inline at::Tensor lora_logits(models::CausalLM& m) {
  at::NoGradGuard ng;
  return m.forward(lora_ids());
}

// Every LoRA layer's B set to N(0, 1) * scale from a fixed stream.
inline void randomize_b(torch::nn::Module& m, double scale = 0.2) {
  at::NoGradGuard ng;
  auto g = at::detail::createCPUGenerator(9);
  for (auto& [n, l] : peft::lora_layers(m)) l->lora_B->weight.copy_(at::randn(l->lora_B->weight.sizes(), g) * scale);
}

}  // namespace qf::testing
