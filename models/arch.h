// Model families as data: one ArchSpec per family states everything the rest of qforge needs to
// know about its layout, so quant/ptq, export/gguf, export/hf, peft and models/hf read the spec
// instead of naming modules themselves:
//  - module names (Hugging Face's): the embedding, the decoder layers' prefix, each layer's linears
//    and 1-D tensors, the final norm and the lm_head; which linears HF stores as Conv1D ([in, out]);
//  - sequential PTQ groups (GPTQ quantizes them one after another within a layer) and AWQ's scaling
//    pairs (a norm, or a linear whose output rows feed the next linears, -> the linears it scales);
//  - config.json: the architecture names read as this family, the keys of the common
//    hyper-parameters, and hooks for the family's own keys (read: validate and refuse what qforge
//    does not implement, naming the key; write: what transformers needs to rebuild the model);
//  - GGUF: llama.cpp's architecture name and each tensor's GGUF name and quantization role
//    ("" when llama.cpp has no architecture for the family: export refuses).
// Torch-free (the config.json fuzz target links it). Adding a family: a spec in models/arch.cpp, its
// modules in models/transformer.cpp (whose names a test checks against the spec), and tests.
#pragma once
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "models/config.h"

namespace qf::models {

class HfConfigReader;

// What a weight is to llama.cpp's quantization mixtures (llama-quantize's tensor categories).
enum class TensorRole { TokenEmbd, Output, AttnQ, AttnK, AttnV, AttnQkv, AttnOutput, FfnGate, FfnUp, FfnDown };

// convert_hf_to_gguf.py permutes Q and K rows from HF's rotate-half RoPE layout to llama.cpp's.
enum class RopeRows { None, QueryHeads, KvHeads };

struct ArchLinear {
  std::string name;                 // within a decoder layer, e.g. "self_attn.q_proj"
  TensorRole role;
  std::string gguf;                 // GGUF name within "blk.N.", e.g. "attn_q" ("" = none)
  RopeRows rope_rows = RopeRows::None;
  bool conv1d = false;              // HF stores the weight [in, out] (GPT-2's Conv1D)
  bool residual = false;            // writes into the residual stream (scaled init where the family does)
};

// A per-layer 1-D tensor (norm weight/bias) and its GGUF name within "blk.N.".
struct ArchTensor {
  std::string name, gguf;
};

struct AwqPair {
  std::string prev;                 // a norm, or a linear whose output rows feed `linears` directly
  bool prev_is_norm;
  std::vector<std::string> linears;
  bool mlp_input = false;           // `linears` open the MLP: scales are judged on the MLP's output
};

// The MLP's activation: act(up(x)), or act(gate(x)) * up(x) when gated.
enum class Activation { Silu, GeluTanh, Relu };

// config.json spellings of the hyper-parameters every family has.
struct HfKeys {
  const char* hidden;
  const char* layers;
  const char* heads;
  const char* ffn;
  const char* max_positions;
  const char* norm_eps;
};

struct ArchSpec {
  Family family;
  std::string name;                            // recipe spelling (model.family)
  std::vector<std::string> hf_architectures;   // config.json "architectures" read as this family
  HfKeys hf_keys;
  int64_t hf_default_max_positions;           // when config.json omits them
  double hf_default_norm_eps;
  // The family's own config.json keys: read into `m` (the common keys already are), appending
  // things the user should know to `notes`; write what transformers needs (architectures,
  // model_type, activation, rope, ...).
  void (*read_hf)(const HfConfigReader& r, const std::string& architecture, ModelConfig& m,
                  std::vector<std::string>& notes);
  void (*write_hf)(const ModelConfig& c, nlohmann::json& j);

  std::string embed;                           // "model.embed_tokens"
  std::string positions;                       // learned position table ("" = RoPE)
  std::string layers;                          // "model.layers": layer i is "<layers>.<i>"
  std::vector<ArchLinear> linears;             // per layer, in forward order
  std::vector<ArchTensor> layer_tensors;       // per layer 1-D tensors
  std::string final_norm;                      // "model.norm" (its .weight, and .bias where it has one)
  std::string lm_head;                         // absent when the embeddings are tied
  std::vector<std::string> optional_modules;   // float modules present only in some configs (OPT's project_in/out)
  bool tied_always = false;                    // the family always ties lm_head to the embedding
  bool scaled_residual_init = false;           // residual linears init with std / sqrt(2 * n_layers) (GPT-2)
  bool gemma_norms = false;                    // RMSNorm weight w scales by (1 + w), computed in fp32 (Gemma)
  bool sandwich_norms = false;                 // norms after attention and MLP too (post_attention_norm, post_ffw_norm)
  bool scale_embeddings = false;               // token embeddings times sqrt(hidden) (Gemma)
  bool fused_qkv = false;                      // one AttnQkv projection, rows [q; k; v] (Phi-3)
  bool fused_gate_up = false;                  // the FfnUp projection holds rows [gate; up] (Phi-3)
  std::vector<std::string> ignored_suffixes;   // checkpoint tensors the model has no use for
  std::vector<std::vector<std::string>> ptq_groups;
  std::vector<AwqPair> awq_pairs;
  Activation mlp_act = Activation::Silu;
  bool gated_mlp = false;                      // FfnGate exists: act(gate(x)) * up(x)
  std::string gguf_arch;                       // llama.cpp architecture ("" = none)
  std::string gguf_missing = "its llama.cpp architecture is not written by qforge yet";  // why, when none

  std::string layer_prefix(int64_t i) const { return layers + "." + std::to_string(i); }
  const ArchLinear* linear(const std::string& name) const;  // nullptr when not a layer linear
  const ArchLinear& linear(TensorRole role) const;          // throws when the family has none
  bool has_conv1d() const;
  // The module holding the per-layer tensor whose GGUF name is `gguf` ("attn_norm.weight" -> "input_layernorm").
  std::string layer_module(const std::string& gguf) const;
  // The layer linear whose weight `param` is ("model.layers.3.mlp.down_proj.weight"); nullptr otherwise.
  const ArchLinear* layer_linear_of(const std::string& param) const;
  // True when `param` (a full HF tensor name) is a Conv1D weight stored [in, out].
  bool is_conv1d_weight(const std::string& param) const {
    const ArchLinear* l = layer_linear_of(param);
    return l && l->conv1d;
  }
};

const ArchSpec& arch_spec(Family f);
const std::vector<const ArchSpec*>& arch_specs();
// The spec reading config.json architecture `hf_architecture`; nullptr when none does.
const ArchSpec* arch_for_hf(const std::string& hf_architecture);
// "LlamaForCausalLM, Qwen2ForCausalLM, ..." for error messages.
std::string hf_architectures_list();

// Splits "self_attn.q_proj" into {"self_attn", "q_proj"} ({"", name} without a dot).
std::pair<std::string, std::string> split_last(const std::string& path);

}  // namespace qf::models
