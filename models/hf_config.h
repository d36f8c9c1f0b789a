// A Hugging Face config.json read as qforge's ModelConfig, without libtorch: the architecture spec
// whose hf_architectures name config.json's "architectures"[0] (models/arch.h) says which keys hold
// the common hyper-parameters and reads the family's own. Invariant: parse_hf_config either returns
// a config whose sizes are all positive integers taken from the file, or throws qf::InputError naming
// the file and the key; it never throws anything else.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "models/config.h"

namespace qf::models {

// config.json's "quantization_config": the packed layout a quantized checkpoint's linears are stored
// in (read back to float by models/hf_quantized.h). method None: a float checkpoint.
enum class HfQuantMethod { None, Gptq, Awq, CompressedTensors, Bnb4, Bnb8 };

// One compressed-tensors config group (its "weights" scheme and the modules it targets).
struct HfQuantScheme {
  int bits = 0;
  int64_t group_size = -1;           // -1: one scale per output row (strategy "channel")
  bool symmetric = true;
  std::vector<std::string> targets;  // "Linear", exact module names, or "re:<regex>"
  std::string format;                // pack-quantized | int-quantized | float-quantized
  // float-quantized (fp8 e4m3 weights): strategy tensor (one scale), channel (one per output row) or
  // block (one per block_rows x block_cols tile, ceil-divided); int formats leave these empty.
  std::string fp8_strategy;
  int64_t block_rows = 0, block_cols = 0;
  // The scheme's input_activations as config.json says them ("fp8 dynamic per-token", "fp8 static
  // per-tensor"), empty when weight-only: qforge loads the weights and does not apply them.
  std::string activations;
  bool fp8() const { return format == "float-quantized"; }
};

struct HfQuant {
  HfQuantMethod method = HfQuantMethod::None;
  int bits = 0;                      // GPTQ 2 | 3 | 4 | 8, AWQ 4
  int64_t group_size = -1;           // GPTQ: -1 = per channel
  bool symmetric = true;             // GPTQ sym, AWQ !zero_point
  bool desc_act = false;             // GPTQ act-order (g_idx maps columns to groups)
  bool zeros_v2 = false;             // GPTQ checkpoint_format "gptq_v2": qzeros hold z (v1 "gptq": z - 1)
  std::vector<HfQuantScheme> groups; // compressed-tensors config_groups
  std::vector<std::string> skip;     // modules_to_not_convert (GPTQ/AWQ) or ignore (compressed-tensors)
  std::string bnb_quant_type;        // bitsandbytes load_in_4bit: bnb_4bit_quant_type nf4 | fp4
  bool bnb_double_quant = false;     // bnb_4bit_use_double_quant (each linear's quant_state says it too)
  double bnb_int8_threshold = 6.0;   // bitsandbytes load_in_8bit: llm_int8_threshold (Linear8bitLt's outlier threshold)
  bool quantized() const { return method != HfQuantMethod::None; }
  // "gptq int4 group 128 sym desc_act (checkpoint_format gptq)", "awq int4 group 32 zero_point (gemm)", ...
  std::string describe() const;
};

// `q` is config.json's quantization_config; errors name `path` and the key. Refused: unknown
// quant_method / version / checkpoint_format, unsupported bits, schemes qforge does not read.
HfQuant parse_hf_quant(const nlohmann::json& q, const std::string& path);

struct HfConfig {
  std::string architecture;        // e.g. "LlamaForCausalLM"
  std::string torch_dtype;         // as config.json says ("float32" when it says nothing)
  ModelConfig config;
  HfQuant quant;                   // quantization_config (method None: float weights)
  std::vector<std::string> notes;  // things the user should know
};

// `text` is the content of config.json; `path` names it in errors.
HfConfig parse_hf_config(const std::string& text, const std::string& path);

// Typed access to a config.json object with errors naming the file and key. Sizes are capped at
// 2^31 - 1 (any real model's are far below) so arithmetic on them (4 * n_embd, products of
// dimensions) cannot overflow int64.
class HfConfigReader {
 public:
  HfConfigReader(const nlohmann::json& j, std::string path) : j(j), path(std::move(path)) {}
  const nlohmann::json& j;
  const std::string path;

  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  InputError bad(const char* k, const std::string& why) const;
  int64_t i64(const char* k) const;  // required positive integer
  int64_t i64_or(const char* k, int64_t def) const { return has(k) ? i64(k) : def; }
  double f64_or(const char* k, double def) const;
  double pos_f64_or(const char* k, double def) const;  // a positive finite number
  bool bool_or(const char* k, bool def) const;
  std::string string_or(const char* k, const std::string& def) const;
  // A nested object ("rope_scaling"), named "<path>: <key>" in errors.
  HfConfigReader child(const char* k) const;
};

}  // namespace qf::models
