// Decoder-only causal language models with Hugging Face module/parameter names, which come from
// each family's architecture spec (models/arch.h): llama (pre-RMSNorm, RoPE, gated SiLU MLP, GQA,
// optional qkv bias) and gpt2 (pre-LayerNorm, learned positions, GELU MLP; HF's Conv1D stores
// [in, out], qforge stores [out, in] and transposes at import/export). A test checks every built
// model's parameter names against its spec.
// Invariant: forward(ids, cache) over a prompt then token-by-token equals one full forward.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <vector>

#include "models/config.h"
#include "models/linear.h"

namespace qf::models {

// Preallocated key/value cache: per layer [B, n_kv_heads, capacity, head_dim].
struct KVCache {
  std::vector<at::Tensor> k, v;
  int64_t length = 0;    // tokens already cached
  int64_t capacity = 0;
};

class CausalLM : public torch::nn::Module {
 public:
  explicit CausalLM(ModelConfig c) : cfg(std::move(c)) {}
  // input_ids [B, T] int64 -> logits [B, T, vocab] (in the model dtype). With a cache, positions
  // continue from cache->length and the cache is extended. forward == logits(hidden(...)).
  at::Tensor forward(const at::Tensor& input_ids, KVCache* cache = nullptr) { return logits(hidden(input_ids, cache)); }
  // The hidden state the output layer reads ([B, T, dim], after the final norm), and the output
  // layer on any [..., dim] rows (a chunked loss calls it on slices): logits(h) needs no position.
  virtual at::Tensor hidden(const at::Tensor& input_ids, KVCache* cache = nullptr) = 0;
  virtual at::Tensor logits(const at::Tensor& h) = 0;
  // The module whose parameters logits() reads (lm_head, or the token embedding when tied).
  virtual torch::nn::Module& head_module() = 0;
  // Activation checkpointing: in training with grad enabled and no cache, every layer i with
  // i % checkpoint_every == 0 keeps only its input and recomputes in backward (0 = off).
  int64_t checkpoint_every = 0;

 protected:
  // fn(x), layer i's forward: checkpointed (models/checkpoint.h) over the layer's trainable
  // parameters when checkpoint_every asks for it and the call is a training forward without cache.
  at::Tensor run_layer(int64_t i, torch::nn::Module& mod, const at::Tensor& x, bool cached,
                       const std::function<at::Tensor(const at::Tensor&)>& fn);

 public:
  KVCache make_cache(int64_t batch, int64_t capacity) const;
  // Re-initialise parameters (normal(0, init_std) for linears/embeddings, ones/zeros for norms).
  void init_weights(uint64_t seed);
  int64_t num_parameters() const;
  // The token embedding table (model.embed_tokens / transformer.wte) and its HF name.
  virtual EmbeddingSlot& token_embedding() = 0;
  virtual std::string token_embedding_name() const = 0;
  // Layer-by-layer execution (PTQ calibration runs one decoder layer at a time):
  // embed(ids) is the hidden state entering layer 0, layer_forward(i, x) one layer's full-sequence
  // forward from position 0 (no cache), and layer_prefix(i) its HF name ("model.layers.3").
  // forward(ids) == head(layer_forward(n-1, ... layer_forward(0, embed(ids)))).
  virtual at::Tensor embed(const at::Tensor& input_ids) = 0;
  virtual at::Tensor layer_forward(int64_t i, const at::Tensor& x) = 0;
  // What the last layer's output becomes before the output layer (the final norm; OPT's
  // project_out): hidden(ids) == head_input(layer_forward(n-1, ... layer_forward(0, embed(ids)))).
  virtual at::Tensor head_input(const at::Tensor& x) = 0;
  virtual torch::nn::Module& layer(int64_t i) = 0;
  virtual std::string layer_prefix(int64_t i) const = 0;
  const ModelConfig cfg;
};

// init = false: parameters allocated in the model dtype but not initialised (every weight is
// loaded next, e.g. from a Hugging Face checkpoint).
std::shared_ptr<CausalLM> build_model(const ModelConfig& cfg, bool init = true);

// Rotary embedding tables for positions [start, start+T): cos, sin of shape [T, head_dim]
// (HF layout: the two halves repeat), using cfg.rope_theta and cfg.rope_scaling.
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const ModelConfig& cfg, int64_t start, int64_t T,
                                               const at::TensorOptions& opts);
// seq_len: the positions the forward covers (start + T); longrope's factors depend on it.
at::Tensor rope_inv_freq(const ModelConfig& cfg, int64_t seq_len = 0);
// The factor cos/sin are multiplied by (longrope's attention factor; 1 otherwise).
double rope_attention_scale(const ModelConfig& cfg);
// x [B, H, T, D]; cos/sin [T, R] with R <= D: the first R dims rotate, the rest pass (partial rotary).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace qf::models
