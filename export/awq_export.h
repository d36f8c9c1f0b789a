// `qforge export --format awq`: a Llama/Qwen2-family model with int4 weights in AutoAWQ's GEMM
// layout, the one transformers (AwqConfig version "gemm", autoawq's WQLinear_GEMM) and vLLM
// (quantization "awq") load:
//  - per linear qweight int32 [in, out/8]: the unsigned codes of 8 output columns per word, column
//    8c + AWQ_ORDER[i] in bits 4i, AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (AutoAWQ WQLinear_GEMM.from_linear);
//    qzeros int32 [groups, out/8] packed the same way; scales fp16 [groups, out]; bias fp16;
//    the runtime's weight is (q - z) * s (AutoAWQ packing_utils.dequantize_gemm).
//  - config.json quantization_config {quant_method "awq", version "gemm", bits 4, group_size,
//    zero_point true, modules_to_not_convert [lm_head + float layers]}, and AutoAWQ's quant_config.json.
// Weights: a QuantizedLinear with an int4 per-group spec that has an integer zero point (QAT /
// PTQ-converted) keeps its own codes, zero points and fp16 scales, so the runtime's weight is
// qforge's exactly: AutoAWQ's own asymmetric rule (int4-g128-zp, int4-g32-zp, int4-g<G>-zp: codes
// and zero points in [0, 15] written as they are), or symmetric (int4-g128, int4-g32: codes q in
// [-8, 7] written as q + 8 with zero point 8). A float linear is RTN'd to --quant (default
// int4-g128; int4-g128-zp gives AutoAWQ's codes) with fp16 scales (the ones the file holds).
// Refused, naming the layer and the formats that hold it: torchao-style asymmetric specs
// (-asym: a float-domain zero point, not an integer in [0, 15]), NF4 / FP8 / llama.cpp
// blocks / LSQ / int8 / int3, GPTQ act-order (g_idx), scales that fp16 cannot hold exactly, and
// output widths not a multiple of 8. Embeddings, norms and lm_head are written in the model's dtype.
// Invariants (as export/int_export.h): built in a staged dir, every packed layer re-read and decoded
// with AutoAWQ's unpack + reverse order and compared bit for bit with what was meant before the
// rename; the model is not changed (each linear read through export/layer_view.h).
#pragma once
#include <string>

#include "data/tokenizer.h"
#include "models/transformer.h"

namespace qf::exporter {

struct AwqExportResult {
  std::string dir;
  int64_t n_quantized = 0, n_exact = 0, n_fallback = 0, bytes = 0;
  int64_t group_size = 0;  // the file's one group size (in_features for per-channel)
};

// `quant`: the RTN scheme for float linears (an int4 per-group preset: int4-g128, int4-g32, ...,
// or with integer zero points int4-g128-zp, int4-g32-zp, ...).
// `fallback`: "" (a width --quant's group does not divide is an error naming the layers) or "f16"
// (those linears stay in float, listed in modules_to_not_convert).
AwqExportResult export_awq(models::CausalLM& model, const data::Tokenizer& tok, const std::string& out,
                           const std::string& quant, const std::string& fallback = "", bool force = false);

}  // namespace qf::exporter
