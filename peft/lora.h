// LoRA (PEFT semantics) on any base linear: dense, frozen bf16, NF4 (QLoRA), LLM.int8, llama.cpp blocks or a
// checkpoint's packed ints (LoRA on the served base), or fake-quant (QAT+LoRA).
//   y = base(x) + s * B(A(dropout(x))),   s = alpha / r   (alpha / sqrt(r) with rsLoRA)
// A [r, in] is kaiming-uniform (a = sqrt(5), PEFT's default), B [out, r] zeros, so a fresh adapter
// leaves the model unchanged. Exact-merge mode (fake-quant or llama.cpp-blocks base) instead computes
//   y = x fq(W + s*BA)^T + b   (blocks: W = dequantize(blocks), fq = the type's fake quant)
// so the fake quantizer sees the merged weight: merging then converting reproduces the trained
// model exactly (see README "QAT + LoRA").
// Invariants: apply_lora validates everything (targets, ranks, base kinds) before swapping any
// module; afterwards only LoRA factors (and modules_to_save) require grad.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "models/hf.h"
#include "models/linear.h"
#include "quant/ggml_mix.h"
#include "quant/spec.h"

namespace qf::peft {

// Blocks: llama.cpp blocks, the frozen base held as the blocks that ship (quant::BlockLinear): one
// type for every linear (peft.base: q4_k, ..., any block row of quant/ggml_types.h), the type
// llama-quantize's mixture gives each linear (peft.base: mix, peft.mixture: q4_k_m, any name of quant::mix_names():
// llama_tensor_get_type's role / layer / GQA rules), or each GGUF tensor's own type (peft.base: gguf,
// model.from a .gguf file). Packed: a GPTQ / AWQ /
// compressed-tensors checkpoint's packed int linears kept packed (models::PackedIntLinear).
enum class BaseFormat { Fp32, Bf16, Nf4, Int8, Blocks, Packed };

// `peft:` section of a run config.
struct LoraConfig {
  bool enabled = false;
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool rslora = false;
  // PEFT matching: an entry equal to a module's full name or to its last components (the leaf name,
  // or "<parent>.<leaf>"); globs ("<layers>.*.mlp.*") match full names; "all-linear" = every linear
  // except the output layer. Module names are the family's (models/arch.h).
  std::vector<std::string> target_modules{"all-linear"};
  std::vector<std::string> modules_to_save;  // trained fully (e.g. lm_head), saved in the adapter
  BaseFormat base = BaseFormat::Fp32;        // storage of the frozen base linears (not lm_head)
  quant::Rule block_rule = quant::Rule::Affine;  // base Blocks, one type: the llama.cpp type's rule
  // base Blocks per linear: a llama-quantize mixture name (peft.mixture, with peft.base: mix) or "gguf" (the
  // file's own types); "" = block_rule everywhere. A mixture's float choice (its F16 fallback for a width
  // no block divides; mixture f16 / f32) and a GGUF's F32 / F16 / BF16 linears are held in that float
  // dtype (models::HalfLinear), which exact_merge leaves unrounded.
  std::string block_mix;
  int64_t nf4_blocksize = 64;
  bool nf4_double_quant = true;
  double int8_threshold = 6.0;               // base int8: Linear8bitLt's activation outlier threshold (0: all int8)
  bool exact_merge = false;                  // fake-quant base sees W + s*BA (needs quant rules)
  std::string init_adapter;                  // a PEFT adapter dir to start from
  bool save_adapter = true;                  // <run>/adapter/ (PEFT format) at the end
  bool merge_at_end = false;                 // <run>/merged/ (or converted/ with quant) at the end
  double scaling() const;
  static LoraConfig from_config(cfg::Reader& r);  // calls r.finish()
};
const char* base_format_name(BaseFormat f);
// cfg.base as the recipe spells it ("q4_k", "mix q4_k_m" or "gguf" for a block base).
std::string base_name(const LoraConfig& cfg);
// peft.base gguf: keep each GGUF tensor's own type.
inline constexpr const char* kGgufTypes = "gguf";

// The LoRA factor holder, so parameter names read "<layer>.lora_A.weight" as in PEFT.
struct LoraFactor : torch::nn::Module {
  LoraFactor(int64_t out, int64_t in);
  at::Tensor weight;
};

class LoraLinear : public models::LinearBase {
 public:
  LoraLinear(std::shared_ptr<models::LinearBase> base, int64_t r, double scaling, double dropout, bool exact);
  at::Tensor forward(const at::Tensor& x) override;
  at::Tensor effective_weight() override;  // merged float weight (base's effective weight + s*BA)
  at::Tensor bias_or_undefined() override { return base->bias_or_undefined(); }
  void pretty_print(std::ostream& s) const override;
  at::Tensor delta() const;                 // s * B @ A, [out, in]
  // Initialises A (kaiming-uniform, a = sqrt(5)) and B (zeros) from `gen`'s stream.
  void reset_parameters();
  // The module that replaces this one after merging: the base with W + s*BA (fake-quant bases keep
  // their quantizer and take the new weight in place; dense/frozen bases become a new DenseLinear in
  // fp32: W + s*BA, or for a llama.cpp-blocks base in exact-merge mode the trained fq(W + s*BA)).
  std::shared_ptr<models::LinearBase> merged();
  // The weight merged() gives the merged layer, computed without changing anything: W + s*BA in W's
  // dtype for a fake-quant base (for its quantizer to fake-quantize or pack), otherwise the base's
  // effective weight + s*BA in fp32. Exporters read merged layers through it (export/layer_view.h).
  at::Tensor merged_weight();
  std::shared_ptr<models::LinearBase> base;
  std::shared_ptr<LoraFactor> lora_A, lora_B;
  const int64_t r;
  const double scaling, dropout;
  const bool exact;
};

struct ApplyReport {
  std::vector<std::string> wrapped;  // module names that got an adapter
  int64_t n_frozen_converted = 0;    // linears re-stored as NF4 / bf16
  int64_t trainable = 0, total = 0, trainable_bytes = 0, weight_bytes = 0;
  int64_t base_weights = 0, base_bytes = 0;  // the re-stored frozen bases: weights held, bytes as stored
  std::string summary() const;       // PEFT-style "trainable params: ..." line
};

// Converts the base (cfg.base) and wraps the targets. Throws ConfigError naming the problem (no
// target matched, with the available names; r larger than a layer's width; exact_merge on a
// non-fake-quant layer) before changing anything. A base already stored in cfg.base's format (the
// same NF4 block size / double quant, or bf16), as frozen_base_streamer builds them, is kept as is.
ApplyReport apply_lora(torch::nn::Module& model, const LoraConfig& cfg, const std::string& output_layer);
// apply_lora's checks alone (throws the same ConfigError; changes nothing).
void check_lora(torch::nn::Module& model, const LoraConfig& cfg, const std::string& output_layer);
// The frozen base apply_lora stores a linear as (cfg.base nf4 or bf16) from its [out, in] weight and bias.
std::shared_ptr<models::LinearBase> frozen_base(const LoraConfig& cfg, const at::Tensor& weight, const at::Tensor& bias);
// QLoRA's streaming load: models::load_hf_weights with this streamer builds every linear apply_lora
// would re-store (all but the output layer and modules_to_save) straight from its checkpoint tensor,
// so the full-precision base never exists as a whole; apply_lora then keeps them, and the model is
// bit for bit the one load-then-apply_lora gives. Runs check_lora first (on the model before loading:
// the names and widths are the same), so a config apply_lora would refuse fails before any weight is
// read. Needs cfg.base nf4 or bf16.
models::LinearStreamer frozen_base_streamer(torch::nn::Module& model, const LoraConfig& cfg,
                                            const std::string& output_layer);
// A run's checkpoint rebuilt (trainer/run_dir): every linear whose frozen base the checkpoint `state`
// holds as llama.cpp blocks (peft.base <type>, mix, gguf: each in the type its `ggml_type`
// buffer saved) or packed ints (peft.base packed) gets a zero-filled base of that geometry before
// apply_lora (which keeps it) and the state load fills it; under mix / gguf a float base (an F16 / F32
// choice) is rebuilt in its saved dtype. Returns the number.
int64_t install_saved_bases(torch::nn::Module& model, const LoraConfig& cfg,
                            const std::vector<std::pair<std::string, at::Tensor>>& state,
                            const std::string& output_layer = "lm_head");
// peft.base mix: the storage llama-quantize's mixture gives each linear apply_lora re-stores
// (full name -> quant::MixChoice: a block rule, or F16 / F32), from the model's family spec (role,
// layer index), layer count and GQA ratio. `problems` (if given) collects a width no type of the
// mixture fits and q2_k_s's imatrix requirement, naming the layer; without it they throw ConfigError.
std::map<std::string, quant::MixChoice> mixture_types(torch::nn::Module& model, const LoraConfig& cfg,
                                                      const std::string& output_layer,
                                                      std::vector<std::string>* problems = nullptr);
// Replaces every LoraLinear by its merged base; returns the number merged.
int64_t merge_lora(torch::nn::Module& model);
// Every LoraLinear under `model`: (full name, module).
std::vector<std::pair<std::string, std::shared_ptr<LoraLinear>>> lora_layers(torch::nn::Module& model);
// Parameter counts/bytes for the report.
void count_parameters(torch::nn::Module& model, ApplyReport& rep);

bool target_matches(const std::string& target, const std::string& name, const std::string& output_layer);

}  // namespace qf::peft
