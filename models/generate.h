// Autoregressive sampling with a KV cache. Invariant: temperature 0 is greedy and equals
// argmax over a full forward at every step; sampling is reproducible for a given seed.
#pragma once
#include <cstdint>
#include <vector>

#include "core/config.h"
#include "models/transformer.h"

namespace qf::models {

struct SamplingConfig {
  int64_t max_new_tokens = 64;
  double temperature = 0.8;  // 0 = greedy
  int64_t top_k = 40;        // 0 = off
  double top_p = 0.95;       // 1 = off
  int64_t seed = 0;
  bool stop_at_eos = true;
  static SamplingConfig from_config(cfg::Reader& r);
};

// Returns only the newly generated ids (stops early at eos_id when stop_at_eos and eos_id >= 0).
std::vector<int64_t> generate(CausalLM& model, const std::vector<int64_t>& prompt, const SamplingConfig& s,
                              int64_t eos_id);
// Filters logits [V] (float) by top-k / top-p; returns logits with removed entries at -inf.
at::Tensor filter_logits(at::Tensor logits, int64_t top_k, double top_p);

}  // namespace qf::models
