// `qforge export --format onnx`: the model as an ONNX causal-LM graph with a KV cache, in Optimum's
// interface, so optimum.onnxruntime.ORTModelForCausalLM and plain onnxruntime sessions run it:
//   inputs  input_ids int64 [batch, sequence_length], attention_mask int64 [batch, past+sequence],
//           position_ids int64 [batch, sequence_length] (every family but OPT, whose learned
//           positions come from the attention mask as transformers computes them),
//           past_key_values.N.key / .value float [batch, kv_heads, past_sequence_length, head_dim]
//   outputs logits float [batch, sequence_length, vocab], present.N.key / .value (past + new).
// One graph serves the prompt and every decode step (past length 0 for the prompt). The directory
// also holds config.json (with use_cache), generation_config.json and the tokenizer, which Optimum
// reads. model.onnx holds the graph; weights are in model.onnx_data (ONNX external data).
// Weights, per linear (LoRA merged and fake quant converted one layer at a time, export/layer_view.h):
//  - float (and bf16) layers: MatMul with the weight in --dtype fp32, or fp16 followed by a Cast
//    (onnxruntime folds it at load); compute is fp32 throughout;
//  - int4 per-group codes with a power-of-two group >= 16: com.microsoft::MatMulNBits (block_size =
//    group, scales as fp32; symmetric codes as q + 8 with the default zero point 8, the -zp presets'
//    codes and integer zero points as they are);
//  - other integer codes (int8 per channel, int3/int2, int4 per channel or odd groups): QDQ,
//    DequantizeLinear of the codes (int8; uint8 with the -zp presets' zero points; per-axis or
//    blocked scales) into MatMul;
//  - refused naming the layer and the formats that would work: NF4, FP8, llama.cpp blocks, LSQ,
//    torchao asymmetric specs (-asym: float zero point), GPTQ act-order, dynamic activation quantization
//    (8da4w): --fallback f32|f16 writes those layers dequantized to float instead.
// Invariants: built in a staged dir and renamed into place when complete; the caller's model is not
// changed; graph semantics follow models/transformer.cpp op for op (RoPE tables are qforge's own).
#pragma once
#include <string>

#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::exporter {

struct OnnxExportResult {
  std::string dir;
  int64_t n_nodes = 0, n_matmul_nbits = 0, n_qdq = 0, n_float = 0, n_fallback = 0, bytes = 0;
};

// dtype: "fp32" or "fp16" (float weights as stored); fallback: "" (refuse) or "f32"/"f16".
OnnxExportResult export_onnx(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                             const std::string& dtype, const std::string& fallback = "", bool force = false);

}  // namespace qf::exporter
