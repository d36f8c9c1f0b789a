// `qforge export --format gptq | compressed-tensors`: a Llama/Qwen2-family model with integer
// weights in the layouts transformers loads for GPTQ (optimum + gptqmodel) and for
// compressed-tensors (the `compressed-tensors` package; vLLM reads the same files):
//  - gptq (checkpoint_format "gptq", v1): per linear qweight int32 [in/(32/b), out] (input rows
//    packed low bits first), qzeros int32 [groups, out/(32/b)] holding zero-1 (v1), scales
//    [groups, out], g_idx int32 [in] = i / group; config.json quantization_config + quantize_config.json.
//    Integer-zero-point specs (int4-g128-zp, ...): sym false, checkpoint_format "gptq_v2" (gptqmodel;
//    qzeros hold z itself, since v1's z - 1 cannot hold z = 0).
//  - compressed-tensors: int4 "pack-quantized" (weight_packed int32 [out, in/8], codes + 8 packed
//    along the input, weight_scale [out, groups], weight_shape; with integer zero points, symmetric
//    false and weight_zero_point int32 [out/8, groups], z packed along the output) or int8
//    "int-quantized" (weight int8 [out, in], weight_scale [out, 1]; symmetric only);
//    config_groups targeting Linear, lm_head ignored.
// Weights: a QuantizedLinear with a symmetric integer spec (QAT/PTQ with e.g. int4-g128,
// int4-g32, int8-per-channel) or an integer-zero-point one (int4-g128-zp, int4-g32-zp: AutoAWQ's /
// GPTQ's asymmetric rule) is written with its own codes, zero points and scales (exact: the runtime
// computes qforge's weights); a float linear is quantized here with --quant (default int4-g128) by RTN.
// torchao's asymmetric specs (-asym) keep a float-domain zero point that these integer formats
// cannot hold: refused with the reason, naming the -zp presets. Embeddings, norms and lm_head are written in float (the model's
// dtype; scales in the spec's scale dtype).
// Invariants: built in a temp dir, each packed layer decoded back (C++ reference of the runtime's
// dequant) and compared with what was meant before the rename; a non-empty --out is refused
// unless `force` (export/hf_export.h check_out). The model is not changed: each linear is read as
// merge_lora + convert would leave it, one at a time (export/layer_view.h).
// Inside: schemes (--quant / --fallback) and width fallbacks checked first, then per linear the
// integer weights and their packing, the quantization_config JSON per format, the decode-back check.
#pragma once
#include <string>

#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::exporter {

enum class IntFormat { Gptq, CompressedTensors };

struct IntExportResult {
  std::string dir;
  int64_t n_quantized = 0, n_exact = 0, bytes = 0;
  int64_t n_fallback = 0;  // linears written in --fallback's format
};

// `fallback`: for float linears whose width --quant's group does not divide (quant::width_fallbacks):
// "f16" keeps them in float (GPTQ: left out of modules_in_block_to_quantize; compressed-tensors:
// ignored), or (compressed-tensors) a preset with the same bits, written as a second config group.
IntExportResult export_int(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out, IntFormat fmt,
                           const std::string& quant, const std::string& fallback = "", bool force = false);

}  // namespace qf::exporter
