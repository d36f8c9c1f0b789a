// A Hugging Face config.json read as qforge's ModelConfig (LlamaForCausalLM, Qwen2ForCausalLM,
// MistralForCausalLM, GPT2LMHeadModel), without libtorch. Invariant: parse_hf_config either
// returns a config whose sizes are all positive integers taken from the file, or throws
// qf::InputError naming the file and the key; it never throws anything else.
#pragma once
#include <string>
#include <vector>

#include "models/config.h"

namespace qf::models {

struct HfConfig {
  std::string architecture;        // e.g. "LlamaForCausalLM"
  std::string torch_dtype;         // as config.json says ("float32" when it says nothing)
  ModelConfig config;
  std::vector<std::string> notes;  // things the user should know (e.g. sliding window)
};

// `text` is the content of config.json; `path` names it in errors.
HfConfig parse_hf_config(const std::string& text, const std::string& path);

}  // namespace qf::models
