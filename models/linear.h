// Swappable linear layers. Invariant: every projection in a qforge model is held through a
// LinearSlot, so quant::prepare / peft::apply_lora can replace it (registered child AND the pointer
// the parent's forward uses) by its Hugging Face name (the family's names: models/arch.h).
// Weight layout is [out_features, in_features] (torch/HF Linear), bias optional.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <string>

namespace qf::models {

// Base of every linear-like module (dense, fake-quant, NF4, LoRA wrapper, converted int).
class LinearBase : public torch::nn::Module {
 public:
  LinearBase(int64_t in, int64_t out) : in_features(in), out_features(out) {}
  virtual at::Tensor forward(const at::Tensor& x) = 0;
  // The weight a float matmul would use (dequantized / merged where applicable), [out, in].
  virtual at::Tensor effective_weight() = 0;
  virtual at::Tensor bias_or_undefined() { return {}; }
  const int64_t in_features, out_features;
};

class DenseLinear : public LinearBase {
 public:
  DenseLinear(int64_t in, int64_t out, bool bias);
  at::Tensor forward(const at::Tensor& x) override;
  at::Tensor effective_weight() override { return weight; }
  at::Tensor bias_or_undefined() override { return bias; }
  void pretty_print(std::ostream& s) const override;
  at::Tensor weight, bias;
};

// A frozen linear whose weight is stored compactly (NF4, bf16, ...): materialize(dtype) builds the
// float weight on demand. forward keeps nothing but `this` for backward and re-materializes there,
// so between forward and backward only the compact copy is alive (bitsandbytes' MatMul4Bit). The
// module has no parameters; bias (if any) is a frozen buffer.
class FrozenLinear : public LinearBase {
 public:
  using LinearBase::LinearBase;
  virtual at::Tensor materialize(at::ScalarType dtype) const = 0;
  at::Tensor forward(const at::Tensor& x) override;
  at::Tensor effective_weight() override { return materialize(at::kFloat); }
  at::Tensor bias_or_undefined() override { return bias; }
  at::Tensor bias;
};

// Frozen weight kept in bf16 or fp16 (the "bf16 LoRA" base): the same buffer names as DenseLinear.
class HalfLinear : public FrozenLinear {
 public:
  HalfLinear(LinearBase& dense, at::ScalarType storage);
  // From a [out, in] weight and an optional bias (what a streaming load hands over): the same module
  // as from a dense layer holding them. A weight already in `storage` is kept, not copied.
  HalfLinear(const at::Tensor& weight, const at::Tensor& bias, at::ScalarType storage);
  at::Tensor materialize(at::ScalarType dtype) const override { return weight.to(dtype); }
  void pretty_print(std::ostream& s) const override;
  at::Tensor weight;
};

// A dense linear whose weight is still the checkpoint's tensor: a view of the memory-mapped file in
// the file's dtype (GPT-2's Conv1D as a transposed view), not read yet. Streaming PTQ (`qforge
// quantize` of a Hugging Face dir) installs these so no more than one decoder layer's float weights
// are ever resident: load() builds the DenseLinear a whole load would have held (the same values:
// widening bf16/fp16 is exact) and drops the source pages it read. Forward refuses (load first).
class DeferredLinear : public LinearBase {
 public:
  DeferredLinear(const at::Tensor& source, const at::Tensor& bias);
  at::Tensor forward(const at::Tensor& x) override;
  at::Tensor effective_weight() override;
  at::Tensor bias_or_undefined() override { return bias; }
  std::shared_ptr<DenseLinear> load(at::ScalarType dtype, at::Device device) const;
  void pretty_print(std::ostream& s) const override;
  at::Tensor source;  // [out, in], not a registered tensor (to() and state dicts do not see it)
  at::Tensor bias;    // a parameter, loaded with the rest of the model
};

// A named handle a parent module holds and calls; replace() swaps the registered child too.
class LinearSlot {
 public:
  LinearSlot() = default;
  LinearSlot(torch::nn::Module* parent, std::string name, std::shared_ptr<LinearBase> m);
  at::Tensor operator()(const at::Tensor& x) const { return mod_->forward(x); }
  const std::shared_ptr<LinearBase>& get() const { return mod_; }
  void replace(std::shared_ptr<LinearBase> m);
  const std::string& name() const { return name_; }

 private:
  torch::nn::Module* parent_ = nullptr;
  std::string name_;
  std::shared_ptr<LinearBase> mod_;
};

// Implemented by modules that own LinearSlots, so a path can be resolved to its slot.
class HasLinearSlots {
 public:
  virtual ~HasLinearSlots() = default;
  virtual LinearSlot* linear_slot(const std::string& child_name) = 0;
};

// Base of token-embedding tables (dense, fake-quant, converted). table() is the [vocab, dim] matrix
// that lookups and a tied lm_head use, so quantizing the table quantizes both, as llama.cpp does.
class EmbeddingBase : public torch::nn::Module {
 public:
  EmbeddingBase(int64_t num, int64_t dim) : num_embeddings(num), embedding_dim(dim) {}
  virtual at::Tensor table() = 0;
  const int64_t num_embeddings, embedding_dim;
};

class DenseEmbedding : public EmbeddingBase {
 public:
  DenseEmbedding(int64_t num, int64_t dim);
  at::Tensor table() override { return weight; }
  void pretty_print(std::ostream& s) const override;
  at::Tensor weight;
};

// Handle for the token embedding, swappable like a LinearSlot.
class EmbeddingSlot {
 public:
  EmbeddingSlot() = default;
  EmbeddingSlot(torch::nn::Module* parent, std::string name, std::shared_ptr<EmbeddingBase> m);
  const std::shared_ptr<EmbeddingBase>& get() const { return mod_; }
  void replace(std::shared_ptr<EmbeddingBase> m);
  const std::string& name() const { return name_; }

 private:
  torch::nn::Module* parent_ = nullptr;
  std::string name_;
  std::shared_ptr<EmbeddingBase> mod_;
};

// Every linear under `root`: (full HF-style name, slot). Order = module registration order.
struct NamedSlot {
  std::string name;
  LinearSlot* slot;
};
std::vector<NamedSlot> linear_slots(torch::nn::Module& root);

}  // namespace qf::models
