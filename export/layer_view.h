// The model as the exporters write it, one layer at a time: what peft::merge_lora and (for the
// packed layouts) quant::convert would leave in a slot, built for that layer alone without replacing
// or changing anything in the model. An export therefore leaves the caller's model as it was
// (modules, parameters, buffers) and costs at most one layer's converted copy of extra memory; its
// bytes are those of exporting the merged + converted model.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/linear.h"
#include "models/transformer.h"
#include "quant/qat.h"

namespace qf::exporter {

// merge_lora + convert for one linear:
//  - a LoRA layer on a fake-quant base: a QuantizedLinear packed from W + s*BA by the base's
//    quantizer (LoraLinear::merged_weight, QuantizedLinear::from_fake_quant);
//  - a LoRA layer on a llama.cpp-blocks base: a QuantizedLinear of W + s*BA in the base's type
//    (quant::BlockLinear::packed; with exact merge, exactly the trained layer);
//  - a llama.cpp-blocks base alone: a QuantizedLinear holding its blocks;
//  - a LoRA layer on any other base: the DenseLinear merge_lora makes (LoraLinear::merged());
//  - a fake-quant layer: its QuantizedLinear (QuantizedLinear::from_fake_quant);
//  - anything else (float, NF4, already converted): `m` itself.
std::shared_ptr<models::LinearBase> converted_linear(const std::shared_ptr<models::LinearBase>& m);
// The spec converted_linear(m) is packed in (nullptr: it stays float), without packing anything.
const quant::QuantSpec* converted_spec(const models::LinearBase& m);
// merge_lora alone (the HF layout): the float weight [out, in] the merged layer computes with
// (its effective_weight(): fake-quant bases fake-quantize W + s*BA).
at::Tensor merged_weight(models::LinearBase& m);
// convert for the token embedding: a FakeQuantEmbedding's QuantizedEmbedding, otherwise `e` itself.
std::shared_ptr<models::EmbeddingBase> converted_embedding(const std::shared_ptr<models::EmbeddingBase>& e);
// Every tensor of `model` that is not a linear's, by HF name, in `dtype`: the (converted) token
// embedding table, then the norms and other parameters (what the int / AWQ exporters write as they are).
std::vector<std::pair<std::string, at::Tensor>> non_linear_tensors(models::CausalLM& model, at::ScalarType dtype);
// The linears (lm_head aside) that stay float after convert, with their input widths (for
// quant::width_fallbacks); every converted one's spec goes to `check` (which throws naming it) first.
std::vector<std::pair<std::string, int64_t>> float_linear_widths(
    models::CausalLM& model, const std::function<void(const std::string&, const quant::QuantSpec&)>& check);

}  // namespace qf::exporter
