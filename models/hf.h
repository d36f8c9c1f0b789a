// Hugging Face checkpoint directories in: config.json (LlamaForCausalLM, Qwen2ForCausalLM,
// MistralForCausalLM, GPT2LMHeadModel) + model.safetensors or sharded model-*.safetensors with
// model.safetensors.index.json; fp32/fp16/bf16 weights; tied embeddings.
// Invariants:
//  - read_hf_checkpoint validates config.json (models/hf_config.h, torch-free) and the file list
//    (every shard named by the index exists) before any weight is read; errors name the file and key;
//  - load_hf_weights checks every tensor's presence, shape and dtype class against the model first
//    and only then copies (memory-mapped shards, one at a time), so a bad checkpoint loads nothing;
//  - GPT-2's Conv1D weights ([in, out] in the file) are transposed to qforge's [out, in] layout.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <nlohmann/json.hpp>
#include <memory>
#include <string>
#include <vector>

#include "models/config.h"
#include "models/transformer.h"

namespace qf::models {

struct HfCheckpoint {
  std::string dir;
  std::string architecture;                        // e.g. "LlamaForCausalLM"
  std::string torch_dtype;                         // as config.json says ("float32", "bfloat16", ...)
  ModelConfig config;
  std::vector<std::string> files;                  // safetensors files, in load order
  std::map<std::string, std::string> weight_map;   // tensor -> file (sharded checkpoints)
  std::vector<std::string> notes;                  // things the user should know (e.g. sliding window)
};

HfCheckpoint read_hf_checkpoint(const std::string& dir);
// Copies the checkpoint's weights into `model` (built from ckpt.config), converting dtypes.
// populate=false: zero-copy tensors stay unread until used (st::load), for one-pass streaming readers.
void load_hf_weights(CausalLM& model, const HfCheckpoint& ckpt, bool progress = true, bool populate = true);
// read + build + load.
std::shared_ptr<CausalLM> load_hf_model(const std::string& dir, bool progress = true);

// The config.json transformers needs to rebuild `c` (LlamaForCausalLM; Qwen2ForCausalLM when the
// model has qkv biases; GPT2LMHeadModel), weights stored as `torch_dtype`.
nlohmann::json hf_config_json(const ModelConfig& c, const std::string& torch_dtype);
// Writes config.json + model.safetensors (or model-0000i-of-0000n.safetensors + index above
// `max_shard_bytes`) into `dir` (which must exist), in `dtype` (float32/bfloat16/float16), HF names
// and layouts (GPT-2 Conv1D transposed back). `weights` are the model's float weights by name.
// `config_extra` keys are merged into config.json (e.g. the tokenizer's bos/eos/pad ids).
void write_hf_weights(const ModelConfig& c, const std::vector<std::pair<std::string, at::Tensor>>& weights,
                      const std::string& dir, at::ScalarType dtype, int64_t max_shard_bytes,
                      const nlohmann::json& config_extra = nlohmann::json::object());

}  // namespace qf::models
