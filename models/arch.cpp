#include "models/arch.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "models/hf_config.h"

namespace qf::models {
namespace {

using json = nlohmann::json;

// ---------------- llama: Llama 1-3.x, Mistral (no sliding window), Qwen2 (qkv bias) ----------------

void read_rope_scaling(const HfConfigReader& c, ModelConfig& m) {
  if (!c.has("rope_scaling")) return;
  const auto& rs = c.j["rope_scaling"];
  if (!rs.is_object()) throw c.bad("rope_scaling", "must be an object such as {\"rope_type\": \"llama3\", ...}");
  const HfConfigReader r = c.child("rope_scaling");
  const std::string type = rs.value("rope_type", rs.value("type", std::string()));
  if (type == "linear") {
    m.rope_scaling = RopeScaling::Linear;
    m.rope_factor = r.pos_f64_or("factor", 1.0);
  } else if (type == "llama3") {
    m.rope_scaling = RopeScaling::Llama3;
    m.rope_factor = r.pos_f64_or("factor", 8.0);
    m.rope_low_freq_factor = r.pos_f64_or("low_freq_factor", 1.0);
    m.rope_high_freq_factor = r.pos_f64_or("high_freq_factor", 4.0);
    m.rope_original_max_seq_len = r.i64_or("original_max_position_embeddings", 8192);
  } else if (type != "default") {
    throw c.bad("rope_scaling", "type '" + type + "' is not supported; expected linear or llama3");
  }
}

// num_key_value_heads (default: num_attention_heads), which must divide the query heads.
void read_kv_heads(const HfConfigReader& c, ModelConfig& m) {
  m.n_kv_heads = c.i64_or("num_key_value_heads", m.n_heads);
  if (m.n_heads % m.n_kv_heads != 0)
    throw c.bad("num_key_value_heads", str("is ", m.n_kv_heads, ", which does not divide num_attention_heads ", m.n_heads,
                                           " (grouped-query attention shares each KV head among a whole number of "
                                           "query heads)"));
}

// transformers' per-layer attention kinds: the "sliding_attention" layers become sliding_layers.
void read_layer_types(const HfConfigReader& c, ModelConfig& m) {
  const auto& lt = c.j["layer_types"];
  if (!lt.is_array() || static_cast<int64_t>(lt.size()) != m.n_layers)
    throw c.bad("layer_types", str("must list one entry per layer (", m.n_layers, ")"));
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const std::string t = lt[i].is_string() ? lt[i].get<std::string>() : "";
    if (t == "sliding_attention") m.sliding_layers.push_back(i);
    else if (t != "full_attention")
      throw c.bad("layer_types", str("entry ", i, " must be \"sliding_attention\" or \"full_attention\""));
  }
}

// Sliding-window attention as transformers builds it: Mistral windows every layer; Qwen2/Qwen3 only
// with use_sliding_window, in the layers `layer_types` marks "sliding_attention" (by default those
// from max_window_layers on).
void read_sliding_window(const HfConfigReader& c, const std::string& arch, ModelConfig& m, std::vector<std::string>&) {
  const bool mistral = arch == "MistralForCausalLM";
  if (!c.has("sliding_window") || (!mistral && !c.bool_or("use_sliding_window", false))) return;
  m.sliding_window = c.i64("sliding_window");
  if (mistral) return;
  if (c.has("layer_types")) {
    read_layer_types(c, m);
  } else {
    const int64_t first = c.has("max_window_layers") ? c.j["max_window_layers"].get<int64_t>() : 28;
    for (int64_t i = std::max<int64_t>(0, first); i < m.n_layers; ++i) m.sliding_layers.push_back(i);
  }
  if (m.sliding_layers.empty()) m.sliding_window = 0;  // no layer uses it
  else if (static_cast<int64_t>(m.sliding_layers.size()) == m.n_layers) m.sliding_layers.clear();  // every layer
}

void read_llama(const HfConfigReader& c, const std::string& arch, ModelConfig& m, std::vector<std::string>& notes) {
  read_kv_heads(c, m);
  m.head_dim = c.i64_or("head_dim", m.dim / m.n_heads);
  m.ffn_dim = c.i64("intermediate_size");
  m.rope_theta = c.f64_or("rope_theta", 10000.0);
  m.tie_embeddings = c.bool_or("tie_word_embeddings", false);
  m.qkv_bias = arch == "Qwen2ForCausalLM" ? true : c.bool_or("attention_bias", false);
  if (c.bool_or("mlp_bias", false)) throw c.bad("mlp_bias", "true is not supported (Llama MLPs without bias only)");
  const std::string act = c.string_or("hidden_act", "silu");
  if (act != "silu") throw c.bad("hidden_act", "'" + act + "' is not supported; expected silu");
  read_rope_scaling(c, m);
  read_sliding_window(c, arch, m, notes);
}

void write_rope_scaling(const ModelConfig& c, json& j);

// Qwen2/Qwen3's sliding-window keys (layer_types says which layers).
void write_qwen_window(const ModelConfig& c, json& j) {
  j["use_sliding_window"] = c.sliding_window > 0;
  j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  j["max_window_layers"] = c.n_layers;
  json types = json::array();
  for (int64_t i = 0; i < c.n_layers; ++i) types.push_back(c.window(i) > 0 ? "sliding_attention" : "full_attention");
  j["layer_types"] = types;
}

void write_llama(const ModelConfig& c, json& j) {
  const bool qwen2 = c.qkv_bias;
  // Without qkv biases, a sliding window on every layer is Mistral's architecture.
  const bool mistral = !qwen2 && c.sliding_window > 0;
  QF_CHECK_INPUT(!mistral || c.sliding_layers.empty(), "HF export: a Llama-family model with a sliding window on some "
                 "layers only has no transformers architecture without qkv biases (Mistral windows every layer)");
  j["architectures"] = {qwen2 ? "Qwen2ForCausalLM" : mistral ? "MistralForCausalLM" : "LlamaForCausalLM"};
  j["model_type"] = qwen2 ? "qwen2" : mistral ? "mistral" : "llama";
  if (mistral) j["sliding_window"] = c.sliding_window;
  if (qwen2) write_qwen_window(c, j);
  j["num_key_value_heads"] = c.kv_heads();
  j["rope_theta"] = c.rope_theta;
  j["hidden_act"] = "silu";
  if (mistral) {
    j["head_dim"] = c.hdim();
  } else if (!qwen2) {
    j["head_dim"] = c.hdim();
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
  } else {
    QF_CHECK(c.hdim() * c.n_heads == c.dim, "Qwen2 export needs head_dim * n_heads == dim");
  }
  write_rope_scaling(c, j);
}

void write_rope_scaling(const ModelConfig& c, json& j) {
  j["rope_scaling"] = nullptr;
  if (c.rope_scaling == RopeScaling::Linear) j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_factor}};
  if (c.rope_scaling == RopeScaling::Llama3)
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope_factor},
                         {"low_freq_factor", c.rope_low_freq_factor},
                         {"high_freq_factor", c.rope_high_freq_factor},
                         {"original_max_position_embeddings", c.rope_original_max_seq_len}};
}

