#include "quant/spec.h"

#include <cmath>
#include <cstdio>

#include "core/error.h"
#include "quant/ggml_types.h"

namespace qf::quant {

int64_t QuantSpec::qmin() const { return symmetric ? -(int64_t(1) << (bits - 1)) : 0; }
int64_t QuantSpec::qmax() const { return symmetric ? (int64_t(1) << (bits - 1)) - 1 : (int64_t(1) << bits) - 1; }

int64_t QuantSpec::block(int64_t width) const {
  switch (granularity) {
    case Granularity::PerGroup:
      return group_size;
    default:
      return width;
  }
}

double QuantSpec::bits_per_weight(int64_t width) const {
  if (is_ggml()) {
    const auto& t = ggml::traits(rule);
    return static_cast<double>(t.bytes) * 8 / static_cast<double>(t.block);
  }
  double vbits = kind == Kind::Int ? bits : kind == Kind::Nf4 ? 4 : 8;
  double sbits = scale_dtype == ScaleDType::F32 ? 32 : 16;
  // Asymmetric blocks also store a zero point: `bits` bits (the integer one of Rule::IntZeroPoint,
  // packed as AutoAWQ's / GPTQ's qzeros; torchao's float one is counted at the same cost).
  double per_block = sbits + (symmetric ? 0 : (kind == Kind::Int ? bits : 0));
  int64_t b = granularity == Granularity::PerTensor ? (int64_t)1 << 40 : block(width);
  return vbits + per_block / static_cast<double>(std::max<int64_t>(1, b));
}

const cfg::Names<Kind>& kind_names() {
  static const cfg::Names<Kind> n{{"int", Kind::Int}, {"fp8-e4m3", Kind::Fp8E4M3}, {"fp8-e5m2", Kind::Fp8E5M2}};
  return n;
}
const cfg::Names<Granularity>& granularity_names() {
  static const cfg::Names<Granularity> n{{"per-tensor", Granularity::PerTensor},
                                         {"per-channel", Granularity::PerChannel},
                                         {"per-group", Granularity::PerGroup},
                                         {"per-token", Granularity::PerToken}};
  return n;
}
const cfg::Names<ScaleDType>& scale_dtype_names() {
  static const cfg::Names<ScaleDType> n{{"fp32", ScaleDType::F32}, {"fp16", ScaleDType::F16}, {"bf16", ScaleDType::BF16}};
  return n;
}
const cfg::Names<Rule>& zero_point_names() {
  static const cfg::Names<Rule> n{{"float", Rule::Affine}, {"int", Rule::IntZeroPoint}};
  return n;
}
const cfg::Names<Learn>& learn_names() {
  static const cfg::Names<Learn> n{{"none", Learn::None}, {"lsq", Learn::Lsq}, {"lsq+", Learn::LsqPlus}};
  return n;
}

std::string QuantSpec::describe() const {
  if (!preset.empty() && is_ggml()) return preset + " (llama.cpp block format)";
  std::string s = kind == Kind::Fp8E4M3 ? "fp8-e4m3" : kind == Kind::Fp8E5M2 ? "fp8-e5m2" : kind == Kind::Nf4 ? "nf4" : "int" + std::to_string(bits);
  if (kind == Kind::Int) s += symmetric ? " sym" : int_zero_point() ? " asym int-zero-point" : " asym";
  s += " " + cfg::name_of(granularity_names(), granularity);
  if (granularity == Granularity::PerGroup) s += "(" + std::to_string(group_size) + ")";
  s += " " + cfg::name_of(scale_dtype_names(), scale_dtype) + "-scale";
  if (learn == Learn::Lsq) s += " LSQ";
  if (learn == Learn::LsqPlus) s += " LSQ+";
  return s;
}

const std::vector<std::string>& QuantSpec::preset_names() {
  static const std::vector<std::string> n{"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "q1_0", "q2_0",          "int4-g128-asym",
                                          "int4-g32", "int4-g128", "int3-g128", "int3-g128-asym", "int4-g128-zp", "int4-g32-zp", "int3-g128-zp", "int8-per-channel", "int8-per-token", "fp8-e4m3", "fp8-e5m2"};
  return n;
}

QuantSpec QuantSpec::preset_named(const std::string& name) {
  QuantSpec s;
  s.preset = name;
  auto ggml = [&](Rule r, int bits, bool sym, int64_t g) {
    s.rule = r;
    s.bits = bits;
    s.symmetric = sym;
    s.granularity = Granularity::PerGroup;
    s.group_size = g;
    s.scale_dtype = ScaleDType::F16;
  };
  const ggml::TypeTraits* t = ggml::traits_by_name(name);
  if (t && t->rule != Rule::Affine) {
    ggml(t->rule, t->bits, t->symmetric, t->block);
  } else if (name == "int4-g32") {  // fp32 scales, unlike the fp16 of int<b>-g<G> below
    s.bits = 4, s.symmetric = true, s.granularity = Granularity::PerGroup, s.group_size = 32;
  } else if (name == "int8-per-channel") {
    s.bits = 8, s.symmetric = true, s.granularity = Granularity::PerChannel;
  } else if (name == "int8-per-token") {
    s.bits = 8, s.symmetric = false, s.granularity = Granularity::PerToken;
  } else if (name == "fp8-e4m3" || name == "fp8-e5m2") {
    s.kind = name == "fp8-e4m3" ? Kind::Fp8E4M3 : Kind::Fp8E5M2;
    s.bits = 8, s.granularity = Granularity::PerChannel;
  } else if (int b = 0, g = 0, used = 0; std::sscanf(name.c_str(), "int%d-g%d%n", &b, &g, &used) == 2 && b >= 2 &&
             b <= 8 && g >= 2 &&
             (name.c_str()[used] == 0 || std::string(name.c_str() + used) == "-asym" ||
              std::string(name.c_str() + used) == "-zp")) {
    // int<bits>-g<group>[-asym|-zp] (int4-g128, int4-g128-asym, int4-g128-zp, int3-g128, ...):
    // symmetric, asymmetric with torchao's float zero point (-asym) or asymmetric with an integer
    // zero point (-zp: AutoAWQ GEMM / GPTQ sym=false), per-group with fp16 scales.
    const std::string suffix = name.c_str() + used;
    s.bits = b, s.symmetric = suffix.empty(), s.granularity = Granularity::PerGroup, s.group_size = g;
    if (suffix == "-zp") s.rule = Rule::IntZeroPoint;
    s.scale_dtype = ScaleDType::F16;
  } else {
    std::string all;
    for (auto& n : preset_names()) all += (all.empty() ? "" : "|") + n;
    throw ConfigError({"unknown quantization preset '" + name + "'; expected one of " + all +
                       " or int<bits>-g<group>[-asym|-zp] (e.g. int4-g64, int4-g64-zp)"});
  }
  return s;
}

QuantSpec QuantSpec::from_config(cfg::Reader& r, bool activation) {
  QuantSpec s;
  std::string preset = r.str("preset", "");
  if (!preset.empty()) {
    try {
      s = preset_named(preset);
    } catch (const ConfigError& e) {
      r.fail("preset", e.problems[0]);
    }
    s.learn = r.choice<Learn>("learn", Learn::None, learn_names());
    if (s.is_ggml() && s.learn != Learn::None)
      r.fail("learn", "llama.cpp block presets compute their scales from the weights (so the exported file equals the "
                      "trained model); learned scales need an affine spec such as int4-g32");
    if (s.int_zero_point() && s.learn != Learn::None)
      r.fail("learn", "integer-zero-point presets (-zp) compute their scale and zero point from the weights (so the "
                      "exported AWQ/GPTQ file equals the trained model); learned scales need an affine spec such as "
                      "int4-g32 (lsq) or int4-g128-asym (lsq+)");
    r.finish();
    return s;
  }
  s.kind = r.choice<Kind>("kind", Kind::Int, kind_names());
  s.bits = static_cast<int>(r.i64("bits", 8, 2, 8));
  s.symmetric = r.boolean("symmetric", !activation);
  s.granularity = r.choice<Granularity>("granularity", activation ? Granularity::PerToken : Granularity::PerChannel,
                                        granularity_names());
  s.group_size = r.i64("group_size", s.granularity == Granularity::PerGroup ? 32 : 0, 0, 1 << 20);
  s.scale_dtype = r.choice<ScaleDType>("scale_dtype", ScaleDType::F32, scale_dtype_names());
  s.learn = r.choice<Learn>("learn", Learn::None, learn_names());
  s.rule = r.choice<Rule>("zero_point", Rule::Affine, zero_point_names());
  if (s.int_zero_point() && (s.kind != Kind::Int || s.symmetric || activation ||
                             (s.granularity != Granularity::PerGroup && s.granularity != Granularity::PerChannel)))
    r.fail("zero_point", "an integer zero point is for asymmetric (symmetric: false) integer weights, per-group or "
                         "per-channel (e.g. preset int4-g128-zp)");
  if (s.int_zero_point() && s.learn != Learn::None)
    r.fail("learn", "an integer zero point is computed from the weights; learned scales use zero_point: float");
  if (s.granularity == Granularity::PerGroup && s.group_size <= 0) r.fail("group_size", "per-group needs group_size > 0");
  if (s.granularity != Granularity::PerGroup && s.group_size != 0)
    r.fail("group_size", "only meaningful with granularity: per-group");
  if (s.kind != Kind::Int && s.bits != 8) r.fail("bits", "fp8 formats are 8 bits");
  if (s.kind != Kind::Int && s.learn != Learn::None) r.fail("learn", "learned scales are for integer formats");
  if (!activation && s.granularity == Granularity::PerToken)
    r.fail("granularity", "per-token is dynamic and applies to activations; weights use per-tensor|per-channel|per-group");
  if (s.learn == Learn::LsqPlus && s.symmetric) r.fail("learn", "lsq+ learns an offset; use symmetric: false");
  if (s.learn == Learn::Lsq && !s.symmetric) r.fail("learn", "lsq learns a scale only; use symmetric: true (or learn: lsq+)");
  s.dynamic = activation || s.learn == Learn::None;
  r.finish();
  return s;
}

YAML::Node QuantSpec::to_yaml() const {
  YAML::Node n;
  if (!preset.empty()) {
    n["preset"] = preset;
    if (learn != Learn::None) n["learn"] = cfg::name_of(learn_names(), learn);
    return n;
  }
  n["kind"] = cfg::name_of(kind_names(), kind);
  n["bits"] = bits;
  n["symmetric"] = symmetric;
  n["granularity"] = cfg::name_of(granularity_names(), granularity);
  n["group_size"] = group_size;
  n["scale_dtype"] = cfg::name_of(scale_dtype_names(), scale_dtype);
  n["learn"] = cfg::name_of(learn_names(), learn);
  if (int_zero_point()) n["zero_point"] = cfg::name_of(zero_point_names(), rule);
  return n;
}

std::vector<std::string> fitting_presets(const QuantSpec& spec, int64_t width) {
  std::vector<std::string> out;
  auto fits = [&](const std::string& name) {
    const auto b = QuantSpec::preset_named(name).block(width);
    return b > 0 && width % b == 0;
  };
  if (spec.is_ggml()) {
    for (const char* n : {"q8_0", "q6_k", "q5_k", "q5_0", "q5_1", "q4_k", "q4_0", "q4_1", "q3_k", "q2_k"})
      if (fits(n)) out.push_back(n);
    return out;
  }
  if (spec.kind == Kind::Int && spec.granularity == Granularity::PerGroup) {
    for (int64_t g = spec.group_size / 2; g >= 8; g /= 2) {
      const auto n = str("int", spec.bits, "-g", g, spec.symmetric ? "" : spec.int_zero_point() ? "-zp" : "-asym");
      if (fits(n)) out.push_back(n);
    }
  }
  if (spec.bits == 8) out.push_back("int8-per-channel");
  return out;
}

std::vector<bool> width_fallbacks(const std::vector<std::pair<std::string, int64_t>>& layers, const QuantSpec& spec,
                                  const std::string& quant_name, const std::string& fallback_name,
                                  const QuantSpec* fallback) {
  std::vector<bool> misfit(layers.size(), false);
  std::vector<std::string> problems;
  std::string without;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& [name, width] = layers[i];
    const int64_t blk = spec.block(width);
    if (blk <= 0 || width % blk == 0) continue;
    misfit[i] = true;
    if (fallback_name.empty()) {
      std::string fit;
      for (auto& p : fitting_presets(spec, width)) fit += (fit.empty() ? "" : ", ") + p;
      without += str(without.empty() ? "" : "; ", name, " (", width, " inputs", fit.empty() ? "" : ": " + fit + " fit", ")");
    } else if (fallback) {
      const int64_t fb = fallback->block(width);
      if (fb > 0 && width % fb != 0) {
        std::string fit;
        for (auto& p : fitting_presets(*fallback, width)) fit += (fit.empty() ? "" : ", ") + p;
        problems.push_back(str("--fallback ", fallback_name, ": its block of ", fb, " does not divide the ", width,
                               " inputs of ", name, " either", fit.empty() ? "" : " (" + fit + " would)"));
      }
    }
  }
  if (!without.empty())
    problems.insert(problems.begin(),
                    str("--quant ", quant_name, ": its block of ", spec.block(int64_t{1} << 40),
                        " does not divide the input width of ", without,
                        "; give --fallback FORMAT for these layers (e.g. one of the presets listed), as "
                        "llama-quantize falls back for widths its block does not divide"));
  if (!problems.empty()) throw ConfigError(problems);
  return misfit;
}

}  // namespace qf::quant
