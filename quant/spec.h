// QuantSpec: the single description of a number format. Fake quant, convert and every exporter
// read the same spec, so "what was trained" == "what is shipped".
// Invariant: a validated spec always has 2 <= bits <= 8 for integers, a group size > 0 for
// per-group, and a preset's fields equal the runtime's block format (q4_0 = int4 symmetric,
// group 32, fp16 scale, llama.cpp rounding).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"

namespace qf::quant {

enum class Kind { Int, Fp8E4M3, Fp8E5M2, Nf4 };
enum class Granularity { PerTensor, PerChannel, PerGroup, PerToken };
enum class ScaleDType { F32, F16, BF16 };
// How values are mapped to integers. Affine = torchao's fake quantizer (round half to even,
// x * (1/scale)). IntZeroPoint = AutoAWQ's / GPTQ's asymmetric rule with an INTEGER zero point z in
// [0, 2^b-1] per block (weight = (q - z) * s; quant/affine.h has the formulas); presets
// int<b>-g<G>-zp. The Ggml* rules are llama.cpp's reference quantizers, block by block.
enum class Rule {
  Affine,
  IntZeroPoint,
  GgmlQ8_0,
  GgmlQ4_0,
  GgmlQ4_1,
  GgmlQ5_0,
  GgmlQ5_1,
  GgmlQ2_K,
  GgmlQ3_K,
  GgmlQ4_K,
  GgmlQ5_K,
  GgmlQ6_K,
  GgmlIQ4_NL,
  GgmlIQ4_XS,
  GgmlTQ1_0,
  GgmlTQ2_0,
  GgmlQ1_0,
  GgmlQ2_0,
};
// The recipe spelling of an integer spec's zero point (quant.*.zero_point): float = torchao's
// float-domain zero point (Rule::Affine), int = an integer one (Rule::IntZeroPoint).
const cfg::Names<Rule>& zero_point_names();
// Learned quantization parameters: none (observer / dynamic), LSQ (scale), LSQ+ (scale + offset).
enum class Learn { None, Lsq, LsqPlus };
// The recipe spellings (quant.*.kind / granularity / scale_dtype / learn).
const cfg::Names<Kind>& kind_names();
const cfg::Names<Granularity>& granularity_names();
const cfg::Names<ScaleDType>& scale_dtype_names();
const cfg::Names<Learn>& learn_names();

struct QuantSpec {
  Kind kind = Kind::Int;
  int bits = 8;
  bool symmetric = true;
  Granularity granularity = Granularity::PerChannel;
  int64_t group_size = 0;  // per-group only
  ScaleDType scale_dtype = ScaleDType::F32;
  Rule rule = Rule::Affine;
  Learn learn = Learn::None;
  bool dynamic = true;     // recompute qparams from the tensor every forward (weights: always fresh)
  std::string preset;      // the preset name this came from ("" = custom)

  int64_t qmin() const;  // symmetric: -2^(b-1); asymmetric: 0
  int64_t qmax() const;  // symmetric: 2^(b-1)-1; asymmetric: 2^b-1
  // Elements that share one scale along the reduction axis for a row of `width`: the group size
  // (for llama.cpp presets, their block size: 32 or 256), else the whole width.
  int64_t block(int64_t width) const;
  // Storage cost per weight including scales/zeros (e.g. q4_0: 4.5, q8_0: 8.5).
  double bits_per_weight(int64_t width) const;
  std::string describe() const;
  bool is_ggml() const { return rule != Rule::Affine && rule != Rule::IntZeroPoint; }
  bool int_zero_point() const { return rule == Rule::IntZeroPoint; }

  // Named presets, bit-exact with their runtimes: q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k
  // iq4_nl iq4_xs tq1_0 tq2_0 q1_0 q2_0 int4-g128-asym
  // int4-g128-zp int4-g32-zp (AutoAWQ GEMM / GPTQ asym) int4-g32 int8-per-channel int8-per-token
  // (activations) fp8-e4m3 fp8-e5m2, and int<b>-g<G>[-asym|-zp]; throws listing them.
  static QuantSpec preset_named(const std::string& name);
  static const std::vector<std::string>& preset_names();
  // Either {preset: name} or explicit fields {bits, symmetric, granularity, group_size, scale_dtype,
  // learn, kind, zero_point (float|int, asymmetric weights only)}; records problems on r and calls r.finish().
  static QuantSpec from_config(cfg::Reader& r, bool activation);
  // What from_config reads back as this spec: {preset[, learn]} or the explicit fields.
  YAML::Node to_yaml() const;
};

// Widths a block does not divide, handled as llama-quantize does (tensor_type_fallback): a linear
// (name, input width) whose width `spec`'s block does not divide gets the fallback format.
// Returns, per layer, whether it needs the fallback. Without one (`fallback_name` empty) every
// such layer is an error: one ConfigError naming each layer, its width, the presets that would fit
// it and the `--fallback FORMAT` option. A `fallback` spec (null: the caller keeps those layers in
// float) must fit every one of them, else a ConfigError naming the layer.
std::vector<bool> width_fallbacks(const std::vector<std::pair<std::string, int64_t>>& layers, const QuantSpec& spec,
                                  const std::string& quant_name, const std::string& fallback_name,
                                  const QuantSpec* fallback);
// Presets like `spec` whose block divides `width` (smaller groups, llama.cpp's 32-blocks, int8 per
// channel), for advice in error messages.
std::vector<std::string> fitting_presets(const QuantSpec& spec, int64_t width);

}  // namespace qf::quant