ArchSpec llama_spec() {
  ArchSpec a;
  a.family = Family::Llama;
  a.name = "llama";
  a.hf_architectures = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"};
  a.hf_keys = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
               "rms_norm_eps"};
  a.hf_default_max_positions = 2048;
  a.hf_default_norm_eps = 1e-6;
  a.read_hf = read_llama;
  a.write_hf = write_llama;
  a.embed = "model.embed_tokens";
  a.layers = "model.layers";
  a.linears = {{"self_attn.q_proj", TensorRole::AttnQ, "attn_q", RopeRows::QueryHeads},
               {"self_attn.k_proj", TensorRole::AttnK, "attn_k", RopeRows::KvHeads},
               {"self_attn.v_proj", TensorRole::AttnV, "attn_v"},
               {"self_attn.o_proj", TensorRole::AttnOutput, "attn_output", RopeRows::None, false, true},
               {"mlp.gate_proj", TensorRole::FfnGate, "ffn_gate"},
               {"mlp.up_proj", TensorRole::FfnUp, "ffn_up"},
               {"mlp.down_proj", TensorRole::FfnDown, "ffn_down", RopeRows::None, false, true}};
  a.layer_tensors = {{"input_layernorm.weight", "attn_norm.weight"}, {"post_attention_layernorm.weight", "ffn_norm.weight"}};
  a.final_norm = "model.norm";
  a.lm_head = "lm_head";
  a.ignored_suffixes = {".rotary_emb.inv_freq"};
  a.ptq_groups = {{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
                  {"self_attn.o_proj"},
                  {"mlp.gate_proj", "mlp.up_proj"},
                  {"mlp.down_proj"}};
  a.awq_pairs = {{"input_layernorm", true, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
                 {"self_attn.v_proj", false, {"self_attn.o_proj"}},
                 {"post_attention_layernorm", true, {"mlp.gate_proj", "mlp.up_proj"}, true},
                 {"mlp.up_proj", false, {"mlp.down_proj"}}};
  a.mlp_act = Activation::Silu;
  a.gated_mlp = true;
  a.gguf_arch = "llama";
  return a;
}

// ---------------- qwen3: the llama layout with q/k RMSNorms per head before RoPE ----------------

void read_qwen3(const HfConfigReader& c, const std::string& arch, ModelConfig& m, std::vector<std::string>& notes) {
  const bool has_head_dim = c.has("head_dim");
  read_llama(c, arch, m, notes);
  if (!has_head_dim) m.head_dim = 128;  // Qwen3Config's default
  m.qk_norm = true;
}

void write_qwen3(const ModelConfig& c, json& j) {
  j["architectures"] = {"Qwen3ForCausalLM"};
  j["model_type"] = "qwen3";
  j["num_key_value_heads"] = c.kv_heads();
  j["head_dim"] = c.hdim();
  j["rope_theta"] = c.rope_theta;
  j["hidden_act"] = "silu";
  j["attention_bias"] = c.qkv_bias;
  write_qwen_window(c, j);
  write_rope_scaling(c, j);
}

ArchSpec qwen3_spec() {
  ArchSpec a = llama_spec();
  a.family = Family::Qwen3;
  a.name = "qwen3";
  a.hf_architectures = {"Qwen3ForCausalLM"};
  a.read_hf = read_qwen3;
  a.write_hf = write_qwen3;
  a.layer_tensors.push_back({"self_attn.q_norm.weight", "attn_q_norm.weight"});
  a.layer_tensors.push_back({"self_attn.k_norm.weight", "attn_k_norm.weight"});
  // llama.cpp's qwen3 uses NEOX (rotate-half) RoPE: Q/K rows are not permuted.
  for (auto& l : a.linears) l.rope_rows = RopeRows::None;
  a.gguf_arch = "qwen3";
  return a;
}

// ---------------- gemma2 / gemma3 (text) ----------------
// sqrt(hidden)-scaled embeddings, (1 + w) RMSNorms before and after attention and the MLP, GeGLU
// (gelu-tanh), scores scaled by query_pre_attn_scalar^-1/2, soft-capping (Gemma 2), interleaved
// sliding-window and global layers, q/k norms and a local RoPE base for windowed layers (Gemma 3).

// A key whose absence means `def` and whose null means "off" (0).
double f64_or_null(const HfConfigReader& c, const char* k, double def) {
  if (c.j.contains(k) && c.j[k].is_null()) return 0.0;
  return c.has(k) ? c.pos_f64_or(k, def) : def;
}

void read_gemma(const HfConfigReader& c, const std::string& arch, ModelConfig& m, std::vector<std::string>&) {
  const bool g3 = arch == "Gemma3ForCausalLM";
  read_kv_heads(c, m);
  m.head_dim = c.i64_or("head_dim", 256);
  m.ffn_dim = c.i64("intermediate_size");
  m.rope_theta = c.f64_or("rope_theta", g3 ? 1000000.0 : 10000.0);
  m.tie_embeddings = c.bool_or("tie_word_embeddings", true);
  if (c.bool_or("attention_bias", false)) throw c.bad("attention_bias", "true is not supported (Gemma has no biases)");
  const char* act_key = c.has("hidden_activation") ? "hidden_activation" : "hidden_act";
  const std::string act = c.string_or(act_key, "gelu_pytorch_tanh");
  if (act != "gelu_pytorch_tanh") throw c.bad(act_key, "'" + act + "' is not supported; expected gelu_pytorch_tanh");
  m.query_pre_attn_scalar = c.pos_f64_or("query_pre_attn_scalar", 256.0);
  m.attn_softcap = f64_or_null(c, "attn_logit_softcapping", g3 ? 0.0 : 50.0);
  m.final_softcap = f64_or_null(c, "final_logit_softcapping", g3 ? 0.0 : 30.0);
  if (g3) {
    m.qk_norm = true;
    read_rope_scaling(c, m);
    m.rope_local_theta = c.pos_f64_or("rope_local_base_freq", 10000.0);
    if (c.bool_or("use_bidirectional_attention", false))
      throw c.bad("use_bidirectional_attention", "true is not supported (causal language models only)");
  } else if (c.has("rope_scaling")) {
    throw c.bad("rope_scaling", "is not supported for Gemma 2");
  }
  // Windows: layer_types when given, else Gemma 2 alternates (even layers windowed) and Gemma 3
  // windows all but every sliding_window_pattern-th layer.
  if (!c.has("sliding_window") && c.j.contains("sliding_window")) return;  // null: no windows
  const int64_t window = c.i64_or("sliding_window", 4096);
  if (c.has("layer_types")) {
    read_layer_types(c, m);
  } else {
    const int64_t pattern = g3 ? c.i64_or("sliding_window_pattern", 6) : 2;
    for (int64_t i = 0; i < m.n_layers; ++i)
      if ((i + 1) % pattern != 0) m.sliding_layers.push_back(i);
  }
  if (!m.sliding_layers.empty()) m.sliding_window = window;
  if (static_cast<int64_t>(m.sliding_layers.size()) == m.n_layers) m.sliding_layers.clear();  // every layer
}

void write_gemma(const ModelConfig& c, json& j) {
  const bool g3 = c.family == Family::Gemma3;
  j["architectures"] = {g3 ? "Gemma3ForCausalLM" : "Gemma2ForCausalLM"};
  j["model_type"] = g3 ? "gemma3_text" : "gemma2";
  j["num_key_value_heads"] = c.kv_heads();
  j["head_dim"] = c.hdim();
  j["rope_theta"] = c.rope_theta;
  j["hidden_activation"] = "gelu_pytorch_tanh";
  j["attention_bias"] = false;
  j["query_pre_attn_scalar"] = c.query_pre_attn_scalar > 0 ? c.query_pre_attn_scalar : static_cast<double>(c.hdim());
  j["attn_logit_softcapping"] = c.attn_softcap > 0 ? json(c.attn_softcap) : json(nullptr);
  j["final_logit_softcapping"] = c.final_softcap > 0 ? json(c.final_softcap) : json(nullptr);
  j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  json types = json::array();
  for (int64_t i = 0; i < c.n_layers; ++i) types.push_back(c.window(i) > 0 ? "sliding_attention" : "full_attention");
  j["layer_types"] = types;
  if (g3) {
    j["rope_local_base_freq"] = c.rope_local_theta > 0 ? c.rope_local_theta : c.rope_theta;
    write_rope_scaling(c, j);
  }
}

ArchSpec gemma_spec(bool g3) {
  ArchSpec a = llama_spec();
  a.family = g3 ? Family::Gemma3 : Family::Gemma2;
  a.name = g3 ? "gemma3" : "gemma2";
  a.hf_architectures = {g3 ? "Gemma3ForCausalLM" : "Gemma2ForCausalLM"};
  a.hf_default_max_positions = g3 ? 131072 : 8192;
  a.read_hf = read_gemma;
  a.write_hf = write_gemma;
  a.layer_tensors = {{"input_layernorm.weight", "attn_norm.weight"},
                     {"post_attention_layernorm.weight", "post_attention_norm.weight"},
                     {"pre_feedforward_layernorm.weight", "ffn_norm.weight"},
                     {"post_feedforward_layernorm.weight", "post_ffw_norm.weight"}};
  if (g3) {
    a.layer_tensors.push_back({"self_attn.q_norm.weight", "attn_q_norm.weight"});
    a.layer_tensors.push_back({"self_attn.k_norm.weight", "attn_k_norm.weight"});
  }
  a.awq_pairs = {{"input_layernorm", true, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
                 {"self_attn.v_proj", false, {"self_attn.o_proj"}},
                 {"pre_feedforward_layernorm", true, {"mlp.gate_proj", "mlp.up_proj"}, true},
                 {"mlp.up_proj", false, {"mlp.down_proj"}}};
  a.mlp_act = Activation::GeluTanh;
  a.gemma_norms = true;
  a.sandwich_norms = true;
  a.scale_embeddings = true;
  // llama.cpp's gemma2/gemma3 use NEOX RoPE (no Q/K permutation); GGUF norms hold 1 + w.
  for (auto& l : a.linears) l.rope_rows = RopeRows::None;
  a.gguf_arch = g3 ? "gemma3" : "gemma2";
  return a;
}

// ---------------- phi3: Phi-3 / Phi-3.5 / Phi-4-mini ----------------
// Fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows), partial rotary, LongRoPE,
// a sliding window on every layer when config.json gives one.

std::vector<double> factor_list(const HfConfigReader& r, const char* k, int64_t n) {
  if (!r.has(k) || !r.j[k].is_array()) throw r.bad(k, "must be a list of numbers");
  std::vector<double> v;
  for (auto& x : r.j[k]) {
    if (!x.is_number() || !(x.get<double>() > 0)) throw r.bad(k, "must hold positive numbers");
    v.push_back(x.get<double>());
  }
  if (static_cast<int64_t>(v.size()) != n)
    throw r.bad(k, str("has ", v.size(), " entries; expected ", n, " (rotary dims / 2)"));
  return v;
}

void read_phi3(const HfConfigReader& c, const std::string&, ModelConfig& m, std::vector<std::string>&) {
  read_kv_heads(c, m);
  m.head_dim = c.i64_or("head_dim", m.dim / m.n_heads);
  m.ffn_dim = c.i64("intermediate_size");
  m.rope_theta = c.f64_or("rope_theta", 10000.0);
  m.tie_embeddings = c.bool_or("tie_word_embeddings", false);
  const std::string act = c.string_or("hidden_act", "silu");
  if (act != "silu") throw c.bad("hidden_act", "'" + act + "' is not supported; expected silu");
  m.partial_rotary = c.pos_f64_or("partial_rotary_factor", 1.0);
  if (m.partial_rotary > 1.0) throw c.bad("partial_rotary_factor", "must be at most 1");
  m.rope_original_max_seq_len = c.i64_or("original_max_position_embeddings", m.max_seq_len);
  if (c.has("rope_scaling")) {
    const auto& rs = c.j["rope_scaling"];
    if (!rs.is_object()) throw c.bad("rope_scaling", "must be an object such as {\"type\": \"longrope\", ...}");
    const std::string type = rs.value("rope_type", rs.value("type", std::string()));
    if (type != "longrope" && type != "su")
      throw c.bad("rope_scaling", "type '" + type + "' is not supported for Phi-3; expected longrope");
    const HfConfigReader r = c.child("rope_scaling");
    m.rope_scaling = RopeScaling::LongRope;
    m.rope_short_factor = factor_list(r, "short_factor", m.rotary_dim() / 2);
    m.rope_long_factor = factor_list(r, "long_factor", m.rotary_dim() / 2);
    m.rope_attention_factor = r.has("attention_factor") ? r.pos_f64_or("attention_factor", 1.0) : 0.0;
  }
  if (c.has("sliding_window")) m.sliding_window = c.i64("sliding_window");
}

void write_phi3(const ModelConfig& c, json& j) {
  j["architectures"] = {"Phi3ForCausalLM"};
  j["model_type"] = "phi3";
  j["num_key_value_heads"] = c.kv_heads();
  j["rope_theta"] = c.rope_theta;
  j["hidden_act"] = "silu";
  j["partial_rotary_factor"] = c.partial_rotary;
  QF_CHECK_INPUT(c.hdim() * c.n_heads == c.dim, "HF export: Phi-3 derives head_dim as hidden_size / heads; this model "
                 "has head_dim ", c.hdim(), " with ", c.n_heads, " heads of a ", c.dim, " hidden size");
  QF_CHECK_INPUT(c.sliding_layers.empty(), "HF export: Phi-3 windows every layer or none");
  j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  j["rope_scaling"] = nullptr;
  if (c.rope_scaling == RopeScaling::LongRope) {
    j["original_max_position_embeddings"] = c.rope_original_max_seq_len;
    j["rope_scaling"] = {{"type", "longrope"}, {"short_factor", c.rope_short_factor}, {"long_factor", c.rope_long_factor}};
    if (c.rope_attention_factor > 0) j["rope_scaling"]["attention_factor"] = c.rope_attention_factor;
  } else {
    QF_CHECK_INPUT(c.rope_scaling == RopeScaling::None, "HF export: Phi-3 takes longrope scaling only");
  }
}

ArchSpec phi3_spec() {
  ArchSpec a = llama_spec();
  a.family = Family::Phi3;
  a.name = "phi3";
  a.hf_architectures = {"Phi3ForCausalLM"};
  a.hf_default_max_positions = 4096;
  a.hf_default_norm_eps = 1e-5;
  a.read_hf = read_phi3;
  a.write_hf = write_phi3;
  a.linears = {{"self_attn.qkv_proj", TensorRole::AttnQkv, "attn_qkv"},
               {"self_attn.o_proj", TensorRole::AttnOutput, "attn_output", RopeRows::None, false, true},
               {"mlp.gate_up_proj", TensorRole::FfnUp, "ffn_up"},
               {"mlp.down_proj", TensorRole::FfnDown, "ffn_down", RopeRows::None, false, true}};
  a.ptq_groups = {{"self_attn.qkv_proj"}, {"self_attn.o_proj"}, {"mlp.gate_up_proj"}, {"mlp.down_proj"}};
  // v's rows are inside qkv_proj and up's inside gate_up_proj: only the norms scale.
  a.awq_pairs = {{"input_layernorm", true, {"self_attn.qkv_proj"}},
                 {"post_attention_layernorm", true, {"mlp.gate_up_proj"}, true}};
  a.fused_qkv = true;
  a.fused_gate_up = true;
  a.gguf_arch = "phi3";
  return a;
}

// ---------------- gpt2 ----------------

void read_gpt2(const HfConfigReader& c, const std::string&, ModelConfig& m, std::vector<std::string>&) {
  m.ffn_dim = c.i64_or("n_inner", 4 * m.dim);
  m.tie_embeddings = true;
  if (!c.bool_or("tie_word_embeddings", true)) throw c.bad("tie_word_embeddings", "false is not supported for GPT-2");
  const std::string act = c.string_or("activation_function", "gelu_new");
  if (act != "gelu_new" && act != "gelu_pytorch_tanh")
    throw c.bad("activation_function", "'" + act + "' is not supported; expected gelu_new");
  for (const char* k : {"scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"})
    if (c.bool_or(k, false)) throw c.bad(k, "true is not supported");
}

void write_gpt2(const ModelConfig&, json& j) {
  j["architectures"] = {"GPT2LMHeadModel"};
  j["model_type"] = "gpt2";
  j["activation_function"] = "gelu_new";
}

ArchSpec gpt2_spec() {
  ArchSpec a;
  a.family = Family::Gpt2;
  a.name = "gpt2";
  a.hf_architectures = {"GPT2LMHeadModel"};
  a.hf_keys = {"n_embd", "n_layer", "n_head", "n_inner", "n_positions", "layer_norm_epsilon"};
  a.hf_default_max_positions = 1024;
  a.hf_default_norm_eps = 1e-5;
  a.read_hf = read_gpt2;
  a.write_hf = write_gpt2;
  a.embed = "transformer.wte";
  a.positions = "transformer.wpe";
  a.layers = "transformer.h";
  a.linears = {{"attn.c_attn", TensorRole::AttnQkv, "attn_qkv", RopeRows::None, true},
               {"attn.c_proj", TensorRole::AttnOutput, "attn_output", RopeRows::None, true, true},
               {"mlp.c_fc", TensorRole::FfnUp, "ffn_up", RopeRows::None, true},
               {"mlp.c_proj", TensorRole::FfnDown, "ffn_down", RopeRows::None, true, true}};
  a.layer_tensors = {{"ln_1.weight", "attn_norm.weight"},
                     {"ln_1.bias", "attn_norm.bias"},
                     {"ln_2.weight", "ffn_norm.weight"},
                     {"ln_2.bias", "ffn_norm.bias"}};
  a.final_norm = "transformer.ln_f";
  a.lm_head = "lm_head";  // never built (tied); a checkpoint's tied copy is ignored
  a.tied_always = true;
  a.scaled_residual_init = true;
  a.ignored_suffixes = {".attn.bias", ".attn.masked_bias"};
  a.ptq_groups = {{"attn.c_attn"}, {"attn.c_proj"}, {"mlp.c_fc"}, {"mlp.c_proj"}};
  a.awq_pairs = {{"ln_1", true, {"attn.c_attn"}}, {"ln_2", true, {"mlp.c_fc"}, true}};
  a.mlp_act = Activation::GeluTanh;
  a.gguf_arch = "gpt2";
  return a;
}

// ---------------- opt ----------------

void read_opt(const HfConfigReader& c, const std::string&, ModelConfig& m, std::vector<std::string>&) {
  m.ffn_dim = c.i64("ffn_dim");
  if (m.dim % m.n_heads != 0)
    throw c.bad("num_attention_heads", str(m.n_heads, " does not divide hidden_size ", m.dim));
  m.embed_proj_dim = c.i64_or("word_embed_proj_dim", m.dim);
  if (m.embed_proj_dim == m.dim) m.embed_proj_dim = 0;
  m.post_norm = !c.bool_or("do_layer_norm_before", true);
  m.tie_embeddings = true;
  if (!c.bool_or("tie_word_embeddings", true)) throw c.bad("tie_word_embeddings", "false is not supported for OPT");
  const std::string act = c.string_or("activation_function", "relu");
  if (act != "relu") throw c.bad("activation_function", "'" + act + "' is not supported; expected relu");
  if (!c.bool_or("enable_bias", true)) throw c.bad("enable_bias", "false is not supported (OPT linears have biases)");
  if (!c.bool_or("layer_norm_elementwise_affine", true))
    throw c.bad("layer_norm_elementwise_affine", "false is not supported");
  if (c.bool_or("_remove_final_layer_norm", false)) throw c.bad("_remove_final_layer_norm", "true is not supported");
}

void write_opt(const ModelConfig& c, json& j) {
  j["architectures"] = {"OPTForCausalLM"};
  j["model_type"] = "opt";
  j["word_embed_proj_dim"] = c.embed_width();
  j["do_layer_norm_before"] = !c.post_norm;
  j["activation_function"] = "relu";
  j["enable_bias"] = true;
  j["layer_norm_elementwise_affine"] = true;
}

ArchSpec opt_spec() {
  ArchSpec a;
  a.family = Family::Opt;
  a.name = "opt";
  a.hf_architectures = {"OPTForCausalLM"};
  a.hf_keys = {"hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "max_position_embeddings",
               "layer_norm_eps"};
  a.hf_default_max_positions = 2048;
  a.hf_default_norm_eps = 1e-5;
  a.read_hf = read_opt;
  a.write_hf = write_opt;
  a.embed = "model.decoder.embed_tokens";
  a.positions = "model.decoder.embed_positions";
  a.layers = "model.decoder.layers";
  a.optional_modules = {"model.decoder.project_in", "model.decoder.project_out"};
  a.linears = {{"self_attn.q_proj", TensorRole::AttnQ, ""},
               {"self_attn.k_proj", TensorRole::AttnK, ""},
               {"self_attn.v_proj", TensorRole::AttnV, ""},
               {"self_attn.out_proj", TensorRole::AttnOutput, "", RopeRows::None, false, true},
               {"fc1", TensorRole::FfnUp, ""},
               {"fc2", TensorRole::FfnDown, "", RopeRows::None, false, true}};
  a.layer_tensors = {{"self_attn_layer_norm.weight", "attn_norm.weight"},
                     {"self_attn_layer_norm.bias", "attn_norm.bias"},
                     {"final_layer_norm.weight", "ffn_norm.weight"},
                     {"final_layer_norm.bias", "ffn_norm.bias"}};
  a.final_norm = "model.decoder.final_layer_norm";
  a.lm_head = "lm_head";  // tied; a checkpoint's copy is ignored
  a.tied_always = true;
  a.ptq_groups = {{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"self_attn.out_proj"}, {"fc1"}, {"fc2"}};
  // ReLU is positively homogeneous, so fc1's rows scale into fc2's columns (AutoAWQ's OPT pairs).
  a.awq_pairs = {{"self_attn_layer_norm", true, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
                 {"self_attn.v_proj", false, {"self_attn.out_proj"}},
                 {"final_layer_norm", true, {"fc1"}, true},
                 {"fc1", false, {"fc2"}}};
  a.mlp_act = Activation::Relu;
  a.gguf_arch = "";
  a.gguf_missing = "llama.cpp has no OPT architecture";
  return a;
}

}  // namespace

const std::vector<const ArchSpec*>& arch_specs() {
  static const ArchSpec llama = llama_spec(), qwen3 = qwen3_spec(), gemma2 = gemma_spec(false),
                        gemma3 = gemma_spec(true), phi3 = phi3_spec(), gpt2 = gpt2_spec(), opt = opt_spec();
  static const std::vector<const ArchSpec*> all{&llama, &qwen3, &gemma2, &gemma3, &phi3, &gpt2, &opt};
  return all;
}

const ArchSpec& arch_spec(Family f) {
  for (auto* a : arch_specs())
    if (a->family == f) return *a;
  throw Error(str("no architecture spec for family #", static_cast<int>(f)));
}

const ArchSpec* arch_for_hf(const std::string& hf_architecture) {
  for (auto* a : arch_specs())
    for (auto& h : a->hf_architectures)
      if (h == hf_architecture) return a;
  return nullptr;
}

std::string hf_architectures_list() {
  std::string s;
  for (auto* a : arch_specs())
    for (auto& h : a->hf_architectures) s += (s.empty() ? "" : ", ") + h;
  return s;
}

const cfg::Names<Family>& family_names() {
  static const cfg::Names<Family> n = [] {
    cfg::Names<Family> v;
    for (auto* a : arch_specs()) v.emplace_back(a->name, a->family);
    return v;
  }();
  return n;
}

const ArchLinear* ArchSpec::linear(const std::string& n) const {
  for (auto& l : linears)
    if (l.name == n) return &l;
  return nullptr;
}

const ArchLinear& ArchSpec::linear(TensorRole role) const {
  for (auto& l : linears)
    if (l.role == role) return l;
  throw Error(str(name, " has no linear of role #", static_cast<int>(role)));
}

bool ArchSpec::has_conv1d() const {
  for (auto& l : linears)
    if (l.conv1d) return true;
  return false;
}

std::string ArchSpec::layer_module(const std::string& gguf) const {
  for (auto& t : layer_tensors)
    if (t.gguf == gguf) return split_last(t.name).first;
  throw Error(str(name, " has no per-layer tensor ", gguf));
}

const ArchLinear* ArchSpec::layer_linear_of(const std::string& n) const {
  const std::string pre = layers + ".";
  if (n.compare(0, pre.size(), pre) != 0) return nullptr;
  const auto dot = n.find('.', pre.size());  // after the layer index
  if (dot == std::string::npos) return nullptr;
  const std::string rel = n.substr(dot + 1);
  for (auto& l : linears)
    if (rel == l.name + ".weight") return &l;
  return nullptr;
}

std::pair<std::string, std::string> split_last(const std::string& path) {
  const auto dot = path.rfind('.');
  if (dot == std::string::npos) return {"", path};
  return {path.substr(0, dot), path.substr(dot + 1)};
}

}  // namespace qf::models
