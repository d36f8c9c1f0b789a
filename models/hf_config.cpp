#include "models/hf_config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_file.h"

namespace qf::models {
namespace {

using json = nlohmann::json;

constexpr int64_t kMaxSize = (int64_t{1} << 31) - 1;

const std::vector<std::string> kArchitectures = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                                                 "GPT2LMHeadModel"};

// Typed access to config.json with errors naming the file and key.
struct Cfg {
  const json& j;
  std::string path;
  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  InputError bad(const char* k, const std::string& why) const {
    return InputError(str(path, ": '", k, "' ", why));
  }
  // Sizes are capped at 2^31 - 1 (any real model's are far below) so arithmetic on them
  // (4 * n_embd, 8 * hidden_size / 3, products of dimensions) cannot overflow int64.
  int64_t i64(const char* k) const {
    if (!has(k)) throw bad(k, "is missing");
    if (!j[k].is_number_integer() || (j[k].is_number_unsigned() && j[k].get<uint64_t>() > kMaxSize) ||
        j[k].get<int64_t>() <= 0 || j[k].get<int64_t>() > kMaxSize)
      throw bad(k, str("must be a positive integer (at most ", kMaxSize, ")"));
    return j[k].get<int64_t>();
  }
  int64_t i64_or(const char* k, int64_t def) const { return has(k) ? i64(k) : def; }
  // A positive finite number (rope scaling factors).
  double pos_f64_or(const char* k, double def) const {
    const double v = f64_or(k, def);
    if (!(v > 0.0) || !std::isfinite(v)) throw bad(k, "must be a positive number");
    return v;
  }
  double f64_or(const char* k, double def) const {
    if (!has(k)) return def;
    if (!j[k].is_number()) throw bad(k, "must be a number");
    return j[k].get<double>();
  }
  bool bool_or(const char* k, bool def) const {
    if (!has(k)) return def;
    if (!j[k].is_boolean()) throw bad(k, "must be true or false");
    return j[k].get<bool>();
  }
};

ModelConfig llama_like(const Cfg& c, const std::string& arch, std::vector<std::string>& notes) {
  ModelConfig m;
  m.family = Family::Llama;
  m.vocab_size = c.i64("vocab_size");
  m.dim = c.i64("hidden_size");
  m.n_layers = c.i64("num_hidden_layers");
  m.n_heads = c.i64("num_attention_heads");
  m.n_kv_heads = c.i64_or("num_key_value_heads", m.n_heads);
  if (m.n_heads % m.n_kv_heads != 0)
    throw c.bad("num_key_value_heads", str("is ", m.n_kv_heads, ", which does not divide num_attention_heads ", m.n_heads,
                                           " (grouped-query attention shares each KV head among a whole number of "
                                           "query heads)"));
  m.head_dim = c.i64_or("head_dim", m.dim / m.n_heads);
  m.ffn_dim = c.i64("intermediate_size");
  m.max_seq_len = c.i64_or("max_position_embeddings", 2048);
  m.rope_theta = c.f64_or("rope_theta", 10000.0);
  m.norm_eps = c.f64_or("rms_norm_eps", 1e-6);
  m.tie_embeddings = c.bool_or("tie_word_embeddings", false);
  m.qkv_bias = arch == "Qwen2ForCausalLM" ? true : c.bool_or("attention_bias", false);
  if (c.bool_or("mlp_bias", false)) throw c.bad("mlp_bias", "true is not supported (Llama MLPs without bias only)");
  const std::string act = c.j.value("hidden_act", std::string("silu"));
  if (act != "silu") throw c.bad("hidden_act", "'" + act + "' is not supported; expected silu");
  if (c.has("rope_scaling")) {
    const auto& rs = c.j["rope_scaling"];
    if (!rs.is_object()) throw c.bad("rope_scaling", "must be an object such as {\"rope_type\": \"llama3\", ...}");
    const Cfg r{rs, c.path + ": rope_scaling"};
    std::string type = rs.value("rope_type", rs.value("type", std::string()));
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
  // Sliding-window attention (Mistral, Qwen2 with use_sliding_window) is not implemented: exact as
  // long as sequences stay within the window.
  const bool sw = arch == "MistralForCausalLM" ? c.has("sliding_window")
                                               : c.bool_or("use_sliding_window", false) && c.has("sliding_window");
  if (sw && c.j["sliding_window"].is_number_integer() && c.j["sliding_window"].get<int64_t>() < m.max_seq_len)
    notes.push_back(qf::str("sliding_window ", c.j["sliding_window"].get<int64_t>(),
                        " is not implemented: attention is full, which is exact for sequences up to that length"));
  return m;
}

ModelConfig gpt2(const Cfg& c) {
  ModelConfig m;
  m.family = Family::Gpt2;
  m.vocab_size = c.i64("vocab_size");
  m.dim = c.i64("n_embd");
  m.n_layers = c.i64("n_layer");
  m.n_heads = c.i64("n_head");
  m.ffn_dim = c.i64_or("n_inner", 4 * m.dim);
  m.max_seq_len = c.i64_or("n_positions", 1024);
  m.norm_eps = c.f64_or("layer_norm_epsilon", 1e-5);
  m.tie_embeddings = true;
  if (!c.bool_or("tie_word_embeddings", true)) throw c.bad("tie_word_embeddings", "false is not supported for GPT-2");
  const std::string act = c.j.value("activation_function", std::string("gelu_new"));
  if (act != "gelu_new" && act != "gelu_pytorch_tanh")
    throw c.bad("activation_function", "'" + act + "' is not supported; expected gelu_new");
  for (const char* k : {"scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"})
    if (c.bool_or(k, false)) throw c.bad(k, "true is not supported");
  return m;
}

}  // namespace

HfConfig parse_hf_config(const std::string& text, const std::string& cpath) {
  HfConfig ck;
  const json j = json_file::parse(text, cpath);
  QF_CHECK_INPUT(j.is_object(), cpath, ": expected a JSON object");
  Cfg c{j, cpath};
  std::string arch;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    arch = j["architectures"][0].get<std::string>();
  std::string known;
  for (auto& a : kArchitectures) known += (known.empty() ? "" : ", ") + a;
  QF_CHECK_INPUT(std::find(kArchitectures.begin(), kArchitectures.end(), arch) != kArchitectures.end(), cpath,
                 ": architecture '", arch, "' is not supported; qforge loads ", known);
  ck.architecture = arch;
  for (const char* k : {"torch_dtype", "dtype"})
    QF_CHECK_INPUT(!j.contains(k) || j[k].is_null() || j[k].is_string(), cpath, ": '", k, "' must be a string such as \"bfloat16\"");
  ck.torch_dtype = "float32";
  for (const char* k : {"dtype", "torch_dtype"})  // torch_dtype wins when both are there
    if (j.contains(k) && j[k].is_string()) ck.torch_dtype = j[k].get<std::string>();
  // A key of the wrong JSON type (e.g. "hidden_act": 3): "<file>: 'hidden_act': expected a string, found a number".
  ck.config = json_file::interpret(cpath, [&] { return arch == "GPT2LMHeadModel" ? gpt2(c) : llama_like(c, arch, ck.notes); });
  return ck;
}

}  // namespace qf::models
