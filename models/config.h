// Model hyper-parameters (the `model:` section). Invariant: a validated ModelConfig always builds;
// field names mirror Hugging Face config.json semantics so import/export maps 1:1.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace qf::models {

enum class Family { Llama, Qwen3, Gemma2, Gemma3, Phi3, Gpt2, Opt };
enum class RopeScaling { None, Linear, Llama3, LongRope };
enum class DType { F32, BF16 };
// The recipe spellings: model.family (from the architecture specs, models/arch.cpp),
// model.rope_scaling.type, model.dtype (inline: torch-free readers such as models/hf_config use them
// without the model library).
const cfg::Names<Family>& family_names();
inline const cfg::Names<RopeScaling>& rope_scaling_names() {
  static const cfg::Names<RopeScaling> n{
      {"none", RopeScaling::None}, {"linear", RopeScaling::Linear}, {"llama3", RopeScaling::Llama3},
      {"longrope", RopeScaling::LongRope}};
  return n;
}
inline const cfg::Names<DType>& dtype_names() {
  static const cfg::Names<DType> n{{"fp32", DType::F32}, {"bf16", DType::BF16}};
  return n;
}

struct ModelConfig {
  Family family = Family::Llama;
  int64_t vocab_size = 0;       // 0 = take it from the tokenizer
  int64_t dim = 256;            // hidden_size
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 0;       // 0 = n_heads (MHA); < n_heads = GQA
  int64_t head_dim = 0;         // 0 = dim / n_heads
  int64_t ffn_dim = 0;          // 0 = llama: 8/3*dim rounded up to 64; gpt2: 4*dim
  int64_t max_seq_len = 1024;   // max_position_embeddings
  double rope_theta = 10000.0;
  RopeScaling rope_scaling = RopeScaling::None;
  double rope_factor = 1.0;
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 4.0;
  int64_t rope_original_max_seq_len = 8192;
  // longrope (Phi-3): per-frequency divisors, short up to rope_original_max_seq_len positions, long
  // beyond; cos/sin times rope_attention_factor (0 = sqrt(1 + ln(factor) / ln(original))).
  std::vector<double> rope_short_factor, rope_long_factor;
  double rope_attention_factor = 0.0;
  double partial_rotary = 1.0;  // RoPE on the first partial_rotary * head_dim dims of each head (Phi-4-mini)
  double norm_eps = 1e-5;
  bool qkv_bias = false;        // Qwen2: true
  bool qk_norm = false;         // Qwen3: RMSNorm over each head's q and k before RoPE
  int64_t sliding_window = 0;   // > 0: local attention, query i sees keys (i - sliding_window, i] (Mistral, Qwen2)
  std::vector<int64_t> sliding_layers;  // the layers that use it; empty = every layer
  double rope_local_theta = 0.0;  // > 0: windowed layers' RoPE base, without rope scaling (Gemma 3)
  double query_pre_attn_scalar = 0.0;  // > 0: attention scores scale by its -1/2 power, not head_dim's (Gemma)
  double attn_softcap = 0.0;    // > 0: scores -> cap * tanh(scores / cap) (Gemma 2)
  double final_softcap = 0.0;   // > 0: logits -> cap * tanh(logits / cap) (Gemma 2)
  bool tie_embeddings = false;
  int64_t embed_proj_dim = 0;   // OPT's word_embed_proj_dim: embeddings this wide, project_in/out (0 = dim)
  bool post_norm = false;       // OPT do_layer_norm_before = false: LayerNorm after each residual add
  DType dtype = DType::F32;
  double init_std = 0.02;
  std::string from;             // a Hugging Face checkpoint dir: architecture + weights come from it

  int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int64_t hdim() const { return head_dim > 0 ? head_dim : dim / n_heads; }
  int64_t embed_width() const { return embed_proj_dim > 0 ? embed_proj_dim : dim; }
  int64_t rotary_dim() const { return static_cast<int64_t>(static_cast<double>(hdim()) * partial_rotary); }
  int64_t ffn() const;
  // The attention window of layer i (0 = full causal attention).
  int64_t window(int64_t layer) const {
    if (sliding_window <= 0) return 0;
    if (sliding_layers.empty()) return sliding_window;
    for (auto l : sliding_layers)
      if (l == layer) return sliding_window;
    return 0;
  }
  static ModelConfig from_config(cfg::Reader& r);  // validates; calls r.finish()
  std::string family_name() const { return cfg::name_of(family_names(), family); }
};

}  // namespace qf::models
