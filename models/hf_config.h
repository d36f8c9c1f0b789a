// A Hugging Face config.json read as qforge's ModelConfig, without libtorch: the architecture spec
// whose hf_architectures name config.json's "architectures"[0] (models/arch.h) says which keys hold
// the common hyper-parameters and reads the family's own. Invariant: parse_hf_config either returns
// a config whose sizes are all positive integers taken from the file, or throws qf::InputError naming
// the file and the key; it never throws anything else.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "models/config.h"

namespace qf::models {

struct HfConfig {
  std::string architecture;        // e.g. "LlamaForCausalLM"
  std::string torch_dtype;         // as config.json says ("float32" when it says nothing)
  ModelConfig config;
  std::vector<std::string> notes;  // things the user should know
};

// `text` is the content of config.json; `path` names it in errors.
HfConfig parse_hf_config(const std::string& text, const std::string& path);

// Typed access to a config.json object with errors naming the file and key. Sizes are capped at
// 2^31 - 1 (any real model's are far below) so arithmetic on them (4 * n_embd, products of
// dimensions) cannot overflow int64.
class HfConfigReader {
 public:
  HfConfigReader(const nlohmann::json& j, std::string path) : j(j), path(std::move(path)) {}
  const nlohmann::json& j;
  const std::string path;

  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  InputError bad(const char* k, const std::string& why) const;
  int64_t i64(const char* k) const;  // required positive integer
  int64_t i64_or(const char* k, int64_t def) const { return has(k) ? i64(k) : def; }
  double f64_or(const char* k, double def) const;
  double pos_f64_or(const char* k, double def) const;  // a positive finite number
  bool bool_or(const char* k, bool def) const;
  std::string string_or(const char* k, const std::string& def) const;
  // A nested object ("rope_scaling"), named "<path>: <key>" in errors.
  HfConfigReader child(const char* k) const;
};

}  // namespace qf::models
