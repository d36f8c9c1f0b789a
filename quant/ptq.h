// Post-training quantization: calibration through forward hooks, layer by layer, then RTN, GPTQ
// or AWQ on every linear a `quant.rules` entry selects.
//
// Data flow (sequential, as GPTQ's and AutoAWQ's reference drivers run): the calibration tokens
// are embedded once; for each decoder layer, capture modules swapped into its LinearSlots collect
// the inputs of its linears while the layer runs over the calibration hidden states; the layer's
// weights are then rewritten; the layer is run again and its outputs become the next layer's
// inputs. Only one layer's activations (plus the hidden states) are alive at a time. In ptq.cpp a
// LayerDriver holds the hidden states and the capture pass; one LayerMethod per method (RtnMethod,
// GptqMethod, AwqMethod) rewrites a layer through it.
//  - rtn:  weights unchanged (convert rounds them); the per-layer error is reported.
//  - gptq: weights become GPTQ's dequantized values, and the exact packed codes are kept for
//          convert (apply_packed); later layers see the quantized layer's outputs.
//  - awq:  per-channel scales s searched on a grid (AutoAWQ: s = x_mean^r / w_mean^(1-r)) and
//          folded into the preceding norm / linear (so the float model is unchanged), then a
//          per-group clipping search shrinks weight ranges; weights stay float, RTN'd by convert.
// Invariant: after run_ptq + prepare + convert + apply_packed, the converted model's weights are
// what the method chose, in the rule's QuantSpec, so every exporter takes them unchanged.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/config.h"
#include "models/transformer.h"
#include "quant/gptq.h"
#include "quant/qat.h"

namespace qf::quant {

struct PtqLinearReport {
  std::string name;
  std::string spec;
  double err_rtn = 0;  // relative output error of round-to-nearest on this layer's calibration inputs
  double err = 0;      // ... of the method's weights (same inputs)
  double damp = 0;     // GPTQ: dampening used
};

struct PtqResult {
  PtqMethod method = PtqMethod::None;
  std::map<std::string, PackedStorage> packed;  // GPTQ: exact packed weights by linear name
  std::vector<PtqLinearReport> linears;
  int64_t calib_tokens = 0;
  double seconds = 0;
  double mean_err_rtn() const;
  double mean_err() const;
};

// Checks before any work: every selected linear is float and its spec supports the method.
// Throws ConfigError naming each offending module.
void check_ptq(models::CausalLM& model, const QatConfig& q, PtqMethod method);
// Streaming PTQ (a model that is never resident whole): called around each decoder layer i.
// before(i): before the layer is calibrated (its DeferredLinears must be loaded by then);
// after(i): once the layer's weights are final and the calibration states have moved past it
// (convert_layer then leaves only the packed layer).
struct PtqLayerHooks {
  std::function<void(int64_t)> before;
  std::function<void(int64_t, PtqResult&)> after;
};
// tokens: int64 [samples, seq_len] calibration token ids. The model must hold float linears
// (models::DeferredLinear counts as float: hooks.before loads it). `importance` (rtn only): per linear
// (full name) the importance weights of its input columns, float32 [in] (p.imatrix's file as
// llama-quantize reads it); each llama.cpp-typed linear it covers is quantized with them and its
// blocks are kept in PtqResult::packed (convert + apply_packed install them). Linears it lacks are
// rounded plainly, as llama-quantize does for a tensor missing from the imatrix.
PtqResult run_ptq(models::CausalLM& model, const QatConfig& q, const PtqConfig& p, const at::Tensor& tokens,
                  bool progress, const PtqLayerHooks& hooks = {},
                  const std::map<std::string, at::Tensor>* importance = nullptr);
// llama.cpp's importance-matrix statistics (tools/imatrix): per linear of the decoder layers (full
// module name), each input column's sum of squares over the calibration tokens (float64 [in]) and
// the number of token rows summed. The float model runs layer by layer as run_ptq's driver does
// (hooks.before(i) loads a streamed layer; hooks.after is not called); no weight changes.
struct InputSquares {
  at::Tensor sums;
  int64_t tokens = 0;
};
std::map<std::string, InputSquares> collect_input_squares(models::CausalLM& model, const at::Tensor& tokens,
                                                          int64_t batch_size, bool progress,
                                                          const PtqLayerHooks& hooks = {});
// quant::prepare + convert + apply_packed for decoder layer i alone (the same modules, bit for bit),
// right after run_ptq's after(i): every selected float linear of the layer becomes its
// QuantizedLinear; the packed codes used are removed from r.packed. Returns the number converted.
int64_t convert_layer(models::CausalLM& model, int64_t i, const QatConfig& q, PtqResult& r);
// After quant::convert: writes GPTQ's exact packed weights into the QuantizedLinears.
void apply_packed(torch::nn::Module& model, const PtqResult& r);
// After quant::prepare of a GPTQ-initialised model: learned (LSQ) scales start at GPTQ's scales,
// so QAT's first forward equals the GPTQ model. Returns the number of quantizers seeded.
int64_t seed_learned_scales(torch::nn::Module& model, const PtqResult& r);

}  // namespace qf::quant
