#include "export/layer_view.h"

#include <ATen/ATen.h>

#include "peft/lora.h"
#include "quant/block_linear.h"

namespace qf::exporter {

std::shared_ptr<models::LinearBase> converted_linear(const std::shared_ptr<models::LinearBase>& m) {
  at::NoGradGuard ng;
  if (auto l = std::dynamic_pointer_cast<peft::LoraLinear>(m)) {
    if (auto* fq = dynamic_cast<quant::FakeQuantLinear*>(l->base.get()))
      return quant::QuantizedLinear::from_fake_quant(*fq, l->merged_weight());
    // LoRA on llama.cpp blocks: W + s*BA re-quantized into the base's type (exact merge: the trained layer)
    if (auto* blk = dynamic_cast<quant::BlockLinear*>(l->base.get())) return blk->packed(l->merged_weight());
    return l->merged();  // a new DenseLinear; the LoRA layer and its base are left alone
  }
  if (auto* fq = dynamic_cast<quant::FakeQuantLinear*>(m.get())) return quant::QuantizedLinear::from_fake_quant(*fq);
  if (auto* blk = dynamic_cast<quant::BlockLinear*>(m.get())) return blk->packed();
  return m;
}

const quant::QuantSpec* converted_spec(const models::LinearBase& m) {
  const models::LinearBase* base = &m;
  if (auto* l = dynamic_cast<const peft::LoraLinear*>(&m)) {
    if (!dynamic_cast<const quant::FakeQuantLinear*>(l->base.get()) && !dynamic_cast<const quant::BlockLinear*>(l->base.get()))
      return nullptr;  // merges to a DenseLinear
    base = l->base.get();
  }
  if (auto* blk = dynamic_cast<const quant::BlockLinear*>(base)) return &blk->spec();
  if (auto* fq = dynamic_cast<const quant::FakeQuantLinear*>(base)) return &fq->weight_fq->spec();
  if (auto* ql = dynamic_cast<const quant::QuantizedLinear*>(base)) return &ql->weight_spec();
  return nullptr;
}

at::Tensor merged_weight(models::LinearBase& m) {
  at::NoGradGuard ng;
  if (auto* l = dynamic_cast<peft::LoraLinear*>(&m)) {
    if (auto* fq = dynamic_cast<quant::FakeQuantLinear*>(l->base.get())) return fq->weight_fq->forward(l->merged_weight());
    if (l->exact) return l->effective_weight();  // a llama.cpp-blocks base: fq(W + s*BA), what was trained
    return l->merged_weight();
  }
  return m.effective_weight();
}

std::shared_ptr<models::EmbeddingBase> converted_embedding(const std::shared_ptr<models::EmbeddingBase>& e) {
  at::NoGradGuard ng;
  if (auto* f = dynamic_cast<quant::FakeQuantEmbedding*>(e.get())) return quant::QuantizedEmbedding::from_fake_quant(*f);
  return e;
}

std::vector<std::pair<std::string, int64_t>> float_linear_widths(
    models::CausalLM& model, const std::function<void(const std::string&, const quant::QuantSpec&)>& check) {
  std::vector<std::pair<std::string, int64_t>> widths;
  for (auto& ns : models::linear_slots(model)) {
    if (ns.name == "lm_head") continue;
    if (const quant::QuantSpec* spec = converted_spec(*ns.slot->get())) {
      check(ns.name, *spec);
      continue;
    }
    widths.emplace_back(ns.name, ns.slot->get()->in_features);
  }
  return widths;
}

std::vector<std::pair<std::string, at::Tensor>> non_linear_tensors(models::CausalLM& model, at::ScalarType dtype) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  const auto emb_name = model.token_embedding_name();
  out.emplace_back(emb_name + ".weight", converted_embedding(model.token_embedding().get())->table().to(dtype).contiguous());
  std::vector<std::string> slot_names;
  for (auto& ns : models::linear_slots(model)) slot_names.push_back(ns.name);
  for (auto& p : model.named_parameters()) {
    const auto& k = p.key();
    bool owned = k.rfind(emb_name + ".", 0) == 0;
    for (auto& n : slot_names) owned |= k.rfind(n + ".", 0) == 0;
    if (!owned) out.emplace_back(k, p.value().detach().to(dtype).contiguous());
  }
  return out;
}

}  // namespace qf::exporter
