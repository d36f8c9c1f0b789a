// Hugging Face checkpoint directories in: config.json (LlamaForCausalLM, Qwen2ForCausalLM,
// MistralForCausalLM, GPT2LMHeadModel) + model.safetensors or sharded model-*.safetensors with
// model.safetensors.index.json; fp32/fp16/bf16 weights; tied embeddings.
// Invariants:
//  - read_hf_checkpoint validates config.json (models/hf_config.h, torch-free) and the file list
//    (every shard named by the index exists) before any weight is read; errors name the file and key;
//  - load_hf_weights checks every tensor's presence, shape and dtype class against the model first
//    and only then copies (memory-mapped shards, one at a time), so a bad checkpoint loads nothing;
//  - GPT-2's Conv1D weights ([in, out] in the file) are transposed to qforge's [out, in] layout;
//  - with a LinearStreamer, the linears it claims are built from their tensors one at a time while
//    the shards stream past (the source pages dropped right after), so a low-bit base never exists
//    in full precision as a whole: the module it builds equals the one built from the fully loaded
//    dense layer (same weight values, in the model dtype, same bias);
//  - a quantized checkpoint (config.json quantization_config: GPTQ, AWQ GEMM, compressed-tensors;
//    models/hf_quantized.h) has its packed linears checked with the rest in pass 1 (shapes against
//    in/out and the group size, then g_idx / weight_shape data) and loads them DEQUANTIZED to the
//    model dtype (a streamer gets the dequantized weight like a dense one), except that a streamer
//    with build_nf4 keeps a bitsandbytes NF4 linear's bytes as they are (QLoRA's frozen base).
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <memory>
#include <string>
#include <vector>

#include "models/config.h"
#include "models/hf_config.h"
#include "models/hf_quantized.h"
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
  HfQuant quant;                                   // quantization_config (method None: a float checkpoint)
  // A GGUF file (models/gguf_config.h): `dir` is the file, `config` what its metadata says (rope tables
  // stored as tensors not yet read); its weights load through exporter::load_gguf_weights, never
  // load_hf_weights.
  bool gguf = false;
};

// What load_hf_weights did with a quantized checkpoint: each packed linear and its stored format.
struct HfLoadReport {
  std::vector<std::pair<std::string, std::string>> dequantized;  // (linear, "gptq int4 group 32 sym ...")
  std::vector<std::string> kept_packed;  // linears a streamer kept packed (bitsandbytes NF4 as QLoRA's base)
};

// Builds some linears of the model straight from their checkpoint tensors while loading (QLoRA's NF4
// base: peft::frozen_base_streamer). `claims(name)` picks linear slots by full name (only dense
// ones are offered); `build(name, weight, bias)` gets the weight with exactly the values the dense
// layer would have held ([out, in], in the model's dtype, or still bf16/fp16 where the model is fp32,
// widening being exact; a view of the file mapping when nothing had to be converted: read it, do not
// keep a reference unless that is the point) and the layer's loaded bias (undefined if none), and
// returns the module to install in the slot.
// mapped = true: `build` gets the file's tensor itself instead, unconverted (the file's dtype; GPT-2's
// Conv1D weight as a transposed view of it), for a builder that defers the read (DeferredLinear);
// its pages are then left to the module.
struct LinearStreamer {
  std::function<bool(const std::string& name)> claims;
  std::function<std::shared_ptr<LinearBase>(const std::string& name, const at::Tensor& weight, const at::Tensor& bias)>
      build;
  bool mapped = false;
  // Optional: a bitsandbytes NF4 linear (models::bnb_packed_nf4) offered packed as it is in the file;
  // returns the module keeping those bytes, or nullptr to take it through `build` dequantized.
  std::function<std::shared_ptr<LinearBase>(const std::string& name, const PackedNf4& packed, const at::Tensor& bias)>
      build_nf4;
  // Optional: a GPTQ / AWQ / compressed-tensors linear [out, in] offered packed, as its parts (part name ->
  // the file's tensor, a view of the mapping: copy what is kept); returns the module keeping them packed
  // (peft.base packed: models::PackedIntLinear), or nullptr to take it through `build` dequantized.
  std::function<std::shared_ptr<LinearBase>(const std::string& name, const HfQuant& q,
                                            const std::map<std::string, at::Tensor>& parts, int64_t out, int64_t in,
                                            const at::Tensor& bias)>
      build_packed;
  // Optional, for a GGUF input: a weight as the file stores it, whatever its type (gguf_type: its GGUF
  // tensor type id; blocks uint8 [out, n_blocks * type_size] in ggml's row layout, F32 / F16 / BF16 rows
  // as their bytes; cols = in_features); returns the
  // module keeping those bytes (peft.base <that type>: quant::BlockLinear, which copies them), or
  // nullptr to take it through `build` dequantized.
  std::function<std::shared_ptr<LinearBase>(const std::string& name, uint32_t gguf_type, const at::Tensor& blocks,
                                            int64_t cols, const at::Tensor& bias)>
      build_blocks;
};

// `dir` may also be a GGUF file: its config from the metadata (architecture "gguf:<arch>"), gguf = true.
HfCheckpoint read_hf_checkpoint(const std::string& dir);
// Copies the checkpoint's weights into `model` (built from ckpt.config), converting dtypes.
// populate=false: zero-copy tensors stay unread until used (st::load), for one-pass streaming readers.
// streamer: the claimed linears are built by it instead (see LinearStreamer), after every other
// tensor has loaded (so their biases are in place), one tensor resident at a time; shards are
// then never populated up front whatever `populate` says. Validation is unchanged (all of it first).
// report: filled with the linears read back from packed tensors (quantized checkpoints).
void load_hf_weights(CausalLM& model, const HfCheckpoint& ckpt, bool progress = true, bool populate = true,
                     const LinearStreamer* streamer = nullptr, HfLoadReport* report = nullptr);
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
