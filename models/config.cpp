#include "models/config.h"

#include "core/error.h"
#include "models/arch.h"
#include "core/gguf_file.h"
#include "models/hf.h"

namespace qf::models {

int64_t ModelConfig::ffn() const {
  if (ffn_dim > 0) return ffn_dim;
  if (family == Family::Gpt2 || family == Family::Opt) return 4 * dim;
  int64_t h = (8 * dim) / 3;
  return (h + 63) / 64 * 64;
}

namespace {

void read_rope(cfg::Reader& rs, ModelConfig& c) {
  c.rope_scaling = rs.choice<RopeScaling>("type", c.rope_scaling, rope_scaling_names());
  c.rope_factor = rs.f64("factor", c.rope_factor, 1.0, 1e6);
  c.rope_low_freq_factor = rs.f64("low_freq_factor", c.rope_low_freq_factor, 1e-6, 1e6);
  c.rope_high_freq_factor = rs.f64("high_freq_factor", c.rope_high_freq_factor, 1e-6, 1e6);
  c.rope_original_max_seq_len = rs.i64("original_max_seq_len", c.rope_original_max_seq_len, 1, 1 << 24);
  c.rope_short_factor = rs.f64s("short_factor", {});
  c.rope_long_factor = rs.f64s("long_factor", {});
  c.rope_attention_factor = rs.f64("attention_factor", 0.0, 0.0, 1e6);
  if (c.rope_scaling == RopeScaling::LongRope && c.rope_short_factor.empty())
    rs.fail("short_factor", "longrope needs short_factor and long_factor lists (one per rotary frequency)");
  if (c.rope_scaling == RopeScaling::Llama3 && c.rope_high_freq_factor <= c.rope_low_freq_factor)
    rs.fail("high_freq_factor", "must be greater than low_freq_factor for llama3 scaling");
}

// Options only some families have (windows, norms, soft-caps, OPT's projections); validate() checks
// them against the family.
void read_family_options(cfg::Reader& r, ModelConfig& c) {
  c.embed_proj_dim = r.i64("embed_proj_dim", c.embed_proj_dim, 0, 1 << 16);
  c.post_norm = r.boolean("post_norm", c.post_norm);
  c.partial_rotary = r.f64("partial_rotary", c.partial_rotary, 0.01, 1.0);
  c.qk_norm = r.boolean("qk_norm", c.family == Family::Qwen3 || c.family == Family::Gemma3);
  c.rope_local_theta = r.f64("rope_local_theta", c.rope_local_theta, 0.0, 1e12);
  c.query_pre_attn_scalar = r.f64("query_pre_attn_scalar", c.query_pre_attn_scalar, 0.0, 1e9);
  c.attn_softcap = r.f64("attn_softcap", c.attn_softcap, 0.0, 1e9);
  c.final_softcap = r.f64("final_softcap", c.final_softcap, 0.0, 1e9);
  c.sliding_window = r.i64("sliding_window", c.sliding_window, 0, 1 << 24);
  for (double l : r.f64s("sliding_layers", {})) {
    if (l != static_cast<double>(static_cast<int64_t>(l)) || l < 0 || l >= static_cast<double>(c.n_layers))
      r.fail("sliding_layers", str("entries must be layer indices in [0, ", c.n_layers, "), got ", l));
    else
      c.sliding_layers.push_back(static_cast<int64_t>(l));
  }
}

// The imported config in the resolved tree, so the run's config.yaml lists what was built.
void write_resolved(YAML::Node res, const ModelConfig& c) {
  res["family"] = c.family_name();
  res["vocab_size"] = c.vocab_size;
  res["dim"] = c.dim;
  res["n_layers"] = c.n_layers;
  res["n_heads"] = c.n_heads;
  res["n_kv_heads"] = c.kv_heads();
  res["head_dim"] = c.hdim();
  res["ffn_dim"] = c.ffn();
  res["max_seq_len"] = c.max_seq_len;
  res["rope_theta"] = c.rope_theta;
  res["norm_eps"] = c.norm_eps;
  res["qkv_bias"] = c.qkv_bias;
  res["qk_norm"] = c.qk_norm;
  res["sliding_window"] = c.sliding_window;
  res["sliding_layers"] = c.sliding_layers;
  res["rope_local_theta"] = c.rope_local_theta;
  res["query_pre_attn_scalar"] = c.query_pre_attn_scalar;
  res["attn_softcap"] = c.attn_softcap;
  res["final_softcap"] = c.final_softcap;
  res["tie_embeddings"] = c.tie_embeddings;
  res["rope_scaling"]["type"] = cfg::name_of(rope_scaling_names(), c.rope_scaling);
  res["rope_scaling"]["factor"] = c.rope_factor;
  res["rope_scaling"]["low_freq_factor"] = c.rope_low_freq_factor;
  res["rope_scaling"]["high_freq_factor"] = c.rope_high_freq_factor;
  res["rope_scaling"]["original_max_seq_len"] = c.rope_original_max_seq_len;
  res["rope_scaling"]["short_factor"] = c.rope_short_factor;
  res["rope_scaling"]["long_factor"] = c.rope_long_factor;
  res["rope_scaling"]["attention_factor"] = c.rope_attention_factor;
  res["partial_rotary"] = c.partial_rotary;
  res["embed_proj_dim"] = c.embed_proj_dim;
  res["post_norm"] = c.post_norm;
}

// model.from: the checkpoint's config.json decides the architecture. Keys also given here must agree
// (the run's config.yaml snapshot lists them all), and the resolved tree records the imported values.
void import_hf(cfg::Reader& r, ModelConfig& c) {
  const auto hf = read_hf_checkpoint(c.from).config;
  auto check = [&](const char* key, double mine, double theirs) {
    if (r.has(key) && mine != theirs)
      r.fail(key, str(mine, " disagrees with ", c.from, gguf_in::is_gguf_file(c.from) ? " (" : "/config.json (", theirs,
                      "); drop the key to use the checkpoint's"));
  };
  check("family", static_cast<double>(c.family), static_cast<double>(hf.family));
  check("vocab_size", c.vocab_size, hf.vocab_size);
  check("dim", c.dim, hf.dim);
  check("n_layers", c.n_layers, hf.n_layers);
  check("n_heads", c.n_heads, hf.n_heads);
  check("n_kv_heads", c.kv_heads(), hf.kv_heads());
  check("ffn_dim", c.ffn(), hf.ffn());
  check("max_seq_len", c.max_seq_len, hf.max_seq_len);
  check("rope_theta", c.rope_theta, hf.rope_theta);
  check("norm_eps", c.norm_eps, hf.norm_eps);
  check("qkv_bias", c.qkv_bias, hf.qkv_bias);
  check("qk_norm", c.qk_norm, hf.qk_norm);
  check("sliding_window", c.sliding_window, hf.sliding_window);
  check("rope_local_theta", c.rope_local_theta, hf.rope_local_theta);
  check("query_pre_attn_scalar", c.query_pre_attn_scalar, hf.query_pre_attn_scalar);
  check("attn_softcap", c.attn_softcap, hf.attn_softcap);
  check("final_softcap", c.final_softcap, hf.final_softcap);
  check("tie_embeddings", c.tie_embeddings, hf.tie_embeddings);
  const auto dtype = c.dtype;
  const auto from = c.from;
  c = hf;
  c.dtype = dtype;
  c.from = from;
  write_resolved(r.resolved(), c);
}

void validate(cfg::Reader& r, cfg::Reader& rs, const ModelConfig& c) {
  if (c.head_dim == 0 && c.dim % c.n_heads != 0)
    r.fail("n_heads", "dim " + std::to_string(c.dim) + " is not divisible by n_heads " + std::to_string(c.n_heads));
  if (c.kv_heads() > c.n_heads || c.n_heads % c.kv_heads() != 0)
    r.fail("n_kv_heads", "n_heads " + std::to_string(c.n_heads) + " must be a multiple of n_kv_heads " +
                             std::to_string(c.kv_heads()));
  if ((c.family == Family::Qwen3 || c.family == Family::Gemma3) && !c.qk_norm)
    r.fail("qk_norm", c.family_name() + " normalizes q and k; must be true");
  const bool learned_positions = !arch_spec(c.family).positions.empty();  // gpt2, opt
  if ((c.embed_proj_dim > 0 || c.post_norm) && c.family != Family::Opt)
    r.fail(c.post_norm ? "post_norm" : "embed_proj_dim", "is OPT's; " + c.family_name() + " has no such option");
  if (learned_positions)
    for (auto [key, set] : {std::pair<const char*, bool>{"qk_norm", c.qk_norm}, {"sliding_window", c.sliding_window > 0},
                            {"rope_local_theta", c.rope_local_theta > 0}, {"query_pre_attn_scalar", c.query_pre_attn_scalar > 0},
                            {"attn_softcap", c.attn_softcap > 0}, {"final_softcap", c.final_softcap > 0}})
      if (set) r.fail(key, "is not part of the " + c.family_name() + " architecture; leave it unset");
  if (c.rope_scaling == RopeScaling::LongRope &&
      (static_cast<int64_t>(c.rope_short_factor.size()) != c.rotary_dim() / 2 ||
       c.rope_long_factor.size() != c.rope_short_factor.size()))
    r.fail("rope_scaling", str("longrope short_factor and long_factor need ", c.rotary_dim() / 2,
                               " entries each (rotary dims / 2), got ", c.rope_short_factor.size(), " and ",
                               c.rope_long_factor.size()));
  if (c.rotary_dim() % 2 != 0) r.fail("partial_rotary", str("gives an odd rotary dimension ", c.rotary_dim()));
  if (!learned_positions && c.hdim() % 2 != 0)
    r.fail("head_dim", "RoPE needs an even head dimension, got " + std::to_string(c.hdim()));
  if (arch_spec(c.family).tied_always && !c.tie_embeddings)
    r.fail("tie_embeddings", c.family_name() + " ties lm_head to the token embedding; must be true");
  if (learned_positions) {
    const std::string f = c.family_name();
    if (c.kv_heads() != c.n_heads) r.fail("n_kv_heads", f + " has no grouped-query attention; use 0 or n_heads");
    if (c.rope_scaling != RopeScaling::None) rs.fail("type", f + " uses learned positions, not RoPE; use none");
    if (c.head_dim != 0 && c.head_dim * c.n_heads != c.dim) r.fail("head_dim", f + " needs head_dim * n_heads == dim");
    
  }
}

}  // namespace

ModelConfig ModelConfig::from_config(cfg::Reader& r) {
  ModelConfig c;
  c.family = r.choice<Family>("family", c.family, family_names());
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
  read_rope(rs, c);
  rs.finish();
  c.norm_eps = r.f64("norm_eps", c.norm_eps, 1e-12, 1.0);
  c.qkv_bias = r.boolean("qkv_bias", c.qkv_bias);
  read_family_options(r, c);
  c.tie_embeddings = r.boolean("tie_embeddings", arch_spec(c.family).tied_always ? true : c.tie_embeddings);
  c.dtype = r.choice<DType>("dtype", c.dtype, dtype_names());
  c.init_std = r.f64("init_std", c.init_std, 0.0, 10.0);
  c.from = r.path("from", "", true);
  if (!c.from.empty()) {
    try {
      import_hf(r, c);
    } catch (const InputError& e) {
      r.fail("from", e.what());
    }
  }
  validate(r, rs, c);
  r.finish();
  return c;
}

}  // namespace qf::models
