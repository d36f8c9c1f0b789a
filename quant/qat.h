// QAT modules and the two explicit steps (torchao's shape): prepare() swaps selected Linears for
// FakeQuantLinear by YAML rules; convert() swaps FakeQuantLinear for QuantizedLinear holding the
// packed integer weights that the fake quantizer simulated.
// Invariant: after convert, weights dequantize bit-identically to the fake-quant forward's weights
// and fp32 logits match the fake-quant model within 1e-5 relative.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/config.h"
#include "models/linear.h"
#include "quant/fake_quant.h"
#include "quant/ptq_config.h"
#include "quant/spec.h"

namespace qf::quant {

struct QuantRule {
  std::string pattern;                  // glob over HF module names, e.g. "model.layers.*.mlp.*"
  QuantSpec weight;
  std::optional<QuantSpec> activation;  // dynamic input quantization (e.g. int8-per-token)
};

// `quant:` section of a run config.
struct QatConfig {
  bool enabled = false;
  std::vector<QuantRule> rules;
  std::vector<std::string> exclude{"lm_head", "model.embed_tokens", "transformer.wte", "transformer.wpe"};
  std::optional<QuantSpec> embedding;   // token-embedding table fake quant (also what a tied lm_head uses)
  int64_t fake_quant_after_steps = 0;  // delayed fake quant (torchtune's fake_quant_after_n_steps)
  ObserverConfig observer;
  bool convert_at_end = true;           // write <run>/converted/ after training
  PtqConfig init;                       // `init: rtn|gptq|awq` (+ calib/gptq/awq): PTQ before QAT starts
  static QatConfig from_config(cfg::Reader& r);  // calls r.finish()
  // The `quant:` section that from_config reads back as this config (qforge quantize writes its
  // output run's recipe with it; a test re-reads it and compares every resolved key).
  YAML::Node to_yaml() const;
};

class FakeQuantLinear : public models::LinearBase {
 public:
  // Takes over the dense layer's weight/bias tensors (same names, so checkpoints keep HF keys).
  FakeQuantLinear(const models::LinearBase& dense, const QuantRule& rule, const ObserverConfig& obs);
  at::Tensor forward(const at::Tensor& x) override { return forward_with_weight(x, weight); }
  // The same computation with a float weight `w` in place of `weight` (LoRA's exact-merge mode feeds
  // W + s*BA, so what is trained is what merge + convert produce).
  at::Tensor forward_with_weight(const at::Tensor& x, const at::Tensor& w);
  at::Tensor effective_weight() override;  // the fake-quantized weight
  at::Tensor bias_or_undefined() override { return bias; }
  void pretty_print(std::ostream& s) const override;
  at::Tensor weight, bias;
  std::shared_ptr<FakeQuantizer> weight_fq, act_fq;
};

// Packed weights as convert() stores them: ggml rules keep llama.cpp's block bytes; affine specs
// keep int codes (int4 two per byte, low nibble first) plus fp scales and zero points (integer-
// zero-point specs: z in [0, 2^b-1] held as float32 integers in `zeros`);
// learned specs (LSQ/LSQ+) dequantize as q * s + offset with the float offset in `zeros`.
class QuantizedLinear : public models::LinearBase {
 public:
  QuantizedLinear(int64_t in, int64_t out, bool bias, QuantSpec wspec, std::optional<QuantSpec> aspec);
  // What convert() puts in fq's place, packing `weight` (default fq.weight; LoRA's merged W + s*BA)
  // with fq's quantizer. fq is not changed, so exporters use it to convert one layer at a time.
  static std::shared_ptr<QuantizedLinear> from_fake_quant(FakeQuantLinear& fq, const at::Tensor& weight = {});
  at::Tensor forward(const at::Tensor& x) override;
  at::Tensor effective_weight() override;  // dequantized weight (float32)
  at::Tensor bias_or_undefined() override { return bias; }
  void pretty_print(std::ostream& s) const override;
  int64_t packed_bytes() const;
  const QuantSpec& weight_spec() const { return wspec_; }
  // Affine integer specs: the integer codes, int32 [out, in] in [qmin, qmax] (what the forward
  // dequantizes with `scales` / `zeros`).
  at::Tensor int_codes() const;
  at::Tensor qweight, scales, zeros, bias;  // scales/zeros undefined for ggml (inside the blocks)
  // GPTQ act-order without static groups: the scale group of each input column (int32 [in]);
  // undefined = contiguous groups. set_g_idx registers it as a buffer (saved with the checkpoint).
  at::Tensor g_idx;
  void set_g_idx(const at::Tensor& g);

