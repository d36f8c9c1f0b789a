#include "models/hf.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/strings.h"
#include "core/safetensors.h"

namespace qf::models {
namespace {

namespace sfs = std::filesystem;
using json = nlohmann::json;

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
  int64_t i64(const char* k) const {
    if (!has(k)) throw bad(k, "is missing");
    if (!j[k].is_number_integer() || j[k].get<int64_t>() <= 0) throw bad(k, "must be a positive integer");
    return j[k].get<int64_t>();
  }
  int64_t i64_or(const char* k, int64_t def) const { return has(k) ? i64(k) : def; }
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
    std::string type = rs.value("rope_type", rs.value("type", std::string()));
    if (type == "linear") {
      m.rope_scaling = RopeScaling::Linear;
      m.rope_factor = rs.value("factor", 1.0);
    } else if (type == "llama3") {
      m.rope_scaling = RopeScaling::Llama3;
      m.rope_factor = rs.value("factor", 8.0);
      m.rope_low_freq_factor = rs.value("low_freq_factor", 1.0);
      m.rope_high_freq_factor = rs.value("high_freq_factor", 4.0);
      m.rope_original_max_seq_len = rs.value("original_max_position_embeddings", int64_t{8192});
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

bool is_conv1d(const std::string& name) {
  for (const char* s : {".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"})
    if (ends_with(name, s)) return true;
  return false;
}

// Tensors a checkpoint may carry that the model has no use for.
bool ignorable(const std::string& name, const ModelConfig& c) {
  for (const char* s : {".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias"})
    if (ends_with(name, s)) return true;
  return c.tie_embeddings && name == "lm_head.weight";  // the tied copy some exporters keep
}

}  // namespace

HfCheckpoint read_hf_checkpoint(const std::string& dir) {
  HfCheckpoint ck;
  ck.dir = dir;
  const std::string cpath = dir + "/config.json";
  QF_CHECK_INPUT(sfs::is_directory(dir), "'", dir, "' is not a directory (expected a Hugging Face checkpoint)");
  QF_CHECK_INPUT(sfs::exists(cpath), "'", dir, "' has no config.json; is it a Hugging Face checkpoint directory?");
  json j;
  try {
    j = json::parse(fs::read_file(cpath));
  } catch (const json::exception& e) {
    throw InputError(qf::str(cpath, ": not valid JSON (", e.what(), ")"));
  }
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
  try {
    ck.config = arch == "GPT2LMHeadModel" ? gpt2(c) : llama_like(c, arch, ck.notes);
  } catch (const json::exception& e) {  // a key of the wrong JSON type (e.g. "hidden_act": 3)
    throw InputError(qf::str(cpath, ": a value has the wrong JSON type for its key (", e.what(),
                             "); compare it with the keys transformers writes for ", arch));
  }

  const std::string index = dir + "/model.safetensors.index.json";
  if (sfs::exists(index)) {
    json ij;
    try {
      ij = json::parse(fs::read_file(index));
    } catch (const json::exception& e) {
      throw InputError(qf::str(index, ": not valid JSON (", e.what(), ")"));
    }
    QF_CHECK_INPUT(ij.contains("weight_map") && ij["weight_map"].is_object(), index, ": missing the 'weight_map' object");
    std::set<std::string> files;
    for (auto it = ij["weight_map"].begin(); it != ij["weight_map"].end(); ++it) {
      QF_CHECK_INPUT(it->is_string(), index, ": weight_map['", it.key(), "'] is not a file name");
      const std::string f = it->get<std::string>();
      QF_CHECK_INPUT(f.find('/') == std::string::npos && f.find("..") == std::string::npos, index, ": shard name '", f,
                     "' must be a plain file name in the checkpoint directory");
      ck.weight_map[it.key()] = f;
      files.insert(f);
    }
    for (auto& f : files) {
      QF_CHECK_INPUT(sfs::exists(dir + "/" + f), index, ": shard '", f, "' is listed but missing from ", dir);
      ck.files.push_back(f);
    }
  } else {
    QF_CHECK_INPUT(sfs::exists(dir + "/model.safetensors"), "'", dir,
                   "' has neither model.safetensors nor model.safetensors.index.json (only safetensors checkpoints load)");
    ck.files.push_back("model.safetensors");
  }
  return ck;
}

void load_hf_weights(CausalLM& model, const HfCheckpoint& ck, bool progress, bool populate) {
  std::map<std::string, at::Tensor> params;
  for (auto& p : model.named_parameters()) params[p.key()] = p.value();
  const bool gpt2 = ck.config.family == Family::Gpt2;
  // Pass 1: headers only (no tensor data is read), every check before any copy.
  std::map<std::string, std::string> found;  // param -> file
  std::vector<std::string> problems;
  for (auto& f : ck.files) {
    const std::string path = ck.dir + "/" + f;
    for (auto& e : st::read_header(path).entries) {
      const std::string& name = e.name;
      if (!ck.weight_map.empty()) {
        auto w = ck.weight_map.find(name);
        if (w == ck.weight_map.end() || w->second != f) {
          problems.push_back(qf::str(path, ": tensor '", name, "' is not listed for this shard in model.safetensors.index.json"));
          continue;
        }
      }
      auto it = params.find(name);
      if (it == params.end()) {
        if (!ignorable(name, ck.config))
          problems.push_back(qf::str(path, ": unexpected tensor '", name, "' for ", ck.architecture, " (not loaded)"));
        continue;
      }
      auto want = it->second.sizes().vec();
      if (gpt2 && is_conv1d(name)) std::swap(want[0], want[1]);
      if (e.shape != want)
        problems.push_back(qf::str(path, ": tensor '", name, "' has shape ", at::IntArrayRef(e.shape),
                                   " but config.json implies ", at::IntArrayRef(want)));
      if (!at::isFloatingType(st::scalar_type(e.dtype)))
        problems.push_back(qf::str(path, ": tensor '", name, "' has dtype ", st::info(e.dtype).name,
                                   ", expected a float type"));
      found[name] = f;
    }
  }
  for (auto& [name, p] : params)
    if (!found.count(name)) problems.push_back(qf::str(ck.dir, ": weight '", name, "' is missing from the checkpoint"));
  if (!problems.empty()) {
    std::string msg = str("cannot load ", ck.dir, " (", problems.size(), " problem", problems.size() > 1 ? "s" : "", "):");
    for (size_t i = 0; i < problems.size() && i < 20; ++i) msg += "\n  - " + problems[i];
    if (problems.size() > 20) msg += str("\n  ... and ", problems.size() - 20, " more");
    throw InputError(msg);
  }
  // Pass 2, one shard mapped at a time. A tensor whose dtype and layout already match the parameter
  // becomes the parameter's storage (zero-copy: the page cache backs it, copy-on-write); others are
  // converted into the parameter and their source pages are dropped right away, so peak memory
  // stays near one copy of the model.
  at::NoGradGuard ng;
  std::unique_ptr<core::ProgressBar> bar;
  if (progress) bar = std::make_unique<core::ProgressBar>("load", static_cast<int64_t>(params.size()), 0, "tensor");
  int64_t done = 0;
  for (auto& f : ck.files) {
    auto file = st::load(ck.dir + "/" + f, populate);
    for (auto& [name, t] : file.tensors) {
      auto it = params.find(name);
      if (it == params.end()) continue;
      const bool transpose = gpt2 && is_conv1d(name);
      auto& p = it->second;
      if (!transpose && t.scalar_type() == p.scalar_type() && t.is_contiguous() && t.numel() > 0) {
        p.set_data(t);
      } else {
        p.copy_(transpose ? t.t() : t);
        st::drop_pages(t);
      }
      if (bar) bar->update(++done);
    }
  }
  if (bar) bar->finish();
  for (auto& n : ck.notes) log::warn(ck.dir, ": ", n);
}

nlohmann::json hf_config_json(const ModelConfig& c, const std::string& torch_dtype) {
  if (c.family == Family::Gpt2)
    return {{"architectures", {"GPT2LMHeadModel"}}, {"model_type", "gpt2"}, {"vocab_size", c.vocab_size},
            {"n_embd", c.dim}, {"n_layer", c.n_layers}, {"n_head", c.n_heads}, {"n_inner", c.ffn()},
            {"n_positions", c.max_seq_len}, {"layer_norm_epsilon", c.norm_eps}, {"activation_function", "gelu_new"},
            {"tie_word_embeddings", true}, {"torch_dtype", torch_dtype}};
  const bool qwen2 = c.qkv_bias;
  json j = {{"architectures", {qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
            {"model_type", qwen2 ? "qwen2" : "llama"},
            {"vocab_size", c.vocab_size},
            {"hidden_size", c.dim},
            {"intermediate_size", c.ffn()},
            {"num_hidden_layers", c.n_layers},
            {"num_attention_heads", c.n_heads},
            {"num_key_value_heads", c.kv_heads()},
            {"max_position_embeddings", c.max_seq_len},
            {"rope_theta", c.rope_theta},
            {"rms_norm_eps", c.norm_eps},
            {"tie_word_embeddings", c.tie_embeddings},
            {"hidden_act", "silu"},
            {"torch_dtype", torch_dtype},
            {"rope_scaling", nullptr}};
  if (!qwen2) {
    j["head_dim"] = c.hdim();
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
  } else {
    QF_CHECK(c.hdim() * c.n_heads == c.dim, "Qwen2 export needs head_dim * n_heads == dim");
  }
  if (c.rope_scaling == RopeScaling::Linear) j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_factor}};
  if (c.rope_scaling == RopeScaling::Llama3)
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope_factor},
                         {"low_freq_factor", c.rope_low_freq_factor},
                         {"high_freq_factor", c.rope_high_freq_factor},
                         {"original_max_position_embeddings", c.rope_original_max_seq_len}};
  return j;
}

