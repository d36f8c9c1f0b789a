// Autoregressive sampling with a KV cache. Invariant: temperature 0 is greedy and equals
// argmax over a full forward at every step; sampling is reproducible for a given seed.
#pragma once
#include <cstdint>
#include <functional>
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

// Why generation ended: the max_new_tokens budget, the EOS token, or the model's context
// (cfg.max_seq_len positions: max_position_embeddings of a Hugging Face checkpoint) is full.
enum class StopReason { MaxNewTokens, Eos, Context };
struct Generation {
  std::vector<int64_t> ids;  // the new tokens, without the EOS that stopped generation
  StopReason stop = StopReason::MaxNewTokens;
};
// Samples up to s.max_new_tokens after `prompt`, never past the model's context; stops at eos_id
// when s.stop_at_eos and eos_id >= 0 (the EOS itself is not returned). on_token, when given, sees
// each returned id as soon as it is sampled (for streaming).
Generation generate_ids(CausalLM& model, const std::vector<int64_t>& prompt, const SamplingConfig& s, int64_t eos_id,
                        const std::function<void(int64_t)>& on_token = {});
// generate_ids(...).ids
std::vector<int64_t> generate(CausalLM& model, const std::vector<int64_t>& prompt, const SamplingConfig& s,
                              int64_t eos_id);
// Filters logits [V] (float) by top-k / top-p; returns logits with removed entries at -inf.
at::Tensor filter_logits(at::Tensor logits, int64_t top_k, double top_p);

}  // namespace qf::models