 private:
  QuantSpec wspec_;
  std::optional<QuantSpec> aspec_;
  std::shared_ptr<FakeQuantizer> act_fq_;  // dynamic/observed input quantization kept from QAT
};

// Packed weights as convert() stores them, registered as buffers qweight/scales/zeros on a module.
struct PackedStorage {
  at::Tensor qweight, scales, zeros;
  at::Tensor g_idx;  // optional: per-column group index (affine per-group only), see QuantizedLinear::g_idx
};
// The dtype packed scales are stored in (spec.scale_dtype).
at::ScalarType scale_type(const QuantSpec& s);
PackedStorage register_packed(torch::nn::Module& m, int64_t rows, int64_t cols, const QuantSpec& spec);
// Quantizes `weight` [rows, cols] exactly as `fq` fake-quantizes it, into `p`.
void pack_weight(PackedStorage& p, const at::Tensor& weight, FakeQuantizer& fq);
// Affine integer codes (int32 [rows, cols] in [qmin, qmax]) as QuantizedLinear stores them: unsigned
// bytes, two per byte (low nibble first) for <= 4 bits.
at::Tensor pack_codes(const at::Tensor& codes, const QuantSpec& spec);
at::Tensor unpack_weight(const PackedStorage& p, const QuantSpec& spec, int64_t rows, int64_t cols);
int64_t packed_storage_bytes(const PackedStorage& p, const QuantSpec& spec);

// Token-embedding table under fake quant: lookups and a tied lm_head see dequant(quant(table)),
// as llama.cpp computes with a quantized token_embd (and output, when tied).
class FakeQuantEmbedding : public models::EmbeddingBase {
 public:
  FakeQuantEmbedding(models::EmbeddingBase& dense, const QuantSpec& spec, const ObserverConfig& obs);
  at::Tensor table() override;
  at::Tensor weight;
  std::shared_ptr<FakeQuantizer> weight_fq;
};

class QuantizedEmbedding : public models::EmbeddingBase {
 public:
  QuantizedEmbedding(int64_t num, int64_t dim, QuantSpec spec);
  // What convert() puts in f's place (f is not changed).
  static std::shared_ptr<QuantizedEmbedding> from_fake_quant(FakeQuantEmbedding& f);
  at::Tensor table() override;
  int64_t packed_bytes() const;
  const QuantSpec& spec() const { return spec_; }
  at::Tensor qweight, scales, zeros;

 private:
  QuantSpec spec_;
};

struct PrepareReport {
  std::vector<std::string> rows;  // printable table lines
  int64_t n_swapped = 0;
};
// Swaps matching linears. Throws ConfigError (before any training) when a rule matches no module,
// when a group/block size does not divide a layer's input width (naming the layer and both numbers).
PrepareReport prepare(torch::nn::Module& model, const QatConfig& cfg);
// Swaps every FakeQuantLinear for a QuantizedLinear (and a FakeQuantEmbedding for a
// QuantizedEmbedding); returns the number converted.
int64_t convert(torch::nn::Module& model);
// Calls set_step on every FakeQuantizer under the model (delayed fake quant, observer freezing).
void set_qat_step(torch::nn::Module& model, int64_t step, int64_t enable_after);
// Bytes of the model's weights as stored (packed linears + everything else at its dtype).
int64_t model_bytes(torch::nn::Module& model);
bool glob_match(const std::string& pattern, const std::string& name);
// The rule that selects linear `name` (the first match, unless an exclude matches), or nullptr:
// prepare's choice, and PTQ's.
const QuantRule* rule_for(const QatConfig& q, const std::string& name);

}  // namespace qf::quant