void write_hf_weights(const ModelConfig& c, const std::vector<std::pair<std::string, at::Tensor>>& weights,
                      const std::string& dir, at::ScalarType dtype, int64_t max_shard_bytes) {
  const std::string tname = dtype == at::kBFloat16 ? "bfloat16" : dtype == at::kHalf ? "float16" : "float32";
  fs::write_atomic(dir + "/config.json", hf_config_json(c, tname).dump(2) + "\n");
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> shards(1);
  int64_t bytes = 0, total = 0;
  for (auto& [name, t] : weights) {
    auto w = (c.family == Family::Gpt2 && is_conv1d(name) ? t.t() : t).to(dtype).contiguous();
    const int64_t nb = w.numel() * w.element_size();
    if (bytes > 0 && bytes + nb > max_shard_bytes) {
      shards.emplace_back();
      bytes = 0;
    }
    shards.back().emplace_back(name, w);
    bytes += nb;
    total += nb;
  }
  const st::Metadata meta{{"format", "pt"}};
  if (shards.size() == 1) {
    st::save(dir + "/model.safetensors", shards[0], meta);
    return;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", json::object()}};
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    st::save(dir + "/" + name, shards[i], meta);
    for (auto& [n, t] : shards[i]) index["weight_map"][n] = name;
  }
  fs::write_atomic(dir + "/model.safetensors.index.json", index.dump(2) + "\n");
}

std::shared_ptr<CausalLM> load_hf_model(const std::string& dir, bool progress) {
  auto ck = read_hf_checkpoint(dir);
  auto m = build_model(ck.config, /*init=*/false);
  load_hf_weights(*m, ck, progress);
  return m;
}

}  // namespace qf::models
