#include "models/config.h"

namespace qf::models {

int64_t ModelConfig::ffn() const {
  if (ffn_dim > 0) return ffn_dim;
  if (family == Family::Gpt2) return 4 * dim;
  int64_t h = (8 * dim) / 3;
  return (h + 63) / 64 * 64;
}

ModelConfig ModelConfig::from_config(cfg::Reader& r) {
  ModelConfig c;
  c.family = r.choice<Family>("family", c.family, {{"llama", Family::Llama}, {"gpt2", Family::Gpt2}});
  c.vocab_size = r.i64("vocab_size", c.vocab_size, 0, 1 << 24);
  c.dim = r.i64("dim", c.dim, 8, 1 << 16);
  c.n_layers = r.i64("n_layers", c.n_layers, 1, 1024);
  c.n_heads = r.i64("n_heads", c.n_heads, 1, 1024);
  c.n_kv_heads = r.i64("n_kv_heads", c.n_kv_heads, 0, 1024);
  c.head_dim = r.i64("head_dim", c.head_dim, 0, 4096);
  c.ffn_dim = r.i64("ffn_dim", c.ffn_dim, 0, 1 << 20);
  c.max_seq_len = r.i64("max_seq_len", c.max_seq_len, 8, 1 << 22);
  c.rope_theta = r.f64("rope_theta", c.rope_theta, 1.0, 1e12);
  auto rs = r.child("rope_scaling");
  c.rope_scaling = rs.choice<RopeScaling>("type", c.rope_scaling,
                                          {{"none", RopeScaling::None}, {"linear", RopeScaling::Linear}, {"llama3", RopeScaling::Llama3}});
  c.rope_factor = rs.f64("factor", c.rope_factor, 1.0, 1e6);
  c.rope_low_freq_factor = rs.f64("low_freq_factor", c.rope_low_freq_factor, 1e-6, 1e6);
  c.rope_high_freq_factor = rs.f64("high_freq_factor", c.rope_high_freq_factor, 1e-6, 1e6);
  c.rope_original_max_seq_len = rs.i64("original_max_seq_len", c.rope_original_max_seq_len, 1, 1 << 24);
  if (c.rope_scaling == RopeScaling::Llama3 && c.rope_high_freq_factor <= c.rope_low_freq_factor)
    rs.fail("high_freq_factor", "must be greater than low_freq_factor for llama3 scaling");
  rs.finish();
  c.norm_eps = r.f64("norm_eps", c.norm_eps, 1e-12, 1.0);
  c.qkv_bias = r.boolean("qkv_bias", c.qkv_bias);
  c.tie_embeddings = r.boolean("tie_embeddings", c.family == Family::Gpt2 ? true : c.tie_embeddings);
  c.dtype = r.choice<DType>("dtype", c.dtype, {{"fp32", DType::F32}, {"bf16", DType::BF16}});
  c.init_std = r.f64("init_std", c.init_std, 0.0, 10.0);

  if (c.head_dim == 0 && c.dim % c.n_heads != 0)
    r.fail("n_heads", "dim " + std::to_string(c.dim) + " is not divisible by n_heads " + std::to_string(c.n_heads));
  if (c.kv_heads() > c.n_heads || c.n_heads % c.kv_heads() != 0)
    r.fail("n_kv_heads", "n_heads " + std::to_string(c.n_heads) + " must be a multiple of n_kv_heads " +
                             std::to_string(c.kv_heads()));
  if (c.family == Family::Llama && c.hdim() % 2 != 0)
    r.fail("head_dim", "RoPE needs an even head dimension, got " + std::to_string(c.hdim()));
  if (c.family == Family::Gpt2) {
    if (c.kv_heads() != c.n_heads) r.fail("n_kv_heads", "gpt2 has no grouped-query attention; use 0 or n_heads");
    if (c.rope_scaling != RopeScaling::None) rs.fail("type", "gpt2 uses learned positions, not RoPE; use none");
    if (c.head_dim != 0 && c.head_dim * c.n_heads != c.dim) r.fail("head_dim", "gpt2 needs head_dim * n_heads == dim");
    if (!c.tie_embeddings) r.fail("tie_embeddings", "gpt2 ties lm_head to wte; must be true");
  }
  r.finish();
  return c;
}

}  // namespace qf::models
