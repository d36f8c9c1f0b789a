// `qforge export --format bnb-int8`: a Hugging Face checkpoint dir in bitsandbytes' LLM.int8 layout,
// what transformers' save_pretrained writes for a BitsAndBytesConfig(load_in_8bit=True) model and
// from_pretrained loads back as Linear8bitLt layers (bitsandbytes 0.50, transformers 4.57):
//  - per decoder linear L: L.weight int8 [out, in] (Int8Params' CB), L.SCB fp32 [out] (row absmax),
//    L.weight_format uint8 scalar 0 (row-major), L.bias in the float dtype;
//  - lm_head, the embedding and the norms in the float dtype (transformers keeps lm_head in float);
//  - config.json quantization_config {quant_method bitsandbytes, load_in_8bit true,
//    llm_int8_threshold, llm_int8_has_fp16_weight false, ...} as transformers writes it.
// What each linear holds: an int8 frozen base (peft.base int8, or a bnb 8-bit dir loaded as one) with
// no adapter keeps its CB / SCB bytes; any other linear (LoRA merged: W_dequant + s*BA, float,
// fake-quant or converted layers: the weight their forward uses) is quantized here as Int8Params
// does on .to(device) (quant/int8_lt.h), so the files equal what bitsandbytes would make of it.
// Invariants: built in a temp dir, re-read with models/hf (each linear's dequantized weight must equal
// int8_dequantize of the CB / SCB meant) before the rename; the model is not changed (layers are read
// one at a time as merge_lora leaves them: export/layer_view.h). Families with Conv1D weights (GPT-2)
// are refused (transformers does not convert them to Linear8bitLt in that layout).
#pragma once
#include <ATen/core/ScalarType.h>

#include <string>

#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::exporter {

struct Bnb8ExportResult {
  std::string dir;
  int64_t n_int8 = 0;    // linears written as CB / SCB
  int64_t n_kept = 0;    // of which int8 bases written with their own bytes
  int64_t bytes = 0;     // model.safetensors size
};

// `dtype`: the float tensors' dtype (kHalf, transformers' default for 8-bit models, kBFloat16 or
// kFloat); `threshold`: llm_int8_threshold (Linear8bitLt's activation outlier threshold, >= 0).
Bnb8ExportResult export_bnb8(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                             at::ScalarType dtype, double threshold, bool force = false);

}  // namespace qf::exporter
